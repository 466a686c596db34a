"""Samplers by the names users know them: diffusers' schedulers, their sigma schedules, and AUTOMATIC1111's names.

A request's `scheduler` is a sampler, optionally with a sigma schedule: `dpmpp_2m_karras`, or A1111's
`DPM++ 2M Karras` (case and spacing do not matter). Each sampler is one diffusers scheduler class (with a config
override where A1111's sampler is a variant, e.g. DPM++ 2M SDE), built from the model folder's scheduler config as
a diffusers user switches schedulers (`Class.from_config(pipe.scheduler.config, **overrides)`); the sigma
schedules are diffusers' own options (`use_karras_sigmas`, `use_exponential_sigmas`, `use_beta_sigmas`), offered
for the samplers whose class has them. Without a `scheduler` a request runs the folder's scheduler as configured,
as a diffusers pipeline does.

One choice of ours: DPM++ SDE's Brownian-tree noise is seeded with the request's seed (`noise_sampler_seed`);
left unset, diffusers draws that seed from torch's global generator, so the same request would give another image
each time.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Mapping


@dataclasses.dataclass(frozen=True)
class Sampler:
    name: str  # ours: what requests, the CLI and metrics say
    scheduler: str  # the diffusers class
    a1111: str  # AUTOMATIC1111's name for it
    overrides: tuple[tuple[str, object], ...] = ()
    sigma_schedules: bool = True  # whether the class offers diffusers' sigma schedules (tested against diffusers)


SAMPLERS = (
    Sampler("ddim", "DDIMScheduler", "DDIM", sigma_schedules=False),
    Sampler("pndm", "PNDMScheduler", "PLMS", sigma_schedules=False),
    Sampler("euler", "EulerDiscreteScheduler", "Euler"),
    Sampler("euler_a", "EulerAncestralDiscreteScheduler", "Euler a", sigma_schedules=False),
    Sampler("heun", "HeunDiscreteScheduler", "Heun"),
    Sampler("lms", "LMSDiscreteScheduler", "LMS"),
    Sampler("dpm2", "KDPM2DiscreteScheduler", "DPM2"),
    Sampler("dpm2_a", "KDPM2AncestralDiscreteScheduler", "DPM2 a"),
    Sampler("dpmpp_2m", "DPMSolverMultistepScheduler", "DPM++ 2M"),
    Sampler("dpmpp_2m_sde", "DPMSolverMultistepScheduler", "DPM++ 2M SDE", (("algorithm_type", "sde-dpmsolver++"),)),
    Sampler("dpmpp_sde", "DPMSolverSDEScheduler", "DPM++ SDE"),
    Sampler("unipc", "UniPCMultistepScheduler", "UniPC"),
    Sampler("lcm", "LCMScheduler", "LCM", sigma_schedules=False),
)
# Sigma schedule -> the diffusers config flag that selects it.
SIGMA_SCHEDULES = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}


@dataclasses.dataclass(frozen=True)
class SchedulerChoice:
    sampler: Sampler
    sigmas: str = ""  # "" (the sampler's own) or a key of SIGMA_SCHEDULES

    @property
    def name(self) -> str:
        return f"{self.sampler.name}_{self.sigmas}" if self.sigmas else self.sampler.name

    @property
    def a1111(self) -> str:
        return f"{self.sampler.a1111} {self.sigmas.capitalize()}" if self.sigmas else self.sampler.a1111


@functools.cache
def choices() -> dict[str, SchedulerChoice]:
    """Every sampler with every sigma schedule its class offers, by our name and by A1111's (normalised)."""
    found = [SchedulerChoice(sampler) for sampler in SAMPLERS]
    found += [SchedulerChoice(sampler, sigmas) for sampler in SAMPLERS if sampler.sigma_schedules
              for sigmas in SIGMA_SCHEDULES]
    return {_normal(key): choice for choice in found for key in (choice.name, choice.a1111)}


def _normal(name: str) -> str:
    return " ".join(name.lower().split())


SCHEDULER_NAMES = tuple(dict.fromkeys(choice.name for choice in choices().values()))


def find_scheduler(name: str) -> SchedulerChoice | None:
    """The sampler and sigma schedule a name means (ours or A1111's), or None."""
    return choices().get(_normal(name))


def make_scheduler(name: str | None, model_config: Mapping, seed: int):
    """A fresh scheduler for one request: the named one (already validated) built from the model folder's scheduler
    config, or (None) the folder's own."""
    import diffusers  # here, not at the top: request validation reads this module's names without torch

    if name is None:
        scheduler, overrides = getattr(diffusers, model_config["_class_name"]), {}
    else:
        choice = find_scheduler(name)
        scheduler, overrides = getattr(diffusers, choice.sampler.scheduler), dict(choice.sampler.overrides)
        if choice.sigmas:
            overrides[SIGMA_SCHEDULES[choice.sigmas]] = True
    accepted = inspect.signature(scheduler.__init__).parameters
    if "noise_sampler_seed" in accepted:
        overrides["noise_sampler_seed"] = seed
    # Only what this class takes: diffusers would log each other entry of the folder's config as ignored, per
    # request (PNDM's `skip_prk_steps` for an LCM request).
    config = {key: value for key, value in model_config.items() if key in accepted or key.startswith("_")}
    return scheduler.from_config(config, **overrides)


def step_kwargs(scheduler, generator) -> dict:
    """What diffusers' pipelines pass to `step` besides the model output (their `prepare_extra_step_kwargs`)."""
    accepted = inspect.signature(scheduler.step).parameters
    return {key: value for key, value in (("generator", generator), ("eta", 0.0)) if key in accepted}

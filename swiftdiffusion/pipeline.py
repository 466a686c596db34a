"""The text-to-image pipeline over engines: encode, denoise (ControlNets, LoRAs), decode, for both families.

It follows diffusers' `StableDiffusion(XL)(ControlNet)Pipeline` step for step (same tokenisation and text
conditioning (`conditioning.py`), CFG batch order [unconditional, conditional], noise drawn from a CPU generator
seeded per request, scheduler calls, residual scaling and summing), so the same weights, seed and scheduler give
diffusers' image. The model's family (`family.py`) decides what the UNet and ControlNets are conditioned on.

What it does differently is where the time goes:
- ControlNets are submitted before the UNet encoder runs and awaited only before the decoder, so a runner that
  computes elsewhere (Triton BLS to other instances) overlaps them with the encoder.
- LoRAs are merged into the weights in place, never wrapped. In `bounded` mode the request starts denoising at
  once, the LoRAs load in the background and are patched in at the first step boundary where they are ready,
  at step `deadline` at the latest (early steps set layout, LoRAs matter later). Text-encoder LoRA layers are
  applied by re-encoding the prompt at that same boundary (encoding is one short call). `sync` mode patches
  before encoding: diffusers' `load_lora_weights` + `fuse_lora` image exactly.
- Weights stay patched after a request; the next request with the same LoRA set skips both restore and patch.

A step is one of the request's `steps`, counted as diffusers' progress bar counts them: second-order samplers
(Heun, DPM2, DPM++ SDE) evaluate the UNet twice in most steps, PNDM's PLMS twice in its first. LoRAs are patched in
only between steps, never between a step's two evaluations, and progress is reported once per step.

Everything per request (timesteps, conditioning, control images, scheduler kwargs) is prepared before the loop;
the loop itself only runs engines and the scheduler.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import math
import threading
import time
from typing import Awaitable, Callable

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from .conditioning import Prompts, TextConditioner, check_request, time_ids
from .controlnets import ControlNetRunner
from .cuda_graphs import GraphedControlNetCatalog, GraphedEngine
from .graphs import WEIGHT_COMPONENTS, residual_names
from .lora_store import LoraSet, LoraStore, lora_key
from .models import LoadedModel
from .request import (GenerationRequest, Limits, RequestError, StopCondition, stop_condition, validate,
                      with_defaults)
from .schedulers import make_scheduler, step_kwargs

StepCallback = Callable[[int, int, float], None]  # (steps done, total steps, seconds since the request began)
Conditioning = dict[str, torch.Tensor]  # encoder_hidden_states and the family's added conditioning, by input name


@dataclasses.dataclass
class LoraTimings:
    """Where a request's LoRA time went (for metrics and benchmarks)."""

    load_s: float = 0.0  # fetch + decode, in the background in bounded mode
    patch_s: float = 0.0
    restore_s: float = 0.0
    bytes_read: int = 0
    cache_hits: int = 0  # LoRAs served decoded from the host cache
    reused: bool = False  # the set was already patched in by the previous request


@dataclasses.dataclass
class DenoiseResult:
    latents: torch.Tensor
    # Step index before which the request's LoRAs were patched in; -1 without LoRAs.
    lora_step: int = -1
    lora_wait_s: float = 0.0
    timings: LoraTimings = dataclasses.field(default_factory=LoraTimings)


@dataclasses.dataclass
class GenerationResult:
    image: np.ndarray  # uint8 [height, width, 3]
    lora_step: int = -1
    lora_wait_s: float = 0.0
    timings: LoraTimings = dataclasses.field(default_factory=LoraTimings)


class Pipeline:
    """One loaded model serving requests one at a time (the Triton instance's execution model)."""

    def __init__(self, model: LoadedModel, controlnets: ControlNetRunner | None = None,
                 loras: LoraStore | None = None, limits: Limits = Limits(), lora_deadline_fraction: float = 0.2,
                 cfg_model: LoadedModel | None = None):
        """`cfg_model`: a second copy of the UNet engines, normally on a second device, that runs the
        unconditional branch of `cfg_parallel` requests; without it both branches share `model`'s engines."""
        self.model = model
        self.engines = model.engines
        self.cfg_model = cfg_model
        self.controlnets = controlnets
        self.loras = loras
        self.limits = limits
        self.lora_deadline_fraction = lora_deadline_fraction
        self.text = TextConditioner(model) if model.family.text_components[0] in model.engines else None
        self.lock = threading.Lock()
        self.applied_key: tuple | None = None  # LoRA set now merged into the weights
        self.applied_text_lora = False
        # The engines each LoRA component patches: the UNet's three graphs share one set of weights (repeats are
        # no-ops), a `cfg_model` copy has its own.
        self.patched = {component: [engine for name, engine in self.engines.items()
                                    if WEIGHT_COMPONENTS.get(name) == component]
                        for component in model.family.lora_components}
        self.copies = [] if cfg_model is None else [e for name, e in cfg_model.engines.items()
                                                     if WEIGHT_COMPONENTS.get(name) == "unet"]

    # ---- request checks -------------------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> GenerationRequest:
        """The request with the model's defaults filled in; RequestError for any invalid field, add-on names
        included, before any work starts."""
        request = with_defaults(request, self.model.defaults)
        validate(request, self.limits)
        check_request(request, self.model.family, self.model.text_layers)
        scheduled(request, self.model.scheduler_config)
        if request.loras and self.loras is None:
            raise ValueError("this pipeline has no LoRA catalog")
        for control in request.controlnets:
            if self.controlnets is None:
                raise ValueError("this pipeline has no ControlNet catalog")
            self.controlnets.check(control.name)
        return request

    # ---- conditioning ---------------------------------------------------------------------------------------
    def encode(self, request: GenerationRequest) -> Conditioning:
        """The text encoders' outputs, rows [negative, positive] when guidance applies, with the text encoders as
        they are now (LoRA patches included)."""
        return self.text([Prompts.of(request)], uses_guidance(with_defaults(request, self.model.defaults)))

    def conditioning(self, request: GenerationRequest, encoded: Conditioning) -> Conditioning:
        """The text encoders' outputs and the family's other added conditioning, on the UNet's device and dtype."""
        tensors = {name: tensor.to(self.model.device, self.model.dtype) for name, tensor in encoded.items()}
        if "time_ids" in self.model.family.added_conditioning:
            rows = tensors["encoder_hidden_states"].shape[0]
            tensors["time_ids"] = time_ids(request, rows, self.model.device, self.model.dtype)
        return tensors

    # ---- denoising -----------------------------------------------------------------------------------------
    async def denoise(self, request: GenerationRequest, encoded: Conditioning | None = None,
                      on_step: StepCallback | None = None, exact_lora_step: int | None = None,
                      stop: StopCondition | None = None) -> DenoiseResult:
        """Runs the scheduler loop. `encoded` are the text encoders' outputs from an outside text encoder (rows
        [negative, positive] under guidance; None: encode here).

        `exact_lora_step` patches the LoRAs exactly before that step (reference runs for tests). `stop` is checked
        before the request starts and at every step boundary (default: the request's own time budget); when it
        fires, RequestStopped is raised with no further engine work, ControlNet calls still in flight collected,
        and the weights as consistent as after any request (patched with `applied_key`'s set, or pristine).
        """
        begin = time.perf_counter()
        request = with_defaults(request, self.model.defaults)
        stop = stop or stop_condition(request, self.limits)
        stop.check(0, request.steps)
        model = self.model
        guided = uses_guidance(request)
        parallel = guided and request.cfg_parallel
        if parallel:
            self._check_parallel()
        timings = LoraTimings()
        lora_job, lora_step = self._start_loras(request, exact_lora_step, timings)
        if lora_step == 0 and self.applied_text_lora:
            encoded = None  # the outside encoder ran without the text-encoder LoRA layers
        conditioning = self.conditioning(request, encoded if encoded is not None else self.encode(request))

        scheduler = scheduled(request, model.scheduler_config)
        timesteps = scheduler.timesteps
        steps, step_of, ends_step = request.steps, *step_plan(len(timesteps), request.steps, scheduler.order)
        deadline = min(self._deadline(request, steps) if exact_lora_step is None else exact_lora_step, steps - 1)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        shape = (1, model.latent_channels, request.height // model.vae_scale_factor,
                 request.width // model.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)
        latents = latents * scheduler.init_noise_sigma
        extra = step_kwargs(scheduler, generator)
        # One branch for the batch [unconditional, conditional]; with `cfg_parallel` one per half, on its own worker
        # (the unconditional half on `cfg_model` when there is one).
        branch_models = ((self.cfg_model or model), model) if parallel else (model,)
        controls = [(c.name, self._control_image(c.image, guided and not parallel), c.scale)
                    for c in request.controlnets]
        branches = [_Branch(self.controlnets, branch, controls, request.controlnet_mode, len(timesteps))
                    for branch in branch_models]
        halves = _halves(conditioning) if parallel else []
        engine_timesteps = timesteps.to(model.device, torch.float32).reshape(-1, 1)
        wait_s = 0.0
        try:
            for index, t in enumerate(timesteps):
                step, starts_step = step_of[index], index == 0 or ends_step[index - 1]
                if starts_step:
                    stop.check(step, steps)
                if lora_job is not None and starts_step and (
                        step >= deadline or (exact_lora_step is None and lora_job.done())):
                    waited = time.perf_counter()
                    lora_set = await asyncio.wrap_future(lora_job)
                    wait_s = time.perf_counter() - waited
                    self._apply(lora_set, timings)
                    if self.applied_text_lora:
                        conditioning = self.conditioning(request, self.encode(request))
                        halves = _halves(conditioning) if parallel else []
                    lora_job, lora_step = None, step
                if parallel:
                    sample, timestep = scheduler.scale_model_input(latents, t), engine_timesteps[index]
                    uncond, cond = await asyncio.gather(*(
                        worker.run(branch.noise({"sample": sample, "timestep": timestep, **half}, index))
                        for worker, branch, half in zip(self._cfg_workers, branches, halves)))
                    uncond = uncond.to(model.device)
                else:
                    model_input = torch.cat([latents] * 2) if guided else latents
                    model_input = scheduler.scale_model_input(model_input, t)
                    noise = await branches[0].noise({"sample": model_input, "timestep": engine_timesteps[index],
                                                     **conditioning}, index)
                    uncond, cond = noise.chunk(2) if guided else (None, noise)
                noise = uncond + request.guidance_scale * (cond - uncond) if guided else cond
                latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
                if on_step is not None and ends_step[index]:
                    on_step(step + 1, steps, time.perf_counter() - begin)
        except Exception:
            # A stopped or failed request still collects the ControlNet calls it sent: an uncollected BLS response
            # keeps its model's instance from ever unloading.
            await self._drain(branches, parallel)
            raise
        return DenoiseResult(latents, lora_step, wait_s, timings)

    async def _drain(self, branches: list[_Branch], parallel: bool) -> None:
        """Collects the ControlNet calls a stopped or failed request still has in flight (each on its branch's
        loop)."""
        if parallel:
            await asyncio.gather(*(worker.run(branch.drain()) for worker, branch in zip(self._cfg_workers, branches)))
        else:
            await branches[0].drain()

    @functools.cached_property
    def _cfg_workers(self) -> tuple[_Worker, _Worker]:
        """The unconditional and the conditional branch's workers, created on the first `cfg_parallel` request."""
        return _Worker((self.cfg_model or self.model).device), _Worker(self.model.device)

    def _check_parallel(self) -> None:
        """Concurrent branches must not share a CUDA graph's static buffers: neither the UNet's (unless the
        unconditional branch has a copy of its own) nor a local ControlNet's."""
        catalog = getattr(self.controlnets, "catalog", None)
        shared_unet = self.cfg_model is None and any(
            isinstance(engine, GraphedEngine) and engine.enabled for engine in self.engines.values())
        if shared_unet or (isinstance(catalog, GraphedControlNetCatalog) and torch.device(catalog.device).type == "cuda"):
            raise RequestError("cfg_parallel", "not available here: the branches would share CUDA graphs' static "
                                               "buffers (a UNet copy for the second branch, cfg_device, allows it "
                                               "with a ControlNet model of its own)")

    def _start_loras(self, request: GenerationRequest, exact_lora_step: int | None, timings: LoraTimings):
        """(pending load or None, step the LoRAs were applied at: 0 when already in place, else -1)."""
        if request.loras and lora_key(request.loras) == self.applied_key and exact_lora_step is None:
            timings.reused = True
            return None, 0
        self._apply(None, timings)
        if not request.loras:
            return None, -1
        if request.lora_mode == "sync" and exact_lora_step is None:
            self._apply(self.loras.load(request.loras), timings)
            return None, 0
        return self.loras.load_async(request.loras), -1

    def _deadline(self, request: GenerationRequest, steps: int) -> int:
        if request.lora_deadline is not None:
            return request.lora_deadline
        return math.ceil(self.lora_deadline_fraction * steps)

    def _apply(self, lora_set: LoraSet | None, timings: LoraTimings) -> None:
        """Patches (or, with None, restores) every engine whose weights LoRAs touch.

        The three UNet engines share one set of torch weights (repeats are no-ops); TensorRT engines each refit.
        A `cfg_model` copy gets the UNet's patch, its factors moved to its device.
        """
        begin = time.perf_counter()
        self.applied_key, self.applied_text_lora = None, False
        if lora_set is None:
            for engine in (*self.copies, *(e for engines in self.patched.values() for e in engines)):
                engine.restore()
            timings.restore_s += time.perf_counter() - begin
            return
        for component, engines in self.patched.items():
            for engine in engines:
                engine.patch(lora_set.patches[component])
        if self.copies:
            patch = lora_set.patches["unet"].to(self.cfg_model.device)
            for engine in self.copies:
                engine.patch(patch)
        self.applied_key = lora_set.key
        self.applied_text_lora = any(lora_set.patches[c].layers for c in self.model.family.text_components)
        timings.patch_s += time.perf_counter() - begin
        timings.load_s += lora_set.load_s
        timings.bytes_read += lora_set.bytes_read
        timings.cache_hits += lora_set.cache_hits

    def _control_image(self, image: np.ndarray, guided: bool) -> torch.Tensor:
        # As diffusers' control image processor: float32 in [0, 1], NCHW, then the engine's dtype.
        tensor = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        tensor = tensor.to(self.model.device, self.model.dtype)
        return torch.cat([tensor] * 2) if guided else tensor

    # ---- decoding ------------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        image = self.engines["vae_decoder"]({"latent": latents})["image"]
        return to_uint8(image)[0]

    # ---- all together --------------------------------------------------------------------------------------
    async def generate_async(self, request: GenerationRequest, on_step: StepCallback | None = None,
                             exact_lora_step: int | None = None, stop: StopCondition | None = None) -> GenerationResult:
        request = self.check(request)
        result = await self.denoise(request, None, on_step, exact_lora_step, stop)
        return GenerationResult(self.decode(result.latents), result.lora_step, result.lora_wait_s, result.timings)

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None,
                 exact_lora_step: int | None = None, stop: StopCondition | None = None) -> GenerationResult:
        with self.lock:
            return asyncio.run(self.generate_async(request, on_step, exact_lora_step, stop))


class _Branch:
    """The UNet work of one denoising branch per step, its ControlNets in the request's mode.

    A branch is the CFG batch [unconditional, conditional], or one half of it with `cfg_parallel`; it keeps the
    asynchronous mode's residuals across steps, so each half has its own. Its UNet engines may be a copy on
    another device: ControlNets take the step's inputs where the pipeline has them, the UNet on its own device.
    """

    def __init__(self, controlnets: ControlNetRunner | None, model: LoadedModel, controls: list, mode: str,
                 steps: int):
        self.controlnets = controlnets
        self.engines = model.engines
        self.device = model.device
        self.residual_names = residual_names(self.engines["unet_decoder"].spec)
        self.controls = controls
        self.mode = mode
        self.last = steps - 1
        self.held = self.waiting = None  # async mode: residuals in use, work submitted one step ago
        self.in_flight: list = []  # ControlNet futures sent and not yet collected

    async def noise(self, inputs: dict, index: int) -> torch.Tensor:
        submitted = summed = None
        if self.controls and self.mode == "overlap":
            submitted = self._submit(inputs)  # awaited once the encoder is launched
        elif self.controls and self.mode == "sequential":
            summed = await self._summed(self._submit(inputs))
        elif self.controls:  # async: step t uses the residuals of step t-1's latent (step 0 its own)
            if index == 0:
                self.held = await self._summed(self._submit(inputs))
            elif self.waiting is not None:
                self.held = await self._summed(self.waiting)
            self.waiting = self._submit(inputs) if 0 < index < self.last else None
            summed = self.held
        unet_inputs = {name: tensor.to(self.device) for name, tensor in inputs.items()}
        return await self._unet_step(unet_inputs, submitted, summed)

    async def drain(self) -> None:
        """Awaits and drops every ControlNet call sent and not yet collected: the next step's in asynchronous mode,
        and the rest of a step's when one of its calls failed."""
        pending, self.in_flight, self.waiting = self.in_flight, [], None
        for future in pending:
            with contextlib.suppress(Exception):
                await future

    def _submit(self, inputs: dict) -> list:
        """Starts every ControlNet of the request on this step's inputs."""
        submitted = [(self.controlnets.submit(name, {**inputs, "controlnet_cond": image}), scale)
                     for name, image, scale in self.controls]
        self.in_flight += [future for future, _ in submitted]
        return submitted

    async def _summed(self, submitted: list) -> list[torch.Tensor]:
        """Awaits submitted ControlNets; their residuals scaled and summed in request order, as MultiControlNet."""
        total = None
        for future, scale in submitted:
            self.in_flight = [f for f in self.in_flight if f is not future]
            residuals = await future
            scaled = torch._foreach_mul([residuals[name].to(self.device) for name in self.residual_names], scale)
            total = scaled if total is None else torch._foreach_add(total, scaled)
        return total

    async def _unet_step(self, inputs: dict, submitted: list | None, summed: list | None) -> torch.Tensor:
        """Noise prediction: the full UNet without ControlNets; else encoder, residuals added, decoder.

        `submitted` ControlNets are awaited only after the encoder has been launched, so they overlap it;
        `summed` residuals are already at hand (sequential and asynchronous modes).
        """
        if submitted is None and summed is None:
            return self.engines["unet"](inputs)["noise_pred"]
        hidden = self.engines["unet_encoder"](inputs)
        if summed is None:
            summed = await self._summed(submitted)
        names = self.residual_names
        decoder_inputs = dict(zip(names, torch._foreach_add([hidden[name] for name in names], summed)))
        decoder_inputs["emb"] = hidden["emb"]
        decoder_inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"]
        return self.engines["unet_decoder"](decoder_inputs)["noise_pred"]


class _Worker:
    """A thread with its own event loop (and CUDA stream on a GPU) that runs one CFG branch's steps.

    Torch releases the GIL inside ops, so two workers run the two halves' engines at the same time. A branch
    always runs on the same worker: its ControlNet futures belong to the event loop that created them. On a CPU
    each worker takes half of the caller's intra-op threads (OpenMP thread counts are per thread), so the two
    halves share the cores instead of oversubscribing them.
    """

    def __init__(self, device: torch.device):
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cfg-branch",
                                                              initializer=torch.set_num_threads,
                                                              initargs=(max(1, torch.get_num_threads() // 2),))
        self.loop = asyncio.new_event_loop()
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def run(self, step: Awaitable[torch.Tensor]) -> asyncio.Future:
        main = None if self.stream is None else torch.cuda.current_stream(self.stream.device)
        return asyncio.wrap_future(self.executor.submit(self._run, step, main))

    def _run(self, step: Awaitable[torch.Tensor], main: torch.cuda.Stream | None) -> torch.Tensor:
        if self.stream is None:
            return self.loop.run_until_complete(step)
        self.stream.wait_stream(main)  # this step's inputs were written on the caller's stream
        with torch.cuda.stream(self.stream):
            noise = self.loop.run_until_complete(step)
        main.wait_stream(self.stream)  # the caller reads the noise on its stream
        return noise


def scheduled(request: GenerationRequest, scheduler_config: dict):
    """The request's scheduler with its timesteps set; RequestError naming `steps` for a count the scheduler cannot
    take (LCM: at most the 50 steps it was distilled from)."""
    scheduler = make_scheduler(request.scheduler, scheduler_config, request.seed)
    try:
        # Timesteps stay on the host: the schedulers index their tables with them, which would sync a GPU.
        scheduler.set_timesteps(request.steps, device="cpu")
    except ValueError as error:
        raise RequestError("steps", f"{request.steps} steps do not suit scheduler "
                                    f"{request.scheduler or scheduler_config['_class_name']}: {error}") from None
    return scheduler


def step_plan(evaluations: int, steps: int, order: int) -> tuple[list[int], list[bool]]:
    """For each UNet evaluation of a scheduler's loop: the step it belongs to, and whether it ends its step, as
    diffusers' pipelines count steps for their progress bar (`num_warmup_steps`, `scheduler.order`)."""
    warmup = evaluations - steps * order
    ends = [i == evaluations - 1 or (i + 1 > warmup and (i + 1) % order == 0) for i in range(evaluations)]
    return list(itertools.accumulate(ends, initial=0))[:-1], ends


def _halves(conditioning: Conditioning) -> list[Conditioning]:
    """The unconditional and the conditional row of each conditioning tensor (the `cfg_parallel` branches')."""
    return [{name: tensor[i:i + 1] for name, tensor in conditioning.items()} for i in range(2)]


def uses_guidance(request: GenerationRequest) -> bool:
    return request.guidance_scale > 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW images to uint8 NHWC, rounded as diffusers' `numpy_to_pil`."""
    images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return (images * 255).round().astype(np.uint8)


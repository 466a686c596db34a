"""The text-to-image pipeline over engines: encode, denoise (ControlNets, LoRAs), decode.

It follows diffusers' `StableDiffusionControlNetPipeline` step for step (same tokenisation, CFG batch order
[unconditional, conditional], noise drawn from a CPU generator seeded per request, scheduler calls, residual
scaling and summing), so the same weights, seed and scheduler give diffusers' image.

What it does differently is where the time goes:
- ControlNets are submitted before the UNet encoder runs and awaited only before the decoder, so a runner that
  computes elsewhere (Triton BLS to other instances) overlaps them with the encoder.
- LoRAs are merged into the weights in place, never wrapped. In `bounded` mode the request starts denoising at
  once, the LoRAs load in the background and are patched in at the first step boundary where they are ready,
  at step `deadline` at the latest (early steps set layout, LoRAs matter later). Text-encoder LoRA layers are
  applied by re-encoding the prompt at that same boundary (encoding is one short call). `sync` mode patches
  before encoding: diffusers' `load_lora_weights` + `fuse_lora` image exactly.
- Weights stay patched after a request; the next request with the same LoRA set skips both restore and patch.

Everything per request (timesteps, control images, scheduler kwargs) is prepared before the loop; the loop
itself only runs engines and the scheduler.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import inspect
import math
import threading
import time
from typing import Awaitable, Callable

import numpy as np
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)
from diffusers.utils.torch_utils import randn_tensor

from .controlnets import ControlNetRunner
from .cuda_graphs import GraphedControlNetCatalog, GraphedEngine
from .graphs import residual_names
from .lora_store import LoraSet, LoraStore, lora_key
from .models import LoadedModel
from .request import GenerationRequest, Limits, RequestError, StopCondition, stop_condition, validate

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}

UNET_ENGINES = ("unet", "unet_encoder", "unet_decoder")
StepCallback = Callable[[int, int, float], None]  # (steps done, total steps, seconds since the request began)


def make_scheduler(name: str, base_config: dict):
    return SCHEDULERS[name].from_config(base_config)


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
        self.lock = threading.Lock()
        self.applied_key: tuple | None = None  # LoRA set now merged into the weights
        self.applied_text_lora = False
        self.step_kwargs = {name: _step_parameters(cls) for name, cls in SCHEDULERS.items()}

    # ---- request checks -------------------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> None:
        """RequestError for any invalid field, add-on names included, before any work starts."""
        validate(request, self.limits)
        if request.loras and self.loras is None:
            raise ValueError("this pipeline has no LoRA catalog")
        for control in request.controlnets:
            if self.controlnets is None:
                raise ValueError("this pipeline has no ControlNet catalog")
            self.controlnets.check(control.name)

    # ---- text ----------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        tokenizer = self.model.tokenizer
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return ids.to(self.model.device)

    def encode(self, request: GenerationRequest) -> torch.Tensor:
        """Prompt embeddings, [negative, positive] when guidance applies, with the text encoder as it is now."""
        texts = [request.negative_prompt, request.prompt] if uses_guidance(request) else [request.prompt]
        return self.engines["text_encoder"]({"input_ids": self.tokenize(texts)})["text_embeddings"]

    # ---- denoising -----------------------------------------------------------------------------------------
    async def denoise(self, request: GenerationRequest, embeddings: torch.Tensor | None = None,
                      on_step: StepCallback | None = None, exact_lora_step: int | None = None,
                      stop: StopCondition | None = None) -> DenoiseResult:
        """Runs the scheduler loop. `embeddings` come from an outside text encoder (None: encode here).

        `exact_lora_step` patches the LoRAs exactly before that step (reference runs for tests). `stop` is checked
        before the request starts and at every step boundary (default: the request's own time budget); when it
        fires, RequestStopped is raised with no further engine work, ControlNet calls still in flight collected,
        and the weights as consistent as after any request (patched with `applied_key`'s set, or pristine).
        """
        begin = time.perf_counter()
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
            embeddings = None  # the outside encoder ran without the text-encoder LoRA layers
        if embeddings is None:
            embeddings = self.encode(request)
        deadline = min(self._deadline(request) if exact_lora_step is None else exact_lora_step, request.steps - 1)

        scheduler = make_scheduler(request.scheduler, model.scheduler_config)
        # Timesteps stay on the host: the schedulers index their tables with them, which would sync a GPU.
        scheduler.set_timesteps(request.steps, device="cpu")
        generator = torch.Generator("cpu").manual_seed(request.seed)
        shape = (1, model.latent_channels, request.height // model.vae_scale_factor,
                 request.width // model.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = {"generator": generator, "eta": 0.0}
        step_kwargs = {k: v for k, v in step_kwargs.items() if k in self.step_kwargs[request.scheduler]}
        # One branch for the batch [unconditional, conditional]; with `cfg_parallel` one per half, on its own worker
        # (the unconditional half on `cfg_model` when there is one).
        branch_models = ((self.cfg_model or model), model) if parallel else (model,)
        controls = [(c.name, self._control_image(c.image, guided and not parallel), c.scale)
                    for c in request.controlnets]
        branches = [_Branch(self.controlnets, branch, controls, request.controlnet_mode, request.steps)
                    for branch in branch_models]
        timesteps, wait_s = scheduler.timesteps, 0.0
        engine_timesteps = timesteps.to(model.device, torch.float32).reshape(-1, 1)
        try:
            for index, t in enumerate(timesteps):
                stop.check(index, len(timesteps))
                if lora_job is not None and (index >= deadline or (exact_lora_step is None and lora_job.done())):
                    waited = time.perf_counter()
                    lora_set = await asyncio.wrap_future(lora_job)
                    wait_s = time.perf_counter() - waited
                    self._apply(lora_set, timings)
                    if self.applied_text_lora:
                        embeddings = self.encode(request)
                    lora_job, lora_step = None, index
                if parallel:
                    sample, timestep = scheduler.scale_model_input(latents, t), engine_timesteps[index]
                    uncond, cond = await asyncio.gather(*(
                        worker.run(branch.noise({"sample": sample, "timestep": timestep,
                                                 "encoder_hidden_states": embeddings[i:i + 1]}, index))
                        for i, (worker, branch) in enumerate(zip(self._cfg_workers, branches))))
                    uncond = uncond.to(model.device)
                else:
                    model_input = torch.cat([latents] * 2) if guided else latents
                    model_input = scheduler.scale_model_input(model_input, t)
                    noise = await branches[0].noise({"sample": model_input, "timestep": engine_timesteps[index],
                                                     "encoder_hidden_states": embeddings}, index)
                    uncond, cond = noise.chunk(2) if guided else (None, noise)
                noise = uncond + request.guidance_scale * (cond - uncond) if guided else cond
                latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
                if on_step is not None:
                    on_step(index + 1, len(timesteps), time.perf_counter() - begin)
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

    def _deadline(self, request: GenerationRequest) -> int:
        if request.lora_deadline is not None:
            return request.lora_deadline
        return math.ceil(self.lora_deadline_fraction * request.steps)

    def _apply(self, lora_set: LoraSet | None, timings: LoraTimings) -> None:
        """Patches (or, with None, restores) every engine whose weights LoRAs touch.

        The three UNet engines share one set of torch weights (repeats are no-ops); TensorRT engines each refit.
        A `cfg_model` copy gets the same patch, its factors moved to its device.
        """
        begin = time.perf_counter()
        self.applied_key, self.applied_text_lora = None, False
        unets = [self.engines[name] for name in UNET_ENGINES]
        copies = [] if self.cfg_model is None else [self.cfg_model.engines[name] for name in UNET_ENGINES]
        if lora_set is None:
            for engine in (*unets, *copies, self.engines["text_encoder"]):
                engine.restore()
            timings.restore_s += time.perf_counter() - begin
            return
        for engine in unets:
            engine.patch(lora_set.unet)
        if copies:
            patch = lora_set.unet.to(self.cfg_model.device)
            for engine in copies:
                engine.patch(patch)
        self.engines["text_encoder"].patch(lora_set.text_encoder)
        self.applied_key, self.applied_text_lora = lora_set.key, bool(lora_set.text_encoder.layers)
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
        self.check(request)
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


def uses_guidance(request: GenerationRequest) -> bool:
    return request.guidance_scale > 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW images to uint8 NHWC, rounded as diffusers' `numpy_to_pil`."""
    images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return (images * 255).round().astype(np.uint8)


def _step_parameters(scheduler_class) -> set[str]:
    return set(inspect.signature(scheduler_class.step).parameters)

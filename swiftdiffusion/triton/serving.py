"""The Triton Python-backend models, as classes over the package.

Each `model_repository/<model>/1/model.py` only binds one of these classes to `triton_python_backend_utils`
(`pb`), so the logic here is importable and unit-testable with a stand-in for `pb`. The request path:

    text_to_image (ensemble)
      text_encoder   prompts -> the family's text encoders' outputs (dynamic batching across requests)
      denoiser       scheduler loop, UNet, LoRA patching  (ControlNets through async BLS ->)
        controlnet   any catalog ControlNet by name, LRU-resident, instances on their own devices
                     (or, with the `local` placement, no such model: the denoiser runs ControlNets on its own
                     devices, `DeviceControlNets`)
      vae_decoder    latents -> uint8 image               (dynamic batching across requests)
    text_to_image_stream (decoupled): the same steps in one model, a response per step, then the image.
Every model reads the model folder's family (`family.py`): what the text encoder returns, what the denoiser and the
ControlNets are conditioned on.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from ..conditioning import Prompts, TextConditioner, check_clip_skip
from ..controlnets import ControlNetCatalog, ControlNetRunner, DeviceControlNets, controlnet_folder
from ..cuda_graphs import GraphedControlNetCatalog, graph_engines
from ..family import FAMILIES, ModelFamily
from ..graphs import residual_names, unet_inputs
from ..lora_store import LoraStore
from ..models import LoadedModel, load_model
from ..pipeline import DenoiseResult, Pipeline, to_uint8, uses_guidance
from ..request import Limits, RequestError, RequestStopped, stop_condition
from ..schema import IMAGE_OUTPUT, LORA_STEP_OUTPUT, REQUEST_INPUTS, request_from_tensors
from .metrics import LoraMetrics, RequestMetrics

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- shared plumbing ------------------------------------------------------------------------------------------
def ready(model: str, what: str) -> None:
    """The one line a model instance writes to the server's log: ready, where, with what."""
    print(f"swiftdiffusion: {model} ready {what}", flush=True)


# How tensors cross between model processes (Deployment.residual_transport; README "Triton on GPUs"): "host" as numpy
# through the Python backend's shared memory; "dlpack" as torch tensors where they lie (GPU tensors by CUDA IPC).
TRANSPORTS = ("host", "dlpack")


def pb_tensor(pb, name: str, value: np.ndarray | torch.Tensor, transport: str = "host"):
    """A Python-backend tensor of `value`: a torch tensor by DLPack where the transport is "dlpack", else a copy in
    host memory (numpy; strings always).

    Triton 2.51 refuses DLPack tensors that are not C-contiguous, and graph engines run channels-last, so their
    outputs are made contiguous (a copy where they are not). The tensor is handed over, not copied: it must not
    change before the receiver has it, which is why GraphedControlNetCatalog returns copies of a graph's outputs
    (static buffers that the next replay overwrites); and the caller must let its CUDA stream finish writing it
    (`settle`).
    """
    if isinstance(value, torch.Tensor):
        if transport == "dlpack":
            return pb.Tensor.from_dlpack(name, value.detach().contiguous())
        value = value.detach().cpu().numpy()
    return pb.Tensor(name, np.ascontiguousarray(value))


def torch_tensor(tensor, transport: str = "host") -> torch.Tensor:
    """A Python-backend tensor as torch: by DLPack where it lies (GPU or host memory; `as_numpy` refuses GPU
    tensors), or through numpy."""
    if transport == "dlpack":
        return torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
    return torch.from_numpy(tensor.as_numpy())


def settle(device: torch.device) -> None:
    """Waits for this thread's CUDA stream on `device`: another process reads a tensor handed over by DLPack without
    regard to our stream (whether 2.51's stub synchronises a DLPack producer is not established)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class ModelBase:
    """What every model reads from its config: parameters, device, dtype, thread budget."""

    pb: Any = None  # triton_python_backend_utils, bound by model.py

    def initialize(self, args: dict) -> None:
        self.config = json.loads(args["model_config"])
        self.params = {k: v["string_value"] for k, v in self.config.get("parameters", {}).items()}
        gpu = args.get("model_instance_kind") == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        self.dtype = DTYPES[self.params.get("dtype", "float32")]
        self.compile = self.params.get("compile", "0") == "1"
        threads = int(self.params.get("torch_threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        # Progress bars of weight loading are noise in a server's log, once per process.
        transformers_logging.disable_progress_bar()
        diffusers_logging.disable_progress_bar()
        self.setup()
        ready(args.get("model_instance_name", self.config["name"]), f"on {self.device}, {self.dtype}: {self.loaded()}")

    def setup(self) -> None:
        raise NotImplementedError

    def loaded(self) -> str:
        """What this instance loaded, for its ready line."""
        return str(self.params.get("model", ""))

    def inputs(self, request, names) -> dict[str, np.ndarray]:
        """The request's tensors by name, without the batch dimension (always 1 here)."""
        found = {}
        for name in names:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                array = tensor.as_numpy()
                if array.shape[:1] != (1,):
                    raise RequestError(name, f"batch dimension must be 1, got shape {array.shape}")
                found[name] = array[0]
        return found

    def error(self, error: Exception):
        """RequestError -> INVALID_ARG naming the field; RequestStopped -> CANCELLED naming what stopped it;
        anything else -> INTERNAL."""
        errors = self.pb.TritonError
        if isinstance(error, RequestError):
            return self.pb.InferenceResponse(error=errors(str(error), errors.INVALID_ARG))
        if isinstance(error, RequestStopped):
            return self.pb.InferenceResponse(error=errors(str(error), errors.CANCELLED))
        return self.pb.InferenceResponse(error=errors(f"{type(error).__name__}: {error}", errors.INTERNAL))

    def tensor(self, name: str, value: np.ndarray | torch.Tensor):
        return pb_tensor(self.pb, name, value)

    def lora_step_tensor(self, result: DenoiseResult):
        return self.tensor(LORA_STEP_OUTPUT.name, np.array([[result.lora_step]], np.int32))

    def load(self, parts: tuple[str, ...], device: torch.device | None = None) -> LoadedModel:
        """The model's engines for these parts, on this instance's device unless told; on a GPU as CUDA graphs
        with channels-last weights."""
        device = device or self.device
        model = load_model(self.params["model"], device, self.dtype, self.params.get("model_config"), parts)
        if device.type != "cuda":
            return model
        return graph_engines(model, channels_last=True, compile=self.compile)

    def limits(self) -> Limits:
        return Limits(max_steps=int(self.params.get("max_steps", Limits.max_steps)),
                      max_size=int(self.params.get("max_size", Limits.max_size)),
                      max_request_seconds=float(self.params.get("max_request_seconds", Limits.max_request_seconds)))


# ---- text encoder ----------------------------------------------------------------------------------------------
TEXT_INPUTS = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2", "clip_skip")
# Outputs of the ensemble's first step besides the text encoders' (`text_outputs`): when the request arrived
# (time.monotonic(), one clock for every process of the host), from which the denoiser counts the request's time
# budget.
ARRIVED_AT = "arrived_at"


def text_outputs(family: ModelFamily) -> tuple[str, ...]:
    """What the text encoder model hands the denoiser, rows [negative, positive]: the prompt embeddings, and the
    pooled embedding of a family with a projected encoder (SDXL's `text_embeds`)."""
    projected = any(part.projected for part in family.text_encoders)
    return ("encoder_hidden_states", "text_embeds") if projected else ("encoder_hidden_states",)


class TextEncoderModel(ModelBase):
    """The prompts of every request in the batch, encoded in one call per text encoder: for each request its
    `text_outputs`, [1, 2 (negative, positive), ...].

    As the ensemble's first step it also rejects a request without `prompt` (the ensemble itself would only
    report a deadlock) or with a `clip_skip` its text encoders cannot take, and stamps its arrival time.
    """

    def setup(self) -> None:
        self.model = self.load(("text",))
        self.text = TextConditioner(self.model)

    def execute(self, requests):
        arrived = np.array([[time.monotonic()]], np.float64)
        batch, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                fields = request_from_tensors(self.inputs(request, TEXT_INPUTS))
                check_clip_skip(fields.clip_skip, self.model.family, self.model.text_layers)
                batch.append((i, Prompts.of(fields)))
            except RequestError as error:
                responses[i] = self.error(error)
        if batch:
            encoded = self.text([prompts for _, prompts in batch], guided=True)
            for row, (i, _) in enumerate(batch):
                tensors = [self.tensor(name, value[2 * row:2 * row + 2][None]) for name, value in encoded.items()]
                responses[i] = self.pb.InferenceResponse([*tensors, self.tensor(ARRIVED_AT, arrived)])
        return responses


# ---- VAE decoder ----------------------------------------------------------------------------------------------
class VaeDecoderModel(ModelBase):
    """Latents of a batch of requests (same size: Triton batches equal shapes only) to uint8 images."""

    def setup(self) -> None:
        self.engine = self.load(("vae",)).engines["vae_decoder"]

    def execute(self, requests):
        # The VAE graph casts to its own dtype (fp32 for an SDXL VAE that asks for `force_upcast`).
        latents = torch.cat([torch.from_numpy(self.pb.get_input_tensor_by_name(r, "latents").as_numpy())
                             for r in requests]).to(self.device, self.dtype)
        images = to_uint8(self.engine({"latent": latents})["image"])
        return [self.pb.InferenceResponse([self.tensor(IMAGE_OUTPUT.name, images[i:i + 1])])
                for i in range(len(requests))]


# ---- ControlNet -----------------------------------------------------------------------------------------------
def controlnet_inputs(family: ModelFamily) -> tuple[str, ...]:
    """A ControlNet call's tensors besides its name: the UNet's inputs (the family's added conditioning included)
    and the control image."""
    return (*unet_inputs(family), "controlnet_cond")


def controlnet_catalog(model: ModelBase, device: torch.device, family: ModelFamily) -> ControlNetCatalog:
    """The model's ControlNet catalog (parameters `controlnet_catalog`, `resident_controlnets`) on `device`: on a
    GPU as CUDA graphs with channels-last weights."""
    args = (model.params["controlnet_catalog"], device, model.dtype, int(model.params.get("resident_controlnets", "4")),
            family)
    if device.type == "cuda":
        return GraphedControlNetCatalog(*args, channels_last=True, compile=model.compile)
    return ControlNetCatalog(*args)


class ControlNetServiceModel(ModelBase):
    """Any ControlNet of the catalog by name (of the model's family); the most recently used stay loaded on this
    instance's device. Inputs and residuals cross as the deployment's `residual_transport` says."""

    def setup(self) -> None:
        family = FAMILIES[self.params.get("family", "sd15")]
        self.input_names = controlnet_inputs(family)
        self.transport = self.params.get("residual_transport", "host")
        self.catalog = controlnet_catalog(self, self.device, family)

    def loaded(self) -> str:
        return f"ControlNets of {self.params['controlnet_catalog']} ({self.catalog.cache.capacity} resident at most)"

    def execute(self, requests):
        return [self._run(request) for request in requests]

    def _run(self, request):
        try:
            name = self.pb.get_input_tensor_by_name(request, "controlnet_name").as_numpy().reshape(-1)[0]
            name = name.decode("utf-8", errors="replace") if isinstance(name, bytes) else str(name)
            inputs = {n: torch_tensor(self.pb.get_input_tensor_by_name(request, n), self.transport).to(
                self.device, self.dtype) for n in self.input_names}
            engine = self.catalog.get(name)
            residuals = engine(inputs)
            tensors = [pb_tensor(self.pb, n, residuals[n], self.transport) for n in engine.spec.outputs]
            if self.transport == "dlpack":
                settle(self.device)  # after the copies that make them contiguous
            return self.pb.InferenceResponse(tensors)
        except Exception as error:  # one bad request must not take the instance down
            return self.error(error)


class BlsControlNets:
    """The orchestrator's ControlNet runner: asynchronous BLS calls to the ControlNet model.

    `submit` sends the request at once (`async_exec` does, a coroutine would not until awaited), so the
    ControlNet instances compute while the caller runs the UNet encoder. A failed call fails its request with the
    ControlNet's name; a dead ControlNet process is the launcher's StubSupervisor's to replace.

    With the "dlpack" transport inputs go and residuals come back as torch tensors where they lie (on a GPU: CUDA
    IPC, the residuals landing on this instance's GPU), never through numpy; the timestep, a 4-byte scalar, is
    cheaper as a copy through shared memory.
    """

    def __init__(self, pb, model_name: str, catalog_root: str, family: ModelFamily, output_names: tuple[str, ...],
                 device: torch.device, transport: str = "host"):
        if transport not in TRANSPORTS:
            raise ValueError(f"residual_transport must be one of {TRANSPORTS}, not {transport!r}")
        self.pb = pb
        self.model_name = model_name
        self.catalog_root = Path(catalog_root)
        self.family = family
        self.input_names = controlnet_inputs(family)
        self.output_names = output_names
        self.device = device
        self.transport = transport

    def check(self, name: str) -> None:
        controlnet_folder(self.catalog_root, name, self.family)

    def submit(self, name: str, inputs: Mapping[str, torch.Tensor]):
        tensors = [self.pb.Tensor("controlnet_name", np.array([name.encode()], dtype=np.object_))]
        tensors += [pb_tensor(self.pb, n, inputs[n], "host" if n == "timestep" else self.transport)
                    for n in self.input_names]
        options = {}
        if self.transport == "dlpack":
            settle(self.device)
            gpu = self.device.type == "cuda"
            options["preferred_memory"] = self.pb.PreferredMemory(
                self.pb.TRITONSERVER_MEMORY_GPU if gpu else self.pb.TRITONSERVER_MEMORY_CPU, self.device.index or 0)
        future = self.pb.InferenceRequest(model_name=self.model_name, inputs=tensors,
                                          requested_output_names=list(self.output_names), **options).async_exec()
        return self._collect(name, future, tensors)

    async def _collect(self, name: str, future, sent: list) -> dict[str, torch.Tensor]:
        """The call's residuals on this instance's device; `sent` (the request's tensors, which a DLPack tensor's
        memory belongs to) is held until the response is in."""
        response = await future
        del sent
        if response.has_error():
            raise RuntimeError(f"ControlNet {name!r} failed: {response.error().message()}")
        return {n: torch_tensor(self.pb.get_output_tensor_by_name(response, n), self.transport).to(self.device)
                for n in self.output_names}


# ---- denoiser (the orchestrator) ------------------------------------------------------------------------------
REQUEST_FIELDS = tuple(spec.name for spec in REQUEST_INPUTS)


class DenoiserModel(ModelBase):
    """The scheduler loop: UNet on this instance, ControlNets on the ControlNet model's, LoRAs merged in place."""

    parts = ("text", "unet")  # the text encoders re-encode prompts for text-encoder LoRA layers

    def setup(self) -> None:
        model = self.load(self.parts)
        controlnets = self.controlnet_runner(model)
        loras = LoraStore(self.params["lora_catalog"], model.lora_target, self.device, self.dtype,
                          cache_mb=int(self.params.get("lora_cache_mb", "1024")),
                          copies_dir=self.params.get("lora_copies") or None)
        loras.warm()
        # `cfg_parallel` requests run their unconditional branch on a UNet copy there (e.g. a second GPU).
        cfg_device = self.params.get("cfg_device")
        cfg_model = self.load(("unet",), torch.device(cfg_device)) if cfg_device else None
        self.pipeline = Pipeline(model, controlnets, loras, self.limits(),
                                 float(self.params.get("lora_deadline_fraction", "0.2")), cfg_model)
        self.metrics = LoraMetrics(self.pb, self.config["name"])
        self.request_metrics = RequestMetrics(self.pb, self.config["name"])

    def controlnet_runner(self, model: LoadedModel) -> ControlNetRunner:
        """Where this instance's ControlNets run (Deployment.controlnet_placement): on the ControlNet model's
        instances through BLS (`service`), or in this process on the devices of `controlnet_devices` (`local`)."""
        if self.params.get("controlnet_placement", "service") == "local":
            devices = [torch.device(d) for d in self.params["controlnet_devices"].split(",")]
            return DeviceControlNets([controlnet_catalog(self, d, model.family) for d in devices], self.device)
        return BlsControlNets(self.pb, self.params.get("controlnet_model", "controlnet"),
                              self.params["controlnet_catalog"], model.family,
                              residual_names(model.engines["unet_decoder"].spec), self.device,
                              self.params.get("residual_transport", "host"))

    def loaded(self) -> str:
        copy = f", a UNet copy on {self.pipeline.cfg_model.device}" if self.pipeline.cfg_model is not None else ""
        controlnets = self.pipeline.controlnets
        if isinstance(controlnets, DeviceControlNets):
            where = f"ControlNets in this process on {', '.join(map(str, controlnets.devices))}"
        else:
            where = f"ControlNets through model {controlnets.model_name!r} ({controlnets.transport} transport)"
        return (f"{', '.join(self.parts)} of {self.params['model']}{copy}; LoRAs of {self.params['lora_catalog']}, "
                f"{where}")

    async def execute(self, requests):
        return [await self._run(request) for request in requests]

    def parse(self, request):
        """The request's fields, with the model's defaults, checked."""
        return self.pipeline.check(request_from_tensors(self.inputs(request, REQUEST_FIELDS)))

    async def denoise(self, generation, encoded, stop, on_step=None) -> DenoiseResult:
        """The pipeline's loop, with the request's metrics recorded however it ends."""
        try:
            result = await self.pipeline.denoise(generation, encoded, on_step, stop=stop)
        except RequestStopped as stopped:
            self.request_metrics.stopped_early(stopped)
            raise
        self.metrics.record(generation, result, self.pipeline.loras.cache.bytes)
        self.request_metrics.finished(generation.steps)
        return result

    async def _run(self, request):
        try:
            generation = self.parse(request)
            # Triton 2.51 does not pass an ensemble request's cancellation on to this step: `is_cancelled` is
            # true only for a request sent to this model directly. The time budget counts from the arrival the
            # text encoder stamped, so a request whose client gave up while it queued here stops at once.
            arrived = self.pb.get_input_tensor_by_name(request, ARRIVED_AT)
            stop = stop_condition(generation, self.pipeline.limits,
                                  None if arrived is None else float(arrived.as_numpy().reshape(-1)[0]),
                                  request.is_cancelled)
            # The text encoder model encoded both rows [negative, positive]; without guidance only the second counts.
            rows = slice(0, 2) if uses_guidance(generation) else slice(1, 2)
            encoded = {name: torch.from_numpy(self.pb.get_input_tensor_by_name(request, name).as_numpy()[0][rows])
                       for name in text_outputs(self.pipeline.model.family)}
            result = await self.denoise(generation, encoded, stop)
            return self.pb.InferenceResponse([self.tensor("latents", result.latents), self.lora_step_tensor(result)])
        except Exception as error:
            return self.error(error)


class StreamModel(DenoiserModel):
    """Decoupled: one response per step (step, total_steps, elapsed_s), then one with the image.

    A closed stream (or a client's cancel) marks the request cancelled; the loop asks `is_cancelled` at every
    step boundary and stops there, before the next UNet, ControlNet or VAE call.
    """

    parts = ("text", "unet", "vae")

    async def execute(self, requests):
        # A decoupled model's coroutines interleave within one instance; LoRA patches must not.
        async with self.one_at_a_time:
            await self._stream(requests)

    def setup(self) -> None:
        super().setup()
        self.one_at_a_time = asyncio.Lock()

    async def _stream(self, requests) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                generation = self.parse(request)

                def progress(step: int, total: int, elapsed: float) -> None:
                    sender.send(self.pb.InferenceResponse([
                        self.tensor("step", np.array([[step]], np.int32)),
                        self.tensor("total_steps", np.array([[total]], np.int32)),
                        self.tensor("elapsed_s", np.array([[elapsed]], np.float32))]))

                stop = stop_condition(generation, self.pipeline.limits, cancelled=sender.is_cancelled)
                result = await self.denoise(generation, None, stop, progress)
                stop.check(generation.steps, generation.steps)  # the VAE decode is a step's worth of work too
                image = self.pipeline.decode(result.latents)[None]
                final = self.pb.InferenceResponse([self.tensor(IMAGE_OUTPUT.name, image),
                                                   self.lora_step_tensor(result)])
            except Exception as error:
                final = self.error(error)
            sender.send(final, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

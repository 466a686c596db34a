"""`baseline_diffusers`: the way a typical Triton + diffusers deployment serves the same requests, to measure against.

One Python model holds a `StableDiffusionControlNetPipeline` and a `StableDiffusionPipeline` over the same modules
and runs each request start to finish, eagerly: per request `load_lora_weights` (one adapter per LoRA) +
`set_adapters` + `fuse_lora`, the pipeline call (ControlNets as a `MultiControlNetModel`, run in series), then
`unfuse_lora` + `unload_lora_weights`. ControlNets are loaded once per name and kept, as deployments usually do.
It takes the request schema of `text_to_image` and validates it the same way, so one client and one load
generator drive both. Fields that choose how ours schedules the work (`lora_mode`, `controlnet_mode`, ...) are
validated and ignored: LoRAs are always fused before the first step (`lora_step` 0), ControlNets always run
before the UNet, in series.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel, PNDMScheduler
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file
from transformers.utils import logging as transformers_logging

from ..catalog import resolve
from ..diffusers_baseline import call_kwargs, fused_loras, to_uint8
from ..lora_store import LoraSource
from ..models import load_components
from ..pipeline import SCHEDULERS
from ..request import GenerationRequest, RequestError, validate
from ..schema import IMAGE_OUTPUT, LORA_STEP_OUTPUT, request_from_tensors
from .metrics import SECONDS_BUCKETS
from .serving import REQUEST_FIELDS, ModelBase


class BaselineDiffusersModel(ModelBase):
    """diffusers' pipelines as a typical deployment runs them: one request at a time, LoRAs fused per request."""

    def setup(self) -> None:
        # transformers/diffusers/peft log a report per adapter loaded; a deployment silences them, so do we.
        transformers_logging.set_verbosity_error()
        diffusers_logging.set_verbosity_error()
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        # Imported after that: the pipeline modules import transformers' image processors, which warn without
        # torchvision although no pipeline here uses one.
        from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

        # What `from_pretrained` / `from_single_file` load, through the loader ours uses: a folder or a checkpoint.
        parts = load_components(self.params["model"], self.params.get("model_config"))
        self.pipe = StableDiffusionPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
            scheduler=PNDMScheduler.from_config(parts.scheduler_config), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False).to(self.device, self.dtype)
        self.control_pipe = StableDiffusionControlNetPipeline(controlnet=MultiControlNetModel([]),
                                                              **self.pipe.components)
        for pipe in (self.pipe, self.control_pipe):
            pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = dict(self.pipe.scheduler.config)
        self.controlnet_root = Path(self.params["controlnet_catalog"])
        self.controlnets: dict[str, ControlNetModel] = {}
        # The catalog's name rules and fetching (local folder or fsspec URL), as ours.
        self.lora_files = LoraSource(self.params["lora_catalog"], self.params.get("lora_copies") or None)
        self.metric_family = self.pb.MetricFamily(
            name="swiftdiffusion_baseline_lora_seconds", kind=self.pb.MetricFamily.HISTOGRAM,
            description="baseline: load_lora_weights + set_adapters + fuse + unfuse + unload time per request")
        self.lora_seconds = self.metric_family.Metric(labels={"model": self.config["name"]}, buckets=SECONDS_BUCKETS)

    def execute(self, requests):
        return [self._run(request) for request in requests]

    def _run(self, request):
        try:
            generation = request_from_tensors(self.inputs(request, REQUEST_FIELDS))
            self.check(generation)
            image = self.generate(generation)
            return self.pb.InferenceResponse([
                self.tensor(IMAGE_OUTPUT.name, image[None]),
                self.tensor(LORA_STEP_OUTPUT.name, np.array([[0 if generation.loras else -1]], np.int32))])
        except Exception as error:  # one bad request must not take the instance down
            return self.error(error)

    def check(self, request: GenerationRequest) -> None:
        """The same RequestErrors as `text_to_image`, before any work starts."""
        validate(request, self.limits())
        for lora in request.loras:
            self.lora_files.locate(lora.name)
        for control in request.controlnets:
            resolve(self.controlnet_root, control.name, "", "controlnet_names")

    def controlnet(self, name: str) -> ControlNetModel:
        if name not in self.controlnets:
            self.controlnets[name] = ControlNetModel.from_pretrained(
                resolve(self.controlnet_root, name, "", "controlnet_names"), torch_dtype=self.dtype,
                local_files_only=True).to(self.device)
        return self.controlnets[name]

    def generate(self, request: GenerationRequest) -> np.ndarray:
        """uint8 [height, width, 3], as diffusers' own `numpy_to_pil` rounds it."""
        if request.controlnets:
            pipe = self.control_pipe
            pipe.controlnet = MultiControlNetModel([self.controlnet(c.name) for c in request.controlnets])
        else:
            pipe = self.pipe
        pipe.scheduler = SCHEDULERS[request.scheduler].from_config(self.scheduler_config)
        begin = time.perf_counter()
        with fused_loras(pipe, [self._lora_state(lora.name) for lora in request.loras],
                         [lora.scale for lora in request.loras]):
            loaded = time.perf_counter()
            image = pipe(**call_kwargs(request)).images[0]
            done = time.perf_counter()
        if request.loras:
            self.lora_seconds.observe(loaded - begin + time.perf_counter() - done)
        return to_uint8(image)

    def _lora_state(self, name: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(self.lora_files.path(name))
        except FileNotFoundError as error:
            raise RequestError("lora_names", f"unknown name {name!r}") from error


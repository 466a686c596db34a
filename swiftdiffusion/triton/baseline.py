"""`baseline_diffusers`: the way a typical Triton + diffusers deployment serves the same requests, to measure against.

One Python model holds the model family's diffusers pipelines (`StableDiffusion(XL)Pipeline` and
`StableDiffusion(XL)ControlNetPipeline`) over the same modules and runs each request start to finish, eagerly: per request `load_lora_weights` (one adapter per LoRA) +
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
from diffusers import ControlNetModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file
from transformers.utils import logging as transformers_logging

from ..conditioning import check_request
from ..controlnets import controlnet_folder
from ..diffusers_baseline import call_kwargs, fused_loras, pipelines, to_uint8
from ..lora_store import LoraSource
from ..pipeline import scheduled
from ..models import MODULE_LOADING, cast, load_components
from ..request import GenerationRequest, RequestError, validate, with_defaults
from ..schedulers import make_scheduler
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
        # What `from_pretrained` / `from_single_file` load, through the loader ours uses: a folder or a checkpoint.
        self.parts = load_components(self.params["model"], self.params.get("model_config"))
        for module in self.parts.pipeline_parts().values():
            if isinstance(module, torch.nn.Module):
                cast(module, self.device, self.dtype)
        self.pipe, self.control_pipe = pipelines(self.parts, make_scheduler(None, self.parts.scheduler_config, 0))
        self.scheduler_config = self.parts.scheduler_config
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
            generation = self.check(request_from_tensors(self.inputs(request, REQUEST_FIELDS)))
            image = self.generate(generation)
            return self.pb.InferenceResponse([
                self.tensor(IMAGE_OUTPUT.name, image[None]),
                self.tensor(LORA_STEP_OUTPUT.name, np.array([[0 if generation.loras else -1]], np.int32))])
        except Exception as error:  # one bad request must not take the instance down
            return self.error(error)

    def check(self, request: GenerationRequest) -> GenerationRequest:
        """The request with the model's defaults; the same RequestErrors as `text_to_image`, before any work
        starts."""
        request = with_defaults(request, self.parts.defaults)
        validate(request, self.limits())
        check_request(request, self.parts.family, self.parts.text_layers)
        scheduled(request, self.scheduler_config)
        for lora in request.loras:
            self.lora_files.locate(lora.name)
        for control in request.controlnets:
            controlnet_folder(self.controlnet_root, control.name, self.parts.family)
        return request

    def controlnet(self, name: str) -> ControlNetModel:
        if name not in self.controlnets:
            with MODULE_LOADING:
                self.controlnets[name] = ControlNetModel.from_pretrained(
                    controlnet_folder(self.controlnet_root, name, self.parts.family), torch_dtype=self.dtype,
                    local_files_only=True).to(self.device)
        return self.controlnets[name]

    def generate(self, request: GenerationRequest) -> np.ndarray:
        """uint8 [height, width, 3], as diffusers' own `numpy_to_pil` rounds it."""
        if request.controlnets:
            pipe = self.control_pipe
            pipe.controlnet = MultiControlNetModel([self.controlnet(c.name) for c in request.controlnets])
        else:
            pipe = self.pipe
        pipe.scheduler = make_scheduler(request.scheduler, self.scheduler_config, request.seed)
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


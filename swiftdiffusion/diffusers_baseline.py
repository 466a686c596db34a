"""A request through diffusers' own pipelines of the model's family, LoRAs served the way deployments usually serve
them: per request `load_lora_weights` (one adapter each) + `set_adapters` + `fuse_lora`, the pipeline call, then
`unfuse_lora` + `unload_lora_weights`. It is the reference of the fidelity tests and the baseline of the
benchmarks and of the `baseline_diffusers` Triton model."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .models import ModelComponents
from .request import GenerationRequest

# Request fields passed to the pipeline call under their own names when set (the SDXL pipelines take them).
SDXL_FIELDS = ("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size", "clip_skip")


def pipelines(components: ModelComponents, scheduler) -> tuple[object, object]:
    """The family's text-to-image and ControlNet pipelines over the same modules (the latter with no ControlNet
    yet: set `pipe.controlnet` per request)."""
    # Imported here: diffusers' pipeline modules import transformers' image processors, which warn in every
    # process on a machine without torchvision although nothing here uses them.
    import diffusers
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    family, parts = components.family, components.pipeline_parts()
    plain = getattr(diffusers, family.pipeline)(**parts, scheduler=scheduler)
    control = getattr(diffusers, family.controlnet_pipeline)(**parts, scheduler=scheduler,
                                                             controlnet=MultiControlNetModel([]))
    for pipe in (plain, control):
        pipe.set_progress_bar_config(disable=True)
    return plain, control


def call_kwargs(request: GenerationRequest) -> dict:
    """The pipeline call's arguments (with ControlNet images and scales when the request has ControlNets); fields
    left None are left to the pipeline's defaults."""
    kwargs = dict(prompt=request.prompt, negative_prompt=request.negative_prompt, num_inference_steps=request.steps,
                  generator=torch.Generator("cpu").manual_seed(request.seed), output_type="np")
    optional = dict(height=request.height, width=request.width, guidance_scale=request.guidance_scale,
                    **{field: getattr(request, field) for field in SDXL_FIELDS})
    kwargs.update({key: value for key, value in optional.items() if value is not None})
    if request.controlnets:
        kwargs.update(image=[Image.fromarray(c.image) for c in request.controlnets],
                      controlnet_conditioning_scale=[c.scale for c in request.controlnets])
    return kwargs


@contextlib.contextmanager
def fused_loras(pipe, sources: Sequence[object], scales: Sequence[float]) -> Iterator[None]:
    """The LoRAs (`load_lora_weights` sources: paths or state dicts) fused into `pipe` for the block, unfused and
    unloaded after it, also when it fails."""
    adapters = [f"lora{i}" for i in range(len(sources))]  # catalog names may hold '.', adapter names may not
    try:
        for adapter, source in zip(adapters, sources):
            pipe.load_lora_weights(source, adapter_name=adapter)
        if adapters:
            pipe.set_adapters(adapters, adapter_weights=list(scales))
            pipe.fuse_lora(adapter_names=adapters, lora_scale=1.0)
        yield
    finally:
        if adapters:
            pipe.unfuse_lora()
            pipe.unload_lora_weights()


def to_uint8(image: np.ndarray) -> np.ndarray:
    """diffusers' float image in [0, 1] as uint8, rounded as its `numpy_to_pil` does."""
    return (image * 255).round().astype(np.uint8)

"""A request through diffusers' own pipelines, LoRAs served the way deployments usually serve them: per request
`load_lora_weights` (one adapter each) + `set_adapters` + `fuse_lora`, the pipeline call, then `unfuse_lora` +
`unload_lora_weights`. It is the reference of the fidelity tests and the baseline of the benchmarks and of the
`baseline_diffusers` Triton model."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .request import GenerationRequest


def call_kwargs(request: GenerationRequest) -> dict:
    """The pipeline call's arguments (with ControlNet images and scales when the request has ControlNets)."""
    kwargs = dict(prompt=request.prompt, negative_prompt=request.negative_prompt, height=request.height,
                  width=request.width, num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                  generator=torch.Generator("cpu").manual_seed(request.seed), output_type="np")
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

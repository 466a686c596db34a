"""The pipeline (torch runtime, fp32, CPU) against plain diffusers on the same weights, seed and scheduler."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from diffusers import (ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from conftest import control_image, max_diff
from swiftdiffusion.diffusers_baseline import call_kwargs, fused_loras, to_uint8
from swiftdiffusion.models import load_components
from swiftdiffusion.pipeline import SCHEDULERS
from swiftdiffusion.request import ControlNetUse, GenerationRequest, LoraUse

TOLERANCE = 2  # of 255, per pixel


@pytest.fixture(scope="module")
def reference(tiny_root):
    """diffusers' own pipelines over a separate copy of the same weights."""
    components = load_components(tiny_root / "model")
    controlnets = {name: ControlNetModel.from_pretrained(tiny_root / "controlnets" / name) for name in ("canny", "depth")}
    common = dict(vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
                  unet=components.unet, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return tiny_root, components, controlnets, common


def diffusers_image(reference, request: GenerationRequest) -> np.ndarray:
    root, components, controlnets, common = reference
    scheduler = SCHEDULERS[request.scheduler].from_config(components.scheduler_config)
    if request.controlnets:
        multi = MultiControlNetModel([controlnets[c.name] for c in request.controlnets])
        pipe = StableDiffusionControlNetPipeline(controlnet=multi, scheduler=scheduler, **common)
    else:
        pipe = StableDiffusionPipeline(scheduler=scheduler, **common)
    with fused_loras(pipe, [str(root / "loras" / f"{lora.name}.safetensors") for lora in request.loras],
                     [lora.scale for lora in request.loras]):
        image = pipe(**call_kwargs(request)).images[0]
    return to_uint8(image)


def request(**kwargs) -> GenerationRequest:
    defaults = dict(prompt="a red house on a hill", negative_prompt="blurry", seed=7, steps=4, height=64, width=64,
                    lora_mode="sync")
    return GenerationRequest(**{**defaults, **kwargs})


CANNY = ControlNetUse("canny", control_image(1), 1.0)
DEPTH = ControlNetUse("depth", control_image(2), 0.6)
CASES = {
    "no_addons": request(),
    "lora_peft": request(loras=(LoraUse("style_peft", 1.0),)),
    "lora_diffusers": request(loras=(LoraUse("style_diffusers", 1.0),)),
    "lora_kohya": request(loras=(LoraUse("character_kohya", 1.0),)),
    "two_loras": request(loras=(LoraUse("style_peft", 0.7), LoraUse("style_diffusers", 0.4))),
    "controlnet": request(controlnets=(CANNY,)),
    "two_controlnets": request(controlnets=(CANNY, DEPTH)),
    "two_controlnets_two_loras": request(controlnets=(CANNY, DEPTH),
                                         loras=(LoraUse("character_kohya", 0.8), LoraUse("style_peft", 0.5))),
    "second_resolution": request(height=96, width=64, controlnets=(
        ControlNetUse("canny", control_image(3, 96, 64), 1.0),)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_diffusers(pipeline, reference, case):
    ours = pipeline.generate(CASES[case]).image
    theirs = diffusers_image(reference, CASES[case])
    assert ours.shape == theirs.shape == (CASES[case].height, CASES[case].width, 3)
    assert max_diff(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_schedulers_match_diffusers(pipeline, reference, scheduler):
    case = request(scheduler=scheduler, steps=5)
    assert max_diff(pipeline.generate(case).image, diffusers_image(reference, case)) <= TOLERANCE


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if c not in ("no_addons", "second_resolution")])
def test_addons_change_the_image(pipeline, case):
    """Guards the fidelity tests: an add-on that were silently ignored would show no difference here."""
    plain = pipeline.generate(CASES["no_addons"]).image
    assert max_diff(pipeline.generate(CASES[case]).image, plain) > 4 * TOLERANCE


def test_same_seed_same_image_and_weights_restored(pipeline):
    first = pipeline.generate(CASES["no_addons"]).image
    pipeline.generate(CASES["two_controlnets_two_loras"])
    assert np.array_equal(pipeline.generate(CASES["no_addons"]).image, first)


def test_controlnet_async_mode_uses_the_previous_steps_residuals(pipeline):
    """Asynchronous ControlNets change the image a little (step t sees step t-1's residuals), never a lot."""
    synchronous = pipeline.generate(CASES["two_controlnets"]).image
    asynchronous = pipeline.generate(dataclasses.replace(CASES["two_controlnets"], controlnet_mode="async")).image
    plain = pipeline.generate(CASES["no_addons"]).image
    assert 0 < max_diff(asynchronous, synchronous) < max_diff(plain, synchronous)

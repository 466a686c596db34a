"""The pipeline (torch runtime, fp32, CPU) against plain diffusers on the same weights, seed and scheduler, for both
model families: SD1.5 against `StableDiffusion(ControlNet)Pipeline`, SDXL against
`StableDiffusionXL(ControlNet)Pipeline`, LoRAs through `load_lora_weights` + `fuse_lora` (`pytest -k sdxl` selects
the SDXL cases)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from conftest import control_image, max_diff
from swiftdiffusion.diffusers_baseline import call_kwargs, fused_loras, pipelines, to_uint8
from swiftdiffusion.models import load_components
from swiftdiffusion.request import ControlNetUse, GenerationRequest, LoraUse
from swiftdiffusion.schedulers import SAMPLERS, SCHEDULER_NAMES, find_scheduler, make_scheduler

TOLERANCE = 2  # of 255, per pixel
FAMILIES = ("sd15", "sdxl")


@pytest.fixture(scope="module")
def references(family_roots):
    """Per family: diffusers' own components over a separate copy of the same weights, and its ControlNets."""
    return {family: (root, load_components(root / "model"),
                     {name: ControlNetModel.from_pretrained(root / "controlnets" / name) for name in ("canny", "depth")})
            for family, root in family_roots.items()}


@pytest.fixture(scope="module")
def ours(pipeline, xl_pipeline):
    return {"sd15": pipeline, "sdxl": xl_pipeline}


def diffusers_pipe(reference, request: GenerationRequest):
    """The family's diffusers pipeline for `request`, with its scheduler and ControlNets."""
    _, components, controlnets = reference
    plain, control = pipelines(components, make_scheduler(request.scheduler, components.scheduler_config,
                                                          request.seed))
    if not request.controlnets:
        return plain
    control.controlnet = MultiControlNetModel([controlnets[c.name] for c in request.controlnets])
    return control


def diffusers_image(reference, request: GenerationRequest, **call) -> np.ndarray:
    root = reference[0]
    pipe = diffusers_pipe(reference, request)
    with fused_loras(pipe, [str(root / "loras" / f"{lora.name}.safetensors") for lora in request.loras],
                     [lora.scale for lora in request.loras]):
        image = pipe(**{**call_kwargs(request), **call}).images[0]
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
    "absent_negative_prompt": request(negative_prompt=None),  # SDXL: zeros (force_zeros_for_empty_prompt)
    "model_defaults": request(height=None, width=None, guidance_scale=None, controlnets=(  # size from the image
        ControlNetUse("canny", control_image(4, 64, 96), 1.0),)),
}
SDXL_CASES = {
    "prompt_2": request(prompt_2="a blue boat at sea"),
    "negative_prompt_2": request(negative_prompt_2="oversaturated"),
    "size_conditioning": request(original_size=(512, 384), crops_coords_top_left=(16, 32), target_size=(256, 256)),
    "size_conditioning_with_controlnet": request(original_size=(128, 128), controlnets=(CANNY,)),
}
ALL_CASES = [(family, case) for family in FAMILIES for case in sorted(CASES)] + [
    ("sdxl", case) for case in sorted(SDXL_CASES)]


def case_request(case: str) -> GenerationRequest:
    return {**CASES, **SDXL_CASES}[case]


@pytest.mark.parametrize("family, case", ALL_CASES, ids=[f"{f}-{c}" for f, c in ALL_CASES])
def test_matches_diffusers(ours, references, family, case):
    image = ours[family].generate(case_request(case)).image
    reference = diffusers_image(references[family], case_request(case))
    assert image.shape == reference.shape
    assert max_diff(image, reference) <= TOLERANCE


SCHEDULER_CASES = [(family, name) for family in FAMILIES for name in SCHEDULER_NAMES]


@pytest.mark.parametrize("family, scheduler", SCHEDULER_CASES, ids=[f"{f}-{s}" for f, s in SCHEDULER_CASES])
def test_schedulers_match_diffusers(ours, references, family, scheduler):
    """Every sampler and sigma schedule we expose, against the diffusers scheduler a user would configure."""
    case = request(scheduler=scheduler, steps=5)
    assert max_diff(ours[family].generate(case).image, diffusers_image(references[family], case)) <= TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_scheduler_by_its_automatic1111_name_is_the_same_scheduler(ours, family):
    for sampler in SAMPLERS:
        for ours_name, a1111 in ((sampler.name, sampler.a1111), (f"{sampler.name}_karras", f"{sampler.a1111} Karras")):
            if find_scheduler(ours_name) is None:
                continue
            assert find_scheduler(a1111) == find_scheduler(ours_name)
    named = ours[family].generate(request(scheduler="dpmpp_2m_karras")).image
    assert np.array_equal(ours[family].generate(request(scheduler="DPM++ 2M Karras")).image, named)


@pytest.mark.parametrize("family, case", [(f, c) for f, c in ALL_CASES if c not in (
    "no_addons", "second_resolution", "model_defaults")], ids=lambda value: value)
def test_addons_change_the_image(ours, family, case):
    """Guards the fidelity tests: an add-on or field that were silently ignored would show no difference here."""
    plain = ours[family].generate(CASES["no_addons"]).image
    assert max_diff(ours[family].generate(case_request(case)).image, plain) > 4 * TOLERANCE


def _hidden(components, text_encoder: str, text: str, clip_skip: int) -> torch.Tensor:
    """A prompt's hidden states `clip_skip` layers before the family's usual one, as diffusers takes a positive
    prompt's (for SD1.5 through the final layer norm, computed here: diffusers 0.42 reaches that norm through
    `text_model`, which transformers 5's CLIPTextModel no longer has)."""
    tokenizer = components.tokenizer if text_encoder == "text_encoder" else components.tokenizer_2
    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    encoder = getattr(components, text_encoder)
    with torch.no_grad():
        output = encoder(ids, output_hidden_states=True)
    if components.family.name == "sd15":
        return encoder.final_layer_norm(output.hidden_states[-(clip_skip + 1)])
    return output.hidden_states[-(clip_skip + 2)]


@pytest.mark.parametrize("family", FAMILIES)
def test_clip_skip_matches_diffusers_positive_prompt_path_for_both_prompts(ours, references, family):
    """`clip_skip` moves both prompts' layer (diffusers moves only the positive prompt's: see conditioning.py), so
    the reference gets, for both prompts, the embeddings diffusers computes for a positive prompt."""
    case = request(clip_skip=1)
    components = references[family][1]
    embeds = {}
    for row, text in (("negative_prompt_embeds", case.negative_prompt), ("prompt_embeds", case.prompt)):
        embeds[row] = torch.cat([_hidden(components, part.component, text, 1)
                                 for part in components.family.text_encoders], dim=-1)
    if family == "sdxl":  # the pooled embedding is the last layer's, whatever clip_skip says
        for row, text in (("negative_pooled_prompt_embeds", case.negative_prompt), ("pooled_prompt_embeds", case.prompt)):
            ids = components.tokenizer_2(text, padding="max_length", max_length=77, truncation=True,
                                         return_tensors="pt").input_ids
            with torch.no_grad():
                embeds[row] = components.text_encoder_2(ids).text_embeds
    reference = diffusers_image(references[family], case, prompt=None, negative_prompt=None, **embeds)
    image = ours[family].generate(case).image
    assert max_diff(image, reference) <= TOLERANCE
    assert max_diff(image, ours[family].generate(CASES["no_addons"]).image) > 4 * TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_image_and_weights_restored(ours, family):
    first = ours[family].generate(CASES["no_addons"]).image
    ours[family].generate(CASES["two_controlnets_two_loras"])
    assert np.array_equal(ours[family].generate(CASES["no_addons"]).image, first)


@pytest.mark.parametrize("family", FAMILIES)
def test_controlnet_async_mode_uses_the_previous_steps_residuals(ours, family):
    """Asynchronous ControlNets change the image a little (step t sees step t-1's residuals), never a lot."""
    synchronous = ours[family].generate(CASES["two_controlnets"]).image
    asynchronous = ours[family].generate(dataclasses.replace(CASES["two_controlnets"], controlnet_mode="async")).image
    plain = ours[family].generate(CASES["no_addons"]).image
    assert 0 < max_diff(asynchronous, synchronous) < max_diff(plain, synchronous)

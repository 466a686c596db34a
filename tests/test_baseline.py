"""The benchmark's baseline (`baseline_diffusers`) serves the same requests as `text_to_image`, image for image.

Without this the benchmark could compare two systems doing different work.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from conftest import control_image, max_diff
from swiftdiffusion.client import infer_inputs
from swiftdiffusion.request import ControlNetUse, GenerationRequest, LoraUse
from swiftdiffusion.schema import tensors_from_request

pytestmark = pytest.mark.server
BASELINE = "baseline_diffusers"
TOLERANCE = 2  # of 255, as diffusers against our pipeline

BASE = GenerationRequest("a red house on a hill", negative_prompt="blurry", seed=7, steps=4, height=64, width=64,
                         lora_mode="sync")
CASES = {
    "no_addons": BASE,
    "one_controlnet_one_lora": dataclasses.replace(BASE, loras=(LoraUse("character_kohya", 0.8),),
                                                   controlnets=(ControlNetUse("canny", control_image(1), 1.0),)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_baseline_equals_text_to_image(client, case):
    ours = client.generate(CASES[case])
    baseline = client.generate(CASES[case], model=BASELINE)
    assert baseline.image.shape == ours.image.shape == (BASE.height, BASE.width, 3)
    assert max_diff(baseline.image, ours.image) <= TOLERANCE
    assert baseline.lora_step == ours.lora_step == (0 if CASES[case].loras else -1)


def test_baseline_unloads_loras_after_each_request(client):
    """A LoRA left fused would leak into the next request: the plain image must not change."""
    plain = client.generate(CASES["no_addons"], model=BASELINE).image
    client.generate(CASES["one_controlnet_one_lora"], model=BASELINE)
    assert np.array_equal(client.generate(CASES["no_addons"], model=BASELINE).image, plain)


@pytest.mark.parametrize("field, value", [("lora_names", np.array([[b"no_such_lora"]], np.object_)),
                                          ("steps", np.array([[0]], np.int32))])
def test_baseline_bad_input_is_invalid_arg(client, field, value):
    tensors = {**tensors_from_request(CASES["one_controlnet_one_lora"]), field: value}
    with pytest.raises(InferenceServerException) as raised:
        client.grpc.infer(BASELINE, infer_inputs(tensors))
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"{field}:" in raised.value.message()

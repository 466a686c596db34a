"""ControlNets as a service, end to end: run on the `controlnet` model's own processes through BLS, they give the
in-process sequential pipeline's images bit for bit, across LRU evictions, and a failing instance stays contained.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from tritonclient.utils import InferenceServerException

from conftest import control_image
from swiftdiffusion.request import ControlNetUse, GenerationRequest
from swiftdiffusion.tiny import SIZES, build_controlnet

pytestmark = [pytest.mark.server, pytest.mark.usefixtures("one_torch_thread")]
CONTROLS = (ControlNetUse("canny", control_image(1), 1.0), ControlNetUse("depth", control_image(2), 0.6),
            ControlNetUse("pose", control_image(3), 0.8))


@pytest.fixture(scope="module")
def pose(tiny_root):
    """A third ControlNet, in the session catalog for this module only: test_server expects `pose` unknown."""
    folder = tiny_root / "controlnets" / "pose"
    torch.manual_seed(3)
    build_controlnet(UNet2DConditionModel.from_pretrained(tiny_root / "model" / "unet"), SIZES["sd15"]["tiny"]).save_pretrained(
        folder)
    yield folder
    shutil.rmtree(folder)


def request(count: int, mode: str = "overlap", controls: tuple[ControlNetUse, ...] = CONTROLS) -> GenerationRequest:
    return GenerationRequest("a red house on a hill", negative_prompt="blurry", seed=7, steps=3, height=64, width=64,
                             controlnets=controls[:count], controlnet_mode=mode)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_overlap_equals_sequential_bit_for_bit(client, pipeline, pose, count):
    overlapped = client.generate(request(count)).image
    assert np.array_equal(overlapped, client.generate(request(count, "sequential")).image)
    assert np.array_equal(overlapped, pipeline.generate(request(count, "sequential")).image)


@pytest.mark.parametrize("count", [1, 3])
def test_async_mode_equals_in_process_async(client, pipeline, pose, count):
    served = client.generate(request(count, "async")).image
    assert np.array_equal(served, pipeline.generate(request(count, "async")).image)
    assert not np.array_equal(served, pipeline.generate(request(count, "sequential")).image)


def test_lru_eviction_and_reload_keep_images_equal(client):
    """Each instance keeps one ControlNet resident, so canny, depth, canny evicts and reloads canny."""
    canny, depth = request(1), request(1, controls=CONTROLS[1:])
    first = client.generate(canny).image
    assert not np.array_equal(client.generate(depth).image, first)
    assert np.array_equal(client.generate(canny).image, first)


def test_broken_controlnet_is_a_clear_error_and_the_next_request_succeeds(client, pipeline, tiny_root):
    folder = tiny_root / "controlnets" / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{ not json")
    try:
        with pytest.raises(InferenceServerException) as raised:
            client.generate(request(1, controls=(ControlNetUse("broken", control_image(1), 1.0),)))
    finally:
        shutil.rmtree(folder)
    # Refused before any work, as a broken LoRA file is: the catalog entry cannot serve this request.
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "controlnet_names: ControlNet 'broken' has no readable config" in raised.value.message()
    assert np.array_equal(client.generate(request(1)).image, pipeline.generate(request(1, "sequential")).image)

"""SDXL end to end through a real tritonserver of its own (the tiny SDXL model): the family is read from the model
folder and the same ensemble serves it; images equal the in-process pipeline (which test_fidelity checks against
diffusers), bounded LoRA loading equals a reference applied at the reported step, the diffusers baseline model
serves SDXL through diffusers' SDXL pipelines, and SDXL's own fields are validated like the others."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from conftest import control_image, max_diff, running_server
from swiftdiffusion.client import Client, Generated, Progress, infer_inputs
from swiftdiffusion.request import ControlNetUse, GenerationRequest, LoraUse
from swiftdiffusion.schema import tensors_from_request
from test_fidelity import CASES, SDXL_CASES, TOLERANCE as FIDELITY_TOLERANCE, diffusers_image, references  # noqa: F401 (a fixture)

pytestmark = pytest.mark.server
TOLERANCE = 1  # of 255: the server's instances run 1 torch thread, the in-process fixture torch's default
SERVED_CASES = {**CASES, **SDXL_CASES, "heun": dataclasses.replace(CASES["no_addons"], scheduler="Heun"),
                "clip_skip": dataclasses.replace(CASES["lora_kohya"], clip_skip=1)}


@pytest.fixture(scope="module")
def xl_server(tiny_xl_root, tmp_path_factory):
    with running_server(tiny_xl_root, tmp_path_factory.mktemp("repository_xl"), controlnet_instances=1,
                        torch_threads=1, baseline=True) as triton:
        yield triton


@pytest.fixture(scope="module")
def xl_client(xl_server):
    client = Client(xl_server.grpc_url)
    yield client
    client.close()


@pytest.mark.parametrize("case", sorted(SERVED_CASES))
def test_sdxl_served_equals_in_process(xl_client, xl_pipeline, case):
    served = xl_client.generate(SERVED_CASES[case])
    assert max_diff(served.image, xl_pipeline.generate(SERVED_CASES[case]).image) <= TOLERANCE
    assert served.lora_step == (0 if SERVED_CASES[case].loras else -1)


def test_sdxl_bounded_loras_equal_reference_at_reported_step(xl_client, xl_pipeline):
    request = dataclasses.replace(CASES["two_controlnets_two_loras"], lora_mode="bounded", lora_deadline=2, steps=6)
    served = xl_client.generate(request)
    assert 0 <= served.lora_step <= 2
    reference = xl_pipeline.generate(request, exact_lora_step=served.lora_step)
    assert max_diff(served.image, reference.image) <= TOLERANCE


def test_sdxl_stream_reports_steps_of_a_second_order_sampler_then_the_unary_image(xl_client):
    request = dataclasses.replace(CASES["controlnet"], scheduler="heun", steps=4)
    messages = list(xl_client.stream(request))
    progress = [m for m in messages if isinstance(m, Progress)]
    assert [p.step for p in progress] == [1, 2, 3, 4] and {p.total_steps for p in progress} == {4}
    assert isinstance(messages[-1], Generated)
    assert max_diff(messages[-1].image, xl_client.generate(request).image) <= TOLERANCE


@pytest.mark.parametrize("case", ["two_controlnets_two_loras", "prompt_2", "absent_negative_prompt"])
def test_sdxl_baseline_model_serves_diffusers_sdxl_pipelines(xl_client, references, case):
    served = xl_client.generate(SERVED_CASES[case], model="baseline_diffusers")
    assert max_diff(served.image, diffusers_image(references["sdxl"], SERVED_CASES[case])) <= FIDELITY_TOLERANCE


GOOD = GenerationRequest("a boat", steps=2, height=64, width=64, lora_mode="sync", prompt_2="a harbour",
                         loras=(LoraUse("style_peft", 0.5),), controlnets=(ControlNetUse("canny", control_image(9), 1.0),))
BAD_INPUTS = {
    "second_prompt_not_utf8": ({"prompt_2": np.array([[b"\xff\xfe"]], np.object_)}, "prompt_2"),
    "clip_skip_beyond_the_text_encoders": ({"clip_skip": np.array([[3]], np.int32)}, "clip_skip"),
    "original_size_zero": ({"original_size": np.array([[0, 64]], np.int32)}, "original_size"),
    "crop_negative": ({"crops_coords_top_left": np.array([[-8, 0]], np.int32)}, "crops_coords_top_left"),
    "target_size_huge": ({"target_size": np.array([[1 << 30, 64]], np.int32)}, "target_size"),
    "sd15_controlnet_name_path": ({"controlnet_names": np.array([[b"../../tiny/controlnets/canny"]], np.object_)},
                                  "controlnet_names"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_sdxl_bad_input_is_invalid_arg_and_server_stays_healthy(xl_client, xl_pipeline, case):
    changes, field = BAD_INPUTS[case]
    tensors = {**tensors_from_request(GOOD), **changes}
    with pytest.raises(InferenceServerException) as raised:
        xl_client.grpc.infer("text_to_image", infer_inputs(tensors))
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"{field}:" in raised.value.message()
    assert max_diff(xl_client.generate(GOOD).image, xl_pipeline.generate(GOOD).image) <= TOLERANCE

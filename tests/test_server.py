"""End to end through a real tritonserver: images equal the in-process pipeline, errors name their field."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import urllib.request

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from conftest import control_image, max_diff
from swiftdiffusion.client import Client, Generated, Progress, infer_inputs
from swiftdiffusion.request import ControlNetUse, GenerationRequest, LoraUse
from swiftdiffusion.schema import tensors_from_request
from swiftdiffusion.triton.perf_analyzer import input_data, run_perf_analyzer
from test_fidelity import CASES

pytestmark = pytest.mark.server
TOLERANCE = 1  # of 255: the server's instances run 1 torch thread, the in-process fixture torch's default


@pytest.mark.parametrize("case", sorted(CASES))
def test_server_equals_in_process(client, pipeline, case):
    served = client.generate(CASES[case])
    assert max_diff(served.image, pipeline.generate(CASES[case]).image) <= TOLERANCE
    assert served.lora_step == (0 if CASES[case].loras else -1)


def test_bounded_lora_equals_reference_at_reported_step(client, pipeline):
    request = dataclasses.replace(CASES["lora_kohya"], lora_mode="bounded", lora_deadline=2, steps=6)
    served = client.generate(request)
    assert 0 <= served.lora_step <= 2
    reference = pipeline.generate(request, exact_lora_step=served.lora_step)
    assert max_diff(served.image, reference.image) <= TOLERANCE


def _mixed_requests() -> list[GenerationRequest]:
    loras = [(), (LoraUse("style_peft", 1.0),), (LoraUse("character_kohya", 0.7),),
             (LoraUse("style_diffusers", 0.9), LoraUse("style_peft", 0.4))]
    controls = [(), (ControlNetUse("canny", control_image(5), 1.0),), (ControlNetUse("depth", control_image(6), 0.8),)]
    return [GenerationRequest("a garden", seed=i, steps=3, height=64, width=64, lora_mode="sync",
                              loras=loras[i % 4], controlnets=controls[i % 3]) for i in range(8)]


def test_concurrent_requests_get_their_own_loras(server, client):
    requests = _mixed_requests()
    alone = [client.generate(r).image for r in requests]

    def send(request):
        with_own = Client(server.grpc_url)
        try:
            return with_own.generate(request).image
        finally:
            with_own.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(send, requests[::-1]))[::-1]
    for one, other in zip(alone, together):
        assert np.array_equal(one, other)
    assert len({image.tobytes() for image in alone}) == len(alone)


def test_stream_delivers_every_step_then_the_unary_image(client):
    request = CASES["two_controlnets_two_loras"]
    messages = list(client.stream(request))
    progress = [m for m in messages if isinstance(m, Progress)]
    assert [p.step for p in progress] == list(range(1, request.steps + 1))
    assert all(p.total_steps == request.steps for p in progress)
    assert all(a.elapsed_s <= b.elapsed_s for a, b in zip(progress, progress[1:]))
    assert isinstance(messages[-1], Generated)
    assert max_diff(messages[-1].image, client.generate(request).image) <= TOLERANCE


GOOD = GenerationRequest("a boat", steps=2, height=64, width=64, lora_mode="sync",
                         loras=(LoraUse("style_peft", 0.5),), controlnets=(ControlNetUse("canny", control_image(9), 1.0),))


def _bad(field_changes: dict) -> dict:
    tensors = tensors_from_request(GOOD)
    for name, value in field_changes.items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value
    return tensors


def _strings(*values: bytes) -> np.ndarray:
    return np.array([list(values)], dtype=np.object_)


BAD_INPUTS = {
    "unknown_lora": ({"lora_names": _strings(b"no_such_lora")}, "lora_names"),
    "lora_path": ({"lora_names": _strings(b"../loras/style_peft")}, "lora_names"),
    "lora_absolute_path": ({"lora_names": _strings(b"/etc/passwd")}, "lora_names"),
    "unknown_controlnet": ({"controlnet_names": _strings(b"pose")}, "controlnet_names"),
    "controlnet_path": ({"controlnet_names": _strings(b"canny/../depth")}, "controlnet_names"),
    "image_shape": ({"controlnet_images": np.zeros((1, 1, 32, 64, 3), np.uint8)}, "controlnet_images"),
    "image_count": ({"controlnet_images": np.zeros((1, 2, 64, 64, 3), np.uint8)}, "controlnet_images"),
    "lora_scales_length": ({"lora_scales": np.array([[0.5, 0.5]], np.float32)}, "lora_scales"),
    "controlnet_scales_length": ({"controlnet_scales": np.array([[1.0, 1.0]], np.float32)}, "controlnet_scales"),
    "steps_zero": ({"steps": np.array([[0]], np.int32)}, "steps"),
    "steps_above_limit": ({"steps": np.array([[10_000]], np.int32)}, "steps"),
    "size_not_multiple_of_8": ({"height": np.array([[100]], np.int32)}, "height"),
    "size_above_limit": ({"width": np.array([[4096]], np.int32)}, "width"),
    "guidance_negative": ({"guidance_scale": np.array([[-1.0]], np.float32)}, "guidance_scale"),
    "guidance_nan": ({"guidance_scale": np.array([[np.nan]], np.float32)}, "guidance_scale"),
    "lora_scale_out_of_range": ({"lora_scales": np.array([[50.0]], np.float32)}, "lora_scales"),
    "controlnet_scale_negative": ({"controlnet_scales": np.array([[-2.0]], np.float32)}, "controlnet_scales"),
    "unknown_scheduler": ({"scheduler": _strings(b"tartan")}, "scheduler"),
    "sigma_schedule_the_sampler_lacks": ({"scheduler": _strings(b"euler_a_karras")}, "scheduler"),
    "more_steps_than_lcm_takes": ({"scheduler": _strings(b"LCM"), "steps": np.array([[100]], np.int32)}, "steps"),
    # SDXL's fields, sent to this SD1.5 model.
    "second_prompt_for_one_text_encoder": ({"prompt_2": _strings(b"a ship")}, "prompt_2"),
    "size_conditioning_for_sd15": ({"original_size": np.array([[512, 512]], np.int32)}, "original_size"),
    "clip_skip_beyond_the_text_encoder": ({"clip_skip": np.array([[50]], np.int32)}, "clip_skip"),
    "clip_skip_negative": ({"clip_skip": np.array([[-1]], np.int32)}, "clip_skip"),
    "prompt_not_utf8": ({"prompt": _strings(b"\xff\xfe caf\xe9")}, "prompt"),
    "unknown_lora_mode": ({"lora_mode": _strings(b"later")}, "lora_mode"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_invalid_arg_and_server_stays_healthy(client, pipeline, case):
    changes, field = BAD_INPUTS[case]
    with pytest.raises(InferenceServerException) as raised:
        client.grpc.infer("text_to_image", infer_inputs(_bad(changes)))
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"{field}:" in raised.value.message()
    assert max_diff(client.generate(GOOD).image, pipeline.generate(GOOD).image) <= TOLERANCE


def test_bad_input_on_the_stream_is_invalid_arg(client):
    request = dataclasses.replace(GOOD, steps=0)
    with pytest.raises(InferenceServerException, match="steps:"):
        list(client.stream(request))
    assert isinstance(list(client.stream(GOOD))[-1], Generated)


def test_metrics_endpoint_reports_lora_metrics(server, client):
    client.generate(GOOD)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(server.metrics_url, timeout=10).read().decode()
    assert 'nv_inference_request_success{model="text_to_image"' in text
    for metric in ("swiftdiffusion_lora_patch_seconds", "swiftdiffusion_lora_apply_step",
                   "swiftdiffusion_lora_bytes_read_total"):
        assert metric in text


def test_perf_analyzer_runs_against_the_ensemble(server, tmp_path):
    data = tmp_path / "inputs.json"
    data.write_text(json.dumps(input_data([GOOD, CASES["no_addons"]])))
    csv = tmp_path / "perf.csv"
    run_perf_analyzer("text_to_image", server.grpc_url, data, csv, measurement_request_count=2,
                      extra=["--max-trials", "3", "--stability-percentage", "1000"], timeout=300)
    header, row = csv.read_text().splitlines()[:2]
    assert header.startswith("Concurrency,Inferences/Second")
    assert float(row.split(",")[1]) > 0

"""Production hardening through a real tritonserver: abandoned requests stop at the next step, the backlog is
bounded, missing fields and hostile LoRA values are INVALID_ARG naming the field, and a model whose process dies
is reloaded by the launcher's supervisor while the server answers not ready."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import signal
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from safetensors.torch import load_file, save_file
from tritonclient.utils import InferenceServerException

from conftest import control_image, max_diff
from swiftdiffusion.client import Client, Generated, Progress, infer_inputs
from swiftdiffusion.request import ControlNetUse, GenerationRequest, LoraUse
from swiftdiffusion.schema import tensors_from_request
from swiftdiffusion.triton.launcher import python_stubs

pytestmark = pytest.mark.server
TOLERANCE = 1  # of 255, as test_server: the server's instances run 1 torch thread
SHORT = GenerationRequest("a quiet street", seed=2, steps=2, height=64, width=64)
# Long enough that a stop in its middle is unmistakable: ~0.1 s per step on the tiny model here.
LONG = GenerationRequest("a long night", seed=3, steps=150, height=256, width=256)


def metric(server, name: str, **labels: str) -> float:
    """One sample of the server's metrics endpoint (0 if absent)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(server.metrics_url, timeout=10).read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and line.split("{", 1)[1].split("}", 1)[0] == wanted:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(condition, timeout_s: float = 30.0, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"not within {timeout_s} s")


# ---- missing fields -------------------------------------------------------------------------------------------
def test_missing_prompt_is_invalid_arg_naming_it(client):
    tensors = tensors_from_request(SHORT)
    tensors.pop("prompt")
    with pytest.raises(InferenceServerException) as raised:
        client.grpc.infer("text_to_image", infer_inputs(tensors))
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert raised.value.message() == "in ensemble 'text_to_image', prompt: required"
    stream = grpcclient.InferenceServerClient(client.url)
    errors = []
    stream.start_stream(callback=lambda result, error: errors.append(error))
    stream.async_stream_infer("text_to_image_stream", infer_inputs(tensors), enable_empty_final_response=True)
    wait_for(lambda: errors)
    stream.stop_stream()
    assert errors[0] is not None and errors[0].message() == "prompt: required"


# ---- hostile LoRA values --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_loras(tiny_root):
    """Copies of catalog LoRAs with one NaN, one Inf, one absurd value: in the session catalog for this module."""
    folder = tiny_root / "loras"
    written = []
    for name, source, value in (("nan_values", "character_kohya", float("nan")), ("inf_values", "style_peft",
                                float("inf")), ("huge_values", "style_diffusers", 1e30)):
        state = load_file(folder / f"{source}.safetensors")
        factors = sorted(key for key, tensor in state.items() if tensor.numel() > 1)
        state[factors[len(factors) // 2]].view(-1)[3] = value
        written.append(folder / f"{name}.safetensors")
        save_file(state, written[-1])
    yield
    for path in written:
        path.unlink()


@pytest.mark.parametrize("mode", ["sync", "bounded"])
@pytest.mark.parametrize("name, problem", [("nan_values", "non-finite values"), ("inf_values", "non-finite values"),
                                           ("huge_values", "values too large")])
def test_lora_with_hostile_values_is_invalid_arg_and_weights_stay_pristine(client, pipeline, hostile_loras, mode,
                                                                           name, problem):
    request = dataclasses.replace(SHORT, steps=4, lora_mode=mode,
                                  loras=(LoraUse("style_peft", 0.5), LoraUse(name, 1.0)))
    with pytest.raises(InferenceServerException) as raised:
        client.generate(request)
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert re.search(rf"lora_names: LoRA '{name}' has {problem} \(layer ", raised.value.message())
    assert max_diff(client.generate(SHORT).image, pipeline.generate(SHORT).image) <= TOLERANCE


# ---- abandoned requests ---------------------------------------------------------------------------------------
STOP_MESSAGE = re.compile(r"timeout_s: the request's time budget of ([\d.]+) s ran out after (\d+) of 150 steps "
                          r"\(([\d.]+) s since it arrived\)")


def test_time_budget_stops_the_request_within_two_steps(client, pipeline):
    """A 150-step request with a 1.5 s budget (no gRPC deadline, so the server's answer arrives): CANCELLED,
    naming the budget; it ran out no more than two steps' time after the budget (per-step time from the same
    message), and the next request is served normally."""
    request = dataclasses.replace(LONG, timeout_s=1.5)
    with pytest.raises(InferenceServerException) as raised:
        client.grpc.infer("text_to_image", infer_inputs(tensors_from_request(request)))
    assert raised.value.status() == "StatusCode.CANCELLED"
    budget, steps, elapsed = STOP_MESSAGE.search(raised.value.message()).groups()
    assert 0 < int(steps) < 150
    assert float(elapsed) - float(budget) <= 2 * float(elapsed) / int(steps)
    assert max_diff(client.generate(SHORT).image, pipeline.generate(SHORT).image) <= TOLERANCE


def test_client_deadline_travels_with_the_request_and_frees_the_server(server):
    """The client library sends its timeout as the request's budget: when its gRPC deadline expires, the server
    stops the request too (Triton 2.51 does not pass an ensemble's cancellation on to the denoiser)."""
    stopped = metric(server, "swiftdiffusion_requests_stopped_total", model="denoiser", reason="timeout_s")
    steps = metric(server, "swiftdiffusion_denoise_steps_total", model="denoiser")
    impatient = Client(server.grpc_url, timeout_s=1.5)
    with pytest.raises(InferenceServerException) as raised:
        impatient.generate(LONG)
    assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    wait_for(lambda: metric(server, "swiftdiffusion_requests_stopped_total", model="denoiser",
                            reason="timeout_s") == stopped + 1)
    assert 0 < metric(server, "swiftdiffusion_denoise_steps_total", model="denoiser") - steps < LONG.steps
    assert isinstance(impatient.generate(SHORT), Generated)
    impatient.close()


def test_closed_stream_stops_the_request_within_two_steps(server, client):
    """The client closes the stream after 5 progress messages; the streaming model stops at the next step
    boundary where it asks `is_cancelled`: at most two steps after the last message the client saw."""
    stopped = metric(server, "swiftdiffusion_requests_stopped_total", model="text_to_image_stream",
                     reason="cancelled")
    steps = metric(server, "swiftdiffusion_denoise_steps_total", model="text_to_image_stream")
    stream, seen = client.stream(LONG), 0
    for message in stream:
        assert isinstance(message, Progress)
        seen += 1
        if seen == 5:
            break
    stream.close()
    wait_for(lambda: metric(server, "swiftdiffusion_requests_stopped_total", model="text_to_image_stream",
                            reason="cancelled") == stopped + 1)
    ran = metric(server, "swiftdiffusion_denoise_steps_total", model="text_to_image_stream") - steps
    assert seen <= ran <= seen + 2
    assert isinstance(list(client.stream(SHORT))[-1], Generated)


# ---- overload -------------------------------------------------------------------------------------------------
BURST = [dataclasses.replace(SHORT, steps=12, height=128, width=128, seed=i) for i in range(14)]


def test_a_burst_beyond_the_queue_is_refused_at_once_and_retries_get_through(server):
    """The session server's denoiser admits one running request and 8 queued (Deployment.max_queue); the rest of
    a burst of 14 is UNAVAILABLE at once, saying the queue is full. With retries, every request is served, each
    image equal to its solo run."""
    errors, finished = [], []
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    for request in BURST:
        grpc.async_infer("text_to_image", infer_inputs(tensors_from_request(request)),
                         callback=lambda result, error: (errors if error else finished).append(error or result))
    wait_for(lambda: len(errors) + len(finished) == len(BURST), timeout_s=120)
    assert len(errors) >= len(BURST) - 9 and len(finished) >= 1
    for error in errors:
        assert error.status() == "StatusCode.UNAVAILABLE"
        assert error.message() == "in ensemble 'text_to_image', [request id: <id_unknown>] Exceeds maximum queue size"

    def patient(request: GenerationRequest) -> np.ndarray:
        with_retries = Client(server.grpc_url, retries=20)
        try:
            return with_retries.generate(request).image
        finally:
            with_retries.close()

    with concurrent.futures.ThreadPoolExecutor(len(BURST)) as pool:
        images = list(pool.map(patient, BURST))
    solo = Client(server.grpc_url)
    assert all(np.array_equal(image, solo.generate(request).image) for image, request in zip(images[:3], BURST))
    solo.close()
    grpc.close()


# ---- dead model processes -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def own_server(tiny_root, tmp_path_factory):
    """A server of its own, so that killed stubs cannot reach other tests; only the models the unary request path
    needs (explicit model control, the launcher's default)."""
    from swiftdiffusion.serve import SHM_ARGS
    from swiftdiffusion.triton.launcher import TritonServer, free_ports
    from swiftdiffusion.triton.repository import Deployment, write_repository

    repository = write_repository(tmp_path_factory.mktemp("own_repository"), Deployment(
        model=tiny_root / "model", controlnet_catalog=tiny_root / "controlnets", lora_catalog=str(tiny_root / "loras"),
        controlnet_instances=2, torch_threads=1, resident_controlnets=1))
    triton = TritonServer()
    triton.start(repository, free_ports(3), log_file=repository / "server.log",
                 extra_args=[*SHM_ARGS, "--load-model=text_to_image", "--load-model=controlnet",
                             "--exit-timeout-secs=10"])
    try:
        triton.wait_ready(timeout=600)
        yield triton
    finally:
        triton.stop()


def ready(server) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{server.http_url}/v2/health/ready", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, TimeoutError, ConnectionError):  # 400 while a model is unloaded; busy reloading
        return False


@pytest.mark.parametrize("instance", ["controlnet_0_0", "denoiser_0_0", "text_encoder_0_0", "vae_decoder_0_0"])
def test_killed_model_process_is_reloaded_and_the_server_is_not_ready_meanwhile(own_server, pipeline, instance):
    """SIGKILL of one model's stub while a request is in flight: Triton 2.51 neither restarts it nor stops routing
    to it. The supervisor sees it within a second, unloads the model (`/v2/health/ready` turns 400, so a load
    balancer stops sending) and loads it again; the old version's processes all exit (nothing of the request in
    flight holds them), then the server is ready and serves the correct image from fresh processes."""
    request = GenerationRequest("a red house on a hill", seed=7, steps=3, height=64, width=64,
                                controlnets=(ControlNetUse("canny", control_image(1), 1.0),))
    busy = dataclasses.replace(request, steps=40, height=128, width=128,
                               controlnets=(ControlNetUse("canny", control_image(1, 128, 128), 1.0),
                                            ControlNetUse("depth", control_image(2, 128, 128), 0.5)))
    client = Client(own_server.grpc_url, timeout_s=120)
    expected = pipeline.generate(request).image
    assert max_diff(client.generate(request).image, expected) <= TOLERANCE
    model = instance.rsplit("_", 2)[0]
    before = python_stubs(own_server.pid)
    old = {pid for pid, stub in before.items() if stub.model == model}
    reloads = len(own_server.supervisor.reloads)
    grpc = grpcclient.InferenceServerClient(own_server.grpc_url)
    answered = []
    grpc.async_infer("text_to_image", infer_inputs(tensors_from_request(busy)),
                     callback=lambda result, error: answered.append(error))
    time.sleep(1.0)  # in its ControlNet calls
    os.kill(next(pid for pid, stub in before.items() if stub.instance == instance), signal.SIGKILL)
    wait_for(lambda: not ready(own_server), timeout_s=30, poll_s=0.05)
    wait_for(lambda: len(own_server.supervisor.reloads) > reloads and ready(own_server), timeout_s=180)
    assert own_server.supervisor.reloads[-1][1] == model
    wait_for(lambda: not old & set(python_stubs(own_server.pid)), timeout_s=60)
    fresh = [stub.instance for stub in python_stubs(own_server.pid).values() if stub.model == model]
    assert sorted(fresh) == sorted(stub.instance for pid, stub in before.items() if pid in old)
    assert max_diff(client.generate(request).image, expected) <= TOLERANCE
    wait_for(lambda: answered, timeout_s=120)  # the request in flight got an answer, whichever
    client.close()
    grpc.close()

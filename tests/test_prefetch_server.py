"""The look-ahead through a real tritonserver: a remote LoRA catalog (a throttled loopback HTTP server), and a
request that waits behind a long one has its LoRA copied locally by the ensemble's `lora_prefetch` step before
its turn; its image equals the in-process one."""

from __future__ import annotations

import functools
import http.server
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import max_diff
from swiftdiffusion.client import Client, infer_inputs
from swiftdiffusion.request import GenerationRequest, LoraUse
from swiftdiffusion.schema import tensors_from_request

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
from lora_bench import ThrottledHandler  # noqa: E402

pytestmark = pytest.mark.server


class SlowHandler(ThrottledHandler):
    rate = 0.5e6  # bytes/s: a tiny-model LoRA takes ~0.3-0.8 s


@pytest.fixture(scope="module")
def remote_server(tiny_root, tmp_path_factory):
    from swiftdiffusion.serve import SHM_ARGS
    from swiftdiffusion.triton.launcher import TritonServer, free_ports
    from swiftdiffusion.triton.repository import Deployment, write_repository

    handler = functools.partial(SlowHandler, directory=str(tiny_root / "loras"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    copies = tmp_path_factory.mktemp("copies")
    repository = write_repository(tmp_path_factory.mktemp("remote_repository"), Deployment(
        model=tiny_root / "model", controlnet_catalog=tiny_root / "controlnets",
        lora_catalog=f"http://127.0.0.1:{httpd.server_address[1]}", lora_copies=str(copies), torch_threads=1,
        controlnet_instances=1))
    triton = TritonServer()
    triton.start(repository, free_ports(3), extra_args=SHM_ARGS, log_file=repository / "server.log")
    try:
        triton.wait_ready(timeout=600)
        yield triton, copies
    finally:
        triton.stop()
        httpd.shutdown()


def test_a_queued_requests_lora_is_copied_before_its_turn(remote_server, pipeline):
    triton, copies = remote_server
    long = GenerationRequest("a long wait", steps=60, height=192, width=192)
    queued = GenerationRequest("a harbour", seed=5, steps=3, height=64, width=64, lora_mode="sync",
                               loras=(LoraUse("character_kohya", 0.8),))
    grpc = grpcclient.InferenceServerClient(triton.grpc_url)
    done = []
    grpc.async_infer("text_to_image", infer_inputs(tensors_from_request(long)),
                     callback=lambda result, error: done.append(("long", time.monotonic(), error)))
    time.sleep(0.5)  # the long one is denoising
    grpc.async_infer("text_to_image", infer_inputs(tensors_from_request(queued)),
                     callback=lambda result, error: done.append(("queued", result, error)))
    deadline = time.monotonic() + 60
    while not list(copies.glob("character_kohya.*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(copies.glob("character_kohya.*.safetensors")), "the LoRA was not prefetched"
    assert not done, "the copy must exist while the long request still runs"
    while len(done) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    (name, result, error), = [d for d in done if d[0] == "queued"]
    assert error is None
    assert max_diff(result.as_numpy("image")[0], pipeline.generate(queued).image) <= 1
    client = Client(triton.grpc_url)
    assert np.array_equal(client.generate(queued).image, result.as_numpy("image")[0])  # from the host cache
    client.close()
    grpc.close()

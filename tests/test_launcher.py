"""End-to-end checks of the tritonserver launcher and perf_analyzer locator against a real server and a toy model."""

from __future__ import annotations

import csv
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from swiftdiffusion.triton.launcher import ServerInstall, TritonServer, find_tritonserver, free_ports

pytestmark = pytest.mark.server

MODEL = "double"
CONFIG = """
name: "double"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "PREFIX" data_type: TYPE_STRING dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
# PREFIX reports the stub's sys.prefix: proof that model.py runs inside this venv and sees its packages.
MODEL_PY = """
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            prefix = np.array([sys.prefix.encode()], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", (x * 2).astype(np.float32)),
                pb_utils.Tensor("PREFIX", prefix),
            ]))
        return responses
"""


def _install() -> ServerInstall:
    try:
        return find_tritonserver()
    except FileNotFoundError as e:
        pytest.skip(f"no tritonserver: {e}")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("model_repository")
    (repo / MODEL / "1").mkdir(parents=True)
    (repo / MODEL / "config.pbtxt").write_text(CONFIG)
    (repo / MODEL / "1" / "model.py").write_text(MODEL_PY)
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[TritonServer]:
    server = TritonServer(_install())
    t0 = time.monotonic()
    server.start(repository, free_ports(3), log_file=repository.parent / "tritonserver.log")
    try:
        server.wait_ready(timeout=120)
        print(f"tritonserver ready in {time.monotonic() - t0:.1f} s")
        yield server
    finally:
        server.stop()


def test_grpc_infer(server: TritonServer) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    x = np.array([1.0, -2.0, 3.5, 0.0], dtype=np.float32)
    inp = grpcclient.InferInput("INPUT0", [4], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(MODEL, [inp])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 2)
    assert result.as_numpy("PREFIX")[0].decode() == sys.prefix


def test_metrics(server: TritonServer) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(server.metrics_url, timeout=10) as response:
        assert "nv_inference_request_success" in response.read().decode()


def _listening_addresses(ports: set[int]) -> set[tuple[str, int]]:
    """(hex local address, port) of the LISTEN sockets on ``ports``, IPv4 and IPv6, from /proc/net."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.split(":")
            if state == "0A" and int(port, 16) in ports:
                found.add((address, int(port, 16)))
    return found


def test_listens_on_loopback_only(server: TritonServer) -> None:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc/net/tcp")
    found = _listening_addresses(set(server.ports))
    assert {port for _, port in found} == set(server.ports)
    # 127.0.0.1 in little-endian hex; gRPC listens on an IPv6 socket, at the IPv4-mapped ::ffff:127.0.0.1
    assert {address for address, _ in found} <= {"0100007F", "0000000000000000FFFF00000100007F"}


def test_perf_analyzer(server: TritonServer, tmp_path: Path) -> None:
    from swiftdiffusion.triton.perf_analyzer import run_perf_analyzer

    data = tmp_path / "input.json"
    data.write_text(json.dumps({"data": [{"INPUT0": [1.0, 2.0, 3.0, 4.0]}]}))
    csv_out = tmp_path / "perf.csv"
    run_perf_analyzer(
        MODEL, server.grpc_url, data, csv_out, measurement_request_count=5, lib_dir=tmp_path / "libs", timeout=120
    )
    rows = list(csv.DictReader(csv_out.open()))
    assert rows and float(rows[0]["Inferences/Second"]) > 0


def test_wait_ready_fails_fast_when_server_exits(tmp_path: Path) -> None:
    server = TritonServer(_install())
    server.start(tmp_path / "missing", free_ports(3), log_file=tmp_path / "log.txt")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code"):
        server.wait_ready(timeout=60)
    assert time.monotonic() - t0 < 30
    server.stop()


def test_stop_ends_process(server: TritonServer) -> None:
    """Runs last in this file: it stops the shared server (the fixture's own stop() is then a no-op)."""
    assert server.process is not None and server.process.poll() is None
    assert server.stop() == 0
    assert server.process.poll() is not None
    assert not _listening_addresses(set(server.ports))

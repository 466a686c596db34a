"""ControlNet inputs and residuals as DLPack tensors through BLS (Deployment.residual_transport "dlpack"), the path a
GPU deployment takes where perf/triton_gpu_check.py finds it working: here with CPU tensors, which Triton 2.51 moves
the same way through the same API. Through real tritonservers of both families, the images equal the in-process
pipeline's and the host transport's; the pieces against a stand-in for `triton_python_backend_utils` first."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import pytest
import torch

from conftest import max_diff, running_server
from swiftdiffusion.client import Client, Generated
from swiftdiffusion.family import SDXL
from swiftdiffusion.request import GenerationRequest
from swiftdiffusion.triton.serving import BlsControlNets, controlnet_inputs, pb_tensor
from test_fidelity import CASES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOLERANCE = 1  # of 255
# 0, 1 and 2 ControlNets, the two ControlNets in every mode, and CFG-parallel branches sending their own calls.
REQUESTS = {
    "no_controlnet": CASES["no_addons"],
    "one_controlnet": CASES["controlnet"],
    "two_controlnets": CASES["two_controlnets"],
    "two_controlnets_sequential": dataclasses.replace(CASES["two_controlnets"], controlnet_mode="sequential"),
    "two_controlnets_async": dataclasses.replace(CASES["two_controlnets"], controlnet_mode="async"),
    "two_controlnets_cfg_parallel": dataclasses.replace(CASES["two_controlnets"], cfg_parallel=True),
}


# ---- against a stand-in for pb --------------------------------------------------------------------------------
class DlpackStandIn:
    """The parts of pb a DLPack BLS call uses, refusing what 2.51 refuses (non-C-contiguous DLPack tensors, GPU
    tensors as numpy); each call's response carries its inputs back, as DLPack-readable tensors."""

    TRITONSERVER_MEMORY_CPU, TRITONSERVER_MEMORY_GPU = "cpu", "gpu"

    def __init__(self):
        self.requests: list[SimpleNamespace] = []
        self.Tensor = self._tensor_class()  # noqa: N815 - pb's name

    @staticmethod
    def _tensor_class():
        class Tensor(SimpleNamespace):
            def __init__(self, name, array, dlpack=False):
                super().__init__(name=name, array=array, dlpack=dlpack)

            @classmethod
            def from_dlpack(cls, name, tensor):
                if not tensor.is_contiguous():
                    raise RuntimeError("DLPack tensor is not contiguous. Only contiguous DLPack tensors that are "
                                       "stored in C-Order are supported.")
                return cls(name, tensor, dlpack=True)

            def to_dlpack(self):
                return torch.utils.dlpack.to_dlpack(torch.as_tensor(self.array))

            def as_numpy(self):
                return np.asarray(self.array)
        return Tensor

    def PreferredMemory(self, kind, device):  # noqa: N802 - pb's name
        return (kind, device)

    def InferenceRequest(self, model_name, inputs, requested_output_names, **options):  # noqa: N802
        request = SimpleNamespace(inputs={t.name: t for t in inputs}, options=options)
        self.requests.append(request)

        async def respond():
            return SimpleNamespace(has_error=lambda: False, outputs=request.inputs)
        return SimpleNamespace(async_exec=lambda: asyncio.ensure_future(respond()))

    def get_output_tensor_by_name(self, response, name):
        return response.outputs[name]


def test_pb_tensor_hands_torch_tensors_over_contiguous_and_keeps_host_copies_for_host():
    pb = DlpackStandIn()
    channels_last = torch.arange(24.0).reshape(1, 2, 3, 4).to(memory_format=torch.channels_last)
    handed = pb_tensor(pb, "down_0", channels_last, "dlpack")
    assert handed.dlpack and torch.equal(handed.array, channels_last) and handed.array.is_contiguous()
    copied = pb_tensor(pb, "down_0", channels_last)
    assert not copied.dlpack and isinstance(copied.array, np.ndarray) and np.array_equal(copied.array,
                                                                                         channels_last.numpy())


def test_a_dlpack_call_sends_tensors_asks_for_outputs_in_memory_and_reads_them_back():
    pb = DlpackStandIn()
    names = controlnet_inputs(SDXL)
    runner = BlsControlNets(pb, "controlnet", "/catalog", SDXL, names[1:], torch.device("cpu"), "dlpack")
    inputs = {name: torch.full((2, 3), float(i)) for i, name in enumerate(names)}
    residuals = asyncio.run(_submitted(runner, inputs))
    [request] = pb.requests
    assert request.options == {"preferred_memory": ("cpu", 0)}
    assert request.inputs["controlnet_name"].array.tolist() == [b"canny"] and not request.inputs["timestep"].dlpack
    assert all(request.inputs[name].dlpack for name in names if name != "timestep")
    assert {name: value.tolist() for name, value in residuals.items()} == {
        name: inputs[name].tolist() for name in names[1:]}


async def _submitted(runner: BlsControlNets, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return await runner.submit("canny", inputs)


def test_an_unknown_transport_is_refused():
    with pytest.raises(ValueError, match="residual_transport must be one of"):
        BlsControlNets(DlpackStandIn(), "controlnet", "/catalog", SDXL, (), torch.device("cpu"), "numpy")


# ---- through real servers -------------------------------------------------------------------------------------
@contextlib.contextmanager
def served(root: Path, repository: Path, **fields) -> Iterator[tuple[Client, Path]]:
    """A tritonserver over the tiny model at `root` rendered with these Deployment fields (one torch thread per
    instance, two ControlNet instances or devices); a client of it, and its log."""
    with running_server(root, repository, controlnet_instances=2, torch_threads=1, **fields) as triton:
        client = Client(triton.grpc_url)
        try:
            yield client, repository / "server.log"
        finally:
            client.close()


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def dlpack(request, family_roots, tmp_path_factory) -> Iterator[tuple[str, Client, Path]]:
    family = request.param
    with served(family_roots[family], tmp_path_factory.mktemp(f"dlpack_{family}"), residual_transport="dlpack") as (
            client, log):
        yield family, client, log


def check_served_image(request, family: str, client: Client, generation: GenerationRequest) -> None:
    """The served image equals the in-process pipeline's and, for SD1.5, the suite's server's (host transport,
    service placement; SDXL's server is compared with in-process in test_sdxl_server)."""
    image = client.generate(generation).image
    in_process = request.getfixturevalue("xl_pipeline" if family == "sdxl" else "pipeline")
    assert max_diff(image, in_process.generate(generation).image) <= TOLERANCE
    if family == "sd15":
        assert max_diff(image, request.getfixturevalue("client").generate(generation).image) <= TOLERANCE


@pytest.mark.server
@pytest.mark.parametrize("case", sorted(REQUESTS))
def test_dlpack_images_equal_in_process_and_the_host_transport(request, dlpack, case):
    family, client, _ = dlpack
    check_served_image(request, family, client, REQUESTS[case])  # the suite's server: the host transport


@pytest.mark.server
def test_the_server_says_it_serves_dlpack_and_the_controlnet_model_takes_gpu_inputs(dlpack):
    _, _, log = dlpack
    text = log.read_text()
    assert text.count("ControlNets through model 'controlnet' (dlpack transport)") == 2  # unary and stream models
    assert "Input tensors can be both in CPU and GPU. FORCE_CPU_ONLY_INPUT_TENSORS is off." in text


@pytest.mark.server
def test_the_stream_sends_its_controlnet_calls_by_dlpack_too(dlpack):
    _, client, _ = dlpack
    check_stream_equals_unary(client, REQUESTS["two_controlnets"])


def check_stream_equals_unary(client: Client, generation: GenerationRequest) -> None:
    """The streaming model's final image equals the unary one's bit for bit."""
    final = list(client.stream(generation))[-1]
    assert isinstance(final, Generated) and np.array_equal(final.image, client.generate(generation).image)

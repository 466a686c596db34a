"""The `local` placement (Deployment.controlnet_placement): no ControlNet model, each denoising instance runs its
ControlNets itself on devices of its own (`DeviceControlNets`), for where no GPU tensor can cross Triton's process
boundary. Here with two CPU "devices": in-process it gives the in-process runner's images bit for bit in every mode,
spreads a request's calls over its devices and names a failed ControlNet; through real tritonservers of both
families it gives the in-process pipeline's images and the service placement's, with no controlnet model."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from typing import Iterator

import numpy as np
import pytest
import torch

from swiftdiffusion.client import Client
from swiftdiffusion.controlnets import ControlNetCatalog, DeviceControlNets
from swiftdiffusion.graphs import residual_names
from swiftdiffusion.pipeline import Pipeline
from test_dlpack_transport import REQUESTS, check_served_image, check_stream_equals_unary, served

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ("sd15", "sdxl")


class RecordingCatalog(ControlNetCatalog):
    """A catalog that records the thread of every ControlNet it hands out, and can hold its callers at a gate."""

    def __init__(self, *args, gate: threading.Event | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = gate
        self.threads: list[str] = []

    def get(self, name: str):
        self.threads.append(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(30)
        return super().get(name)


def two_devices(pipeline: Pipeline, gate: threading.Event | None = None) -> DeviceControlNets:
    root = pipeline.controlnets.catalog.root
    return DeviceControlNets([RecordingCatalog(root, family=pipeline.model.family, gate=gate) for _ in range(2)], "cpu")


@pytest.fixture(scope="module")
def on_two_devices(request):
    """Per family: the session's in-process pipeline, and one over the same model with two CPU devices."""
    made = {}

    def pipelines(family: str) -> tuple[Pipeline, Pipeline]:
        if family not in made:
            reference = request.getfixturevalue("xl_pipeline" if family == "sdxl" else "pipeline")
            made[family] = reference, Pipeline(reference.model, two_devices(reference), reference.loras)
        return made[family]
    return pipelines


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(REQUESTS))
def test_two_devices_give_the_in_process_images_bit_for_bit(on_two_devices, family, case):
    reference, local = on_two_devices(family)
    catalogs = [worker.catalog for worker in local.controlnets.workers]
    for catalog in catalogs:
        catalog.threads.clear()
    assert np.array_equal(local.generate(REQUESTS[case]).image, reference.generate(REQUESTS[case]).image)
    threads = [set(catalog.threads) for catalog in catalogs]
    # Every device served some of the request's calls, each device's on a thread of its own.
    if not REQUESTS[case].controlnets:
        assert threads == [set(), set()]
        return
    assert [len(names) for names in threads] == [1, 1] and threads[0] != threads[1]
    assert all(name.startswith("controlnet-") for names in threads for name in names)


def test_calls_in_flight_go_to_the_least_busy_device(pipeline):
    gate = threading.Event()
    runner = two_devices(pipeline, gate)
    inputs = {"sample": torch.zeros(2, 4, 8, 8), "timestep": torch.zeros(1),
              "encoder_hidden_states": torch.zeros(2, 77, 32), "controlnet_cond": torch.zeros(2, 3, 64, 64)}

    async def four_calls():
        pending = [runner.submit("canny", inputs) for _ in range(4)]
        queued = [worker.queued for worker in runner.workers]
        gate.set()
        return queued, await asyncio.gather(*pending)

    queued, results = asyncio.run(four_calls())
    assert queued == [2, 2] and [worker.queued for worker in runner.workers] == [0, 0]
    decoder = residual_names(pipeline.engines["unet_decoder"].spec)
    assert all(set(result) == set(decoder) for result in results)
    assert all(torch.equal(result[name], results[0][name]) for result in results for name in decoder)


def test_a_failed_call_names_the_controlnet(pipeline, monkeypatch):
    def unreadable(name):
        raise OSError("weights unreadable")

    runner = two_devices(pipeline)
    for worker in runner.workers:
        monkeypatch.setattr(worker.catalog, "get", unreadable)

    async def call():
        return await runner.submit("canny", {})

    with pytest.raises(RuntimeError, match="ControlNet 'canny' failed: OSError: weights unreadable"):
        asyncio.run(call())


# ---- through real servers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=FAMILIES)
def local(request, family_roots, tmp_path_factory) -> Iterator[tuple[str, Client, object]]:
    family = request.param
    repository = tmp_path_factory.mktemp(f"local_{family}")
    with served(family_roots[family], repository, controlnet_placement="local") as (client, log):
        yield family, client, log


@pytest.mark.server
@pytest.mark.parametrize("case", sorted(REQUESTS))
def test_local_placement_images_equal_in_process_and_the_service_placement(request, local, case):
    family, client, _ = local
    check_served_image(request, family, client, REQUESTS[case])  # the suite's server: the service placement


@pytest.mark.server
def test_no_controlnet_model_and_both_denoising_models_run_controlnets_on_their_devices(local):
    _, client, log = local
    assert "controlnet" not in {model["name"] for model in client.grpc.get_model_repository_index(as_json=True)[
        "models"]}
    ready = [line for line in log.read_text().splitlines() if " ready on " in line]
    assert sum("ControlNets in this process on cpu, cpu" in line for line in ready) == 2, ready  # unary, stream


@pytest.mark.server
def test_the_stream_runs_its_controlnets_locally_too(local):
    _, client, _ = local
    check_stream_equals_unary(client, REQUESTS["two_controlnets"])


LOADS_AT_ONCE = """
import sys, threading, torch
from swiftdiffusion.models import load_controlnet
register_parameter = torch.nn.Module.register_parameter
barrier = threading.Barrier(8)
def load():
    barrier.wait()
    for _ in range(5):
        assert not any(p.is_meta for p in load_controlnet(sys.argv[1]).module.parameters())
threads = [threading.Thread(target=load) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
assert torch.nn.Module.register_parameter is register_parameter, torch.nn.Module.register_parameter
assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
print("ok")
"""


def test_controlnets_loaded_by_parallel_workers_leave_torch_unpatched(tiny_root):
    """Each device's worker loads its first ControlNet itself, so loads run in parallel threads: without one load
    at a time, diffusers' loader left `register_parameter` patched and every later module on the meta device (run in
    a process of its own, which that would spoil)."""
    run = subprocess.run([sys.executable, "-c", LOADS_AT_ONCE, str(tiny_root / "controlnets" / "canny")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]

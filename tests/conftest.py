"""Shared fixtures: the built-in tiny model (built once per test session) and a pipeline over it."""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import pytest
import torch

from swiftdiffusion.controlnets import ControlNetCatalog, LocalControlNets
from swiftdiffusion.lora_store import LoraStore
from swiftdiffusion.models import load_model
from swiftdiffusion.pipeline import Pipeline
from swiftdiffusion import tiny
from swiftdiffusion.tiny import build_model


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_xl_root(tmp_path_factory):
    """The built-in tiny SDXL model."""
    return build_model(tmp_path_factory.mktemp("tiny_xl"), "tiny", seed=0, family="sdxl")


@pytest.fixture(scope="session")
def family_roots(tiny_root, tiny_xl_root) -> dict:
    return {"sd15": tiny_root, "sdxl": tiny_xl_root}


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module, as the servers' instances run it (`torch_threads=1`). With two threads
    oneDNN splits convolution reductions differently, and in-process references came out up to 1/255 from the
    served images; with one thread on both sides they are bit-exact. The tiny graphs gain nothing from a second
    thread anyway."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_pipeline(root, **kwargs) -> Pipeline:
    model = load_model(root / "model")
    return Pipeline(model, LocalControlNets(ControlNetCatalog(root / "controlnets", family=model.family)),
                    LoraStore(root / "loras", model.lora_target, model.device, model.dtype), **kwargs)


@pytest.fixture(scope="session")
def pipeline(tiny_root) -> Pipeline:
    return make_pipeline(tiny_root)


@pytest.fixture(scope="session")
def xl_pipeline(tiny_xl_root) -> Pipeline:
    return make_pipeline(tiny_xl_root)


def control_image(seed: int, height: int = 64, width: int = 64) -> np.ndarray:
    """The built-in control image at the tests' default size."""
    return tiny.control_image(seed, height, width)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@contextlib.contextmanager
def running_server(root, folder, **deployment) -> Iterator:
    """A real tritonserver on free local ports over a built-in model folder (model, controlnets, loras), with a
    repository rendered into `folder`; stopped when the block ends."""
    from swiftdiffusion.serve import SHM_ARGS
    from swiftdiffusion.triton.launcher import TritonServer, free_ports
    from swiftdiffusion.triton.repository import Deployment, write_repository

    repository = write_repository(folder, Deployment(model=root / "model", controlnet_catalog=root / "controlnets",
                                                     lora_catalog=str(root / "loras"), **deployment))
    triton = TritonServer()
    triton.start(repository, free_ports(3), extra_args=SHM_ARGS, log_file=repository / "server.log")
    try:
        triton.wait_ready(timeout=600)
        yield triton
    finally:
        triton.stop()


@pytest.fixture(scope="session")
def server(tiny_root, tmp_path_factory):
    """One real tritonserver over the tiny model, for every end-to-end test; its denoiser keeps a UNet copy for
    CFG-parallel requests' unconditional branch (on a second GPU in production)."""
    with running_server(tiny_root, tmp_path_factory.mktemp("repository"), controlnet_instances=2, torch_threads=1,
                        resident_controlnets=1, baseline=True, cfg_device="cpu") as triton:
        yield triton


@pytest.fixture(scope="session")
def client(server):
    from swiftdiffusion.client import Client

    client = Client(server.grpc_url)
    yield client
    client.close()

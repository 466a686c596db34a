"""ControlNets by name: a catalog folder of diffusers ControlNets, an LRU of loaded ones, and runners.

A runner takes one ControlNet evaluation and returns an awaitable of its residuals. `LocalControlNets` computes
in the calling process before returning (the sequential baseline); the Triton orchestrator's runner sends the
work to the ControlNet model with asynchronous BLS, so it computes while the UNet encoder runs.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Awaitable, Mapping, Protocol

import torch

from .catalog import LruCache, resolve
from .engines import Engine
from .family import ModelFamily, family_of
from .models import load_controlnet
from .request import RequestError


class ControlNetRunner(Protocol):
    def submit(self, name: str, inputs: Mapping[str, torch.Tensor]) -> Awaitable[dict[str, torch.Tensor]]:
        """Starts one ControlNet evaluation (inputs named as the `controlnet` graph's) and returns its future."""

    def check(self, name: str) -> None:
        """Raises RequestError if `name` is not in the catalog."""


def controlnet_folder(root: Path, name: str, family: ModelFamily | None) -> Path:
    """The catalog folder of ControlNet `name`; RequestError naming `controlnet_names` if there is none, or if it is
    a ControlNet of another family than the model's (read from its config, before anything is loaded)."""
    path = resolve(root, name, "", "controlnet_names")
    if family is not None:
        try:
            own = family_of(json.loads((path / "config.json").read_text()))
        except (OSError, ValueError) as error:
            raise RequestError("controlnet_names", f"ControlNet {name!r} has no readable config ({error})") from error
        if own is not family:
            raise RequestError("controlnet_names", f"ControlNet {name!r} is an {own.name} ControlNet; this model is "
                                                   f"{family.name}")
    return path


class ControlNetCatalog:
    """ControlNet folders under `root`, the `capacity` most recently used kept loaded; with `family`, only
    ControlNets of that family are served."""

    def __init__(self, root: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 capacity: int = 4, family: ModelFamily | None = None):
        self.root = Path(root)
        self.device = device
        self.dtype = dtype
        self.family = family
        self.cache: LruCache[Engine] = LruCache(capacity, self._load)

    def path(self, name: str) -> Path:
        return controlnet_folder(self.root, name, self.family)

    def _load(self, name: str) -> Engine:
        return load_controlnet(self.path(name), self.device, self.dtype)

    def get(self, name: str) -> Engine:
        self.path(name)
        return self.cache.get(name)


class LocalControlNets:
    """Runs ControlNets in this process: one after the other, before `submit` returns; or, with `overlap` on a
    GPU, each ControlNet on a CUDA stream of its own, so its kernels overlap the UNet encoder's on the main stream.

    `overlap` is off by default (in-process use; served ControlNets run on their own instances): on an H100 it
    took a one-ControlNet step from 15.3 to 13.9 ms, images within 1/255 of eager (perf/gpu_bench.py).
    """

    def __init__(self, catalog: ControlNetCatalog, overlap: bool = False):
        self.catalog = catalog
        self.overlap = overlap and torch.device(catalog.device).type == "cuda"
        self.streams: dict[str, torch.cuda.Stream] = {}

    def check(self, name: str) -> None:
        self.catalog.path(name)

    def submit(self, name: str, inputs: Mapping[str, torch.Tensor]) -> Awaitable[dict[str, torch.Tensor]]:
        engine = self.catalog.get(name)
        if not self.overlap:
            future = asyncio.get_running_loop().create_future()
            future.set_result(engine(inputs))
            return future
        main = torch.cuda.current_stream()
        stream = self.streams.setdefault(name, torch.cuda.Stream(main.device))
        stream.wait_stream(main)  # its inputs are ready, and last step's outputs have been read
        for tensor in inputs.values():
            tensor.record_stream(stream)  # asynchronous mode: the caller may free them before this stream reads
        with torch.cuda.stream(stream):
            outputs = engine(inputs)
        done = stream.record_event()
        return _joined(outputs, done)


async def _joined(outputs: dict[str, torch.Tensor], done: torch.cuda.Event) -> dict[str, torch.Tensor]:
    """The side stream's outputs, safe to use on the current stream."""
    main = torch.cuda.current_stream()
    main.wait_event(done)
    for tensor in outputs.values():
        tensor.record_stream(main)  # the allocator must not hand their memory back to the side stream early
    return outputs

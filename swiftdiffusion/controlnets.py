"""ControlNets by name: a catalog folder of diffusers ControlNets, an LRU of loaded ones, and runners.

A runner takes one ControlNet evaluation and returns an awaitable of its residuals. `LocalControlNets` computes
in the calling process before returning (the sequential baseline); the Triton orchestrator's runner sends the
work to the ControlNet model with asynchronous BLS, so it computes while the UNet encoder runs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Awaitable, Mapping, Protocol

import torch

from .catalog import LruCache, resolve
from .engines import Engine
from .models import load_controlnet


class ControlNetRunner(Protocol):
    def submit(self, name: str, inputs: Mapping[str, torch.Tensor]) -> Awaitable[dict[str, torch.Tensor]]:
        """Starts one ControlNet evaluation (inputs named as the `controlnet` graph's) and returns its future."""

    def check(self, name: str) -> None:
        """Raises RequestError if `name` is not in the catalog."""


class ControlNetCatalog:
    """ControlNet folders under `root`, the `capacity` most recently used kept loaded."""

    def __init__(self, root: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 capacity: int = 4):
        self.root = Path(root)
        self.device = device
        self.dtype = dtype
        self.cache: LruCache[Engine] = LruCache(capacity, self._load)

    def path(self, name: str) -> Path:
        return resolve(self.root, name, "", "controlnet_names")

    def _load(self, name: str) -> Engine:
        return load_controlnet(self.path(name), self.device, self.dtype)

    def get(self, name: str) -> Engine:
        self.path(name)
        return self.cache.get(name)


class LocalControlNets:
    """Runs ControlNets in this process, one after the other."""

    def __init__(self, catalog: ControlNetCatalog):
        self.catalog = catalog

    def check(self, name: str) -> None:
        self.catalog.path(name)

    def submit(self, name: str, inputs: Mapping[str, torch.Tensor]) -> Awaitable[dict[str, torch.Tensor]]:
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.catalog.get(name)(inputs))
        return future

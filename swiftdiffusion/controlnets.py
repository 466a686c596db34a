"""ControlNets by name: a catalog folder of diffusers ControlNets, an LRU of loaded ones, and runners.

A runner takes one ControlNet evaluation and returns an awaitable of its residuals. `LocalControlNets` computes
in the calling process before returning (the sequential baseline); the Triton orchestrator's runner sends the
work to the ControlNet model with asynchronous BLS, so it computes while the UNet encoder runs; `DeviceControlNets`
(the `local` placement) computes on devices of its own, in the calling process, while the UNet encoder runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import threading
from pathlib import Path
from typing import Awaitable, Iterator, Mapping, Protocol, Sequence

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


async def _joined(outputs: dict[str, torch.Tensor], done: torch.cuda.Event,
                  device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The side stream's outputs (on `device`, default the current one), safe to use on its current stream."""
    main = torch.cuda.current_stream(device)
    main.wait_event(done)
    for tensor in outputs.values():
        tensor.record_stream(main)  # the allocator must not hand their memory back to the side stream early
    return outputs


class DeviceControlNets:
    """The `local` placement: ControlNets in the calling process, on devices of their own (the GPUs a denoising
    instance is given; CPU "devices" in tests), for where no GPU tensor can cross Triton's process boundary.

    Each device has its own catalog and one worker thread that runs its calls in turn (so no two calls share a CUDA
    graph's static buffers), on CUDA streams of its own. A call goes to the device with the fewest calls queued,
    in turn among equals, so one request's ControlNets spread over the devices. Inputs cross to the device once
    the caller's stream has written them (an event, no host sync), residuals come back to `device` (the caller's)
    by device-to-device or peer copies, and `submit` returns an awaitable as a BLS call does: the pipeline's
    modes and CFG-parallel branches work unchanged.
    """

    def __init__(self, catalogs: Sequence[ControlNetCatalog], device: str | torch.device):
        if not catalogs:
            raise ValueError("DeviceControlNets needs at least one device's catalog")
        self.device = torch.device(device)
        threads = torch.get_num_threads()
        self.workers = [_DeviceWorker(catalog, index, self.device, threads) for index, catalog in enumerate(catalogs)]
        self.lock = threading.Lock()
        self.turn = 0  # the worker first in line among equally busy ones

    @property
    def devices(self) -> list[torch.device]:
        return [worker.device for worker in self.workers]

    def check(self, name: str) -> None:
        self.workers[0].catalog.path(name)

    def submit(self, name: str, inputs: Mapping[str, torch.Tensor]) -> Awaitable[dict[str, torch.Tensor]]:
        worker = self._take()
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.current_stream(self.device).record_event()
            for tensor in inputs.values():
                if tensor.is_cuda:
                    tensor.record_stream(worker.link)  # read there, possibly after the caller has dropped it
        future = worker.executor.submit(worker.run, name, dict(inputs), ready)
        future.add_done_callback(lambda _: self._release(worker))
        return self._collect(name, future)

    def _take(self) -> _DeviceWorker:
        with self.lock:
            order = self.workers[self.turn:] + self.workers[:self.turn]
            worker = min(order, key=lambda w: w.queued)
            self.turn = (self.workers.index(worker) + 1) % len(self.workers)
            worker.queued += 1
            return worker

    def _release(self, worker: _DeviceWorker) -> None:
        with self.lock:
            worker.queued -= 1

    async def _collect(self, name: str, future: concurrent.futures.Future) -> dict[str, torch.Tensor]:
        try:
            residuals, done = await asyncio.wrap_future(future)
        except Exception as error:  # named as a failed BLS call is
            raise RuntimeError(f"ControlNet {name!r} failed: {type(error).__name__}: {error}") from error
        return residuals if done is None else await _joined(residuals, done, self.device)


class _DeviceWorker:
    """One device of `DeviceControlNets`: its catalog, its thread and, on CUDA, its streams."""

    def __init__(self, catalog: ControlNetCatalog, index: int, caller: torch.device, threads: int):
        self.catalog = catalog
        self.device = torch.device(catalog.device)
        self.caller = caller
        self.queued = 0  # calls submitted and not finished
        # OpenMP thread counts are per thread: the worker computes with the caller's budget (`torch_threads`).
        self.executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"controlnet-{index}-{self.device}", initializer=torch.set_num_threads,
            initargs=(threads,))
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        # PyTorch issues a copy between two GPUs on the source device's current stream: copies from and to the
        # caller's GPU go on a stream of this worker's there, never behind the caller's own work (the UNet encoder).
        self.link = torch.cuda.Stream(caller) if cuda and caller != self.device else self.stream

    def run(self, name: str, inputs: dict[str, torch.Tensor], ready: torch.cuda.Event | None):
        """On the worker's thread: (residuals on the caller's device, the event that marks them written or None)."""
        with self._streams(ready):
            local = {n: tensor.to(self.device, non_blocking=True) for n, tensor in inputs.items()}
            residuals = self.catalog.get(name)(local)
            back = {n: tensor.to(self.caller, non_blocking=True) for n, tensor in residuals.items()}
        # The copy back was issued on this device's stream (the source's), so its event covers the copy.
        return back, None if self.stream is None else self.stream.record_event()

    @contextlib.contextmanager
    def _streams(self, ready: torch.cuda.Event | None) -> Iterator[None]:
        """On CUDA: the worker's streams current (on its device and the caller's), after the caller's writes."""
        if self.stream is None:
            yield
            return
        with torch.cuda.stream(self.link), torch.cuda.stream(self.stream):
            self.link.wait_event(ready)
            self.stream.wait_event(ready)
            yield

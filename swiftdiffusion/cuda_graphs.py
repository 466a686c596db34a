"""CUDA-graph replay of torch engines: one graph per input-shape bucket, captured on first use.

Why: in eager PyTorch an SD1.5 UNet step is launch-bound (23.7 ms eager against 10.6 ms replayed as one graph,
512x512 with CFG, fp16, measured on an H100), since each of its ~1,000 small kernels costs a CPU-side launch. A
replay launches them all at once.

Why graphs survive LoRAs: `TorchWeights` merges and restores in place, into the very storage the graph captured,
so a patch between two replays changes what the next replay computes, with no recapture. Anything that
reassigns a parameter's storage after capture (`param.data = ...`, `module.to(...)`) would leave the graphs
reading stale memory; `graph_engines` therefore applies `channels_last` before any capture.

Attention needs nothing here: diffusers' default processor is `AttnProcessor2_0` (PyTorch SDPA), which captures.

On any device but CUDA the wrapper runs the engine eagerly, so the same code serves CPU machines and tests.

`compile=True` also puts the per-step engines (the UNet and its halves, ControlNets) through `torch.compile`
(inductor, one specialised program per shape) before capture: on an H100 a replayed SD1.5 UNet half then takes
about 0.6x the time of its graph of eager kernels (fused normalisation and elementwise work), at the price of
half a minute or more of compilation per graph and shape at first use; a server enables it when it lives long
enough to pay that back (README).
Compiled code reads parameters as graph inputs (inductor's `freezing` stays off), so in-place LoRA patches
reach the compiled kernels as they reach plain ones.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Mapping

import torch

from .controlnets import ControlNetCatalog
from .engines import TorchEngine, WeightPatch
from .models import LoadedModel

log = logging.getLogger(__name__)

# The engines of a model worth graphing: every one the pipeline calls on the GPU.
GRAPHED = ("text_encoder", "text_encoder_2", "unet", "unet_encoder", "unet_decoder", "vae_decoder")
# The ones called every denoising step, where compilation time pays back; the text encoder and VAE run once.
COMPILED = ("unet", "unet_encoder", "unet_decoder")


# One capture at a time per process, and no engine launching beside it (PyTorch's rule for graph capture): seen
# on an H100 as "operation not permitted when stream is capturing" when the two CFG-parallel branches captured
# their graphs at once from two threads. Held per call only while launching, so replays still overlap on the GPU.
_LAUNCH_LOCK = threading.Lock()


@dataclasses.dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # static buffers the replay reads
    outputs: dict[str, torch.Tensor]  # static tensors the replay writes


class GraphedEngine:
    """An `Engine` that replays a CUDA graph of a `TorchEngine`, one graph per tuple of input shapes and dtypes.

    The first call with new shapes warms the engine up on a side stream (lazy cuBLAS/cuDNN initialisation must
    not land in the graph) and captures it; every call copies the inputs into the static buffers and replays.

    Outputs are the graph's static tensors: the next call to this engine (any shape: its graphs share one
    memory pool) overwrites them, so callers must consume or copy them first. The pipeline does for every
    engine it calls; `clone_outputs=True` returns copies instead, for engines whose outputs a caller may hold
    across a second call (a request may name one ControlNet twice).
    """

    def __init__(self, engine: TorchEngine, clone_outputs: bool = False, warmup: int = 2):
        self.engine = engine
        self.spec = engine.spec
        self.weights = engine.weights
        self.clone_outputs = clone_outputs
        self.warmup = warmup
        self.enabled = engine.module_device().type == "cuda"
        self.graphs: dict[tuple, _Captured] = {}
        self.capture_s: dict[tuple, float] = {}  # seconds spent warming up and capturing, per shape key
        self.failures: dict[tuple, str] = {}  # shape keys that would not capture, served eagerly
        self.pool = None  # one memory pool for all of this engine's graphs (they never run concurrently)
        # A capture stream of its own: cuBLAS keys its workspace by stream, and graphs captured on torch's shared
        # default capture stream share one workspace, which races when two graphs replay concurrently (a
        # ControlNet on its side stream beside the UNet encoder): seen on an H100 as run-to-run image changes.
        self.capture_stream = torch.cuda.Stream(engine.module_device()) if self.enabled else None

    def key(self, inputs: Mapping[str, torch.Tensor]) -> tuple:
        return tuple((tuple(inputs[name].shape), inputs[name].dtype) for name in self.spec.inputs)

    @torch.inference_mode()
    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.enabled:
            return self.engine(inputs)
        with _LAUNCH_LOCK:
            return self._launch(inputs)

    def _launch(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = self.key(inputs)
        if key in self.failures:
            return self.engine(inputs)
        captured = self.graphs.get(key) or self._capture(key, inputs)
        if captured is None:
            return self.engine(inputs)
        for name, buffer in captured.inputs.items():
            buffer.copy_(inputs[name])
        captured.graph.replay()
        if self.clone_outputs:
            return {name: tensor.clone() for name, tensor in captured.outputs.items()}
        return dict(captured.outputs)

    def _capture(self, key: tuple, inputs: Mapping[str, torch.Tensor]) -> _Captured | None:
        begin = time.perf_counter()
        static = {name: inputs[name].clone() for name in self.spec.inputs}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.engine(static)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the LoRA loader thread may copy factors to the GPU while this thread captures.
            with torch.cuda.graph(graph, pool=self.pool, stream=self.capture_stream,
                                  capture_error_mode="thread_local"):
                outputs = self.engine(static)
        except RuntimeError as error:
            log.warning("CUDA graph capture failed for %s; running it eagerly: %s", key, error)
            self.failures[key] = str(error)
            return None
        self.graphs[key] = captured = _Captured(graph, static, outputs)
        self.capture_s[key] = time.perf_counter() - begin
        return captured

    def patch(self, patch: WeightPatch) -> None:
        self.engine.patch(patch)

    def restore(self) -> None:
        self.engine.restore()


def graphed(engine: TorchEngine, channels_last: bool = False, clone_outputs: bool = False,
            compile: bool = False) -> GraphedEngine:
    """Wraps one torch engine; `channels_last` converts its module's 4-D weights first (before any capture);
    `compile` (CUDA only) replays `torch.compile`'s code for the module instead of eager kernels."""
    if channels_last:
        engine.module.to(memory_format=torch.channels_last)
    if compile and engine.module_device().type == "cuda":
        # dynamic=False: a program specialised to each shape bucket, as its graph is.
        engine = TorchEngine(torch.compile(engine.module, dynamic=False), engine.spec, engine.weights)
    return GraphedEngine(engine, clone_outputs)


def graph_engines(model: LoadedModel, channels_last: bool = False, compile: bool = False) -> LoadedModel:
    """The same model with its GPU engines graphed (the per-step ones compiled first if `compile`). The modules
    (and weights) are shared with `model`'s engines, so `channels_last` changes those too; call this before
    `model`'s engines are captured by anything else."""
    engines = dict(model.engines)
    for name in GRAPHED:
        if name in engines:  # a Triton model loads only the parts it runs
            engines[name] = graphed(engines[name], channels_last, compile=compile and name in COMPILED)
    return dataclasses.replace(model, engines=engines)


class GraphedControlNetCatalog(ControlNetCatalog):
    """A ControlNet catalog whose engines replay CUDA graphs (eagerly on CPU), returning copies of the residuals."""

    def __init__(self, root, device="cpu", dtype=torch.float32, capacity: int = 4, family=None,
                 channels_last: bool = False, compile: bool = False):
        super().__init__(root, device, dtype, capacity, family)
        self.channels_last = channels_last
        self.compile = compile

    def _load(self, name: str) -> GraphedEngine:
        return graphed(super()._load(name), self.channels_last, clone_outputs=True, compile=self.compile)

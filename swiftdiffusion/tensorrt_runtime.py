"""TensorRT engines for the graphs of `onnx_export`: build from the ONNX files, run them as `Engine`s on torch CUDA
tensors, and merge LoRAs by refitting.

Deliberately thin: the shapes come from the export manifest (`profile_shapes`), and the refit arrays from
`onnx_export.refit_weights` (W0 + deltas laid out as the ONNX initializers, whose names the ONNX parser gives the
engine weights), so everything except the TensorRT calls themselves is tested with onnxruntime. TensorRT is imported
on first use: this module imports without it, and its entry points then raise `TensorRTMissing`.
"""

from __future__ import annotations

import json
import threading
import types
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .engines import WeightPatch
from .graphs import GraphSpec
from .onnx_export import WeightMap, load_initializers, refit_weights, resolve_dim

Size = tuple[int, int, int]  # batch, latent height, latent width
Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # min, opt, max


class TensorRTMissing(RuntimeError):
    pass


def import_tensorrt() -> types.ModuleType:
    """The `tensorrt` module, or TensorRTMissing saying how to get it."""
    try:
        import tensorrt
    except ImportError as error:
        raise TensorRTMissing(
            "TensorRT is not installed: install the `tensorrt` Python package (TensorRT 10, from NVIDIA's package "
            "index, on a machine with an NVIDIA GPU) to build or run TensorRT engines"
        ) from error
    return tensorrt


def profile_shapes(graph: Mapping, min_size: Size, opt_size: Size, max_size: Size) -> dict[str, Shapes]:
    """Min/opt/max shapes of each dynamic input of a manifest graph entry, from batch and latent sizes."""
    return {
        name: tuple(tuple(resolve_dim(dim, *size) for dim in info["dims"]) for size in (min_size, opt_size, max_size))
        for name, info in graph["inputs"].items()
        if any(isinstance(dim, str) for dim in info["dims"])
    }


def build_engine(onnx_path: str | Path, plan_path: str | Path, profiles: Sequence[Mapping[str, Shapes]],
                 fp16: bool = True, refittable: bool = False) -> Path:
    """Parses an ONNX file (external data beside it) and writes the serialized engine to `plan_path`."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    plan_path = Path(plan_path)
    plan_path.write_bytes(plan)
    return plan_path


class TensorRTEngine:
    """One graph's TensorRT engine behind the `Engine` protocol, with LoRA patches merged by refit.

    Refittable engines keep the ONNX initializers in host memory (W0, about the graph's size) to restore from and
    to answer the refitter's requests for weights it needs alongside the changed ones. A lock keeps inference and
    refit apart on one engine, and the refit waits for the device's queued work to finish first.
    """

    def __init__(self, plan_path: str | Path, spec: GraphSpec, weight_map: WeightMap | None = None,
                 onnx_path: str | Path | None = None, device: str | torch.device = "cuda"):
        trt = import_tensorrt()
        self.spec = spec
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT cannot load {plan_path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = {name for name in names if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT}
        if inputs != set(spec.inputs) or set(names) - inputs != set(spec.outputs):
            raise ValueError(f"engine {plan_path} has tensors {names}, the graph expects {spec}")
        torch_dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                        trt.DataType.BF16: torch.bfloat16, trt.DataType.INT32: torch.int32,
                        trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
        self.dtypes = {name: torch_dtypes[self.engine.get_tensor_dtype(name)] for name in names}
        self.weight_map = weight_map
        self.pristine = load_initializers(onnx_path) if weight_map is not None else {}
        self.patched: set[str] = set()  # initializers that now differ from W0
        self.applied_key: tuple | None = None
        self.lock = threading.Lock()

    @classmethod
    def from_export(cls, onnx_dir: str | Path, plan_path: str | Path, graph: str,
                    device: str | torch.device = "cuda") -> TensorRTEngine:
        """The engine of one graph of an export folder: I/O names from its manifest, its weight map if it has one."""
        onnx_dir = Path(onnx_dir)
        entry = json.loads((onnx_dir / "manifest.json").read_text())["graphs"][graph]
        spec = GraphSpec(tuple(entry["inputs"]), tuple(entry["outputs"]))
        weight_map = WeightMap.load(onnx_dir / entry["weights"]) if "weights" in entry else None
        return cls(plan_path, spec, weight_map, onnx_dir / entry["file"], device)

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self.lock:
            feeds = {name: inputs[name].to(self.device, self.dtypes[name]).contiguous() for name in self.spec.inputs}
            for name, tensor in feeds.items():
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
            outputs = {}
            for name in self.spec.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            # Feeds freed on return are reused only by later work on this stream (the allocator is stream-ordered).
            if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
                raise RuntimeError("TensorRT inference failed (see the log above)")
            return outputs

    def patch(self, patch: WeightPatch) -> None:
        with self.lock:
            if patch.key == self.applied_key:
                return
            if self.weight_map is None:
                raise ValueError("this engine was not exported with a weight map, so it cannot take LoRAs")
            merged = refit_weights(self.weight_map, self.pristine, patch)  # raises before the engine changes
            self._refit({**{name: self.pristine[name] for name in self.patched - set(merged)}, **merged})
            self.patched = set(merged)
            self.applied_key = patch.key

    def restore(self) -> None:
        with self.lock:
            self._refit({name: self.pristine[name] for name in self.patched})
            self.patched = set()
            self.applied_key = None

    def _refit(self, arrays: Mapping[str, np.ndarray]) -> None:
        if not arrays:
            return
        trt = import_tensorrt()
        torch.cuda.synchronize(self.device)
        refitter = trt.Refitter(self.engine, self.logger)
        alive = []  # trt.Weights does not own its array: keep each alive until the refit returns

        def set_weights(name: str, array: np.ndarray) -> None:
            dtype = trt.nptype(refitter.get_weights_prototype(name).dtype)
            array = np.ascontiguousarray(array, dtype=dtype)
            alive.append(array)
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise RuntimeError(f"TensorRT refused new weights for {name!r} (not refittable, or a size change)")

        for name, array in arrays.items():
            set_weights(name, array)
        # Weights the engine fused with changed ones must be given too; unchanged, they are W0.
        for name in refitter.get_missing_weights():
            set_weights(name, self.pristine[name])
        if not refitter.refit_cuda_engine():
            raise RuntimeError("TensorRT refit failed (see the log above)")

"""ONNX export of every graph of `graphs.py`, its onnxruntime verification, and the weight maps that make LoRA refit
possible.

Export uses the TorchScript exporter (`dynamo=False`), tracing at batch 2 and a latent height that is not a multiple
of 8 (12x8): there diffusers passes the UNet's upsample sizes explicitly, so the trace records them as computations
on shapes, not as constants, and the graph holds at every size. The
graphs take any batch in `BATCH_RANGE` and any latent size in `LATENT_RANGE` (64..1024 pixels, multiples of 8);
axis names in the files say how each dimension follows the latent size: `height/4` is ceil(height / 4) (a skip
three levels down), `height*8` an image dimension.

A weight map says, for each torch parameter of a graph's diffusers/transformers module, which ONNX initializer holds
it and how (as is, transposed: a Linear applied by MatMul, or reshaped: a GroupNorm scale). TensorRT's ONNX parser
names engine weights after the initializers, so the map is also the refit name map, and `refit_weights` computes
exactly what the TensorRT refitter receives; the tests feed the same arrays to onnxruntime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime
import torch
from diffusers import ControlNetModel
from onnx import numpy_helper

from . import graphs
from .engines import WeightPatch
from .graphs import WEIGHT_COMPONENTS, GraphSpec
from .models import ModelComponents, load_components, vae_dtype

OPSET = 17
BATCH_RANGE = (1, 2)  # CFG runs batch 2
LATENT_RANGE = (8, 128)  # 64..1024 pixels
TRACE_SIZE = (2, 12, 8)  # batch, latent height, latent width
CHECK_SIZES = ((1, 8, 8), (2, 8, 8), (1, 12, 8), (2, 12, 8))
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf refuses messages over 2 GiB: bigger graphs keep weights in <file>.data


@dataclasses.dataclass(frozen=True)
class GraphSource:
    """One graph to export: `name` is its file stem (`controlnet_canny`), `kind` its key in `graph_specs`."""

    name: str
    kind: str
    module: torch.nn.Module
    spec: GraphSpec

    @property
    def component(self) -> tuple[str, torch.nn.Module]:
        """The wrapped diffusers/transformers module and its attribute name (every `graphs.py` wrapper has one)."""
        return next(iter(self.module.named_children()))


@dataclasses.dataclass(frozen=True)
class WeightEntry:
    initializer: str
    transform: str  # "none", "transpose" or "reshape": how the initializer is made from the parameter
    shape: tuple[int, ...]  # the parameter's shape


@dataclasses.dataclass
class WeightMap:
    """Torch parameter name -> ONNX initializer, for one graph.

    `unused`: parameters the graph does not depend on (the other half of a split UNet); patches skip them.
    `unmappable`: parameter -> why no initializer holds it unambiguously (folded into another constant, or equal in
    value to other weights, as the untrained norms of the tiny model are); patching one is an error.
    """

    weights: dict[str, WeightEntry]
    unused: list[str]
    unmappable: dict[str, str]

    def to_json(self) -> dict:
        return {"weights": {k: dataclasses.asdict(v) for k, v in self.weights.items()},
                "unused": self.unused, "unmappable": self.unmappable}

    @classmethod
    def from_json(cls, data: Mapping) -> WeightMap:
        weights = {name: WeightEntry(entry["initializer"], entry["transform"], tuple(entry["shape"]))
                   for name, entry in data["weights"].items()}
        return cls(weights, list(data["unused"]), dict(data["unmappable"]))

    @classmethod
    def load(cls, path: str | Path) -> WeightMap:
        return cls.from_json(json.loads(Path(path).read_text()))


def graph_sources(components: ModelComponents, controlnets: Mapping[str, ControlNetModel]) -> list[GraphSource]:
    """Every graph of a model (its family's text encoders included) and its ControlNets, as fp32 eval modules."""
    family = components.family
    specs = graphs.graph_specs(components.unet.config, family)
    modules = {
        **{part.component: graphs.TextEncoder(getattr(components, part.component), family.final_norm)
           for part in family.text_encoders},
        "unet": graphs.FullUNet(components.unet),
        "unet_encoder": graphs.UNetEncoder(components.unet),
        "unet_decoder": graphs.UNetDecoder(components.unet),
        "vae_decoder": graphs.VaeDecoder(components.vae),
    }
    sources = [GraphSource(name, name, module, specs[name]) for name, module in modules.items()]
    sources += [GraphSource(f"controlnet_{name}", "controlnet", graphs.ControlNetResiduals(controlnet),
                            specs["controlnet"]) for name, controlnet in sorted(controlnets.items())]
    for source in sources:
        source.module.float().eval().requires_grad_(False)
    return sources


def dynamic_axes(source: GraphSource, unet_config) -> dict[str, dict[int, str]]:
    """Axis names of every dynamic dimension of a graph's inputs and outputs (see the module docstring)."""
    blocks = len(unet_config.down_block_types)
    levels = [0]  # conv_in's skip, then each down block's resnets and downsampler
    for block in range(blocks):
        levels += [block] * unet_config.layers_per_block + ([block + 1] if block < blocks - 1 else [])
    scales = {name: f"/{2 ** level}" if level else "" for name, level in zip(graphs.skip_names(len(levels)), levels)}
    scales.update(sample="", noise_pred="", latent="", mid=f"/{2 ** (blocks - 1)}")
    module = source.component[1]
    if source.kind == "vae_decoder":
        scales["image"] = f"*{2 ** (len(module.config.block_out_channels) - 1)}"
    if source.kind == "controlnet":
        scales["controlnet_cond"] = f"*{2 ** (len(module.config.conditioning_embedding_out_channels) - 1)}"
    axes = {}
    for name in (*source.spec.inputs, *source.spec.outputs):
        if name in scales:
            axes[name] = {0: "batch", 2: f"height{scales[name]}", 3: f"width{scales[name]}"}
        elif name != "timestep":
            axes[name] = {0: "batch"}
    return axes


def resolve_dim(dim: int | str, batch: int, height: int, width: int) -> int:
    """The size of a manifest dimension (an int or an axis name of `dynamic_axes`) at a batch and latent size."""
    if isinstance(dim, int):
        return dim
    if dim == "batch":
        return batch
    match = re.fullmatch(r"(height|width)(?:([*/])(\d+))?", dim)
    if match is None:
        raise ValueError(f"unknown axis name {dim!r}")
    axis, op, factor = match.groups()
    value = height if axis == "height" else width
    if op is None:
        return value
    return value * int(factor) if op == "*" else -(-value // int(factor))


def sample_inputs(source: GraphSource, components: ModelComponents, batch: int, height: int, width: int,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs for a graph at a batch and latent size; the decoder's are the encoder's real outputs."""
    generator = torch.Generator().manual_seed(seed)
    unet = components.unet.config
    text_encoder = source.kind if source.kind in components.family.text_components else "text_encoder"
    text = getattr(components, text_encoder).config
    base = {
        "sample": torch.randn(batch, unet.in_channels, height, width, generator=generator),
        "timestep": torch.rand(1, generator=generator) * 999,
        "encoder_hidden_states": torch.randn(batch, text.max_position_embeddings, unet.cross_attention_dim,
                                             generator=generator),
        "input_ids": torch.randint(0, text.vocab_size, (batch, text.max_position_embeddings), generator=generator),
        # A different layer per row: the graph gathers each row's own.
        "hidden_layer": torch.randint(1, text.num_hidden_layers + 1, (batch,), generator=generator),
        "latent": torch.randn(batch, components.vae.config.latent_channels, height, width, generator=generator),
    }
    if "text_embeds" in components.family.added_conditioning:
        pooled = components.text_encoder_2.config.projection_dim
        base["text_embeds"] = torch.randn(batch, pooled, generator=generator)
        base["time_ids"] = torch.tensor([[512.0, 384.0, 16.0, 0.0, 512.0, 512.0]]).repeat(batch, 1) * (
            1 + torch.rand(batch, 1, generator=generator))
    if source.kind == "controlnet":
        axes = dynamic_axes(source, unet)["controlnet_cond"]
        size = [resolve_dim(axes[axis], batch, height, width) for axis in (2, 3)]
        channels = source.component[1].config.conditioning_channels
        base["controlnet_cond"] = torch.rand(batch, channels, *size, generator=generator)
    if source.kind == "unet_decoder":
        encoder = graphs.UNetEncoder(components.unet)
        spec = graphs.graph_specs(unet, components.family)["unet_encoder"]
        with torch.inference_mode():
            base.update(zip(spec.outputs, encoder(*(base[name] for name in spec.inputs))))
    return {name: base[name].clone() for name in source.spec.inputs}


def _outputs(module: torch.nn.Module, spec: GraphSpec, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    result = module(*(inputs[name] for name in spec.inputs))
    return (result,) if isinstance(result, torch.Tensor) else tuple(result)


def used_parameters(source: GraphSource, inputs: Mapping[str, torch.Tensor]) -> set[str]:
    """Names (in the wrapped module's own namespace) of the parameters a graph's outputs depend on.

    Found by autograd rather than by name, so that a split UNet's halves need no hand-kept lists.
    """
    prefix = source.component[0] + "."
    params = dict(source.module.named_parameters())
    try:
        with torch.enable_grad():
            source.module.requires_grad_(True)
            total = sum(output.float().sum() for output in _outputs(source.module, source.spec, inputs))
            grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    finally:
        source.module.requires_grad_(False)
    return {name.removeprefix(prefix) for name, grad in zip(params, grads) if grad is not None}


def build_weight_map(model: onnx.ModelProto, source: GraphSource, used: set[str]) -> WeightMap:
    """Matches parameters to initializers: by name first, then by exact value (as is, transposed or reshaped).

    Constant folding renames the initializers it rewrites (`onnx::MatMul_1234` holds a Linear's W^T), so values
    are what identify them. A parameter whose value several initializers hold is ambiguous and left unmappable.
    """
    attr, module = source.component
    arrays = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer
              if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    by_digest: dict[bytes, list[str]] = {}
    for name, array in arrays.items():
        by_digest.setdefault(_digest(array), []).append(name)

    def holders(value: np.ndarray) -> list[str]:
        return [init for init in by_digest.get(_digest(value), [])
                if arrays[init].dtype == value.dtype and np.array_equal(arrays[init].reshape(value.shape), value)]

    weights, unused, unmappable = {}, [], {}
    for name, param in module.named_parameters():
        value = param.detach().cpu().numpy()
        shape = tuple(value.shape)
        if name not in used:
            unused.append(name)
            continue
        if f"{attr}.{name}" in arrays and arrays[f"{attr}.{name}"].shape == shape:
            weights[name] = WeightEntry(f"{attr}.{name}", "none", shape)
            continue
        candidates = [(init, "none" if arrays[init].shape == shape else "reshape") for init in holders(value)]
        if value.ndim == 2:
            candidates += [(init, "transpose") for init in holders(value.T) if arrays[init].shape == shape[::-1]]
        if len(candidates) == 1:
            weights[name] = WeightEntry(candidates[0][0], candidates[0][1], shape)
        else:
            unmappable[name] = (f"its value is held by {len(candidates)} initializers" if candidates
                                else "no initializer holds its value")
    return WeightMap(weights, unused, unmappable)


def _digest(array: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).digest()


def load_initializers(onnx_path: str | Path, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Initializers of an ONNX file (external data included; all, or the named ones) as numpy arrays: a refit's W0."""
    wanted = None if names is None else set(names)
    model = onnx.load(str(onnx_path))
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer
            if wanted is None or init.name in wanted}


def refit_weights(weight_map: WeightMap, pristine: Mapping[str, np.ndarray],
                  patch: WeightPatch) -> dict[str, np.ndarray]:
    """Initializer name -> its value with the patch merged (W0 + up @ down, laid out as the initializer).

    This is what the TensorRT refitter is given, and what the tests write into onnxruntime graphs. Layers of
    parameters the graph does not use are skipped; patching an unmappable or shared weight raises ValueError.
    """
    owners: dict[str, list[str]] = {}
    for name, entry in weight_map.weights.items():
        owners.setdefault(entry.initializer, []).append(name)
    unused = set(weight_map.unused)
    result = {}
    for name, delta in patch.layers.items():
        entry = weight_map.weights.get(name)
        if entry is None:
            if name in unused:
                continue
            reason = weight_map.unmappable.get(name, "it is not a weight of this graph")
            raise ValueError(f"cannot patch {name!r}: {reason}")
        if len(owners[entry.initializer]) > 1:
            raise ValueError(f"cannot patch {name!r}: initializer {entry.initializer!r} also holds "
                             f"{[n for n in owners[entry.initializer] if n != name]}")
        stored = pristine[entry.initializer]
        weight = torch.from_numpy(np.array(stored.T if entry.transform == "transpose" else stored.reshape(entry.shape),
                                           dtype=np.float32))
        merged = weight.reshape(entry.shape[0], -1).addmm(delta.up.float().cpu(), delta.down.float().cpu())
        merged = merged.reshape(entry.shape).numpy()
        merged = merged.T if entry.transform == "transpose" else merged.reshape(stored.shape)
        result[entry.initializer] = np.ascontiguousarray(merged, dtype=stored.dtype)
    return result


def export_graph(source: GraphSource, inputs: Mapping[str, torch.Tensor], axes: Mapping[str, Mapping[int, str]],
                 opset: int = OPSET) -> onnx.ModelProto:
    """Traces one graph on `inputs` and returns the ONNX model, weights included.

    Output dimensions not named in `axes` are static: they are written as the traced sizes, where the exporter's
    shape inference would otherwise leave made-up symbols.
    """
    with torch.inference_mode():
        traced = dict(zip(source.spec.outputs, _outputs(source.module, source.spec, inputs)))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # Tracer warnings flag Python-side shape checks (asserts), which the verification covers.
        warnings.simplefilter("ignore")
        staged = Path(tmp) / "graph.onnx"
        torch.onnx.export(source.module, tuple(inputs[name] for name in source.spec.inputs), str(staged),
                          input_names=list(source.spec.inputs), output_names=list(source.spec.outputs),
                          dynamic_axes={k: dict(v) for k, v in axes.items()}, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
        model = onnx.load(str(staged))  # gathers the exporter's per-tensor files for graphs over 2 GB
    for output in model.graph.output:
        for axis, dim in enumerate(output.type.tensor_type.shape.dim):
            if axis not in axes.get(output.name, {}):
                dim.dim_value = traced[output.name].shape[axis]
    return model


def save_onnx(model: onnx.ModelProto, path: Path, external_threshold: int = EXTERNAL_DATA_BYTES) -> bool:
    """Writes `model` to `path`, its weights to `<path>.data` when they exceed the threshold; True if they do.

    Saving with external data empties the tensors of `model`: read what is needed from it first.
    """
    external = sum(len(init.raw_data) for init in model.graph.initializer) > external_threshold
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data.name)
    return external


def cpu_session_options() -> onnxruntime.SessionOptions:
    """Options for onnxruntime checks: worker threads that sleep rather than spin (checks share busy CPUs)."""
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def verify_graph(onnx_path: str | Path, module: torch.nn.Module, spec: GraphSpec,
                 input_sets: Sequence[Mapping[str, torch.Tensor]]) -> list[float]:
    """Max abs difference between onnxruntime (CPU) and the torch module, per input set, over all outputs."""
    session = onnxruntime.InferenceSession(str(onnx_path), cpu_session_options(), providers=["CPUExecutionProvider"])
    diffs = []
    for inputs in input_sets:
        ort = session.run(list(spec.outputs), {name: inputs[name].numpy() for name in spec.inputs})
        with torch.inference_mode():
            expected = _outputs(module, spec, inputs)
        diff = 0.0
        for name, got, want in zip(spec.outputs, ort, expected):
            if got.shape != tuple(want.shape):
                raise AssertionError(f"{name}: onnxruntime shape {got.shape} != torch shape {tuple(want.shape)}")
            diff = max(diff, float(np.abs(got - want.numpy()).max()))
        diffs.append(diff)
    return diffs


def _value_dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]


def _io(values) -> dict[str, dict]:
    return {v.name: {"dims": _value_dims(v),
                     "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name} for v in values}


def export_model(model: str | Path | ModelComponents, controlnets: Mapping[str, str | Path], out: str | Path,
                 opset: int = OPSET, verify: bool = True, log: Callable[[str], None] = print) -> dict:
    """Exports, maps and (optionally) verifies every graph into `out`, and writes and returns `out/manifest.json`."""
    components = model if isinstance(model, ModelComponents) else load_components(model)
    nets = {name: ControlNetModel.from_pretrained(path, local_files_only=True) for name, path in controlnets.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    family = components.family
    manifest = {"opset": opset, "family": family.name, "default_size": components.defaults.size,
                "batch_range": BATCH_RANGE, "latent_range": LATENT_RANGE, "trace_size": TRACE_SIZE, "graphs": {}}
    for source in graph_sources(components, nets):
        path = out / f"{source.name}.onnx"
        axes = dynamic_axes(source, components.unet.config)
        trace_inputs = sample_inputs(source, components, *TRACE_SIZE)
        start = time.perf_counter()
        onnx_model = export_graph(source, trace_inputs, axes, opset)
        entry = {"file": path.name, "kind": source.kind,
                 "inputs": _io(onnx_model.graph.input), "outputs": _io(onnx_model.graph.output)}
        if source.kind == "vae_decoder" and vae_dtype(components, torch.float16) == torch.float32:
            entry["fp32"] = True  # this VAE overflows in fp16 (`force_upcast`): engines keep it in fp32
        component = WEIGHT_COMPONENTS.get(source.kind)
        if component is not None:
            weight_map = build_weight_map(onnx_model, source, used_parameters(source, trace_inputs))
            weights_file = path.with_name(f"{source.name}.weights.json")
            weights_file.write_text(json.dumps({"graph": source.name, "onnx": path.name, "component": component,
                                                **weight_map.to_json()}, indent=1))
            entry.update(weights=weights_file.name, component=component, mapped=len(weight_map.weights),
                         unmappable=len(weight_map.unmappable))
        entry["external_data"] = save_onnx(onnx_model, path)
        entry["export_seconds"] = round(time.perf_counter() - start, 2)
        del onnx_model  # a real UNet is 3.4 GB: free it before onnxruntime loads the file
        if verify:
            start = time.perf_counter()
            input_sets = [sample_inputs(source, components, *size, seed=i + 1) for i, size in enumerate(CHECK_SIZES)]
            diffs = verify_graph(path, source.module, source.spec, input_sets)
            entry["checks"] = [{"batch": b, "height": h, "width": w, "max_abs_diff": d}
                               for (b, h, w), d in zip(CHECK_SIZES, diffs)]
            entry["verify_seconds"] = round(time.perf_counter() - start, 2)
        manifest["graphs"][source.name] = entry
        log(format_row(source.name, entry))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def format_row(name: str, entry: Mapping) -> str:
    """One line of the export table: graph, export seconds, max abs diff per check."""
    checks = "  ".join(f"b{c['batch']} {c['height']}x{c['width']}: {c['max_abs_diff']:.1e}"
                       for c in entry.get("checks", []))
    return f"{name:<20} {entry['export_seconds']:>7.2f}s  {checks}"

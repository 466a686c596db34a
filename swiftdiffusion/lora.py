"""LoRA files decoded into per-layer low-rank factors, keyed by the model's weight names.

Key formats are diffusers' business: `lora_state_dict` (of the family's pipeline LoRA loader, given the UNet config
so that kohya's SDXL files, which name blocks the sgm way, map as `load_lora_weights` maps them) converts
kohya/A1111 files, `convert_*_to_peft` brings
old diffusers and PEFT keys to one form, and `get_peft_kwargs` gives each module its alpha exactly as
`load_lora_weights` would. What is new here is the result: instead of wrapping layers, each LoRA becomes
`{weight name: (down, up * scale)}`, which `build_patch` concatenates across a request's LoRAs into one
`WeightPatch` (one matrix product per layer) for the engines to merge in place.

The converters run once per key layout, not once per file: a layout (every key with its shape and dtype, the
values of its scalars such as kohya alphas, and the adapter metadata diffusers stores) is converted once and its
result traced back to the file's keys, giving a `DecodePlan` (weight name <- down key, up key, alpha / rank). The
next file of that layout is decoded by direct lookups through the plan, with results bit-identical to the
converters' (their output tensors are the file's own tensors, renamed). A layout whose converted tensors are
not the file's own (a converter that computes new ones) is converted every time.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Iterable, Mapping

import torch
from diffusers import loaders
from diffusers.configuration_utils import FrozenDict
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import get_peft_kwargs
from peft.utils.other import get_pattern_key
from safetensors import safe_open

from .engines import LayerDelta, WeightPatch
from .family import FAMILIES, ModelFamily

LORA_COMPONENTS = {component for family in FAMILIES.values() for component in family.lora_components}
# The largest change a LoRA may make to one weight entry (|alpha/r * up @ down|, before the request's scale).
# Weights are O(1) and fp16 ends at 65504: a larger delta is a broken or hostile file, never a style.
MAX_DELTA = 1e4


class LoraFormatError(ValueError):
    """The file is not a LoRA for this model (corrupt, truncated, unknown layers, wrong shapes or bad values)."""


@dataclasses.dataclass(frozen=True)
class LoraTarget:
    """The model LoRA files are decoded for: its family (converters, patched components), its UNet config and the
    shapes of its weights (component -> weight name -> shape)."""

    family: ModelFamily
    unet_config: Mapping
    weight_shapes: Mapping[str, Mapping[str, torch.Size]]


@dataclasses.dataclass(frozen=True)
class LoraFile:
    """A LoRA file's tensors (memory-mapped from the file by safetensors) and its metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: Mapping[str, str]
    nbytes: int


def read_lora(name: str, path: str | Path) -> LoraFile:
    """The file through safetensors' own memory-mapped loading (no bytes object, no second parse)."""
    try:
        with safe_open(str(path), framework="pt") as file:  # what load_file does, keeping the metadata too
            return LoraFile(file.get_tensors(), file.metadata() or {}, Path(path).stat().st_size)
    except Exception as error:  # the reader raises many types for a damaged file
        raise LoraFormatError(f"LoRA {name!r} is not a readable LoRA safetensors file ({error})") from error


@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """One LoRA, decoded: component -> weight name -> (down [r, in], up [out, r] with alpha/r folded in).

    `bound` bounds every factor entry (the largest Frobenius norm of a factor), so a patch can tell without a pass
    over the values whether they fit a narrower dtype.
    """

    name: str
    layers: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]]
    bound: float = 0.0

    def touches(self, component: str) -> bool:
        return bool(self.layers.get(component))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layers in self.layers.values() for pair in layers.values()
                   for t in pair)


@dataclasses.dataclass(frozen=True)
class FactorSource:
    """Where one layer's factors are in a file of a given layout."""

    weight: str  # the model's weight name
    down: str  # file keys
    up: str
    down_shape: tuple[int, ...]  # as the converters shaped them
    up_shape: tuple[int, ...]
    scale: float  # alpha / rank


DecodePlan = Mapping[str, tuple[FactorSource, ...]]  # component -> its layers


class DecodePlans:
    """Decode plans by key layout, for one model's weights; thread-safe (the loader threads share it)."""

    def __init__(self):
        self.plans: dict[tuple, DecodePlan | None] = {}
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, layout: tuple) -> tuple[bool, DecodePlan | None]:
        """(whether the layout is known, its plan: None if its converted tensors cannot be traced)."""
        with self.lock:
            known = layout in self.plans
            self.hits, self.misses = self.hits + known, self.misses + (not known)
            return known, self.plans.get(layout)

    def add(self, layout: tuple, plan: DecodePlan | None) -> None:
        with self.lock:
            self.plans[layout] = plan


def layout_of(file: LoraFile) -> tuple:
    """Every key with its shape and dtype, the value of every scalar (alphas), and the adapter metadata."""
    keys = tuple(sorted((key, tuple(t.shape), str(t.dtype), float(t) if t.numel() == 1 else None)
                        for key, t in file.tensors.items()))
    return keys, file.metadata.get("lora_adapter_metadata")


def decode_lora(name: str, file: LoraFile, target: LoraTarget, plans: DecodePlans | None = None) -> LoraFactors:
    """Decodes a LoRA file for a model, through the plan of its layout when `plans` has one (and adding it when
    not); without `plans`, through the converters."""
    layout = layout_of(file) if plans is not None else None
    known, plan = plans.get(layout) if plans is not None else (False, None)
    if plan is not None:
        layers = _apply(plan, file.tensors)
    else:
        converted = _convert(name, file, target)
        layers = {component: _factors(peft_state, scales) for component, (peft_state, scales) in converted.items()}
        if plans is not None and not known:
            plans.add(layout, _trace(converted, file.tensors))
    bound = max(check_values(name, component, factors) for component, factors in layers.items())
    return LoraFactors(name, layers, bound)


def _convert(name: str, file: LoraFile, target: LoraTarget) -> dict[str, tuple[dict, dict[str, float]]]:
    """component -> (its PEFT-named state dict, module -> alpha / rank), checked against the model's weights."""
    loader = getattr(loaders, target.family.lora_loader)
    try:
        state_dict, network_alphas = loader.lora_state_dict(dict(file.tensors), unet_config=FrozenDict(target.unet_config))
    except Exception as error:  # the converters raise many types for a foreign file
        raise LoraFormatError(f"LoRA {name!r} is not a readable LoRA safetensors file ({error})") from error
    foreign = sorted({key.split(".")[0] for key in state_dict} & LORA_COMPONENTS - set(target.family.lora_components))
    if foreign:  # e.g. an SDXL LoRA's second text encoder, for an SD1.5 model
        raise LoraFormatError(f"LoRA {name!r} adapts {', '.join(foreign)}, which this {target.family.name} model "
                              "does not have")
    converted = {}
    for component in target.family.lora_components:
        prefix = f"{component}."
        part = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
        if not part:
            continue
        alphas = {k.removeprefix(prefix): v for k, v in (network_alphas or {}).items() if k.startswith(prefix)}
        shapes = target.weight_shapes.get(component, {})
        peft_state = _to_peft(component, part, shapes)
        scales = _module_scales(component, peft_state, alphas or None, _component_config(file.metadata, component))
        _check_shapes(name, component, peft_state, scales, shapes)
        converted[component] = (peft_state, scales)
    if not converted:
        raise LoraFormatError(f"LoRA {name!r} has no UNet or text-encoder layers")
    return converted


def _component_config(metadata: Mapping[str, str], component: str) -> dict | None:
    """The LoraConfig kwargs diffusers stores in a file's metadata (`lora_adapter_metadata`), if any."""
    stored = metadata.get("lora_adapter_metadata")
    if not stored:
        return None
    stored = json.loads(stored)
    config = {k.removeprefix(f"{component}."): v for k, v in stored.items() if k.startswith(f"{component}.")}
    return config or None


def _to_peft(component: str, state_dict: dict, shapes: Mapping[str, torch.Size]) -> dict:
    if component == "unet":
        return state_dict if any("lora_A" in k for k in state_dict) else convert_unet_state_dict_to_peft(state_dict)
    state_dict = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict))
    # Text-encoder LoRAs name layers with transformers 4's `text_model.` prefix; transformers 5 drops it from
    # `CLIPTextModel`'s weight names and keeps it in `CLIPTextModelWithProjection`'s: use the model's own.
    prefix = "text_model." if any(name.startswith("text_model.") for name in shapes) else ""
    return {prefix + k.removeprefix("text_model."): v for k, v in state_dict.items()}


def _module_scales(component: str, peft_state: dict, alphas: dict | None, config: dict | None) -> dict[str, float]:
    """Module name -> alpha / rank, resolved by PEFT's own pattern rules."""
    ranks = {k: v.shape[1] for k, v in peft_state.items() if k.endswith("lora_B.weight")}
    if config is None:
        config = get_peft_kwargs(ranks, alphas, peft_state, is_unet=component == "unet")
    scales = {}
    for key, rank in ranks.items():
        module = key.removesuffix(".lora_B.weight")
        alpha_key = get_pattern_key(config.get("alpha_pattern", {}).keys(), module)
        alpha = config.get("alpha_pattern", {}).get(alpha_key, config["lora_alpha"])
        scales[module] = alpha / rank
    return scales


def _check_shapes(name: str, component: str, peft_state: dict, scales: dict[str, float], shapes) -> None:
    for module in scales:
        down, up = peft_state[f"{module}.lora_A.weight"], peft_state[f"{module}.lora_B.weight"]
        shape = shapes.get(f"{module}.weight")
        if shape is None:
            raise LoraFormatError(f"LoRA {name!r} adapts {component} layer {module!r}, which this model lacks")
        if up.shape[0] != shape[0] or down[0].numel() != shape[1:].numel() or up[0].numel() != down.shape[0]:
            raise LoraFormatError(
                f"LoRA {name!r} layer {module!r}: factors {tuple(up.shape)} @ {tuple(down.shape)} do not fit "
                f"the model's weight {tuple(shape)}"
            )


def _factor_pair(down: torch.Tensor, up: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The one copy of a layer's factors: to fp32, 2-D, alpha / rank folded into up (in place when the fp32
    copy is ours, i.e. the file was not fp32 already)."""
    up32 = up.float().flatten(1)
    up32 = up32.mul_(scale) if up32.data_ptr() != up.data_ptr() else up32 * scale
    return down.float().flatten(1).contiguous(), up32.contiguous()


def _factors(peft_state: dict, scales: dict[str, float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {f"{module}.weight": _factor_pair(peft_state[f"{module}.lora_A.weight"],
                                             peft_state[f"{module}.lora_B.weight"], scale)
            for module, scale in scales.items()}


def _trace(converted: dict[str, tuple[dict, dict[str, float]]], tensors: Mapping[str, torch.Tensor]
           ) -> DecodePlan | None:
    """The plan that reproduces `converted` from a file's tensors by key, or None if a converted factor is not
    one of the file's tensors (same storage, dtype and size; a contiguous reshape at most)."""
    by_address = {t.data_ptr(): key for key, t in tensors.items() if t.numel() > 1}

    def source(tensor: torch.Tensor) -> str | None:
        key = by_address.get(tensor.data_ptr())
        original = tensors.get(key) if key is not None else None
        fits = (original is not None and tensor.is_contiguous() and tensor.dtype == original.dtype
                and tensor.numel() == original.numel())
        return key if fits else None

    plan = {}
    for component, (peft_state, scales) in converted.items():
        sources = []
        for module, scale in scales.items():
            down, up = peft_state[f"{module}.lora_A.weight"], peft_state[f"{module}.lora_B.weight"]
            down_key, up_key = source(down), source(up)
            if down_key is None or up_key is None:
                return None
            sources.append(FactorSource(f"{module}.weight", down_key, up_key, tuple(down.shape), tuple(up.shape),
                                        scale))
        plan[component] = tuple(sources)
    return plan


def _apply(plan: DecodePlan, tensors: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    return {component: {s.weight: _factor_pair(tensors[s.down].view(s.down_shape), tensors[s.up].view(s.up_shape),
                                               s.scale) for s in sources}
            for component, sources in plan.items()}


def check_values(name: str, component: str, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
    """LoraFormatError if any factor is NaN or infinite, or a layer's delta exceeds MAX_DELTA, before any weight
    is written; returns a bound on every factor entry (the largest factor's Frobenius norm).

    One pass over the factors: each layer's squared Frobenius norms (a BLAS dot each, ~9 ms per 127 MB of
    factors here). Any NaN or Inf makes them non-finite, and ||up|| * ||down|| bounds every entry of up @ down;
    only a layer that fails this screen is examined exactly (which also avoids rejecting a loose bound).
    """
    if not factors:
        return 0.0
    weights = list(factors)
    squares = torch.stack([torch.stack((torch.dot(down.view(-1), down.view(-1)), torch.dot(up.view(-1), up.view(-1))))
                           for down, up in factors.values()]).double()
    suspects = (~torch.isfinite(squares).all(1)) | (squares.prod(1).sqrt() > MAX_DELTA)
    for index in suspects.nonzero().flatten().tolist():
        down, up = factors[weights[index]]
        layer = f"{component} {weights[index].removesuffix('.weight')}"
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise LoraFormatError(f"LoRA {name!r} has non-finite values (layer {layer})")
        largest = float((up.double() @ down.double()).abs().max())
        if largest > MAX_DELTA:
            raise LoraFormatError(f"LoRA {name!r} has values too large (layer {layer}: its delta reaches "
                                  f"{largest:.3g}, at most {MAX_DELTA:g})")
    return float(squares.max().sqrt())


def build_patch(component: str, loras: Iterable[tuple[LoraFactors, float]], device: torch.device,
                dtype: torch.dtype, stager: Stager | None = None) -> WeightPatch:
    """Sums a request's LoRAs (each with its request scale) into one patch for one component, on `device` in
    `dtype` (through `stager`'s pinned buffer on a GPU). A layer that one LoRA touches needs no concatenation."""
    loras = [(lora, scale) for lora, scale in loras if lora.touches(component)]
    per_layer: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for lora, scale in loras:
        weights, pairs = list(lora.layers[component]), list(lora.layers[component].values())
        ups = [up for _, up in pairs]
        scaled = ups if scale == 1.0 else torch._foreach_mul(ups, scale)  # x * 1.0 == x: skipping it is exact
        for weight, (down, _), up in zip(weights, pairs, scaled):
            per_layer.setdefault(weight, []).append((down, up))
    layers = {weight: LayerDelta(up=_joined([up for _, up in pairs], 1).to(dtype),
                                 down=_joined([down for down, _ in pairs], 0).to(dtype))
              for weight, pairs in per_layer.items()}
    if any(lora.bound * abs(scale) > torch.finfo(dtype).max for lora, scale in loras):
        _check_range(component, layers, dtype)
    if device.type == "cuda":
        layers = (stager or Stager(device)).stage(layers)
    key = tuple((lora.name, float(scale)) for lora, scale in loras)
    return WeightPatch(key=key, layers=layers)


def _joined(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _check_range(component: str, layers: Mapping[str, LayerDelta], dtype: torch.dtype) -> None:
    """LoraFormatError if a factor overflowed the engine's dtype (fp16 ends at 65504: finite fp32 factors of a
    valid-looking file can still become Inf there). Only run when the factors' bound says it could happen."""
    finite = torch.stack([torch.isfinite(d.up).all() & torch.isfinite(d.down).all() for d in layers.values()])
    if not bool(finite.all()):
        weight = list(layers)[int((~finite).nonzero()[0])]
        raise LoraFormatError(f"a LoRA of this request has values beyond {dtype} (layer {component} "
                              f"{weight.removesuffix('.weight')})")


class Stager:
    """Moves a patch's factors to a device with one host-to-device copy, through a pinned buffer reused across
    patches, on a stream of its own (so the copy overlaps whatever the device is computing).

    One stager per store, shared by its loader threads: a patch holds the buffer from packing until its copy is
    done (a few ms), so the buffer allocated (and pinned) at warm-up serves every later patch.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.lock = threading.Lock()

    def stage(self, layers: Mapping[str, LayerDelta]) -> dict[str, LayerDelta]:
        tensors = [t for delta in layers.values() for t in (delta.up, delta.down)]
        if not tensors:
            return dict(layers)
        sizes = [t.numel() for t in tensors]
        device = torch.empty(sum(sizes), dtype=tensors[0].dtype, device=self.device)
        with self.lock:
            host = self._host_buffer(device.numel() * device.element_size()).view(device.dtype)
            torch.cat([t.reshape(-1) for t in tensors], out=host)
            if self.stream is None:
                device.copy_(host)
            else:
                with torch.cuda.stream(self.stream):
                    device.copy_(host, non_blocking=True)
                self.stream.synchronize()  # the buffer may be reused, and the patch is ready when handed over
        views = [part.view(t.shape) for part, t in zip(device.split(sizes), tensors)]
        return {weight: LayerDelta(up=views[2 * i], down=views[2 * i + 1]) for i, weight in enumerate(layers)}

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.stream is not None)
        return self.buffer[:nbytes]


def weight_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {name: param.shape for name, param in module.named_parameters()}

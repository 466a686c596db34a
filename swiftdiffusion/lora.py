"""LoRA files decoded into per-layer low-rank factors, keyed by the model's weight names.

Key formats are diffusers' business: `lora_state_dict` converts kohya/A1111 files, `convert_*_to_peft` brings
old diffusers and PEFT keys to one form, and `get_peft_kwargs` gives each module its alpha exactly as
`load_lora_weights` would. What is new here is the result: instead of wrapping layers, each LoRA becomes
`{weight name: (down, up * scale)}`, which `build_patch` concatenates across a request's LoRAs into one
`WeightPatch` (one matrix product per layer) for the engines to merge in place.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Iterable, Mapping

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import get_peft_kwargs
from peft.utils.other import get_pattern_key
from safetensors.torch import load as load_safetensors

from .engines import LayerDelta, WeightPatch

COMPONENTS = ("unet", "text_encoder")
# The largest change a LoRA may make to one weight entry (|alpha/r * up @ down|, before the request's scale).
# Weights are O(1) and fp16 ends at 65504: a larger delta is a broken or hostile file, never a style.
MAX_DELTA = 1e4


class LoraFormatError(ValueError):
    """The file is not a LoRA for this model (corrupt, truncated, unknown layers or wrong shapes)."""


@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """One LoRA, decoded: component -> weight name -> (down [r, in], up [out, r] with alpha/r folded in)."""

    name: str
    layers: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]]

    def touches(self, component: str) -> bool:
        return bool(self.layers.get(component))


def _safetensors_metadata(data: bytes) -> dict:
    (header_size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + header_size]).get("__metadata__", {}) or {}


def _component_config(metadata: dict, component: str) -> dict | None:
    """The LoraConfig kwargs diffusers stores in a file's metadata (`lora_adapter_metadata`), if any."""
    stored = metadata.get("lora_adapter_metadata")
    if not stored:
        return None
    stored = json.loads(stored)
    config = {k.removeprefix(f"{component}."): v for k, v in stored.items() if k.startswith(f"{component}.")}
    return config or None


def _to_peft(component: str, state_dict: dict) -> dict:
    if component == "unet":
        return state_dict if any("lora_A" in k for k in state_dict) else convert_unet_state_dict_to_peft(state_dict)
    state_dict = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict))
    # Text-encoder LoRAs name layers with transformers 4's `text_model.` prefix, transformers 5 drops it.
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


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


def decode_lora(name: str, data: bytes, weight_shapes: Mapping[str, Mapping[str, torch.Size]]) -> LoraFactors:
    """Decodes a `.safetensors` LoRA file's bytes against the model's weights (component -> name -> shape)."""
    try:
        raw = load_safetensors(data)
        metadata = _safetensors_metadata(data)
        state_dict, network_alphas = StableDiffusionPipeline.lora_state_dict(raw)
    except Exception as error:  # the readers raise many types for a damaged file
        raise LoraFormatError(f"LoRA {name!r} is not a readable LoRA safetensors file ({error})") from error
    layers = {}
    for component in COMPONENTS:
        prefix = f"{component}."
        part = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
        if not part:
            continue
        alphas = {k.removeprefix(prefix): v for k, v in (network_alphas or {}).items() if k.startswith(prefix)}
        peft_state = _to_peft(component, part)
        scales = _module_scales(component, peft_state, alphas or None, _component_config(metadata, component))
        layers[component] = _factors(name, component, peft_state, scales, weight_shapes[component])
        check_values(name, component, layers[component])
    if not layers:
        raise LoraFormatError(f"LoRA {name!r} has no UNet or text-encoder layers")
    return LoraFactors(name, layers)


def _factors(name, component, peft_state, scales, shapes) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    factors = {}
    for module, scale in scales.items():
        down = peft_state[f"{module}.lora_A.weight"].float().flatten(1)
        up = peft_state[f"{module}.lora_B.weight"].float().flatten(1) * scale
        weight = f"{module}.weight"
        shape = shapes.get(weight)
        if shape is None:
            raise LoraFormatError(f"LoRA {name!r} adapts {component} layer {module!r}, which this model lacks")
        if up.shape[0] != shape[0] or down.shape[1] != shape[1:].numel() or up.shape[1] != down.shape[0]:
            raise LoraFormatError(
                f"LoRA {name!r} layer {module!r}: factors {tuple(up.shape)} @ {tuple(down.shape)} do not fit "
                f"the model's weight {tuple(shape)}"
            )
        factors[weight] = (down.contiguous(), up.contiguous())
    return factors


def check_values(name: str, component: str, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """LoraFormatError if any factor is NaN or infinite, or a layer's delta exceeds MAX_DELTA, before any weight
    is written.

    One pass over the factors: each layer's squared Frobenius norms (a BLAS dot each, ~10 ms per 190 MB of
    factors here). Any NaN or Inf makes them non-finite, and ||up|| * ||down|| bounds every entry of up @ down;
    only a layer that fails this screen is examined exactly (which also avoids rejecting a loose bound).
    """
    if not factors:
        return
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


def build_patch(
    component: str, loras: Iterable[tuple[LoraFactors, float]], device: torch.device, dtype: torch.dtype
) -> WeightPatch:
    """Sums a request's LoRAs (each with its request scale) into one patch for one component."""
    loras = [(lora, scale) for lora, scale in loras if lora.touches(component)]
    per_layer: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for lora, scale in loras:
        for weight, (down, up) in lora.layers[component].items():
            per_layer.setdefault(weight, []).append((down, up * scale))
    layers = {
        weight: LayerDelta(
            up=_to_device(torch.cat([up for _, up in pairs], dim=1), device, dtype),
            down=_to_device(torch.cat([down for down, _ in pairs], dim=0), device, dtype),
        )
        for weight, pairs in per_layer.items()
    }
    _check_range(component, layers, dtype)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # the copies are done before the patch is handed over
    key = tuple((lora.name, float(scale)) for lora, scale in loras)
    return WeightPatch(key=key, layers=layers)


def _check_range(component: str, layers: Mapping[str, LayerDelta], dtype: torch.dtype) -> None:
    """LoraFormatError if a factor overflowed the engine's dtype (fp16 ends at 65504: finite fp32 factors of a
    valid-looking file can still become Inf there); one check for all layers, on the factors' device."""
    if not layers or torch.finfo(dtype).max >= torch.finfo(torch.float32).max:
        return
    finite = torch.stack([torch.isfinite(d.up).all() & torch.isfinite(d.down).all() for d in layers.values()])
    if not bool(finite.all()):
        weight = list(layers)[int((~finite).nonzero()[0])]
        raise LoraFormatError(f"a LoRA of this request has values beyond {dtype} (layer {component} "
                              f"{weight.removesuffix('.weight')})")


def _to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host factors to the engine's device; through pinned memory on a GPU, so the copy is a plain DMA."""
    tensor = tensor.to(dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def weight_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {name: param.shape for name, param in module.named_parameters()}

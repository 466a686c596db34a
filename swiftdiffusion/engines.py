"""The engine interface and its torch implementation.

An engine runs one graph of `graphs.py`: named tensors in, named tensors out. Its weights can be patched with
low-rank deltas (W = W0 + sum_i scale_i * up_i @ down_i, LoRAs merged in place) and restored to W0 exactly.
Weight names are always the torch parameter names of the diffusers module (e.g.
`down_blocks.0.attentions.0.proj_in.weight`); the TensorRT runtime maps them to its own names.

Engines cut from one module (the full UNet and its two halves) share one `TorchWeights`: patching any of them
patches all, and a repeated patch with the same key is free, so callers simply patch every engine they use.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol

import torch

from .graphs import GraphSpec


@dataclasses.dataclass(frozen=True)
class LayerDelta:
    """W += up @ down for one weight, with the scales already folded into `up`.

    Several LoRAs on one layer are concatenated along the rank, so each layer costs one matrix product.
    """

    up: torch.Tensor  # [out, rank]
    down: torch.Tensor  # [rank, in * kernel area]


@dataclasses.dataclass(frozen=True)
class WeightPatch:
    """The deltas of one LoRA set, and a key naming that set (same key, same weights)."""

    key: tuple
    layers: Mapping[str, LayerDelta]

    def to(self, device: torch.device) -> WeightPatch:
        """The same patch with its factors on `device` (for a second copy of the model there)."""
        return WeightPatch(self.key, {name: LayerDelta(d.up.to(device), d.down.to(device))
                                      for name, d in self.layers.items()})


class Engine(Protocol):
    spec: GraphSpec

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Runs the graph on named inputs and returns its named outputs."""

    def patch(self, patch: WeightPatch) -> None:
        """Makes the weights W0 + the patch's deltas (a no-op if that patch is already applied)."""

    def restore(self) -> None:
        """Makes every weight bit-identical to W0 again."""


class TorchWeights:
    """In-place LoRA merging into a module's parameters, with exact restore from pristine copies.

    Only touched layers are copied (once, on first touch, on the weight's device) and only they are written.
    The storage of each parameter never changes, so captured CUDA graphs stay valid across patches.
    """

    def __init__(self, module: torch.nn.Module):
        self.params = dict(module.named_parameters())
        self.pristine: dict[str, torch.Tensor] = {}
        self.dirty: set[str] = set()
        self.applied_key: tuple | None = None

    def check(self, patch: WeightPatch) -> None:
        """Raises ValueError, before anything is written, if a delta names an unknown or mis-shaped weight."""
        for name, delta in patch.layers.items():
            weight = self.params.get(name)
            if weight is None:
                raise ValueError(f"no weight named {name!r} in this model")
            rows, cols = weight.shape[0], weight[0].numel()
            if delta.up.shape[0] != rows or delta.down.shape[1] != cols or delta.up.shape[1] != delta.down.shape[0]:
                raise ValueError(
                    f"LoRA shapes {tuple(delta.up.shape)} @ {tuple(delta.down.shape)} do not fit weight "
                    f"{name!r} of shape {tuple(weight.shape)}"
                )

    @torch.no_grad()
    def patch(self, patch: WeightPatch) -> None:
        if patch.key == self.applied_key:
            return
        self.check(patch)
        self.restore()
        try:
            for name, delta in patch.layers.items():
                weight = self.params[name]
                if name not in self.pristine:
                    self.pristine[name] = weight.detach().clone()
                self.dirty.add(name)
                weight.view(weight.shape[0], -1).addmm_(delta.up, delta.down)
        except BaseException:
            self.restore()
            raise
        self.applied_key = patch.key

    @torch.no_grad()
    def restore(self) -> None:
        for name in self.dirty:
            self.params[name].copy_(self.pristine[name])
        self.dirty.clear()
        self.applied_key = None


class TorchEngine:
    """Runs a `graphs.py` module eagerly with torch, on its device and dtype."""

    def __init__(self, module: torch.nn.Module, spec: GraphSpec, weights: TorchWeights | None = None):
        self.module = module.eval().requires_grad_(False)
        self.spec = spec
        self.weights = weights if weights is not None else TorchWeights(module)

    @torch.inference_mode()
    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        result = self.module(*(inputs[name] for name in self.spec.inputs))
        if isinstance(result, torch.Tensor):
            result = (result,)
        return dict(zip(self.spec.outputs, result))

    def module_device(self) -> torch.device:
        return next(self.module.parameters()).device

    def patch(self, patch: WeightPatch) -> None:
        self.weights.patch(patch)

    def restore(self) -> None:
        self.weights.restore()

"""The computation graphs the server runs, as torch modules with named inputs and outputs.

Each class here is one engine: the torch runtime calls it directly, the ONNX exporter traces it, and TensorRT
builds from that ONNX. The UNet is split at the ControlNet boundary: `UNetEncoder` (time embedding, conv_in,
down blocks, mid block) does not depend on any ControlNet, so ControlNets run while it computes; `UNetDecoder`
takes the skips and mid output already summed with the ControlNet residuals, so one decoder graph serves any
number of ControlNets. `FullUNet` serves requests without ControlNet in one call.

The split follows `diffusers.UNet2DConditionModel.forward` for SD1.5-type UNets (no class embeddings, no added
conditioning, no attention masks). One difference that changes nothing: the decoder always passes the
upsample size explicitly, which equals the factor-2 upsample when sizes divide evenly and keeps the graph
valid for every multiple of 8 pixels otherwise.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextModel


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """Names of a graph's inputs and outputs, in call order."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def skip_count(unet_config) -> int:
    """Number of skip tensors the down blocks emit: conv_in's, then each resnet's and each downsampler's."""
    blocks = len(unet_config.down_block_types)
    return 1 + blocks * unet_config.layers_per_block + (blocks - 1)


def skip_names(count: int) -> tuple[str, ...]:
    return tuple(f"down_{i}" for i in range(count))


def residual_names(decoder: GraphSpec) -> tuple[str, ...]:
    """The decoder inputs a ControlNet adds to, in order: the skips and the mid output (between `emb` and
    `encoder_hidden_states`); also a ControlNet's outputs."""
    return decoder.inputs[1:-1]


def graph_specs(unet_config) -> dict[str, GraphSpec]:
    """The I/O names of every graph of a model, keyed by graph name."""
    skips = skip_names(skip_count(unet_config))
    unet_in = ("sample", "timestep", "encoder_hidden_states")
    return {
        "text_encoder": GraphSpec(("input_ids",), ("text_embeddings",)),
        "unet": GraphSpec(unet_in, ("noise_pred",)),
        "unet_encoder": GraphSpec(unet_in, ("emb", *skips, "mid")),
        "unet_decoder": GraphSpec(("emb", *skips, "mid", "encoder_hidden_states"), ("noise_pred",)),
        "controlnet": GraphSpec((*unet_in, "controlnet_cond"), (*skips, "mid")),
        "vae_decoder": GraphSpec(("latent",), ("image",)),
    }


class TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder: CLIPTextModel):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]


class UNetEncoder(torch.nn.Module):
    """Time embedding, conv_in, down blocks and mid block: returns (emb, *skips, mid)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep.expand(sample.shape[0])))
        sample = unet.conv_in(sample)
        skips = [sample]
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, block_skips = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                sample, block_skips = block(hidden_states=sample, temb=emb)
            skips.extend(block_skips)
        mid = unet.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        return (emb, *skips, mid)


class UNetDecoder(torch.nn.Module):
    """Up blocks and the output head, from the time embedding, the skips and the mid output."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(self, emb: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        # args: *skips, mid, encoder_hidden_states (positional, so that the exporter names each one).
        *skips, sample, encoder_hidden_states = args
        unet = self.unet
        for index, block in enumerate(unet.up_blocks):
            block_skips = tuple(skips[-len(block.resnets):])
            skips = skips[: -len(block.resnets)]
            upsample_size = skips[-1].shape[2:] if index < len(unet.up_blocks) - 1 else None
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=block_skips,
                               encoder_hidden_states=encoder_hidden_states, upsample_size=upsample_size)
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=block_skips,
                               upsample_size=upsample_size)
        return unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))


class FullUNet(torch.nn.Module):
    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class ControlNetResiduals(torch.nn.Module):
    """A ControlNet's unscaled down and mid residuals: the caller scales and sums them, as diffusers does."""

    def __init__(self, controlnet: ControlNetModel):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond,
                                    conditioning_scale=1.0, return_dict=False)
        return (*down, mid)


class VaeDecoder(torch.nn.Module):
    """Latents (as the denoising loop leaves them) to images in [-1, 1]."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.vae.config.scaling_factor, return_dict=False)[0]

"""The computation graphs the server runs, as torch modules with named inputs and outputs.

Each class here is one engine: the torch runtime calls it directly, the ONNX exporter traces it, and TensorRT
builds from that ONNX. The UNet is split at the ControlNet boundary: `UNetEncoder` (time and added embeddings,
conv_in, down blocks, mid block) does not depend on any ControlNet, so ControlNets run while it computes;
`UNetDecoder` takes the skips and mid output already summed with the ControlNet residuals, so one decoder graph
serves any number of ControlNets. `FullUNet` serves requests without ControlNet in one call.

The split follows `diffusers.UNet2DConditionModel.forward` for the UNets of both families (`family.py`): SDXL's
added conditioning (`text_embeds`, `time_ids`) folds into the time embedding before the down blocks, so it is an
input of the encoder (and of every ControlNet), never of the decoder. No class embeddings, no attention masks.
One difference that changes nothing: the decoder always passes the upsample size explicitly, which equals the
factor-2 upsample when sizes divide evenly and keeps the graph valid for every multiple of 8 pixels otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .family import ModelFamily, TextEncoderPart, family_of

# Graph name -> the diffusers component whose weights it computes with (what LoRA patches name).
WEIGHT_COMPONENTS = {"unet": "unet", "unet_encoder": "unet", "unet_decoder": "unet", "text_encoder": "text_encoder",
                     "text_encoder_2": "text_encoder_2"}


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """Names of a graph's inputs and outputs, in call order."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def skip_count(unet_config: Mapping) -> int:
    """Number of skip tensors the down blocks emit: conv_in's, then each resnet's and each downsampler's."""
    blocks = len(unet_config["down_block_types"])
    return 1 + blocks * unet_config["layers_per_block"] + (blocks - 1)


def skip_names(count: int) -> tuple[str, ...]:
    return tuple(f"down_{i}" for i in range(count))


def residual_names(decoder: GraphSpec) -> tuple[str, ...]:
    """The decoder inputs a ControlNet adds to, in order: the skips and the mid output (between `emb` and
    `encoder_hidden_states`); also a ControlNet's outputs."""
    return decoder.inputs[1:-1]


def text_encoder_spec(part: TextEncoderPart) -> GraphSpec:
    return GraphSpec(("input_ids", "hidden_layer"), ("hidden_states", "text_embeds") if part.projected
                     else ("hidden_states",))


def unet_inputs(family: ModelFamily) -> tuple[str, ...]:
    """What the UNet, its encoder and every ControlNet are called with (besides a ControlNet's image)."""
    return ("sample", "timestep", "encoder_hidden_states", *family.added_conditioning)


def graph_specs(unet_config: Mapping, family: ModelFamily | None = None) -> dict[str, GraphSpec]:
    """The I/O names of every graph of a model, keyed by graph name (the family's from the UNet config unless
    given)."""
    family = family or family_of(unet_config)
    skips = skip_names(skip_count(unet_config))
    unet_in = unet_inputs(family)
    return {
        **{part.component: text_encoder_spec(part) for part in family.text_encoders},
        "unet": GraphSpec(unet_in, ("noise_pred",)),
        "unet_encoder": GraphSpec(unet_in, ("emb", *skips, "mid")),
        "unet_decoder": GraphSpec(("emb", *skips, "mid", "encoder_hidden_states"), ("noise_pred",)),
        "controlnet": GraphSpec((*unet_in, "controlnet_cond"), (*skips, "mid")),
        "vae_decoder": GraphSpec(("latent",), ("image",)),
    }


def added_conditioning(names: tuple[str, ...], values: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor] | None:
    """diffusers' `added_cond_kwargs` from a graph's extra inputs (None for a family without any)."""
    return dict(zip(names, values)) if names else None


class TextEncoder(torch.nn.Module):
    """Per row, the hidden states after layer `hidden_layer` (0: the token embeddings), through the final layer
    norm when the family takes them so (SD1.5); and a projected encoder's pooled output (SDXL's `text_embeds`).

    The layer is an input, not a constant, so that one graph serves every `clip_skip` and a batch may mix them
    (the Triton text encoder batches requests)."""

    def __init__(self, text_encoder: CLIPTextModel | CLIPTextModelWithProjection, final_norm: bool):
        super().__init__()
        self.text_encoder = text_encoder
        # transformers 5 keeps the norm on the model, 4 on its `text_model`.
        self.final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm if final_norm else None
        self.projected = isinstance(text_encoder, CLIPTextModelWithProjection)

    def forward(self, input_ids: torch.Tensor, hidden_layer: torch.Tensor):
        output = self.text_encoder(input_ids, output_hidden_states=True)
        states = torch.stack(output.hidden_states, 1)  # [batch, layers + 1, tokens, width]
        index = hidden_layer.view(-1, 1, 1, 1).expand(-1, 1, states.shape[2], states.shape[3])
        selected = states.gather(1, index).squeeze(1)
        if self.final_norm is not None:
            selected = self.final_norm(selected)
        return (selected, output.text_embeds) if self.projected else selected


class UNetEncoder(torch.nn.Module):
    """Time embedding (with the family's added conditioning), conv_in, down blocks and mid block: returns
    (emb, *skips, mid)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        self.added = family_of(unet.config).added_conditioning

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *conditioning: torch.Tensor):
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep.expand(sample.shape[0])))
        added = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                   added_cond_kwargs=added_conditioning(self.added, conditioning))
        if added is not None:
            emb = emb + added
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
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
        self.added = family_of(unet.config).added_conditioning

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *conditioning: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False,
                         added_cond_kwargs=added_conditioning(self.added, conditioning))[0]


class ControlNetResiduals(torch.nn.Module):
    """A ControlNet's unscaled down and mid residuals: the caller scales and sums them, as diffusers does."""

    def __init__(self, controlnet: ControlNetModel):
        super().__init__()
        self.controlnet = controlnet
        self.added = family_of(controlnet.config).added_conditioning

    def forward(self, sample, timestep, encoder_hidden_states, *conditioning_and_image):
        *conditioning, controlnet_cond = conditioning_and_image
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                                    added_cond_kwargs=added_conditioning(self.added, tuple(conditioning)),
                                    return_dict=False)
        return (*down, mid)


class VaeDecoder(torch.nn.Module):
    """Latents (as the denoising loop leaves them, in any dtype) to images in [-1, 1], computed in the VAE's own
    dtype (fp32 for an SDXL VAE that asks for `force_upcast` in an fp16 deployment). Latents are unscaled with the
    VAE's `latents_mean` / `latents_std` when its config has them, as diffusers' SDXL pipeline does."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae
        config = vae.config
        normalised = getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None
        self.register_buffer("latents_mean", torch.tensor(config.latents_mean).view(1, -1, 1, 1) if normalised else None,
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(config.latents_std).view(1, -1, 1, 1) if normalised else None,
                             persistent=False)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        latent = latent.to(self.vae.dtype)
        if self.latents_mean is None:
            latent = latent / self.vae.config.scaling_factor
        else:
            latent = latent * self.latents_std.to(latent) / self.vae.config.scaling_factor + self.latents_mean.to(latent)
        return self.vae.decode(latent, return_dict=False)[0]

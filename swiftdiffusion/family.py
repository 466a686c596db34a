"""Model families: what sets SDXL apart from Stable Diffusion 1.5, as data that every layer reads.

A family says how text becomes conditioning (which text encoders, which of their hidden layers, whether a pooled
embedding and the size/crop ids join the UNet's time embedding), which diffusers code is its reference (pipelines,
LoRA converters) and what a request gets by default. The graphs, the pipeline, the LoRA decoder, export and
serving all take it from the model folder (`family_of` its UNet config), so both families run through one path.

What the two families are, as diffusers 0.42 runs them (`StableDiffusion(ControlNet)Pipeline`,
`StableDiffusionXL(ControlNet)Pipeline`):
- SD1.5: one CLIP text encoder, its last hidden states through the final layer norm (`clip_skip` k: the states k
  layers earlier, through the same norm); nothing added to the time embedding; 512 px, guidance 7.5.
- SDXL: CLIP ViT-L and OpenCLIP bigG (`CLIPTextModelWithProjection`, whose tokenizer pads with "!"), each one's
  penultimate hidden states without the final norm (`clip_skip` k: k layers earlier), concatenated (768 + 1280);
  the second one's projected pooled output as `text_embeds`, and `time_ids` (original size, crop top-left, target
  size) added to the time embedding of the UNet and of every ControlNet; an absent negative prompt is zeros
  (`force_zeros_for_empty_prompt`, from the model folder); the VAE decodes in fp32 when its config says
  `force_upcast`; 1024 px, guidance 5.0.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping


@dataclasses.dataclass(frozen=True)
class TextEncoderPart:
    """One text encoder of a family: its diffusers component (folder) name, its tokenizer's, and whether it is a
    `CLIPTextModelWithProjection` whose projected pooled output conditions the UNet (`text_embeds`)."""

    component: str
    tokenizer: str
    projected: bool = False


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str
    text_encoders: tuple[TextEncoderPart, ...]
    # Which hidden states condition the UNet: this many layers before the last (plus the request's clip_skip), and
    # whether they go through the encoder's final layer norm.
    skipped_layers: int
    final_norm: bool
    # Inputs the UNet and ControlNets take besides sample, timestep and encoder_hidden_states (diffusers'
    # `added_cond_kwargs`), in graph input order.
    added_conditioning: tuple[str, ...]
    default_size: int
    default_guidance: float
    # Whether an absent negative prompt is zeros when the folder's model_index.json does not say.
    zero_absent_negative: bool
    # Whether the VAE decodes in fp32 when the deployment is fp16 and the VAE's config asks (`force_upcast`).
    vae_upcast: bool
    # diffusers' reference code for this family, by name (imported where used: the pipeline modules are heavy).
    pipeline: str
    controlnet_pipeline: str
    lora_loader: str

    @property
    def text_components(self) -> tuple[str, ...]:
        return tuple(part.component for part in self.text_encoders)

    @property
    def lora_components(self) -> tuple[str, ...]:
        """The modules whose weights LoRAs patch (never the ControlNets)."""
        return ("unet", *self.text_components)

    @property
    def second_prompts(self) -> bool:
        """Whether requests may give the second text encoder prompts of its own (`prompt_2`, `negative_prompt_2`)."""
        return len(self.text_encoders) > 1


SD15 = ModelFamily(
    name="sd15", text_encoders=(TextEncoderPart("text_encoder", "tokenizer"),), skipped_layers=0, final_norm=True,
    added_conditioning=(), default_size=512, default_guidance=7.5, zero_absent_negative=False, vae_upcast=False,
    pipeline="StableDiffusionPipeline", controlnet_pipeline="StableDiffusionControlNetPipeline",
    lora_loader="StableDiffusionLoraLoaderMixin")
SDXL = ModelFamily(
    name="sdxl", text_encoders=(TextEncoderPart("text_encoder", "tokenizer"),
                                TextEncoderPart("text_encoder_2", "tokenizer_2", projected=True)),
    skipped_layers=1, final_norm=False, added_conditioning=("text_embeds", "time_ids"), default_size=1024,
    default_guidance=5.0, zero_absent_negative=True, vae_upcast=True, pipeline="StableDiffusionXLPipeline",
    controlnet_pipeline="StableDiffusionXLControlNetPipeline", lora_loader="StableDiffusionXLLoraLoaderMixin")
FAMILIES = {family.name: family for family in (SD15, SDXL)}
TIME_IDS = 6  # original height, width, crop top, left, target height, width


def family_of(unet_config: Mapping) -> ModelFamily:
    """The family of a UNet (or ControlNet) config; ValueError for one neither family describes."""
    kind = unet_config.get("addition_embed_type")
    if kind is None:
        return SD15
    if kind != "text_time":
        raise ValueError(f"unsupported UNet: addition_embed_type {kind!r} (SD1.5- and SDXL-type UNets are served)")
    time_width = unet_config["addition_time_embed_dim"] * TIME_IDS
    if unet_config.get("projection_class_embeddings_input_dim", 0) <= time_width:
        raise ValueError("unsupported SDXL variant: its added conditioning is not a pooled text embedding plus six "
                         "size and crop ids (an SDXL refiner?)")
    return SDXL

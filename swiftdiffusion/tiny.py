"""The built-in random models: stand-ins for real SD1.5 and SDXL weights where no model hub is reachable.

`build_model(out, size, seed, family)` writes, deterministically from a seed, what a user would otherwise download:
  out/model/                 a diffusers-format folder (unet, vae, text encoder(s), tokenizer(s), scheduler)
  out/controlnets/<name>/    ControlNets in diffusers format (`canny`, `depth`)
  out/loras/<name>.safetensors  LoRAs in real key formats (diffusers, PEFT, kohya/A1111; for SDXL kohya's sgm block
                             names and te1/te2 prefixes), UNet and text-encoder layers
The architectures are the families' (`family.py`) with reduced widths, so every downstream path treats them
exactly like real folders:
- SD1.5: the same block types, cross-attention, 12+1 skip tensors, 4 VAE levels, one CLIP text encoder.
- SDXL: three UNet levels (the first without attention) with transformer depth per level, linear projections,
  `addition_embed_type: text_time`, 9+1 skip tensors; CLIP and a projected CLIP (whose tokenizer pads with "!"),
  their widths concatenated for cross-attention; the base model's Euler scheduler config, its VAE scaling factor
  and `force_upcast`, `force_zeros_for_empty_prompt`.

Weights that start at zero in real training (ControlNet zero-convolutions, LoRA up-matrices) are perturbed here,
so that tests can tell "applied" from "ignored".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .family import FAMILIES, SD15, SDXL, TIME_IDS, ModelFamily

CONTROLNET_NAMES = ("canny", "depth")
# LoRA catalog entry -> key format of its file.
LORA_FORMATS = {"style_diffusers": "diffusers", "style_peft": "peft", "character_kohya": "kohya"}
TEXT_LENGTH = 77  # CLIP's context length, as in both families.


@dataclasses.dataclass(frozen=True)
class ModelSize:
    unet_channels: tuple[int, ...]
    norm_groups: int
    text_widths: tuple[int, ...]  # per text encoder
    text_layers: tuple[int, ...]
    vae_channels: tuple[int, int, int, int]
    vae_layers: int
    controlnet_embedding: tuple[int, int, int, int]
    lora_rank: int
    # SDXL: transformer blocks per level, attention heads per level, width of each size/crop id's embedding.
    transformer_depth: tuple[int, ...] = ()
    attention_heads: tuple[int, ...] = ()
    time_id_width: int = 0


# `small` keeps each family's width ratios (SD1.5's 1:2:4:4, SDXL's 1:2:4 and 768:1280 text widths), so UNet,
# ControlNet and LoRA costs stand in the same proportions as in the real models (at 1/10 of their widths), and a
# 64x64-latent step is far above Python overhead. SDXL's transformer depths (1, 2, 10) shrink to (1, 2, 4).
SIZES = {
    "sd15": {
        "tiny": ModelSize((32, 32, 64, 64), 8, (32,), (2,), (8, 16, 16, 16), 1, (8, 8, 16, 16), 4),
        "small": ModelSize((32, 64, 128, 128), 16, (128,), (4,), (16, 32, 64, 64), 2, (16, 32, 64, 128), 8),
    },
    "sdxl": {
        "tiny": ModelSize((32, 64, 64), 8, (32, 64), (3, 4), (8, 16, 16, 16), 1, (8, 8, 16, 16), 4,
                          transformer_depth=(1, 1, 2), attention_heads=(2, 4, 4), time_id_width=8),
        "small": ModelSize((32, 64, 128), 16, (96, 160), (3, 4), (16, 32, 64, 64), 2, (16, 32, 96, 128), 8,
                           transformer_depth=(1, 2, 4), attention_heads=(2, 4, 8), time_id_width=32),
    },
}
SIZE_NAMES = ("tiny", "small")

# The layers a typical LoRA trains: every attention projection, feed-forward and transformer in/out projection of
# the UNet (192 weights in SD1.5), and the text encoders' attention projections.
UNET_LORA_SUFFIXES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                      "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_LORA_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
# What LoCon-style kohya files train besides: the resnets' 3x3 convolutions (a few of them here).
LOCON_SUFFIXES = ("resnets.0.conv1",)


def build_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A byte-level BPE tokenizer with CLIP's conventions, built offline (no CLIP vocabulary ships anywhere).
    SDXL's second tokenizer pads with "!"."""
    symbols = sorted(set(bytes_to_unicode().values()))
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>"), ("e", "r</w>"), ("a", "t</w>")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_LENGTH, pad_token=pad_token)


def build_unet(size: ModelSize, family: ModelFamily = SD15) -> UNet2DConditionModel:
    if family is SD15:
        return UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=size.unet_channels, layers_per_block=2, cross_attention_dim=size.text_widths[0],
            attention_head_dim=8, norm_num_groups=size.norm_groups)
    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=size.unet_channels, layers_per_block=2, transformer_layers_per_block=size.transformer_depth,
        attention_head_dim=size.attention_heads, cross_attention_dim=sum(size.text_widths),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=size.time_id_width,
        projection_class_embeddings_input_dim=TIME_IDS * size.time_id_width + size.text_widths[1],
        norm_num_groups=size.norm_groups)


def build_vae(size: ModelSize, family: ModelFamily = SD15) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=size.vae_channels,
        layers_per_block=size.vae_layers,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=512 if family is SD15 else 1024,
        scaling_factor=0.18215 if family is SD15 else 0.13025,
        force_upcast=True,
    )


def build_text_encoder(size: ModelSize, index: int, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """The `index`-th text encoder: CLIP ViT-L's shape (quick GELU), or for SDXL's second OpenCLIP bigG's (GELU,
    with the projection whose pooled output conditions the UNet)."""
    width = size.text_widths[index]
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=size.text_layers[index],
        num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH,
        hidden_act="quick_gelu" if index == 0 else "gelu",
        projection_dim=width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config) if index == 0 else CLIPTextModelWithProjection(config)


# SD1.5's own scheduler configuration. `clip_sample: false` is not a PNDM argument but the other schedulers
# read it from this shared config (diffusers' pipelines force it to false when it is missing).
SCHEDULER_CONFIGS = {
    "sd15": {
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None,
    },
    # SDXL base 1.0's.
    "sdxl": {
        "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
    },
}


def build_controlnet(unet: UNet2DConditionModel, size: ModelSize) -> ControlNetModel:
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=size.controlnet_embedding)
    # Give the controlnet its own encoder weights and non-zero zero-convolutions.
    with torch.no_grad():
        for param in controlnet.parameters():
            param.add_(torch.randn_like(param) * 0.02)
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        for conv in zero_convs:
            conv.weight.normal_(0.0, 0.3 / conv.weight.shape[1] ** 0.5)
            conv.bias.normal_(0.0, 0.05)
    return controlnet


def control_image(seed: int, height: int, width: int | None = None) -> np.ndarray:
    """A control image for the built-in ControlNets (tests, demos, benchmarks): blocky random pixels with a coarse
    edge map's statistics (edges at 8-pixel blocks), reproducible from `seed`; square unless `width` is given."""
    width = height if width is None else width
    blocks = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return np.ascontiguousarray(blocks.repeat(8, axis=0).repeat(8, axis=1))


def lora_targets(model: torch.nn.Module, suffixes: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape of each Linear or Conv2d layer a LoRA adapts."""
    return {name: tuple(module.weight.shape) for name, module in model.named_modules()
            if name.endswith(suffixes) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}


def random_lora_factors(targets: Mapping[str, tuple[int, ...]], rank: int, generator: torch.Generator
                        ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (down, up), shaped as trainers save them (a convolution's down [rank, in, kh, kw] and up
    [out, rank, 1, 1]); up is non-zero unlike a freshly initialised LoRA."""
    factors = {}
    for name, shape in sorted(targets.items()):
        fan_in = math.prod(shape[1:])
        down = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
        up = torch.randn(shape[0], rank, generator=generator) * (0.6 / rank**0.5)
        if len(shape) == 4:
            down, up = down.view(rank, *shape[1:]), up[:, :, None, None]
        factors[name] = (down, up)
    return factors


# A resnet's layers in the sgm naming.
SGM_RESNET_LAYERS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                     "conv_shortcut": "skip_connection"}
SGM_MIDDLE = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}


def sgm_name(module: str, layers_per_block: int) -> str:
    """A diffusers UNet module name (of a resnet or an attention block) in the sgm/LDM naming that kohya's SDXL
    trainers write (`input_blocks.4.1...`): the inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers` and
    `_convert_unet_lora_key`."""
    parts = module.split(".")
    middle = parts[0] == "mid_block"
    kind = parts[1] if middle else parts[2]
    if kind not in ("resnets", "attentions"):
        raise ValueError(f"no sgm name for {module!r}")
    if middle:
        layer, rest = int(parts[2]), parts[3:]
        block = f"middle_block.{SGM_MIDDLE[kind, layer]}"
    else:
        level, layer, rest = int(parts[1]), int(parts[3]), parts[4:]
        first = 1 + level * (layers_per_block + 1) if parts[0] == "down_blocks" else level * (layers_per_block + 1)
        block = f"{'input_blocks' if parts[0] == 'down_blocks' else 'output_blocks'}.{first + layer}." \
                f"{0 if kind == 'resnets' else 1}"
    if kind == "resnets":
        rest = [SGM_RESNET_LAYERS.get(rest[0], rest[0]), *rest[1:]]
    return ".".join([block, *rest])


def kohya_prefix(component: str, two_text_encoders: bool) -> str:
    """kohya's key prefix of a component: `lora_te_` for the single text encoder of SD1.5, `lora_te1_` and
    `lora_te2_` for SDXL's two."""
    if component == "unet":
        return "lora_unet_"
    if not two_text_encoders:
        return "lora_te_"
    return "lora_te2_" if component == "text_encoder_2" else "lora_te1_"


def lora_state_dict(factors: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]], key_format: str,
                    alpha: float, layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    """Writes factors (component -> module -> (down, up)) with the keys of one real format: `kohya` (diffusers
    block names, as kohya's SD1.5 trainers), `kohya_sgm` (sgm block names, as its SDXL trainers), `peft`,
    `diffusers`."""
    two_text_encoders = "text_encoder_2" in factors
    tensors: dict[str, torch.Tensor] = {}
    for component, modules in factors.items():
        for module, (down, up) in modules.items():
            if key_format in ("kohya", "kohya_sgm"):
                name = sgm_name(module, layers_per_block) if key_format == "kohya_sgm" and component == "unet" else module
                key = kohya_prefix(component, two_text_encoders) + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = down
                tensors[f"{key}.lora_up.weight"] = up
                tensors[f"{key}.alpha"] = torch.tensor(alpha)
            elif key_format == "peft":
                tensors[f"{component}.{module}.lora_A.weight"] = down
                tensors[f"{component}.{module}.lora_B.weight"] = up
            elif key_format == "diffusers":
                infix = "lora" if component == "unet" else "lora_linear_layer"
                tensors[f"{component}.{module}.{infix}.down.weight"] = down
                tensors[f"{component}.{module}.{infix}.up.weight"] = up
            else:
                raise ValueError(f"unknown LoRA key format {key_format!r}")
    return {key: value.contiguous() for key, value in tensors.items()}


def model_lora_targets(modules: Mapping[str, torch.nn.Module], locon: bool = False) -> dict[str, dict]:
    """component -> module -> weight shape, for the layers a typical LoRA of this model trains (and LoCon's 3x3
    convolutions with `locon`). Text-encoder layers keep transformers 4's `text_model.` prefix, as trained LoRAs
    name them."""
    targets = {}
    for component, module in modules.items():
        if component == "unet":
            targets[component] = lora_targets(module, UNET_LORA_SUFFIXES + (LOCON_SUFFIXES if locon else ()))
        else:
            targets[component] = {"text_model." + name.removeprefix("text_model."): shape
                                  for name, shape in lora_targets(module, TEXT_LORA_SUFFIXES).items()}
    return targets


def random_lora(targets: Mapping[str, Mapping[str, tuple[int, ...]]], rank: int, generator: torch.Generator,
                key_format: str, alpha: float, layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    """A random LoRA of `targets` (component -> module -> shape; components in that order draw from `generator`)
    in one key format."""
    factors = {component: random_lora_factors(shapes, rank, generator) for component, shapes in targets.items()}
    return lora_state_dict(factors, key_format, alpha, layers_per_block)


def write_loras(out: Path, modules: Mapping[str, torch.nn.Module], family: ModelFamily, rank: int, seed: int) -> None:
    """The three named LoRAs. SD1.5: the formats' usual content (only the kohya and PEFT files carry text-encoder
    keys, the kohya one with alpha = rank / 2). SDXL: every file adapts the UNet and both text encoders; the kohya
    one names blocks the sgm way and also trains LoCon 3x3 convolutions."""
    out.mkdir(parents=True, exist_ok=True)
    for index, (name, key_format) in enumerate(sorted(LORA_FORMATS.items())):
        generator = torch.Generator().manual_seed(seed * 1000 + index)
        kohya = key_format == "kohya"
        with_text = family is SDXL or key_format != "diffusers"
        targets = model_lora_targets({c: m for c, m in modules.items() if c == "unet" or with_text},
                                     locon=kohya and family is SDXL)
        file_format = "kohya_sgm" if kohya and family is SDXL else key_format
        tensors = random_lora(targets, rank, generator, file_format, rank / 2 if kohya else rank)
        save_file(tensors, out / f"{name}.safetensors", metadata={"format": "pt"})


def model_index(family: ModelFamily) -> dict:
    """model_index.json of a diffusers folder of the family."""
    index = {"_class_name": family.pipeline, "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", SCHEDULER_CONFIGS[family.name]["_class_name"]],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for part in family.text_encoders:
        index[part.component] = ["transformers", "CLIPTextModelWithProjection" if part.projected else "CLIPTextModel"]
        index[part.tokenizer] = ["transformers", "CLIPTokenizer"]
    if family is SD15:
        index.update(feature_extractor=[None, None], requires_safety_checker=False, safety_checker=[None, None])
    else:
        index.update(force_zeros_for_empty_prompt=True)
    return index


def build_model(out: Path, size_name: str = "tiny", seed: int = 0, family: str = "sd15") -> Path:
    """Writes the model, ControlNet and LoRA folders under `out` and returns `out`."""
    kind = FAMILIES[family]
    size = SIZES[family][size_name]
    out = Path(out)
    torch.manual_seed(seed)
    tokenizers = [build_tokenizer("!" if part.projected else "<|endoftext|>") for part in kind.text_encoders]
    unet = build_unet(size, kind)
    vae = build_vae(size, kind)
    texts = [build_text_encoder(size, i, tokenizer) for i, tokenizer in enumerate(tokenizers)]
    model_dir = out / "model"
    unet.save_pretrained(model_dir / "unet")
    vae.save_pretrained(model_dir / "vae")
    for part, tokenizer, text in zip(kind.text_encoders, tokenizers, texts):
        text.save_pretrained(model_dir / part.component)
        tokenizer.save_pretrained(model_dir / part.tokenizer)
    (model_dir / "scheduler").mkdir()
    (model_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIGS[family], indent=2))
    (model_dir / "model_index.json").write_text(json.dumps(model_index(kind), indent=2))
    for name in CONTROLNET_NAMES:
        build_controlnet(unet, size).save_pretrained(out / "controlnets" / name)
    modules = {"unet": unet, **{part.component: text for part, text in zip(kind.text_encoders, texts)}}
    write_loras(out / "loras", modules, kind, size.lora_rank, seed)
    (out / "swiftdiffusion.json").write_text(json.dumps(_marker(size_name, seed, family)))
    return out


def _marker(size_name: str, seed: int, family: str) -> dict:
    """What identifies a build (the SD1.5 marker keeps the form it had before SDXL, so old builds stay valid)."""
    return {"size": size_name, "seed": seed} if family == "sd15" else {"size": size_name, "seed": seed, "family": family}


def ensure_model(out: Path, size_name: str = "tiny", seed: int = 0, family: str = "sd15") -> Path:
    """Builds the model into `out` unless a build with the same family, size and seed is already there."""
    marker = Path(out) / "swiftdiffusion.json"
    if marker.exists() and json.loads(marker.read_text()) == _marker(size_name, seed, family):
        return Path(out)
    return build_model(out, size_name, seed, family)


def add_controlnets(root: Path, names: tuple[str, ...], size_name: str = "tiny", seed: int = 0,
                    family: str = "sd15") -> None:
    """More random ControlNets in a built model's catalog (`root/controlnets/<name>`), each built once, the i-th
    from seed `seed + 100 + i`."""
    unet = None
    for index, name in enumerate(names):
        folder = Path(root) / "controlnets" / name
        if not (folder / "config.json").is_file():
            if unet is None:
                unet = UNet2DConditionModel.from_pretrained(Path(root) / "model" / "unet")
            torch.manual_seed(seed + 100 + index)
            build_controlnet(unet, SIZES[family][size_name]).save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swiftdiffusion tiny", description=__doc__.splitlines()[0],
                                     epilog="example: swiftdiffusion tiny --family sdxl --size small --out models/sdxl")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd15")
    parser.add_argument("--size", choices=SIZE_NAMES, default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    print(build_model(args.out, args.size, args.seed, args.family))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The built-in random Stable Diffusion 1.5 model: a stand-in for real weights where no model hub is reachable.

`build_model(out, size)` writes, deterministically from a seed, what a user would otherwise download:
  out/model/                 a diffusers-format SD1.5 folder (unet, vae, text_encoder, tokenizer, scheduler)
  out/controlnets/<name>/    ControlNets in diffusers format (`canny`, `depth`)
  out/loras/<name>.safetensors  LoRAs in three real key formats (diffusers, PEFT, kohya/A1111)
The architecture is SD1.5's (same block types, cross-attention, 12+1 skip tensors, 4 VAE levels, CLIP text
encoder) with reduced widths, so every downstream path treats it exactly like a real SD1.5 folder.

Weights that start at zero in real training (ControlNet zero-convolutions, LoRA up-matrices) are perturbed here,
so that tests can tell "applied" from "ignored".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

CONTROLNET_NAMES = ("canny", "depth")
# LoRA catalog entry -> key format of its file.
LORA_FORMATS = {"style_diffusers": "diffusers", "style_peft": "peft", "character_kohya": "kohya"}
TEXT_LENGTH = 77  # CLIP's context length, as in SD1.5.


@dataclasses.dataclass(frozen=True)
class ModelSize:
    unet_channels: tuple[int, int, int, int]
    norm_groups: int
    text_width: int
    text_layers: int
    vae_channels: tuple[int, int, int, int]
    vae_layers: int
    controlnet_embedding: tuple[int, int, int, int]
    lora_rank: int


# `small` keeps SD1.5's 1:2:4:4 channel ratios, so UNet, ControlNet and LoRA costs stand in the same
# proportions as in SD1.5 (at 1/10 of its widths), and a 64x64-latent step is far above Python overhead.
SIZES = {
    "tiny": ModelSize((32, 32, 64, 64), 8, 32, 2, (8, 16, 16, 16), 1, (8, 8, 16, 16), 4),
    "small": ModelSize((32, 64, 128, 128), 16, 128, 4, (16, 32, 64, 64), 2, (16, 32, 64, 128), 8),
}

# The layers a typical SD1.5 LoRA trains: every attention projection, feed-forward and transformer in/out
# projection of the UNet (192 weights in SD1.5), and the text encoder's attention projections.
UNET_LORA_SUFFIXES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                      "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_LORA_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def build_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE tokenizer with CLIP's conventions, built offline (no CLIP vocabulary ships anywhere)."""
    symbols = sorted(set(bytes_to_unicode().values()))
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>"), ("e", "r</w>"), ("a", "t</w>")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_LENGTH)


def build_unet(size: ModelSize) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=size.unet_channels,
        layers_per_block=2,
        cross_attention_dim=size.text_width,
        attention_head_dim=8,
        norm_num_groups=size.norm_groups,
    )


def build_vae(size: ModelSize) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=size.vae_channels,
        layers_per_block=size.vae_layers,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=512,
        scaling_factor=0.18215,
    )


def build_text_encoder(size: ModelSize, vocab_size: int, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=size.text_width,
        intermediate_size=size.text_width * 4,
        num_hidden_layers=size.text_layers,
        num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=size.text_width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


# SD1.5's own scheduler configuration. `clip_sample: false` is not a PNDM argument but the other schedulers
# read it from this shared config (diffusers' pipelines force it to false when it is missing).
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
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


def lora_targets(model: torch.nn.Module, suffixes: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Module name -> (out_features, in_features) of each weight a LoRA adapts (1x1 convs count as linear)."""
    targets = {}
    for name, module in model.named_modules():
        if name.endswith(suffixes) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            targets[name] = (module.weight.shape[0], module.weight.shape[1])
    return targets


def random_lora_factors(
    targets: dict[str, tuple[int, int]], rank: int, generator: torch.Generator
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (down [rank, in], up [out, rank]); up is non-zero unlike a freshly initialised LoRA."""
    factors = {}
    for name, (out_features, in_features) in sorted(targets.items()):
        down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        up = torch.randn(out_features, rank, generator=generator) * (0.6 / rank**0.5)
        factors[name] = (down, up)
    return factors


def lora_state_dict(
    unet_factors: dict, text_factors: dict, key_format: str, alpha: float, unet_convs: set[str]
) -> dict[str, torch.Tensor]:
    """Writes factors with the keys of one real format. 1x1-conv targets get 4-D factors, as trainers save them."""

    def shaped(module: str, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if module in unet_convs:
            return down[:, :, None, None], up[:, :, None, None]
        return down, up

    tensors: dict[str, torch.Tensor] = {}
    for prefix, factors in (("unet", unet_factors), ("text_encoder", text_factors)):
        for module, (down, up) in factors.items():
            down, up = shaped(module, down, up) if prefix == "unet" else (down, up)
            if key_format == "kohya":
                kohya_prefix = "lora_unet_" if prefix == "unet" else "lora_te_"
                key = kohya_prefix + module.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = down
                tensors[f"{key}.lora_up.weight"] = up
                tensors[f"{key}.alpha"] = torch.tensor(alpha)
            elif key_format == "peft":
                tensors[f"{prefix}.{module}.lora_A.weight"] = down
                tensors[f"{prefix}.{module}.lora_B.weight"] = up
            elif key_format == "diffusers":
                infix = "lora" if prefix == "unet" else "lora_linear_layer"
                tensors[f"{prefix}.{module}.{infix}.down.weight"] = down
                tensors[f"{prefix}.{module}.{infix}.up.weight"] = up
            else:
                raise ValueError(f"unknown LoRA key format {key_format!r}")
    return {key: value.contiguous() for key, value in tensors.items()}


def write_loras(out: Path, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, rank: int, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    unet_targets = lora_targets(unet, UNET_LORA_SUFFIXES)
    # Trained LoRAs name text-encoder layers with transformers 4's `text_model.` prefix; keep it, as they do.
    text_targets = {"text_model." + name.removeprefix("text_model."): shape
                    for name, shape in lora_targets(text_encoder, TEXT_LORA_SUFFIXES).items()}
    unet_convs = {name for name, module in unet.named_modules() if name in unet_targets
                  and isinstance(module, torch.nn.Conv2d)}
    for index, (name, key_format) in enumerate(sorted(LORA_FORMATS.items())):
        generator = torch.Generator().manual_seed(seed * 1000 + index)
        unet_factors = random_lora_factors(unet_targets, rank, generator)
        # Only the kohya file carries text-encoder keys with an alpha != rank: the formats' usual content.
        text_factors = random_lora_factors(text_targets, rank, generator) if key_format != "diffusers" else {}
        alpha = rank / 2 if key_format == "kohya" else rank
        tensors = lora_state_dict(unet_factors, text_factors, key_format, alpha, unet_convs)
        save_file(tensors, out / f"{name}.safetensors", metadata={"format": "pt"})


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def build_model(out: Path, size_name: str = "tiny", seed: int = 0) -> Path:
    """Writes the model, ControlNet and LoRA folders under `out` and returns `out`."""
    size = SIZES[size_name]
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    unet = build_unet(size)
    vae = build_vae(size)
    text_encoder = build_text_encoder(size, len(tokenizer), tokenizer)
    model_dir = out / "model"
    unet.save_pretrained(model_dir / "unet")
    vae.save_pretrained(model_dir / "vae")
    text_encoder.save_pretrained(model_dir / "text_encoder")
    tokenizer.save_pretrained(model_dir / "tokenizer")
    (model_dir / "scheduler").mkdir()
    (model_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    (model_dir / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    for name in CONTROLNET_NAMES:
        build_controlnet(unet, size).save_pretrained(out / "controlnets" / name)
    write_loras(out / "loras", unet, text_encoder, size.lora_rank, seed)
    (out / "swiftdiffusion.json").write_text(json.dumps({"size": size_name, "seed": seed}))
    return out


def ensure_model(out: Path, size_name: str = "tiny", seed: int = 0) -> Path:
    """Builds the model into `out` unless a build with the same size and seed is already there."""
    marker = Path(out) / "swiftdiffusion.json"
    if marker.exists() and json.loads(marker.read_text()) == {"size": size_name, "seed": seed}:
        return Path(out)
    return build_model(out, size_name, seed)


def add_controlnets(root: Path, names: tuple[str, ...], size_name: str = "tiny", seed: int = 0) -> None:
    """More random ControlNets in a built model's catalog (`root/controlnets/<name>`), each built once, the i-th
    from seed `seed + 100 + i`."""
    unet = None
    for index, name in enumerate(names):
        folder = Path(root) / "controlnets" / name
        if not (folder / "config.json").is_file():
            if unet is None:
                unet = UNet2DConditionModel.from_pretrained(Path(root) / "model" / "unet")
            torch.manual_seed(seed + 100 + index)
            build_controlnet(unet, SIZES[size_name]).save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swiftdiffusion tiny", description=__doc__.splitlines()[0],
                                     epilog="example: swiftdiffusion tiny --size small --out models/small")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    print(build_model(args.out, args.size, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

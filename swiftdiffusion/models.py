"""Loading a local SD1.5 model into engines: a diffusers folder, or a single-file checkpoint plus a config folder.

Nothing is ever fetched from a hub (`local_files_only`). The same code loads the built-in tiny model and a real
SD1.5 download; ControlNets are diffusers ControlNet folders.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from . import graphs
from .engines import Engine, TorchEngine, TorchWeights
from .lora import weight_shapes


@dataclasses.dataclass
class ModelComponents:
    """The diffusers/transformers modules of one SD1.5 model."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict


@dataclasses.dataclass
class LoadedModel:
    """Engines for every graph of a model, and what the pipeline needs besides them."""

    tokenizer: CLIPTokenizer
    scheduler_config: dict
    unet_config: object
    latent_channels: int
    vae_scale_factor: int
    engines: dict[str, Engine]
    # component -> weight name -> shape: what LoRA files are checked against.
    weight_shapes: dict[str, dict[str, torch.Size]]
    device: torch.device
    dtype: torch.dtype


def load_components(path: str | Path, config: str | Path | None = None) -> ModelComponents:
    """Reads a diffusers folder, or a single-file `.safetensors` checkpoint with a local diffusers config folder."""
    path = Path(path)
    if path.is_file():
        if config is None:
            raise ValueError(f"{path} is a single-file checkpoint: give its diffusers config folder too")
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config), local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
        return ModelComponents(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, dict(pipe.scheduler.config))
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True)
    scheduler_config = PNDMScheduler.load_config(path / "scheduler", local_files_only=True)
    return ModelComponents(tokenizer, text_encoder, unet, vae, dict(scheduler_config))


def torch_engines(components: ModelComponents, device: str | torch.device, dtype: torch.dtype) -> LoadedModel:
    """Wraps the modules as torch engines; the three UNet graphs share one set of weights."""
    device = torch.device(device)
    for module in (components.text_encoder, components.unet, components.vae):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    specs = graphs.graph_specs(components.unet.config)
    # Weight names are the diffusers/transformers module's own (what LoRA files name), not the wrappers'.
    unet_weights = TorchWeights(components.unet)
    engines: dict[str, Engine] = {
        "text_encoder": TorchEngine(graphs.TextEncoder(components.text_encoder), specs["text_encoder"],
                                    TorchWeights(components.text_encoder)),
        "unet": TorchEngine(graphs.FullUNet(components.unet), specs["unet"], unet_weights),
        "unet_encoder": TorchEngine(graphs.UNetEncoder(components.unet), specs["unet_encoder"], unet_weights),
        "unet_decoder": TorchEngine(graphs.UNetDecoder(components.unet), specs["unet_decoder"], unet_weights),
        "vae_decoder": TorchEngine(graphs.VaeDecoder(components.vae), specs["vae_decoder"]),
    }
    return LoadedModel(
        tokenizer=components.tokenizer,
        scheduler_config=components.scheduler_config,
        unet_config=components.unet.config,
        latent_channels=components.unet.config.in_channels,
        vae_scale_factor=2 ** (len(components.vae.config.block_out_channels) - 1),
        engines=engines,
        weight_shapes={"unet": weight_shapes(components.unet), "text_encoder": weight_shapes(components.text_encoder)},
        device=device,
        dtype=dtype,
    )


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
               config: str | Path | None = None) -> LoadedModel:
    return torch_engines(load_components(path, config), device, dtype)


def load_controlnet(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Engine:
    controlnet = ControlNetModel.from_pretrained(path, local_files_only=True)
    controlnet.to(device=device, dtype=dtype)
    return TorchEngine(graphs.ControlNetResiduals(controlnet), graphs.graph_specs(controlnet.config)["controlnet"])

"""Loading a local SD1.5 model into engines: a diffusers folder, or a single-file checkpoint plus a config folder.

Nothing is ever fetched from a hub (`local_files_only`). The same code loads the built-in tiny model and a real
SD1.5 download; ControlNets are diffusers ControlNet folders.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from . import graphs
from .engines import Engine, TorchEngine, TorchWeights
from .lora import weight_shapes


ALL_PARTS = ("text_encoder", "unet", "vae")


@dataclasses.dataclass
class ModelComponents:
    """The diffusers/transformers modules of one SD1.5 model (None for parts not loaded)."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel | None
    unet: UNet2DConditionModel | None
    vae: AutoencoderKL | None
    scheduler_config: dict
    unet_config: dict
    vae_config: dict


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


def load_components(path: str | Path, config: str | Path | None = None,
                    parts: tuple[str, ...] = ALL_PARTS) -> ModelComponents:
    """Reads a diffusers folder, or a single-file `.safetensors` checkpoint with a local diffusers config folder.

    `parts` limits what is loaded from a folder (a Triton model holding the text encoder needs no UNet).
    """
    path = Path(path)
    if path.is_file():
        if config is None:
            raise ValueError(f"{path} is a single-file checkpoint: give its diffusers config folder too")
        # Imported here: diffusers' pipeline modules import transformers' image processors, which warn in every
        # process on a machine without torchvision although nothing here uses them.
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config), local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
        return ModelComponents(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, dict(pipe.scheduler.config),
                               dict(pipe.unet.config), dict(pipe.vae.config))
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    loaders = {"text_encoder": CLIPTextModel, "unet": UNet2DConditionModel, "vae": AutoencoderKL}
    modules = {part: loaders[part].from_pretrained(path / part, local_files_only=True) if part in parts else None
               for part in ALL_PARTS}
    scheduler_config = PNDMScheduler.load_config(path / "scheduler", local_files_only=True)
    unet_config = UNet2DConditionModel.load_config(path / "unet", local_files_only=True)
    vae_config = AutoencoderKL.load_config(path / "vae", local_files_only=True)
    return ModelComponents(tokenizer, scheduler_config=dict(scheduler_config), unet_config=dict(unet_config),
                           vae_config=dict(vae_config), **modules)


def torch_engines(components: ModelComponents, device: str | torch.device, dtype: torch.dtype) -> LoadedModel:
    """Wraps the loaded modules as torch engines; the three UNet graphs share one set of weights."""
    device = torch.device(device)
    specs = graphs.graph_specs(SimpleNamespace(**components.unet_config))
    engines: dict[str, Engine] = {}
    shapes = {}
    # Weight names are the diffusers/transformers module's own (what LoRA files name), not the wrappers'.
    if components.text_encoder is not None:
        text_encoder = _prepare(components.text_encoder, device, dtype)
        engines["text_encoder"] = TorchEngine(graphs.TextEncoder(text_encoder), specs["text_encoder"],
                                              TorchWeights(text_encoder))
        shapes["text_encoder"] = weight_shapes(text_encoder)
    if components.unet is not None:
        unet = _prepare(components.unet, device, dtype)
        unet_weights = TorchWeights(unet)
        for name, graph in (("unet", graphs.FullUNet), ("unet_encoder", graphs.UNetEncoder),
                            ("unet_decoder", graphs.UNetDecoder)):
            engines[name] = TorchEngine(graph(unet), specs[name], unet_weights)
        shapes["unet"] = weight_shapes(unet)
    if components.vae is not None:
        engines["vae_decoder"] = TorchEngine(graphs.VaeDecoder(_prepare(components.vae, device, dtype)),
                                             specs["vae_decoder"])
    return LoadedModel(
        tokenizer=components.tokenizer,
        scheduler_config=components.scheduler_config,
        unet_config=components.unet_config,
        latent_channels=components.unet_config["in_channels"],
        vae_scale_factor=2 ** (len(components.vae_config["block_out_channels"]) - 1),
        engines=engines,
        weight_shapes=shapes,
        device=device,
        dtype=dtype,
    )


def _prepare(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return cast(module, device, dtype).eval().requires_grad_(False)


def cast(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`module` on `device` in `dtype`. diffusers' `ModelMixin.to` warns at every dtype cast that some modules
    "should be kept in float32", naming none when the model keeps none in fp32 (ours: UNet, VAE, ControlNet), once
    per process; torch's own `to` does the same cast. A model that does keep modules in fp32 goes through diffusers'."""
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(device=device, dtype=dtype)
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
               config: str | Path | None = None, parts: tuple[str, ...] = ALL_PARTS) -> LoadedModel:
    return torch_engines(load_components(path, config, parts), device, dtype)


def load_controlnet(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Engine:
    controlnet = cast(ControlNetModel.from_pretrained(path, local_files_only=True), device, dtype)
    return TorchEngine(graphs.ControlNetResiduals(controlnet), graphs.graph_specs(controlnet.config)["controlnet"])

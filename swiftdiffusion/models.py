"""Loading a local model of either family into engines: a diffusers folder, or a single-file checkpoint plus its
config folder.

Nothing is ever fetched from a hub (`local_files_only`). The same code loads the built-in tiny models and real
SD1.5 / SDXL downloads; the family (`family.py`) comes from the folder's UNet config. ControlNets are diffusers
ControlNet folders, checked against the model's family when loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from . import graphs
from .engines import Engine, TorchEngine, TorchWeights
from .family import ModelFamily, family_of
from .lora import LoraTarget, weight_shapes
from .request import RequestDefaults

# What a Triton model may load of a model: the text encoders (all of the family's), the UNet, the VAE.
ALL_PARTS = ("text", "unet", "vae")

# diffusers' and transformers' loaders patch torch for the whole process while they build a module (accelerate's
# `init_empty_weights` replaces `nn.Module.register_parameter`, `no_init_weights` the `torch.nn.init` functions).
# Two loads in parallel threads (ControlNet workers loading their first call's net) can restore each other's patch
# and leave it in place for good: every module built afterwards has its parameters on the meta device. So every
# load a serving process makes (model parts, ControlNets, the baseline model's) holds this lock.
MODULE_LOADING = threading.Lock()


def one_load_at_a_time(load):
    """Runs `load` under MODULE_LOADING."""
    @functools.wraps(load)
    def locked(*args, **kwargs):
        with MODULE_LOADING:
            return load(*args, **kwargs)
    return locked


@dataclasses.dataclass
class ModelComponents:
    """The diffusers/transformers modules of one model, named as diffusers' pipelines name them (None for parts
    not loaded, or not in the family: SD1.5 has no `text_encoder_2`)."""

    family: ModelFamily
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel | None
    unet: UNet2DConditionModel | None
    vae: AutoencoderKL | None
    scheduler_config: dict
    unet_config: dict
    vae_config: dict
    # Per text-encoder component: its number of hidden layers (what `clip_skip` is checked against).
    text_layers: dict[str, int]
    # An absent negative prompt is zeros (SDXL's `force_zeros_for_empty_prompt`, from model_index.json).
    zero_absent_negative: bool = False
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None

    @property
    def defaults(self) -> RequestDefaults:
        return request_defaults(self.family, self.unet_config, vae_scale_factor(self.vae_config))

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        """The modules LoRAs adapt, by component (those loaded)."""
        return {c: getattr(self, c) for c in self.family.lora_components if getattr(self, c) is not None}

    def pipeline_parts(self) -> dict:
        """The modules as keyword arguments of the family's diffusers pipelines (references and the baseline)."""
        parts = dict(vae=self.vae, unet=self.unet, tokenizer=self.tokenizer, text_encoder=self.text_encoder)
        if self.family.second_prompts:
            # The invisible watermark is off: it is an optional package, and it would change every image.
            return dict(parts, tokenizer_2=self.tokenizer_2, text_encoder_2=self.text_encoder_2,
                        force_zeros_for_empty_prompt=self.zero_absent_negative, add_watermarker=False)
        return dict(parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@dataclasses.dataclass
class LoadedModel:
    """Engines for every graph of a model, and what the pipeline needs besides them."""

    family: ModelFamily
    tokenizers: dict[str, CLIPTokenizer]  # by text-encoder component
    text_layers: dict[str, int]
    zero_absent_negative: bool
    scheduler_config: dict
    unet_config: dict
    latent_channels: int
    vae_scale_factor: int
    engines: dict[str, Engine]
    # component -> weight name -> shape: what LoRA files are checked against.
    weight_shapes: dict[str, dict[str, torch.Size]]
    device: torch.device
    dtype: torch.dtype

    @property
    def lora_target(self) -> LoraTarget:
        return LoraTarget(self.family, self.unet_config, self.weight_shapes)

    @property
    def defaults(self) -> RequestDefaults:
        return request_defaults(self.family, self.unet_config, self.vae_scale_factor)


TEXT_CLASSES = {False: CLIPTextModel, True: CLIPTextModelWithProjection}


def vae_scale_factor(vae_config: dict) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def request_defaults(family: ModelFamily, unet_config: dict, scale_factor: int) -> RequestDefaults:
    """diffusers' defaults for a model: the UNet's sample size in pixels, the family's guidance."""
    return RequestDefaults(unet_config["sample_size"] * scale_factor, family.default_guidance)


@one_load_at_a_time
def load_components(path: str | Path, config: str | Path | None = None,
                    parts: tuple[str, ...] = ALL_PARTS) -> ModelComponents:
    """Reads a diffusers folder, or a single-file `.safetensors` checkpoint with a local diffusers config folder.

    `parts` limits what is loaded from a folder (a Triton model holding the text encoders needs no UNet).
    """
    path = Path(path)
    if path.is_file():
        return _single_file(path, config)
    unet_config = dict(UNet2DConditionModel.load_config(path / "unet", local_files_only=True))
    family = family_of(unet_config)
    modules = {part.component: TEXT_CLASSES[part.projected].from_pretrained(path / part.component, local_files_only=True)
               for part in family.text_encoders if "text" in parts}
    tokenizers = {part.tokenizer: CLIPTokenizer.from_pretrained(path / part.tokenizer, local_files_only=True)
                  for part in family.text_encoders}
    if "unet" in parts:
        modules["unet"] = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True)
    if "vae" in parts:
        modules["vae"] = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True)
    index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
    return ModelComponents(
        family=family, **tokenizers, **{name: modules.get(name) for name in ("unet", "vae", *family.text_components)},
        scheduler_config=_config(path / "scheduler" / "scheduler_config.json"), unet_config=unet_config,
        vae_config=_config(path / "vae" / "config.json"),
        text_layers={part.component: _config(path / part.component / "config.json")["num_hidden_layers"]
                     for part in family.text_encoders},
        zero_absent_negative=index.get("force_zeros_for_empty_prompt", family.zero_absent_negative))


def _config(path: Path) -> dict:
    return json.loads(path.read_text())


def _single_file(path: Path, config: str | Path | None) -> ModelComponents:
    if config is None:
        raise ValueError(f"{path} is a single-file checkpoint: give its diffusers config folder too")
    family = family_of(UNet2DConditionModel.load_config(Path(config) / "unet", local_files_only=True))
    # Imported here: diffusers' pipeline modules import transformers' image processors, which warn in every
    # process on a machine without torchvision although nothing here uses them.
    import diffusers

    pipe = getattr(diffusers, family.pipeline).from_single_file(str(path), config=str(config), local_files_only=True)
    texts = {part.component: getattr(pipe, part.component) for part in family.text_encoders}
    tokenizers = {part.tokenizer: getattr(pipe, part.tokenizer) for part in family.text_encoders}
    return ModelComponents(
        family=family, **tokenizers, **texts, unet=pipe.unet, vae=pipe.vae, scheduler_config=dict(pipe.scheduler.config),
        unet_config=dict(pipe.unet.config), vae_config=dict(pipe.vae.config),
        text_layers={name: module.config.num_hidden_layers for name, module in texts.items()},
        zero_absent_negative=pipe.config.get("force_zeros_for_empty_prompt", family.zero_absent_negative))


def torch_engines(components: ModelComponents, device: str | torch.device, dtype: torch.dtype) -> LoadedModel:
    """Wraps the loaded modules as torch engines; the three UNet graphs share one set of weights."""
    device = torch.device(device)
    family = components.family
    specs = graphs.graph_specs(components.unet_config, family)
    engines: dict[str, Engine] = {}
    shapes = {}
    # Weight names are the diffusers/transformers module's own (what LoRA files name), not the wrappers'.
    for part in family.text_encoders:
        module = getattr(components, part.component)
        if module is not None:
            module = _prepare(module, device, dtype)
            engines[part.component] = TorchEngine(graphs.TextEncoder(module, family.final_norm),
                                                  specs[part.component], TorchWeights(module))
            shapes[part.component] = weight_shapes(module)
    if components.unet is not None:
        unet = _prepare(components.unet, device, dtype)
        unet_weights = TorchWeights(unet)
        for name, graph in (("unet", graphs.FullUNet), ("unet_encoder", graphs.UNetEncoder),
                            ("unet_decoder", graphs.UNetDecoder)):
            engines[name] = TorchEngine(graph(unet), specs[name], unet_weights)
        shapes["unet"] = weight_shapes(unet)
    if components.vae is not None:
        engines["vae_decoder"] = TorchEngine(graphs.VaeDecoder(_prepare(components.vae, device,
                                                                        vae_dtype(components, dtype))),
                                             specs["vae_decoder"])
    return LoadedModel(
        family=family,
        tokenizers={part.component: getattr(components, part.tokenizer) for part in family.text_encoders},
        text_layers=components.text_layers,
        zero_absent_negative=components.zero_absent_negative,
        scheduler_config=components.scheduler_config,
        unet_config=components.unet_config,
        latent_channels=components.unet_config["in_channels"],
        vae_scale_factor=vae_scale_factor(components.vae_config),
        engines=engines,
        weight_shapes=shapes,
        device=device,
        dtype=dtype,
    )


def vae_dtype(components: ModelComponents, dtype: torch.dtype) -> torch.dtype:
    """fp32 where the family's pipeline upcasts the VAE (SDXL's VAE overflows in fp16 and says `force_upcast`)."""
    upcast = components.family.vae_upcast and dtype == torch.float16 and components.vae_config.get("force_upcast")
    return torch.float32 if upcast else dtype


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


@one_load_at_a_time
def load_controlnet(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Engine:
    controlnet = cast(ControlNetModel.from_pretrained(path, local_files_only=True), device, dtype)
    return TorchEngine(graphs.ControlNetResiduals(controlnet), graphs.graph_specs(controlnet.config)["controlnet"])

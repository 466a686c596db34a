"""Writes a deployable Triton model repository: every config.pbtxt generated here, from one `Deployment`.

The model code lives in the project's `model_repository/<model>/1/model.py` (thin adapters); this module
copies it next to configs rendered for one deployment (model paths, catalogs, limits, devices), so nothing is
hand-copied between configs and a new deployment is one `Deployment(...)` away.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig

from ..family import TIME_IDS, ModelFamily, family_of
from ..graphs import skip_count, skip_names
from ..request import Limits
from ..schema import IMAGE_OUTPUT, LORA_STEP_OUTPUT, PROGRESS_OUTPUTS, REQUEST_INPUTS, TensorSpec
from .prefetch import PREFETCHED
from .serving import ARRIVED_AT, TEXT_INPUTS, controlnet_inputs, text_outputs

# What clients send, every input optional in the configs: Triton 2.51's ensemble answers a missing required input
# with "unexpected deadlock ...", so the models check required fields themselves and name them ("prompt: required").
CLIENT_INPUTS = [dataclasses.replace(spec, optional=True) for spec in REQUEST_INPUTS]
SOURCE = Path(__file__).resolve().parents[2] / "model_repository"
MODELS = ("text_encoder", "lora_prefetch", "denoiser", "controlnet", "vae_decoder", "text_to_image",
          "text_to_image_stream", "baseline_diffusers")


@dataclasses.dataclass
class Deployment:
    model: Path
    controlnet_catalog: Path
    lora_catalog: str  # folder or fsspec URL
    # With a single-file `.safetensors` checkpoint as `model`: the diffusers config folder it follows.
    model_config: Path | None = None
    dtype: str = "float32"
    # instance_group per model: [] = one CPU instance; [[0], [1]] = one instance on GPU 0 and one on GPU 1.
    gpus: dict[str, list[list[int]]] = dataclasses.field(default_factory=dict)
    controlnet_instances: int = 2  # CPU instances of the ControlNet model (GPU: one per `gpus` entry)
    resident_controlnets: int = 4
    lora_deadline_fraction: float = 0.2
    torch_threads: int = 0  # 0: torch's default; set it to share CPU cores between instances
    compile: bool = False  # GPU instances: torch.compile the per-step engines before graph capture (README)
    # Where the orchestrator keeps a UNet copy for the unconditional branch of `cfg_parallel` requests
    # ("cuda:1"; "cpu" in tests); empty: both branches share the instance's UNet.
    cfg_device: str = ""
    # The diffusers baseline model, for benchmarks and tests: a second copy of the weights, so off by default.
    baseline: bool = False
    limits: Limits = Limits()
    # Requests that may wait for each denoising model's instances; one more is refused at once with UNAVAILABLE
    # ("Exceeds maximum queue size"), which clients retry with backoff. 0: unbounded.
    max_queue: int = 8
    lora_cache_mb: int = 1024  # decoded LoRAs kept in host memory per denoising instance
    # Where local copies of a remote LoRA catalog's files go (shared by the prefetch step and the denoisers);
    # empty: a folder under the system's temporary directory.
    lora_copies: str = ""


def _tensor(spec: TensorSpec, direction: str) -> str:
    optional = "\n    optional: true" if spec.optional and direction == "input" else ""
    dims = ", ".join(str(d) for d in spec.dims)
    return f"  {{\n    name: \"{spec.name}\"\n    data_type: {spec.triton_type}\n    dims: [ {dims} ]{optional}\n  }}"


def _io(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str:
    ins = ",\n".join(_tensor(s, "input") for s in inputs)
    outs = ",\n".join(_tensor(s, "output") for s in outputs)
    return f"input [\n{ins}\n]\noutput [\n{outs}\n]\n"


def _instances(deployment: Deployment, model: str, cpu_count: int = 1) -> str:
    groups = deployment.gpus.get(model)
    if not groups:
        return f"instance_group [ {{ count: {cpu_count} kind: KIND_CPU }} ]\n"
    rendered = ", ".join(f"{{ count: 1 kind: KIND_GPU gpus: [ {', '.join(map(str, g))} ] }}" for g in groups)
    return f"instance_group [ {rendered} ]\n"


def _parameters(values: dict[str, object]) -> str:
    rendered = "\n".join(f"parameters {{ key: \"{k}\" value: {{ string_value: \"{v}\" }} }}" for k, v in values.items())
    return rendered + "\n"


def _python(name: str, max_batch_size: int, body: str, batching: bool = False, decoupled: bool = False,
            max_queue: int = 0) -> str:
    """A Python-backend model's config; `batching` batches requests across clients, `max_queue` (> 0) bounds the
    requests waiting for an instance (Triton applies queue policies only through a dynamic_batching block)."""
    text = f"name: \"{name}\"\nbackend: \"python\"\nmax_batch_size: {max_batch_size}\n"
    if batching:
        text += "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
    elif max_queue > 0:
        text += f"dynamic_batching {{ default_queue_policy {{ max_queue_size: {max_queue} }} }}\n"
    if decoupled:
        text += "model_transaction_policy { decoupled: true }\n"
    return text + body


def conditioning_specs(config_root: Path, family: ModelFamily, unet_config: dict) -> dict[str, TensorSpec]:
    """The conditioning tensors of the model, without the batch dimension (leading -1: rows of a CFG batch): the
    prompt embeddings, the pooled text embedding and the size ids of SDXL."""
    specs = {"encoder_hidden_states": TensorSpec("encoder_hidden_states", "TYPE_FP32",
                                                 (-1, 77, unet_config["cross_attention_dim"]), optional=False)}
    for part in family.text_encoders:
        if part.projected:
            width = CLIPTextConfig.from_pretrained(config_root / part.component).projection_dim
            specs["text_embeds"] = TensorSpec("text_embeds", "TYPE_FP32", (-1, width), optional=False)
    if "time_ids" in family.added_conditioning:
        specs["time_ids"] = TensorSpec("time_ids", "TYPE_FP32", (-1, TIME_IDS), optional=False)
    return specs


def render_configs(deployment: Deployment) -> dict[str, str]:
    """config.pbtxt text per model, for the family of the deployment's model folder."""
    config_root = deployment.model_config or deployment.model
    unet_config = UNet2DConditionModel.load_config(config_root / "unet")
    family = family_of(unet_config)
    latent_channels = unet_config["in_channels"]
    skips = skip_names(skip_count(unet_config))
    common = {"dtype": deployment.dtype, "torch_threads": deployment.torch_threads,
              "compile": int(deployment.compile)}
    model = {"model": deployment.model.resolve(), **common}
    if deployment.model_config is not None:
        model["model_config"] = deployment.model_config.resolve()
    catalogs = {"controlnet_catalog": deployment.controlnet_catalog.resolve(),
                "lora_catalog": deployment.lora_catalog, "lora_copies": deployment.lora_copies}
    conditioning = conditioning_specs(config_root, family, unet_config)
    # The text encoder model's outputs: its rows are always [negative, positive].
    encoded = [dataclasses.replace(conditioning[name], dims=(2, *conditioning[name].dims[1:]))
               for name in text_outputs(family)]
    arrived = TensorSpec(ARRIVED_AT, "TYPE_FP64", (1,))
    prefetched = TensorSpec(PREFETCHED, "TYPE_INT32", (1,))
    # The prefetch step also takes the arrival stamp, which it ignores: a request without LoRAs would reach it with
    # no input at all, which Triton 2.51 rejects ("request has 0 inputs").
    prefetch_inputs = [next(spec for spec in CLIENT_INPUTS if spec.name == "lora_names"),
                       dataclasses.replace(arrived, optional=False)]
    latents = TensorSpec("latents", "TYPE_FP32", (latent_channels, -1, -1), optional=False)
    text_inputs = [s for s in CLIENT_INPUTS if s.name in TEXT_INPUTS]
    limits = {"max_steps": deployment.limits.max_steps, "max_size": deployment.limits.max_size,
              "max_request_seconds": deployment.limits.max_request_seconds,
              "lora_deadline_fraction": deployment.lora_deadline_fraction}
    controlnet_tensors = {
        "sample": TensorSpec("sample", "TYPE_FP32", (-1, latent_channels, -1, -1), optional=False),
        "timestep": TensorSpec("timestep", "TYPE_FP32", (1,), optional=False),
        **conditioning,
        "controlnet_cond": TensorSpec("controlnet_cond", "TYPE_FP32", (-1, 3, -1, -1), optional=False),
    }
    controlnet_io = [TensorSpec("controlnet_name", "TYPE_STRING", (1,), optional=False),
                     *(controlnet_tensors[name] for name in controlnet_inputs(family))]
    residuals = [TensorSpec(name, "TYPE_FP32", (-1, -1, -1, -1), optional=False) for name in (*skips, "mid")]
    denoiser_params = {**model, **catalogs, **limits, "controlnet_model": "controlnet",
                       "cfg_device": deployment.cfg_device, "lora_cache_mb": deployment.lora_cache_mb}
    configs = {
        "text_encoder": _python("text_encoder", 8, _io(text_inputs, [*encoded, arrived]) + _instances(
            deployment, "text_encoder") + _parameters(model), batching=True),
        "vae_decoder": _python("vae_decoder", 4, _io([latents], [IMAGE_OUTPUT]) + _instances(
            deployment, "vae_decoder") + _parameters(model), batching=True),
        "controlnet": _python("controlnet", 0, _io(controlnet_io, residuals) + _instances(
            deployment, "controlnet", deployment.controlnet_instances) + _parameters(
            {**common, "family": family.name, "controlnet_catalog": catalogs["controlnet_catalog"],
             "resident_controlnets": deployment.resident_controlnets})),
        "lora_prefetch": _python("lora_prefetch", 1, _io(prefetch_inputs, [prefetched]) + _instances(
            deployment, "lora_prefetch") + _parameters(catalogs)),
        "denoiser": _python("denoiser", 1, _io([*CLIENT_INPUTS, *encoded, arrived, prefetched],
                                               [latents, LORA_STEP_OUTPUT])
                            + _instances(deployment, "denoiser") + _parameters(denoiser_params),
                            max_queue=deployment.max_queue),
        "text_to_image_stream": _python(
            "text_to_image_stream", 1, _io(CLIENT_INPUTS, [IMAGE_OUTPUT, LORA_STEP_OUTPUT, *PROGRESS_OUTPUTS])
            + _instances(deployment, "denoiser") + _parameters(denoiser_params), decoupled=True,
            max_queue=deployment.max_queue),
        "text_to_image": _ensemble(text_outputs(family)),
    }
    if deployment.baseline:
        # The benchmark's baseline (swiftdiffusion.triton.baseline): same schema, placed like the denoiser.
        configs["baseline_diffusers"] = _python(
            "baseline_diffusers", 1, _io(CLIENT_INPUTS, [IMAGE_OUTPUT, LORA_STEP_OUTPUT])
            + _instances(deployment, "denoiser") + _parameters({**model, **catalogs, "max_steps": limits["max_steps"],
                                                                "max_size": limits["max_size"]}),
            max_queue=deployment.max_queue)
    return configs


def _maps(kind: str, names) -> str:
    return "".join(f"        {kind} {{ key: \"{n}\" value: \"{n}\" }}\n" for n in names)


def _step(model: str, inputs, outputs) -> str:
    return (f"    {{\n      model_name: \"{model}\"\n      model_version: -1\n"
            + _maps("input_map", inputs) + _maps("output_map", outputs) + "    }")


def _ensemble(encoded: tuple[str, ...]) -> str:
    """text_encoder -> lora_prefetch -> denoiser -> vae_decoder, every tensor passed on under its own name."""
    text_fields = [s.name for s in REQUEST_INPUTS if s.name in TEXT_INPUTS]
    steps = [
        _step("text_encoder", text_fields, [*encoded, ARRIVED_AT]),
        _step("lora_prefetch", [ARRIVED_AT, "lora_names"], [PREFETCHED]),
        _step("denoiser", [*(s.name for s in REQUEST_INPUTS), *encoded, ARRIVED_AT, PREFETCHED],
              ["latents", "lora_step"]),
        _step("vae_decoder", ["latents"], ["image"]),
    ]
    return ("name: \"text_to_image\"\nplatform: \"ensemble\"\nmax_batch_size: 1\n"
            + _io(CLIENT_INPUTS, [IMAGE_OUTPUT, LORA_STEP_OUTPUT])
            + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n")


def write_repository(out: Path, deployment: Deployment) -> Path:
    """Renders every config and copies each model's model.py; returns `out`."""
    out = Path(out)
    configs = render_configs(deployment)
    for stale in out.glob("*/config.pbtxt"):  # a model of an earlier deployment would load too
        if stale.parent.name not in configs:
            shutil.rmtree(stale.parent)
    for name, config in configs.items():
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        (folder / "1").mkdir(parents=True)
        (folder / "config.pbtxt").write_text(config)
        source = SOURCE / name / "1" / "model.py"
        if source.exists():
            shutil.copy(source, folder / "1" / "model.py")
    (out / "deployment.json").write_text(json.dumps(dataclasses.asdict(deployment), default=str, indent=2))
    return out

"""Writes a deployable Triton model repository: every config.pbtxt generated here, from one `Deployment`.

The model code lives in the project's `model_repository/<model>/1/model.py` (thin adapters); this module
copies it next to configs rendered for one deployment (model paths, catalogs, limits, devices), so nothing is
hand-copied between configs and a new deployment is one `Deployment(...)` away.
"""

from __future__ import annotations

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
from .serving import ARRIVED_AT, TRANSPORTS, controlnet_inputs, text_outputs

# What clients send, every input optional in the configs: Triton 2.51's ensemble answers a missing required input
# with "unexpected deadlock ...", so the models check required fields themselves and name them ("prompt: required").
CLIENT_INPUTS = [dataclasses.replace(spec, optional=True) for spec in REQUEST_INPUTS]
SOURCE = Path(__file__).resolve().parents[2] / "model_repository"
MODELS = ("text_encoder", "lora_prefetch", "denoiser", "controlnet", "vae_decoder", "text_to_image",
          "text_to_image_stream", "baseline_diffusers")
# Where ControlNets run: "service", the `controlnet` model's own instances (processes, GPUs) through BLS; "local", in
# each denoising instance's process on devices of its own (README "Placement").
PLACEMENTS = ("service", "local")
# The Triton type of the tensors a deployment's ControlNets take and give (the timestep stays FP32).
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}


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
    # The decoupled `text_to_image_stream` model (progress per step): its own processes and weights; a replica
    # behind a balancer that only sends unary requests can leave it out.
    streaming: bool = True
    limits: Limits = Limits()
    # Requests that may wait for each denoising model's instances; one more is refused at once with UNAVAILABLE
    # ("Exceeds maximum queue size"), which clients retry with backoff. 0: unbounded.
    max_queue: int = 8
    lora_cache_mb: int = 1024  # decoded LoRAs kept in host memory per denoising instance
    # Where local copies of a remote LoRA catalog's files go (shared by the prefetch step and the denoisers);
    # empty: a folder under the system's temporary directory.
    lora_copies: str = ""
    # How ControlNet inputs and residuals cross between the denoiser's and the ControlNet model's processes (the
    # `service` placement): "host" (numpy through shared memory) or "dlpack" (torch tensors where they lie: on GPUs by
    # CUDA IPC, where `perf/triton_gpu_check.py` found it to work).
    residual_transport: str = "host"
    # "service": the `controlnet` model's instances (`gpus["controlnet"]`, `controlnet_instances`); "local": no such
    # model, each denoising instance runs ControlNets itself on those same devices (one CPU "device" per
    # `controlnet_instances` on a CPU deployment), for where no GPU tensor can cross processes.
    controlnet_placement: str = "service"

    def __post_init__(self) -> None:
        if self.residual_transport not in TRANSPORTS:
            raise ValueError(f"residual_transport must be one of {TRANSPORTS}, not {self.residual_transport!r}")
        if self.controlnet_placement not in PLACEMENTS:
            raise ValueError(f"controlnet_placement must be one of {PLACEMENTS}, not {self.controlnet_placement!r}")
        if self.controlnet_placement == "local" and self.residual_transport != "host":
            raise ValueError("residual_transport applies to the service placement only: with controlnet_placement "
                             "'local' residuals never leave the denoiser's process")

    def controlnet_devices(self) -> list[str]:
        """The devices of the ControlNets: one per GPU of `gpus["controlnet"]`, else `controlnet_instances` CPUs."""
        groups = self.gpus.get("controlnet")
        if groups:
            return [f"cuda:{gpu}" for group in groups for gpu in group]
        return ["cpu"] * self.controlnet_instances


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


def conditioning_specs(config_root: Path, family: ModelFamily, unet_config: dict,
                       tensor_type: str = "TYPE_FP32") -> dict[str, TensorSpec]:
    """The conditioning tensors of the model, without the batch dimension (leading -1: rows of a CFG batch): the
    prompt embeddings, the pooled text embedding and the size ids of SDXL, of `tensor_type` (the deployment's
    dtype, which the models compute and hand on in)."""
    specs = {"encoder_hidden_states": TensorSpec("encoder_hidden_states", tensor_type,
                                                 (-1, 77, unet_config["cross_attention_dim"]), optional=False)}
    for part in family.text_encoders:
        if part.projected:
            width = CLIPTextConfig.from_pretrained(config_root / part.component).projection_dim
            specs["text_embeds"] = TensorSpec("text_embeds", tensor_type, (-1, width), optional=False)
    if "time_ids" in family.added_conditioning:
        specs["time_ids"] = TensorSpec("time_ids", tensor_type, (-1, TIME_IDS), optional=False)
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
    # Tensors between the models are of the deployment's dtype: Triton refuses an FP16 tensor for an FP32 input.
    tensor_type = TRITON_TYPES[deployment.dtype]
    conditioning = conditioning_specs(config_root, family, unet_config, tensor_type)
    # The text encoder model's outputs: its rows are always [negative, positive].
    encoded = [dataclasses.replace(conditioning[name], dims=(2, *conditioning[name].dims[1:]))
               for name in text_outputs(family)]
    arrived = TensorSpec(ARRIVED_AT, "TYPE_FP64", (1,))
    prefetched = TensorSpec(PREFETCHED, "TYPE_INT32", (1,))
    # The prefetch step also takes the arrival stamp, which it ignores: a request without LoRAs would reach it with
    # no input at all, which Triton 2.51 rejects ("request has 0 inputs").
    prefetch_inputs = [next(spec for spec in CLIENT_INPUTS if spec.name == "lora_names"),
                       dataclasses.replace(arrived, optional=False)]
    latents = TensorSpec("latents", tensor_type, (latent_channels, -1, -1), optional=False)
    text_inputs = _text_step_inputs()
    limits = {"max_steps": deployment.limits.max_steps, "max_size": deployment.limits.max_size,
              "max_request_seconds": deployment.limits.max_request_seconds,
              "lora_deadline_fraction": deployment.lora_deadline_fraction}
    denoiser_params = {**model, **catalogs, **limits, "cfg_device": deployment.cfg_device,
                       "lora_cache_mb": deployment.lora_cache_mb, **_controlnet_parameters(deployment)}
    configs = {
        "text_encoder": _python("text_encoder", 8, _io(text_inputs, [*encoded, arrived]) + _instances(
            deployment, "text_encoder") + _parameters(model), batching=True),
        "vae_decoder": _python("vae_decoder", 4, _io([latents], [IMAGE_OUTPUT]) + _instances(
            deployment, "vae_decoder") + _parameters(model), batching=True),
        "lora_prefetch": _python("lora_prefetch", 1, _io(prefetch_inputs, [prefetched]) + _instances(
            deployment, "lora_prefetch") + _parameters(catalogs)),
        "denoiser": _python("denoiser", 1, _io([*CLIENT_INPUTS, *encoded, arrived, prefetched],
                                               [latents, LORA_STEP_OUTPUT])
                            + _instances(deployment, "denoiser") + _parameters(denoiser_params),
                            max_queue=deployment.max_queue),
        "text_to_image": _ensemble(text_outputs(family)),
    }
    if deployment.streaming:
        configs["text_to_image_stream"] = _python(
            "text_to_image_stream", 1, _io(CLIENT_INPUTS, [IMAGE_OUTPUT, LORA_STEP_OUTPUT, *PROGRESS_OUTPUTS])
            + _instances(deployment, "denoiser") + _parameters(denoiser_params), decoupled=True,
            max_queue=deployment.max_queue)
    if deployment.controlnet_placement == "service":
        configs["controlnet"] = _controlnet_model(deployment, family, latent_channels, skips, conditioning, common)
    if deployment.baseline:
        # The benchmark's baseline (swiftdiffusion.triton.baseline): same schema, placed like the denoiser.
        configs["baseline_diffusers"] = _python(
            "baseline_diffusers", 1, _io(CLIENT_INPUTS, [IMAGE_OUTPUT, LORA_STEP_OUTPUT])
            + _instances(deployment, "denoiser") + _parameters({**model, **catalogs, "max_steps": limits["max_steps"],
                                                                "max_size": limits["max_size"]}),
            max_queue=deployment.max_queue)
    return configs


def _controlnet_parameters(deployment: Deployment) -> dict[str, object]:
    """What a denoising model needs to know of its ControlNets' placement."""
    if deployment.controlnet_placement == "local":
        return {"controlnet_placement": "local", "controlnet_devices": ",".join(deployment.controlnet_devices()),
                "resident_controlnets": deployment.resident_controlnets}
    return {"controlnet_placement": "service", "controlnet_model": "controlnet",
            "residual_transport": deployment.residual_transport}


def _controlnet_model(deployment: Deployment, family: ModelFamily, latent_channels: int, skips: tuple[str, ...],
                      conditioning: dict[str, TensorSpec], common: dict[str, object]) -> str:
    """The `controlnet` model of the service placement: its tensors in the deployment's dtype (the timestep FP32, as
    the pipeline keeps it), its instances on `gpus["controlnet"]` or `controlnet_instances` CPUs; `conditioning` of
    that dtype already."""
    tensor_type = TRITON_TYPES[deployment.dtype]
    tensors = {
        "sample": TensorSpec("sample", tensor_type, (-1, latent_channels, -1, -1), optional=False),
        "timestep": TensorSpec("timestep", "TYPE_FP32", (1,), optional=False),
        **conditioning,
        "controlnet_cond": TensorSpec("controlnet_cond", tensor_type, (-1, 3, -1, -1), optional=False),
    }
    inputs = [TensorSpec("controlnet_name", "TYPE_STRING", (1,), optional=False),
              *(tensors[name] for name in controlnet_inputs(family))]
    residuals = [TensorSpec(name, tensor_type, (-1, -1, -1, -1), optional=False) for name in (*skips, "mid")]
    parameters = {**common, "family": family.name, "controlnet_catalog": deployment.controlnet_catalog.resolve(),
                  "resident_controlnets": deployment.resident_controlnets,
                  "residual_transport": deployment.residual_transport}
    if deployment.residual_transport == "dlpack":
        # Without it the backend copies every GPU input to host memory before the model sees it.
        parameters["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
    return _python("controlnet", 0, _io(inputs, residuals) + _instances(
        deployment, "controlnet", deployment.controlnet_instances) + _parameters(parameters))


def _maps(kind: str, names) -> str:
    return "".join(f"        {kind} {{ key: \"{n}\" value: \"{n}\" }}\n" for n in names)


def _step(model: str, inputs, outputs) -> str:
    return (f"    {{\n      model_name: \"{model}\"\n      model_version: -1\n"
            + _maps("input_map", inputs) + _maps("output_map", outputs) + "    }")


def _text_step_inputs() -> list[TensorSpec]:
    """The ensemble's first step takes every client input of fixed shape, although it reads only the text fields
    (`serving.TEXT_INPUTS`): a request with none of those (no prompt, the rest defaulted) would reach the text
    encoder with no input at all, which Triton 2.51 answers with "request has 0 inputs" instead of our
    "prompt: required". Inputs of variable shape (LoRA and ControlNet lists, control images) stay out: requests
    whose shapes differ are never batched together, and the control images are megabytes copied for nothing."""
    return [s for s in CLIENT_INPUTS if -1 not in s.dims]


def _ensemble(encoded: tuple[str, ...]) -> str:
    """text_encoder -> lora_prefetch -> denoiser -> vae_decoder, every tensor passed on under its own name."""
    steps = [
        _step("text_encoder", [s.name for s in _text_step_inputs()], [*encoded, ARRIVED_AT]),
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

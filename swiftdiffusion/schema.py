"""The Triton request schema of `text_to_image` (and its streaming twin): names, dtypes, shapes, defaults.

One table serves the config generator, the model adapters and the client. Every tensor carries a leading
batch dimension of 1 (the models batch requests, never a request's contents).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .request import CONTROLNET_MODES, LORA_MODES, ControlNetUse, GenerationRequest, LoraUse, RequestError
from .schedulers import SCHEDULER_NAMES


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    triton_type: str  # config.pbtxt data type
    dims: tuple[int, ...]  # without the batch dimension
    optional: bool = True
    doc: str = ""
    choices: tuple[str, ...] = ()  # the values a string field takes

    @property
    def numpy_type(self):
        return TRITON_TO_NUMPY[self.triton_type]


TRITON_TO_NUMPY = {"TYPE_BOOL": np.bool_, "TYPE_STRING": np.object_, "TYPE_INT32": np.int32,
                   "TYPE_INT64": np.int64, "TYPE_FP32": np.float32, "TYPE_UINT8": np.uint8}
DEFAULTS = GenerationRequest(prompt="")

REQUEST_INPUTS = (
    TensorSpec("prompt", "TYPE_STRING", (1,), optional=False, doc="UTF-8 prompt"),
    TensorSpec("negative_prompt", "TYPE_STRING", (1,), doc="UTF-8 negative prompt (absent: empty for SD1.5, zeros "
                                                           "for SDXL, as diffusers)"),
    TensorSpec("seed", "TYPE_INT64", (1,), doc=f"noise seed (default {DEFAULTS.seed})"),
    TensorSpec("steps", "TYPE_INT32", (1,), doc=f"denoising steps (default {DEFAULTS.steps})"),
    TensorSpec("guidance_scale", "TYPE_FP32", (1,), doc="classifier-free guidance (default: the model's, 7.5 for "
                                                        "SD1.5, 5.0 for SDXL)"),
    TensorSpec("height", "TYPE_INT32", (1,), doc="pixels, multiple of 8 (default: the control images', else the "
                                                 "model's: 512 for SD1.5, 1024 for SDXL)"),
    TensorSpec("width", "TYPE_INT32", (1,), doc="pixels, multiple of 8 (default as height)"),
    TensorSpec("scheduler", "TYPE_STRING", (1,), doc="sampler, optionally with a sigma schedule (`dpmpp_2m_karras`), "
                                                     "or its AUTOMATIC1111 name (`DPM++ 2M Karras`); default: the "
                                                     "model folder's scheduler", choices=SCHEDULER_NAMES),
    TensorSpec("lora_names", "TYPE_STRING", (-1,), doc="LoRA catalog names"),
    TensorSpec("lora_scales", "TYPE_FP32", (-1,), doc="one scale per LoRA (default 1.0 each)"),
    TensorSpec("lora_mode", "TYPE_STRING", (1,), doc="`bounded` (default) or `sync`", choices=LORA_MODES),
    TensorSpec("lora_deadline", "TYPE_INT32", (1,), doc="bounded mode: latest step to patch LoRAs in"),
    TensorSpec("controlnet_names", "TYPE_STRING", (-1,), doc="ControlNet catalog names"),
    TensorSpec("controlnet_images", "TYPE_UINT8", (-1, -1, -1, 3), doc="one HxWx3 control image per ControlNet"),
    TensorSpec("controlnet_scales", "TYPE_FP32", (-1,), doc="one scale per ControlNet (default 1.0 each)"),
    TensorSpec("controlnet_mode", "TYPE_STRING", (1,), doc="`overlap` (default), `sequential` or `async` "
                                                          "(step t uses step t-1's residuals)", choices=CONTROLNET_MODES),
    TensorSpec("cfg_parallel", "TYPE_BOOL", (1,), doc="run the guidance branches concurrently as two batch-1 "
                                                      "passes (default false)"),
    TensorSpec("timeout_s", "TYPE_FP32", (1,), doc="seconds the client will wait: the server stops the request "
                                                   "then (default: the server's `max_request_seconds`)"),
    TensorSpec("prompt_2", "TYPE_STRING", (1,), doc="SDXL: prompt of the second text encoder (default: prompt)"),
    TensorSpec("negative_prompt_2", "TYPE_STRING", (1,), doc="SDXL: negative prompt of the second text encoder "
                                                             "(default: negative_prompt)"),
    TensorSpec("original_size", "TYPE_INT32", (2,), doc="SDXL: size conditioning, height and width (default: the "
                                                        "image's size)"),
    TensorSpec("crops_coords_top_left", "TYPE_INT32", (2,), doc="SDXL: crop conditioning, top and left (default 0, 0)"),
    TensorSpec("target_size", "TYPE_INT32", (2,), doc="SDXL: target size conditioning, height and width (default: "
                                                      "the image's size)"),
    TensorSpec("clip_skip", "TYPE_INT32", (1,), doc="text-encoder layers skipped before the family's usual one "
                                                    "(default 0; 1 is AUTOMATIC1111's 'Clip skip: 2')"),
)
REQUIRED_INPUTS = tuple(spec.name for spec in REQUEST_INPUTS if not spec.optional)
IMAGE_OUTPUT = TensorSpec("image", "TYPE_UINT8", (-1, -1, 3), optional=False, doc="the image, HxWx3")
LORA_STEP_OUTPUT = TensorSpec("lora_step", "TYPE_INT32", (1,), optional=False,
                              doc="step before which the LoRAs were patched in (-1: no LoRA)")
# Streaming responses: one per step with these, then one with the image.
PROGRESS_OUTPUTS = (
    TensorSpec("step", "TYPE_INT32", (1,), optional=False, doc="steps done"),
    TensorSpec("total_steps", "TYPE_INT32", (1,), optional=False, doc="steps in all"),
    TensorSpec("elapsed_s", "TYPE_FP32", (1,), optional=False, doc="seconds since the request began"),
)


def _scalar(inputs: dict[str, np.ndarray], name: str, default):
    value = inputs.get(name)
    if value is None:
        return default
    if value.size != 1:
        raise RequestError(name, f"expected one value, got shape {value.shape}")
    item = value.reshape(-1)[0]
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RequestError(name, f"not valid UTF-8 ({error})") from None
    return item.item()


def _strings(inputs: dict[str, np.ndarray], name: str) -> list[str]:
    value = inputs.get(name)
    if value is None:
        return []
    try:
        return [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in value.reshape(-1)]
    except UnicodeDecodeError as error:
        raise RequestError(name, f"not valid UTF-8 ({error})") from None


def _scales(inputs: dict[str, np.ndarray], name: str, count: int, list_field: str) -> list[float]:
    value = inputs.get(name)
    if value is None:
        return [1.0] * count
    scales = [float(x) for x in value.reshape(-1)]
    if len(scales) != count:
        raise RequestError(name, f"{len(scales)} scales for {count} entries of {list_field}")
    return scales


def _pair(inputs: dict[str, np.ndarray], name: str) -> tuple[int, int] | None:
    value = inputs.get(name)
    if value is None:
        return None
    if value.size != 2:
        raise RequestError(name, f"expected two values, got shape {value.shape}")
    return tuple(int(x) for x in value.reshape(-1))


def _optional(value, convert):
    return None if value is None else convert(value)


def check_required(inputs: dict[str, np.ndarray], names: tuple[str, ...] = REQUIRED_INPUTS) -> None:
    """RequestError naming the first of `names` (required inputs) that the request lacks."""
    for name in names:
        if name not in inputs:
            raise RequestError(name, "required")


def request_from_tensors(inputs: dict[str, np.ndarray]) -> GenerationRequest:
    """Builds a request from a Triton request's tensors (batch dimension 1, already removed or not)."""
    check_required(inputs)
    lora_names = _strings(inputs, "lora_names")
    lora_scales = _scales(inputs, "lora_scales", len(lora_names), "lora_names")
    controlnet_names = _strings(inputs, "controlnet_names")
    controlnet_scales = _scales(inputs, "controlnet_scales", len(controlnet_names), "controlnet_names")
    images = inputs.get("controlnet_images")
    images = np.zeros((0, 0, 0, 3), np.uint8) if images is None else images
    images = images.reshape(images.shape[-4:]) if images.ndim >= 4 else images
    if len(controlnet_names) != (len(images) if images.ndim == 4 else -1):
        raise RequestError("controlnet_images", f"got shape {images.shape} for {len(controlnet_names)} ControlNets "
                                                f"(expected [count, height, width, 3])")
    return GenerationRequest(
        prompt=_scalar(inputs, "prompt", ""),
        negative_prompt=_scalar(inputs, "negative_prompt", None),
        seed=int(_scalar(inputs, "seed", DEFAULTS.seed)),
        steps=int(_scalar(inputs, "steps", DEFAULTS.steps)),
        guidance_scale=_optional(_scalar(inputs, "guidance_scale", None), float),
        height=_optional(_scalar(inputs, "height", None), int),
        width=_optional(_scalar(inputs, "width", None), int),
        scheduler=_scalar(inputs, "scheduler", None),
        loras=tuple(LoraUse(n, s) for n, s in zip(lora_names, lora_scales)),
        controlnets=tuple(ControlNetUse(n, np.ascontiguousarray(i), s)
                          for n, i, s in zip(controlnet_names, images, controlnet_scales)),
        lora_mode=_scalar(inputs, "lora_mode", DEFAULTS.lora_mode),
        lora_deadline=_optional(_scalar(inputs, "lora_deadline", None), int),
        controlnet_mode=_scalar(inputs, "controlnet_mode", DEFAULTS.controlnet_mode),
        cfg_parallel=bool(_scalar(inputs, "cfg_parallel", DEFAULTS.cfg_parallel)),
        timeout_s=_optional(_scalar(inputs, "timeout_s", None), float),
        prompt_2=_scalar(inputs, "prompt_2", None),
        negative_prompt_2=_scalar(inputs, "negative_prompt_2", None),
        original_size=_pair(inputs, "original_size"),
        crops_coords_top_left=_pair(inputs, "crops_coords_top_left"),
        target_size=_pair(inputs, "target_size"),
        clip_skip=_optional(_scalar(inputs, "clip_skip", None), int),
    )


def tensors_from_request(request: GenerationRequest) -> dict[str, np.ndarray]:
    """The inverse, for clients: every tensor with its batch dimension of 1; fields left to their defaults (None,
    empty add-on lists, the default modes) are omitted."""
    tensors = {
        "prompt": _strings_tensor([request.prompt]),
        "seed": np.array([[request.seed]], dtype=np.int64),
        "steps": np.array([[request.steps]], dtype=np.int32),
        "lora_mode": _strings_tensor([request.lora_mode]),
    }
    optional = {
        "negative_prompt": _optional(request.negative_prompt, lambda v: _strings_tensor([v])),
        "prompt_2": _optional(request.prompt_2, lambda v: _strings_tensor([v])),
        "negative_prompt_2": _optional(request.negative_prompt_2, lambda v: _strings_tensor([v])),
        "scheduler": _optional(request.scheduler, lambda v: _strings_tensor([v])),
        "guidance_scale": _optional(request.guidance_scale, lambda v: np.array([[v]], dtype=np.float32)),
        "height": _optional(request.height, lambda v: np.array([[v]], dtype=np.int32)),
        "width": _optional(request.width, lambda v: np.array([[v]], dtype=np.int32)),
        "lora_deadline": _optional(request.lora_deadline, lambda v: np.array([[v]], dtype=np.int32)),
        "timeout_s": _optional(request.timeout_s, lambda v: np.array([[v]], dtype=np.float32)),
        "clip_skip": _optional(request.clip_skip, lambda v: np.array([[v]], dtype=np.int32)),
        **{name: _optional(getattr(request, name), lambda v: np.array([v], dtype=np.int32))
           for name in ("original_size", "crops_coords_top_left", "target_size")},
    }
    tensors.update({name: value for name, value in optional.items() if value is not None})
    if request.controlnet_mode != DEFAULTS.controlnet_mode:
        tensors["controlnet_mode"] = _strings_tensor([request.controlnet_mode])
    if request.cfg_parallel:
        tensors["cfg_parallel"] = np.array([[True]], dtype=np.bool_)
    if request.loras:
        tensors["lora_names"] = _strings_tensor([lora.name for lora in request.loras])
        tensors["lora_scales"] = np.array([[lora.scale for lora in request.loras]], dtype=np.float32)
    if request.controlnets:
        tensors["controlnet_names"] = _strings_tensor([c.name for c in request.controlnets])
        tensors["controlnet_images"] = np.stack([c.image for c in request.controlnets])[None]
        tensors["controlnet_scales"] = np.array([[c.scale for c in request.controlnets]], dtype=np.float32)
    return tensors


def _strings_tensor(values: list[str]) -> np.ndarray:
    return np.array([[value.encode("utf-8") for value in values]], dtype=np.object_)

"""One text-to-image request, its limits and its validation.

Every entry point (in-process pipeline, Triton models, client) builds a `GenerationRequest` and calls
`validate`, so a bad field gets the same `RequestError` (naming the field) everywhere; the Triton adapters turn
it into INVALID_ARG.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Callable

import numpy as np

from .schedulers import SCHEDULER_NAMES, find_scheduler

LORA_MODES = ("bounded", "sync")
# overlap: ControlNets run while the UNet encoder does; sequential: before it (the baseline); async: step t's
# decoder takes step t-1's residuals, so ControlNets overlap whole steps (for slow links between devices).
CONTROLNET_MODES = ("overlap", "sequential", "async")
# Catalog names: one plain path component, so that a name can never reach outside its catalog folder.
CATALOG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


# Bounds of the fields a model checks more closely (its text encoders' depth) or only feeds to an embedding.
MAX_CLIP_SKIP = 64
MAX_CONDITIONING_PIXELS = 16_384


class RequestError(ValueError):
    """A request field is invalid; `field` names it for the client."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class Limits:
    max_steps: int = 150
    max_size: int = 1024
    min_size: int = 64
    max_guidance: float = 30.0
    max_addon_scale: float = 4.0
    max_loras: int = 4
    max_controlnets: int = 4
    # The server's time budget per request (seconds from its arrival; 0: none); a request's `timeout_s` can only
    # shorten it.
    max_request_seconds: float = 0.0
    max_timeout_s: float = 86_400.0


@dataclasses.dataclass(frozen=True)
class LoraUse:
    name: str
    scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class ControlNetUse:
    name: str
    image: np.ndarray  # uint8 [height, width, 3]
    scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One text-to-image request. Fields left None take the model's defaults (`with_defaults`): its family's
    guidance and size (a control image's size when the request has one), its folder's scheduler."""

    prompt: str
    # None: absent, which is not the same as empty for SDXL: an absent negative prompt is zeros there
    # (`force_zeros_for_empty_prompt`), an empty one is encoded.
    negative_prompt: str | None = None
    seed: int = 0
    steps: int = 20
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    loras: tuple[LoraUse, ...] = ()
    controlnets: tuple[ControlNetUse, ...] = ()
    lora_mode: str = "bounded"
    # Last step before which the LoRAs must be patched in `bounded` mode; None: the configured default.
    lora_deadline: int | None = None
    controlnet_mode: str = "overlap"
    # Classifier-free guidance's two branches as two concurrent batch-1 passes (threads; CUDA streams on a GPU)
    # instead of one batch of two: equal within fp tolerance, faster where one pass leaves the device idle.
    cfg_parallel: bool = False
    # Seconds the client will wait (its deadline): the server stops the request once they are up, counted from
    # its arrival. Triton 2.51 does not pass an ensemble request's cancellation on to its steps, so this field is
    # what frees the server from a request whose client gave up (the client library sends its deadline here).
    timeout_s: float | None = None
    # SDXL's second text encoder's prompts (None: the first ones, as diffusers falls back).
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    # SDXL's size conditioning, (height, width) and (top, left) in pixels; None: the image's size, (0, 0).
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    # Text-encoder layers to skip from the family's default one (diffusers' convention: 1 is A1111's "Clip skip 2").
    clip_skip: int | None = None


@dataclasses.dataclass(frozen=True)
class RequestDefaults:
    """What a model gives the fields a request leaves None."""

    size: int
    guidance_scale: float


def with_defaults(request: GenerationRequest, defaults: RequestDefaults) -> GenerationRequest:
    """The request with every model-dependent default filled in (the scheduler stays None: the folder's own).
    Without a size, a request with control images takes the first one's size, as diffusers' ControlNet pipelines
    do; any other size is the model's."""
    if request.controlnets and request.height is None and request.width is None:
        height, width = request.controlnets[0].image.shape[:2]
    else:
        height, width = request.height or defaults.size, request.width or defaults.size
    guidance = defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale
    return dataclasses.replace(request, height=int(height), width=int(width), guidance_scale=float(guidance))


class RequestStopped(Exception):
    """The request was stopped before it finished: its client went away, or its time budget ran out.

    `field` names what stopped it (`timeout_s`, `max_request_seconds`, or `cancelled` for a client that cancelled);
    the Triton adapters answer CANCELLED with this message.
    """

    def __init__(self, field: str, message: str, steps_done: int):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.steps_done = steps_done


STOP_REASONS = ("timeout_s", "max_request_seconds", "cancelled")
# How often a running request asks whether its client cancelled it: one IPC round trip to the Triton core (70 us
# on these CPUs), so a loop of 10 ms GPU steps pays at most 0.7% and still notices within one or two steps.
CANCEL_POLL_S = 0.01


@dataclasses.dataclass
class StopCondition:
    """When a running request must stop: a deadline (monotonic seconds) and/or a cancellation probe."""

    deadline: float | None = None
    budget_field: str = "timeout_s"
    budget_s: float = 0.0
    started: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: Callable[[], bool] | None = None
    poll_s: float = CANCEL_POLL_S
    _next_poll: float = 0.0

    def check(self, steps_done: int, total_steps: int) -> None:
        """Raises RequestStopped if the request must stop now; called at every step boundary."""
        now = time.monotonic()
        where = f"after {steps_done} of {total_steps} steps"
        if self.deadline is not None and now >= self.deadline:
            raise RequestStopped(self.budget_field, f"the request's time budget of {self.budget_s:g} s ran out "
                                                    f"{where} ({now - self.started:.2f} s since it arrived)",
                                 steps_done)
        if self.cancelled is not None and now >= self._next_poll:
            self._next_poll = now + self.poll_s
            if self.cancelled():
                raise RequestStopped("cancelled", f"the client cancelled the request; stopped {where}", steps_done)


def stop_condition(request: GenerationRequest, limits: Limits, arrived: float | None = None,
                   cancelled: Callable[[], bool] | None = None) -> StopCondition:
    """The request's stop condition: the tighter of its own `timeout_s` and the server's `max_request_seconds`,
    counted from `arrived` (monotonic seconds; default now), and the client's cancellation if it can be probed."""
    arrived = time.monotonic() if arrived is None else arrived
    budgets = [(request.timeout_s, "timeout_s"), (limits.max_request_seconds or None, "max_request_seconds")]
    budgets = [(seconds, field) for seconds, field in budgets if seconds]
    if not budgets:
        return StopCondition(started=arrived, cancelled=cancelled)
    seconds, field = min(budgets)
    return StopCondition(arrived + seconds, field, seconds, arrived, cancelled)


def check_catalog_name(field: str, name: str) -> None:
    if not CATALOG_NAME.fullmatch(name) or ".." in name:
        raise RequestError(field, f"{name!r} is not a catalog name (letters, digits, '_', '-', '.'; no paths)")


def _check_range(field: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise RequestError(field, f"{value} is outside [{low}, {high}]")


def validate(request: GenerationRequest, limits: Limits) -> None:
    """Raises RequestError for the first invalid field (fields left to the model's defaults are not checked)."""
    _check_range("steps", request.steps, 1, limits.max_steps)
    for field in ("height", "width"):
        size = getattr(request, field)
        if size is None:
            continue
        _check_range(field, size, limits.min_size, limits.max_size)
        if size % 8:
            raise RequestError(field, f"{size} is not a multiple of 8")
    if request.guidance_scale is not None:
        _check_range("guidance_scale", request.guidance_scale, 0.0, limits.max_guidance)
    if request.scheduler is not None and find_scheduler(request.scheduler) is None:
        raise RequestError("scheduler", f"unknown scheduler {request.scheduler!r}; one of {', '.join(SCHEDULER_NAMES)} "
                                        "or AUTOMATIC1111's names (e.g. 'DPM++ 2M Karras', 'Euler a')")
    if request.lora_mode not in LORA_MODES:
        raise RequestError("lora_mode", f"unknown mode {request.lora_mode!r}; one of {', '.join(LORA_MODES)}")
    if request.controlnet_mode not in CONTROLNET_MODES:
        raise RequestError("controlnet_mode", f"unknown mode {request.controlnet_mode!r}; "
                                              f"one of {', '.join(CONTROLNET_MODES)}")
    if request.lora_deadline is not None:
        _check_range("lora_deadline", request.lora_deadline, 0, request.steps)
    if request.timeout_s is not None:
        _check_range("timeout_s", request.timeout_s, 1e-3, limits.max_timeout_s)
    if request.clip_skip is not None:
        _check_range("clip_skip", request.clip_skip, 0, MAX_CLIP_SKIP)
    for field, low in (("original_size", 1), ("crops_coords_top_left", 0), ("target_size", 1)):
        for value in getattr(request, field) or ():
            _check_range(field, value, low, MAX_CONDITIONING_PIXELS)
    _validate_addons(request, limits)


def _validate_addons(request: GenerationRequest, limits: Limits) -> None:
    if len(request.loras) > limits.max_loras:
        raise RequestError("lora_names", f"{len(request.loras)} LoRAs, at most {limits.max_loras}")
    if len({lora.name for lora in request.loras}) != len(request.loras):
        raise RequestError("lora_names", "a LoRA is named twice")
    for lora in request.loras:
        check_catalog_name("lora_names", lora.name)
        _check_range("lora_scales", lora.scale, -limits.max_addon_scale, limits.max_addon_scale)
    if len(request.controlnets) > limits.max_controlnets:
        raise RequestError("controlnet_names", f"{len(request.controlnets)} ControlNets, at most {limits.max_controlnets}")
    size = _control_size(request)
    for control in request.controlnets:
        check_catalog_name("controlnet_names", control.name)
        _check_range("controlnet_scales", control.scale, 0.0, limits.max_addon_scale)
        image = control.image
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != (size or image.shape[:2]):
            expected = f"[{size[0]}, {size[1]}, 3]" if size else "[height, width, 3]"
            raise RequestError("controlnet_images",
                               f"image for {control.name!r} is {image.dtype} {list(image.shape)}, expected uint8 {expected}")


def _control_size(request: GenerationRequest) -> tuple[int, int] | None:
    """The size every control image must have: the request's, or without one the first image's (which becomes the
    request's); None while only one side is given (the model's default decides the other)."""
    if request.height is None and request.width is None:
        return tuple(request.controlnets[0].image.shape[:2]) if request.controlnets else None
    if request.height is None or request.width is None:
        return None
    return request.height, request.width

"""Stopping a request at a step boundary (its time budget, a client's cancel) and refusing LoRA files with
non-finite or absurd values, in-process (through the server: test_hardening.py)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import control_image, make_pipeline
from swiftdiffusion.lora import LoraFormatError, check_values
from swiftdiffusion.lora_store import LoraStore
from swiftdiffusion.request import (ControlNetUse, GenerationRequest, Limits, LoraUse, RequestError, RequestStopped,
                                    StopCondition, stop_condition, validate)
from swiftdiffusion.schema import request_from_tensors, tensors_from_request

# DDIM: one UNet evaluation (and one ControlNet call per ControlNet) per step.
REQUEST = GenerationRequest("a harbour at night", seed=4, steps=6, height=64, width=64, lora_mode="sync", scheduler="ddim",
                            loras=(LoraUse("style_peft", 0.8),),
                            controlnets=(ControlNetUse("canny", control_image(1), 1.0),), controlnet_mode="async")


@pytest.fixture(scope="module")
def own_pipeline(tiny_root):
    return make_pipeline(tiny_root)


class CancelAfter:
    """A cancellation probe that answers True from its `n`-th call on."""

    def __init__(self, n: int):
        self.calls = itertools.count(1)
        self.n = n

    def __call__(self) -> bool:
        return next(self.calls) >= self.n


def test_budget_picks_the_tighter_of_request_and_server():
    limits = Limits(max_request_seconds=10.0)
    assert stop_condition(dataclasses.replace(REQUEST, timeout_s=2.0), limits, arrived=100.0).deadline == 102.0
    server_bound = stop_condition(dataclasses.replace(REQUEST, timeout_s=30.0), limits, arrived=100.0)
    assert (server_bound.deadline, server_bound.budget_field) == (110.0, "max_request_seconds")
    assert stop_condition(REQUEST, Limits(), arrived=100.0).deadline is None


def test_expired_budget_names_the_field_and_the_steps():
    stop = StopCondition(deadline=0.0, budget_field="timeout_s", budget_s=1.5, started=0.0)
    with pytest.raises(RequestStopped, match=r"^timeout_s: the request's time budget of 1.5 s ran out after 3 of 9 "
                                             r"steps") as stopped:
        stop.check(3, 9)
    assert stopped.value.steps_done == 3


@pytest.mark.parametrize("field, value", [("timeout_s", 0.0), ("timeout_s", -1.0), ("timeout_s", float("nan")),
                                          ("timeout_s", 1e9)])
def test_timeout_out_of_range_is_a_request_error(field, value):
    with pytest.raises(RequestError, match=f"^{field}:"):
        validate(dataclasses.replace(REQUEST, **{field: value}), Limits())


def test_missing_prompt_is_required():
    tensors = tensors_from_request(REQUEST)
    tensors.pop("prompt")
    with pytest.raises(RequestError, match="^prompt: required$"):
        request_from_tensors(tensors)


class CountingControlNets:
    """The pipeline's ControlNet runner, counting calls submitted and collected."""

    def __init__(self, runner):
        self.runner = runner
        self.submitted = self.collected = 0

    def check(self, name: str) -> None:
        self.runner.check(name)

    def submit(self, name, inputs):
        self.submitted += 1
        return self._collect(self.runner.submit(name, inputs))

    async def _collect(self, future):
        residuals = await future
        self.collected += 1
        return residuals


@pytest.mark.parametrize("mode", ["async", "overlap"])
def test_cancelled_request_stops_at_the_next_step_and_the_next_request_is_unaffected(tiny_root, mode):
    """The probe says 'cancelled' at its 4th call (the checks before the request, then before steps 0, 1, 2): the
    request stops before step 2, every ControlNet call it sent collected (async mode sent step 2's during step 1);
    the LoRA state is consistent, so the next requests' images equal a fresh pipeline's."""
    pipeline = make_pipeline(tiny_root)
    counting = pipeline.controlnets = CountingControlNets(pipeline.controlnets)
    request = dataclasses.replace(REQUEST, controlnet_mode=mode)
    steps = []
    with pytest.raises(RequestStopped, match="^cancelled: .* stopped after 2 of 6 steps") as stopped:
        pipeline.generate(request, on_step=lambda step, total, elapsed: steps.append(step),
                          stop=StopCondition(cancelled=CancelAfter(4), poll_s=0.0))
    assert steps == [1, 2] and stopped.value.steps_done == 2
    assert counting.submitted == counting.collected == 2
    fresh = make_pipeline(tiny_root)
    for follow_up in (request, dataclasses.replace(request, loras=(LoraUse("character_kohya", 0.5),))):
        assert np.array_equal(pipeline.generate(follow_up).image, fresh.generate(follow_up).image)


# ---- LoRA values --------------------------------------------------------------------------------------------
def factors(down_value: float = 0.1, up_value: float = 0.1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"layer.weight": (torch.full((4, 16), down_value), torch.full((8, 4), up_value))}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_factor_is_refused_naming_the_layer(bad):
    values = factors()
    values["layer.weight"][1][3, 2] = bad
    with pytest.raises(LoraFormatError, match=r"^LoRA 'x' has non-finite values \(layer unet layer\)$"):
        check_values("x", "unet", values)


def test_a_delta_beyond_the_limit_is_refused_and_a_loose_bound_is_not():
    with pytest.raises(LoraFormatError, match=r"^LoRA 'x' has values too large \(layer unet layer: its delta "
                                              r"reaches 1.6e\+04, at most 10000\)$"):
        check_values("x", "unet", factors(up_value=4e4))
    # ||up|| * ||down|| exceeds the limit, the product itself does not (orthogonal factors)
    down = torch.zeros(2, 4)
    down[0, 0] = 1e3
    up = torch.zeros(3, 2)
    up[0, 1] = 1e3
    check_values("x", "unet", {"layer.weight": (down, up)})


def test_a_file_with_a_nan_is_refused_before_any_weight_is_written(tiny_root, tmp_path, own_pipeline):
    state = load_file(tiny_root / "loras" / "character_kohya.safetensors")
    state[sorted(k for k in state if "lora_up" in k)[0]].view(-1)[7] = float("nan")
    save_file(state, tmp_path / "nan_values.safetensors")
    for dtype in (torch.float32, torch.float16):
        store = LoraStore(tmp_path, own_pipeline.model.lora_target, torch.device("cpu"), dtype)
        with pytest.raises(RequestError, match=r"^lora_names: LoRA 'nan_values' has non-finite values \(layer "):
            store.load([LoraUse("nan_values")])


def test_factors_beyond_float16_are_refused_in_a_float16_store(tiny_root, tmp_path, own_pipeline):
    """Finite fp32 factors whose product is fine can still overflow fp16 one by one."""
    state = load_file(tiny_root / "loras" / "style_peft.safetensors")
    up, down = sorted(k for k in state if "lora_B" in k)[0], sorted(k for k in state if "lora_A" in k)[0]
    state[up], state[down] = state[up] * 1e5, state[down] * 1e-5
    save_file(state, tmp_path / "wide.safetensors")
    shapes = own_pipeline.model.lora_target
    LoraStore(tmp_path, shapes, torch.device("cpu"), torch.float32).load([LoraUse("wide")])
    with pytest.raises(RequestError, match=r"^lora_names: a LoRA of this request has values beyond torch.float16"):
        LoraStore(tmp_path, shapes, torch.device("cpu"), torch.float16).load([LoraUse("wide")])

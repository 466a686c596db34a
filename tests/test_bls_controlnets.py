"""The orchestrator's ControlNet runner against a stand-in for `triton_python_backend_utils`: residuals come back
on the device, a failed call names its ControlNet (a killed stub, end to end: test_controlnet_service.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from swiftdiffusion.family import SD15
from swiftdiffusion.triton.serving import BlsControlNets, controlnet_inputs

OUTPUTS = ("down_0", "mid")
DEAD = ("Failed to process the request(s) for model 'controlnet_0_0', message: "
        "Stub process 'controlnet_0_0' is not healthy.")


class StandIn:
    """The parts of pb that BlsControlNets uses; each call's response is the next of `errors` (None: success)."""

    def __init__(self, errors: list[str | None]):
        self.errors = list(errors)
        self.loads: list[str] = []

    def Tensor(self, name, array):  # noqa: N802 - pb's name
        return SimpleNamespace(name=name, array=array)

    def InferenceRequest(self, model_name, inputs, requested_output_names):  # noqa: N802
        error = self.errors.pop(0)

        async def respond():
            return SimpleNamespace(has_error=lambda: error is not None,
                                   error=lambda: SimpleNamespace(message=lambda: error), outputs=OUTPUTS)
        return SimpleNamespace(async_exec=lambda: asyncio.ensure_future(respond()))

    def get_output_tensor_by_name(self, response, name):
        return SimpleNamespace(as_numpy=lambda: np.full((1, 2), OUTPUTS.index(name), np.float32))

    def load_model(self, model_name):
        self.loads.append(model_name)


def run(pb: StandIn, calls: int) -> list[object]:
    """`calls` ControlNet calls in flight at once; each one's residuals or error."""
    runner = BlsControlNets(pb, "controlnet", "/catalog", SD15, OUTPUTS, torch.device("cpu"))
    inputs = {name: torch.zeros(1) for name in controlnet_inputs(SD15)}

    async def main():
        pending = [runner.submit("canny", inputs) for _ in range(calls)]
        return await asyncio.gather(*pending, return_exceptions=True)
    return asyncio.run(main())


def test_success_returns_every_residual_on_the_device():
    (residuals,) = run(StandIn([None]), 1)
    assert set(residuals) == set(OUTPUTS) and residuals["mid"].tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize("message", [DEAD, "ControlNet raised: out of range", "unknown ControlNet 'x'"])
def test_a_failed_call_names_the_controlnet_and_leaves_recovery_to_the_supervisor(message):
    pb = StandIn([message, None])
    error, residuals = run(pb, 2)
    assert isinstance(residuals, dict)
    assert pb.loads == [] and str(error) == f"ControlNet 'canny' failed: {message}"

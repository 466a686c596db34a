"""CFG parallelism: the two guidance branches as concurrent batch-1 passes give the batched path's images.

Batch-1 and batch-2 kernels round differently, so the two paths agree within fp32 tolerance, not bit for bit:
measured on the tiny model (4 seeds x 0-2 ControlNets x ddim/euler_a/dpmpp_2m, 6 steps) the latents differ by
at most 2.5e-6 of their largest magnitude, the images by at most 1/255.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import numpy as np
import pytest
import torch

from conftest import control_image, make_pipeline, max_diff
from swiftdiffusion.request import ControlNetUse, GenerationRequest

LATENT_TOLERANCE = 1e-5  # relative to the largest latent magnitude
TOLERANCE = 1  # of 255
CONTROLS = (ControlNetUse("canny", control_image(1), 1.0), ControlNetUse("depth", control_image(2), 0.6))


def request(count: int, **kwargs) -> GenerationRequest:
    fields = dict(prompt="a red house on a hill", negative_prompt="blurry", seed=5, steps=4, height=64, width=64)
    return GenerationRequest(**{**fields, **kwargs}, controlnets=CONTROLS[:count])


@pytest.mark.parametrize("mode", ["overlap", "async"])
@pytest.mark.parametrize("count", [0, 1, 2])
def test_parallel_branches_equal_the_batched_path(pipeline, count, mode):
    batched = request(count, controlnet_mode=mode)
    parallel = dataclasses.replace(batched, cfg_parallel=True)
    expected = asyncio.run(pipeline.denoise(batched)).latents
    latents = asyncio.run(pipeline.denoise(parallel)).latents
    assert (latents - expected).abs().max() <= LATENT_TOLERANCE * expected.abs().max()
    assert max_diff(pipeline.decode(latents), pipeline.decode(expected)) <= TOLERANCE
    assert max_diff(pipeline.generate(parallel).image, pipeline.generate(batched).image) <= TOLERANCE


def test_branches_run_on_two_worker_threads(tiny_root):
    pipeline = make_pipeline(tiny_root)
    calls = []
    pipeline.engines["unet"].module.register_forward_pre_hook(
        lambda module, args: calls.append((threading.current_thread(), args[0].shape[0])))
    pipeline.generate(request(0, cfg_parallel=True, steps=2))
    threads = {thread for thread, _ in calls}
    assert len(threads) == 2 and all(thread.name.startswith("cfg-branch") for thread in threads)
    assert [batch for _, batch in calls] == [1] * 4


def test_unguided_request_ignores_the_option(pipeline):
    unguided = request(1, guidance_scale=1.0)
    assert np.array_equal(pipeline.generate(dataclasses.replace(unguided, cfg_parallel=True)).image,
                          pipeline.generate(unguided).image)


@pytest.mark.server
def test_served_parallel_branches_equal_in_process(client, tiny_root):
    """Through Triton the denoiser runs the branches on two threads of its own, each sending its ControlNets by
    BLS from its own event loop; with one torch thread on both sides the image is the in-process one exactly."""
    parallel = request(2, cfg_parallel=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # before the first parallel request: the branch workers take their count from it
    try:
        expected = make_pipeline(tiny_root).generate(parallel).image
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(client.generate(parallel).image, expected)

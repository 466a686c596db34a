"""CFG parallelism: the two guidance branches as concurrent batch-1 passes give the batched path's images,
with both branches on one UNet or the unconditional one on a copy of its own (a second device in production).

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
from swiftdiffusion.cuda_graphs import GraphedEngine
from swiftdiffusion.models import load_model
from swiftdiffusion.request import ControlNetUse, GenerationRequest, LoraUse, RequestError

LATENT_TOLERANCE = 1e-5  # relative to the largest latent magnitude
TOLERANCE = 1  # of 255
CONTROLS = (ControlNetUse("canny", control_image(1), 1.0), ControlNetUse("depth", control_image(2), 0.6))


def request(count: int, **kwargs) -> GenerationRequest:
    fields = dict(prompt="a red house on a hill", negative_prompt="blurry", seed=5, steps=4, height=64, width=64,
                  scheduler="ddim")  # one UNet evaluation per step
    return GenerationRequest(**{**fields, **kwargs}, controlnets=CONTROLS[:count])


@pytest.mark.parametrize("mode", ["overlap", "async"])
@pytest.mark.parametrize("count", [0, 1, 2])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_parallel_branches_equal_the_batched_path(pipeline, xl_pipeline, family, count, mode):
    """SDXL's halves split its added conditioning (pooled text embeddings, size ids) along with the prompts'."""
    pipeline = {"sd15": pipeline, "sdxl": xl_pipeline}[family]
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


@pytest.fixture(scope="module")
def two_copies(tiny_root):
    """A pipeline whose unconditional branch runs on a UNet copy of its own."""
    return make_pipeline(tiny_root, cfg_model=load_model(tiny_root / "model", parts=("unet",)))


def unet_params(pipeline, copy: bool = False) -> dict[str, torch.Tensor]:
    model = pipeline.cfg_model if copy else pipeline.model
    return dict(model.engines["unet"].module.named_parameters())


def test_the_copy_runs_the_unconditional_branch(two_copies):
    calls = {"main": [], "copy": []}
    hooks = [two_copies.engines["unet"].module.register_forward_pre_hook(
                 lambda module, args: calls["main"].append(args[2][0, 0, :4].clone())),
             two_copies.cfg_model.engines["unet"].module.register_forward_pre_hook(
                 lambda module, args: calls["copy"].append(args[2][0, 0, :4].clone()))]
    try:
        parallel = request(0, cfg_parallel=True, steps=2)
        two_copies.generate(parallel)
    finally:
        for hook in hooks:
            hook.remove()
    embeddings = two_copies.encode(parallel)["encoder_hidden_states"]  # [negative, positive]
    assert len(calls["main"]) == len(calls["copy"]) == 2
    assert all(torch.equal(c, embeddings[0, 0, :4]) for c in calls["copy"])
    assert all(torch.equal(c, embeddings[1, 0, :4]) for c in calls["main"])


@pytest.mark.parametrize("count", [0, 2])
def test_the_copy_gets_the_loras_and_equals_the_batched_path(two_copies, pipeline, tiny_root, count):
    with_lora = request(count, loras=(LoraUse("character_kohya", 0.8), LoraUse("style_peft", 0.5)), lora_mode="sync")
    expected = pipeline.generate(with_lora).image
    image = two_copies.generate(dataclasses.replace(with_lora, cfg_parallel=True)).image
    assert max_diff(image, expected) <= TOLERANCE
    main, copy = unet_params(two_copies), unet_params(two_copies, copy=True)
    assert all(torch.equal(copy[name], weight) for name, weight in main.items())  # the same patch, bit for bit
    assert max_diff(image, pipeline.generate(request(count)).image) > 8  # the LoRAs did change the image

    two_copies.generate(request(count, cfg_parallel=True))  # no LoRA: both copies restored bit for bit
    pristine = dict(load_model(tiny_root / "model", parts=("unet",)).engines["unet"].module.named_parameters())
    copy = unet_params(two_copies, copy=True)
    assert all(torch.equal(copy[name], weight) for name, weight in pristine.items())


def test_shared_cuda_graphs_refuse_the_option(tiny_root, two_copies):
    """Graphs replay from static buffers, which two concurrent branches on one set of graphs would share; with a
    UNet copy each branch has graphs of its own. (CPU stand-in: graphed engines marked as replaying.)"""
    shared = make_pipeline(tiny_root)
    shared.engines = {**shared.engines, "unet": GraphedEngine(shared.engines["unet"])}
    shared.engines["unet"].enabled = True
    with pytest.raises(RequestError) as raised:
        asyncio.run(shared.denoise(request(0, cfg_parallel=True)))
    assert raised.value.field == "cfg_parallel" and "static buffers" in str(raised.value)
    copied = make_pipeline(tiny_root, cfg_model=two_copies.cfg_model)
    copied.engines = {**copied.engines, "unet": GraphedEngine(copied.engines["unet"])}
    copied.engines["unet"].enabled = True
    copied._check_parallel()  # allowed (running it would need CUDA)


def test_unguided_request_ignores_the_option(pipeline):
    unguided = request(1, guidance_scale=1.0)
    assert np.array_equal(pipeline.generate(dataclasses.replace(unguided, cfg_parallel=True)).image,
                          pipeline.generate(unguided).image)


@pytest.mark.server
def test_served_parallel_branches_equal_in_process(client, tiny_root):
    """Through Triton the denoiser runs the branches on two threads of its own (the unconditional one on its UNet
    copy), each sending its ControlNets by BLS from its own event loop; with one torch thread on both sides the
    image is the in-process one exactly."""
    parallel = request(2, cfg_parallel=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # before the first parallel request: the branch workers take their count from it
    try:
        expected = make_pipeline(tiny_root).generate(parallel).image
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(client.generate(parallel).image, expected)


@pytest.mark.server
def test_served_parallel_branches_with_loras_equal_the_batched_path(client, pipeline):
    """The served denoiser patches its UNet copy too: with two LoRAs and two ControlNets the parallel branches
    give the batched image (one torch thread on both sides, as the server's instances run)."""
    with_lora = request(2, loras=(LoraUse("character_kohya", 0.8), LoraUse("style_peft", 0.5)), lora_mode="sync")
    served = client.generate(dataclasses.replace(with_lora, cfg_parallel=True)).image
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batched, plain = pipeline.generate(with_lora).image, pipeline.generate(request(2)).image
    finally:
        torch.set_num_threads(threads)
    assert max_diff(served, batched) <= TOLERANCE
    assert max_diff(served, plain) > 8  # the LoRAs did change the image
    assert np.array_equal(client.generate(request(2)).image, plain)  # and are gone from both copies again

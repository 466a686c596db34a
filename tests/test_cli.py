"""The first ten minutes: one `swiftdiffusion` command, a CLI with a flag for every request field, JSON output,
batches of prompts, the asyncio client, and a server log without lines repeated per model process."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import control_image, max_diff
from swiftdiffusion import generate
from swiftdiffusion.client import AsyncClient, Generated, Progress
from swiftdiffusion.request import ControlNetUse, GenerationRequest, LoraUse
from swiftdiffusion.schema import REQUEST_INPUTS


def test_every_schema_field_has_a_flag():
    options = {option for action in generate.parser()._actions for option in action.option_strings}
    assert {generate.flag(spec) for spec in REQUEST_INPUTS} <= options


def test_flags_and_shorthands_build_the_servers_request(tmp_path):
    edges = tmp_path / "edges.png"
    Image.fromarray(control_image(3, 64, 64)).save(edges)
    common = ["--prompt", "a boat", "--seed", "4", "--steps", "3", "--guidance-scale", "5", "--scheduler", "euler",
              "--lora-mode", "sync", "--controlnet-mode", "async", "--cfg-parallel", "--timeout-s", "30",
              "--lora-deadline", "1", "--out", str(tmp_path / "x.png")]
    long = generate.parser().parse_args(common + [
        "--height", "64", "--width", "64", "--lora-names", "style_peft", "character_kohya", "--lora-scales", "0.5",
        "1.0", "--controlnet-names", "canny", "--controlnet-images", str(edges), "--controlnet-scales", "0.7"])
    short = generate.parser().parse_args(common + [
        "--size", "64", "--lora", "style_peft:0.5", "--lora", "character_kohya", "--controlnet", f"canny:{edges}:0.7"])
    expected = GenerationRequest("a boat", seed=4, steps=3, guidance_scale=5.0, height=64, width=64,
                                 scheduler="euler", lora_mode="sync", controlnet_mode="async", cfg_parallel=True,
                                 timeout_s=30.0, lora_deadline=1,
                                 loras=(LoraUse("style_peft", 0.5), LoraUse("character_kohya", 1.0)),
                                 controlnets=(ControlNetUse("canny", control_image(3, 64, 64), 0.7),))
    for args in (long, short):
        (request,) = generate.requests_from_args(args)
        assert dataclasses.replace(request, controlnets=()) == dataclasses.replace(expected, controlnets=())
        assert np.array_equal(request.controlnets[0].image, expected.controlnets[0].image)


def test_sdxl_fields_and_automatic1111_scheduler_names_are_flags(tmp_path):
    edges = tmp_path / "edges.png"
    Image.fromarray(control_image(3, 100, 70)).save(edges)  # sides not multiples of 8
    args = generate.parser().parse_args([
        "--prompt", "a boat", "--prompt-2", "a harbour", "--negative-prompt-2", "fog", "--original-size", "512",
        "384", "--crops-coords-top-left", "16", "0", "--target-size", "256", "256", "--clip-skip", "1",
        "--scheduler", "DPM++ 2M Karras", "--controlnet", f"canny:{edges}", "--out", str(tmp_path / "x.png")])
    (request,) = generate.requests_from_args(args)
    assert (request.prompt_2, request.negative_prompt_2, request.original_size, request.crops_coords_top_left,
            request.target_size, request.clip_skip, request.scheduler) == (
        "a harbour", "fog", (512, 384), (16, 0), (256, 256), 1, "dpmpp_2m_karras")
    # Without --size the control image keeps its size, rounded down to a multiple of 8 (the request's size then).
    assert request.controlnets[0].image.shape == (96, 64, 3) and request.height is None is request.width
    with pytest.raises(SystemExit):
        generate.parser().parse_args(["--prompt", "x", "--scheduler", "tartan", "--out", "x.png"])


def test_a_bad_flag_value_gets_the_servers_message(tmp_path):
    args = generate.parser().parse_args(["--prompt", "x", "--steps", "0", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="^error: steps: 0 is outside"):
        generate.requests_from_args(args)


def test_one_command_lists_every_subcommand():
    shown = subprocess.run([sys.executable, "-m", "swiftdiffusion", "--help"], capture_output=True, text=True,
                           check=True).stdout
    for command in ("serve", "generate", "demo", "tiny", "export", "bench"):
        assert re.search(rf"^  {command} ", shown, re.M), command
    for command in ("serve", "generate", "tiny", "export"):
        help_text = subprocess.run([sys.executable, "-m", "swiftdiffusion", command, "--help"], capture_output=True,
                                   text=True, check=True).stdout
        assert f"swiftdiffusion {command}" in help_text and "example:" in help_text


@pytest.mark.server
def test_json_output_and_a_batch_of_prompts(server, pipeline, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red house\n\na blue boat\na green tree\n")
    out = tmp_path / "images"
    done = subprocess.run([sys.executable, "-m", "swiftdiffusion", "generate", "--url", server.grpc_url,
                           "--prompts", str(prompts), "--steps", "2", "--size", "64", "--lora", "style_peft:0.5",
                           "--lora-mode", "sync", "--json", "--out", str(out)],
                          capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(line["image"] for line in lines) == sorted(str(out / f"{i:04d}.png") for i in range(3))
    assert all(line["lora_step"] == 0 and line["seconds"] > 0 and line["seed"] == 0 for line in lines)
    first = GenerationRequest("a red house", steps=2, height=64, width=64, lora_mode="sync",
                              loras=(LoraUse("style_peft", 0.5),))
    assert max_diff(np.asarray(Image.open(out / "0000.png")), pipeline.generate(first).image) <= 1


@pytest.mark.server
def test_async_client_equals_the_blocking_one(server, client):
    requests = [GenerationRequest("a garden", seed=i, steps=3, height=64, width=64, lora_mode="sync",
                                  loras=(LoraUse("style_peft", 0.3 * i),) if i else ()) for i in range(3)]

    async def together():
        async with AsyncClient(server.grpc_url) as concurrent:
            unary = await asyncio.gather(*(concurrent.generate(r) for r in requests))
            streamed = [message async for message in concurrent.stream(requests[1])]
            return unary, streamed

    unary, streamed = asyncio.run(together())
    for request, result in zip(requests, unary):
        blocking = client.generate(request)
        assert np.array_equal(result.image, blocking.image) and result.lora_step == blocking.lora_step
    assert [m.step for m in streamed if isinstance(m, Progress)] == [1, 2, 3]
    assert isinstance(streamed[-1], Generated) and np.array_equal(streamed[-1].image, unary[1].image)


@pytest.mark.server
def test_server_log_has_no_line_repeated_per_model_process(server, client):
    client.generate(GenerationRequest("a log", steps=1, height=64, width=64))
    lines = [line for line in server.log_file.read_text().splitlines()
             if line.strip() and not line.startswith(("+", "|"))]  # Triton's tables of settings and models
    text = [re.sub(r"^[IWE]\d{4} [\d:.]+ +\d+ ", "", line) for line in lines]  # Triton's time and thread prefix
    repeated = {line: count for line, count in collections.Counter(text).items() if count > 1}
    assert not repeated
    ready = [line for line in lines if line.startswith("swiftdiffusion: ") and " ready " in line]
    instances = {line.split()[1] for line in ready}
    assert instances >= {"text_encoder_0_0", "denoiser_0_0", "controlnet_0_0", "controlnet_0_1", "vae_decoder_0_0"}

"""LoRA catalog, in-place patching with exact restore, and bounded asynchronous loading."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import http.server
import random
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tritonclient.utils import InferenceServerException

from conftest import make_pipeline, max_diff
from swiftdiffusion.engines import LayerDelta, WeightPatch
from swiftdiffusion.lora_store import LoraStore
from swiftdiffusion.request import GenerationRequest, LoraUse, RequestError
from swiftdiffusion.tiny import LORA_FORMATS, lora_state_dict, random_lora_factors

NAMES = sorted(LORA_FORMATS)
REQUEST = GenerationRequest("a mountain lake", negative_prompt="fog", seed=3, steps=6, height=64, width=64,
                            scheduler="ddim", loras=(LoraUse("character_kohya", 1.0),))


@pytest.fixture(scope="module")
def lora_pipeline(tiny_root):
    """A pipeline of its own: these tests leave weights patched and swap the LoRA store."""
    return make_pipeline(tiny_root)


def unet_weights(pipeline) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in pipeline.model.engines["unet"].weights.params.items()}


def assert_pristine(pipeline, pristine: dict[str, torch.Tensor]) -> None:
    for name, param in pipeline.model.engines["unet"].weights.params.items():
        assert torch.equal(param, pristine[name]), name


def test_restore_is_bit_exact_after_random_cycles(lora_pipeline):
    engine = lora_pipeline.model.engines["unet"]
    pristine = unet_weights(lora_pipeline)
    store = lora_pipeline.loras
    rng = random.Random(0)
    sets = [store.load([LoraUse(n, rng.uniform(-1.5, 1.5)) for n in rng.sample(NAMES, rng.randint(1, 3))])
            for _ in range(12)]
    for _ in range(200):
        engine.patch(rng.choice(sets).patches["unet"])
        if rng.random() < 0.3:
            engine.restore()
    engine.restore()
    assert_pristine(lora_pipeline, pristine)


def test_failure_mid_patch_restores_every_written_layer(lora_pipeline):
    engine = lora_pipeline.model.engines["unet"]
    pristine = unet_weights(lora_pipeline)
    good = lora_pipeline.loras.load([LoraUse("style_peft", 1.0)]).patches["unet"]
    layers = dict(good.layers)
    last = list(layers)[-1]
    # Right shapes (so the up-front check passes) but a dtype addmm_ rejects: fails after the others are written.
    layers[last] = LayerDelta(layers[last].up.to(torch.float64), layers[last].down)
    with pytest.raises(RuntimeError):
        engine.patch(WeightPatch(("broken",), layers))
    assert_pristine(lora_pipeline, pristine)
    engine.patch(good)
    assert not torch.equal(engine.weights.params[last], pristine[last])
    engine.restore()
    assert_pristine(lora_pipeline, pristine)


def test_only_touched_layers_are_written(lora_pipeline):
    engine = lora_pipeline.model.engines["unet"]
    pristine = unet_weights(lora_pipeline)
    patch = lora_pipeline.loras.load([LoraUse("style_diffusers", 1.0)]).patches["unet"]
    engine.patch(patch)
    changed = {name for name, p in engine.weights.params.items() if not torch.equal(p, pristine[name])}
    assert changed == set(patch.layers)
    engine.restore()


def test_same_lora_set_is_reused_without_loading(lora_pipeline):
    request = dataclasses.replace(REQUEST, lora_mode="sync")
    first = lora_pipeline.generate(request)
    result = asyncio.run(lora_pipeline.denoise(request))
    assert result.timings.reused and result.timings.bytes_read == 0
    assert np.array_equal(lora_pipeline.decode(result.latents), first.image)


class SlowStore(LoraStore):
    """A LoRA source that takes `delay` seconds per file (a slow remote store)."""

    delay = 0.6

    def decoded(self, name: str):
        time.sleep(self.delay)
        return super().decoded(name)


@pytest.fixture
def slow_pipeline(tiny_root):
    pipeline = make_pipeline(tiny_root)
    model = pipeline.model
    pipeline.loras = SlowStore(tiny_root / "loras", model.lora_target, model.device, model.dtype)
    return pipeline


def test_bounded_mode_applies_by_the_deadline_and_equals_reference_at_that_step(slow_pipeline):
    request = dataclasses.replace(REQUEST, lora_mode="bounded", lora_deadline=2)
    result = slow_pipeline.generate(request)
    assert 0 < result.lora_step <= 2  # the slow loader is never ready before step 1 of this tiny model
    slow_pipeline.loras.delay = 0.0
    reference = slow_pipeline.generate(request, exact_lora_step=result.lora_step)
    assert np.array_equal(result.image, reference.image)
    synced = slow_pipeline.generate(dataclasses.replace(request, lora_mode="sync"))
    assert max_diff(result.image, synced.image) > 0  # applying later is a real (small) difference


def test_bounded_mode_waits_at_the_deadline(slow_pipeline):
    slow_pipeline.loras.delay = 2.0
    result = slow_pipeline.generate(dataclasses.replace(REQUEST, lora_mode="bounded", lora_deadline=1))
    assert result.lora_step == 1 and result.lora_wait_s > 0.5


def write_bad_loras(folder, tiny_root) -> dict[str, str]:
    """Broken catalog entries: name -> what is wrong with it."""
    good = (tiny_root / "loras" / "style_peft.safetensors").read_bytes()
    (folder / "bad_truncated.safetensors").write_bytes(good[: len(good) // 2])
    (folder / "bad_garbage.safetensors").write_bytes(b"\x00" * 64 + b"not a safetensors file")
    generator = torch.Generator().manual_seed(0)
    # Right layer names, wrong shapes: a LoRA trained for another model width.
    wide = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64)}
    save_file(lora_state_dict({"unet": random_lora_factors(wide, 4, generator)}, "peft", 4),
              folder / "bad_wrong_model.safetensors")
    unknown = {"down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q": (32, 32)}
    save_file(lora_state_dict({"unet": random_lora_factors(unknown, 4, generator)}, "peft", 4),
              folder / "bad_unknown_layer.safetensors")
    return {"bad_truncated": "readable", "bad_garbage": "readable", "bad_wrong_model": "do not fit",
            "bad_unknown_layer": "lacks"}


@pytest.fixture(scope="module")
def bad_loras(tiny_root):
    return write_bad_loras(tiny_root / "loras", tiny_root)


@pytest.mark.parametrize("mode", ["sync", "bounded"])
def test_broken_lora_files_are_request_errors_and_leave_weights_pristine(lora_pipeline, bad_loras, mode):
    lora_pipeline.generate(GenerationRequest("x", steps=1, height=64, width=64))  # restore
    pristine = unet_weights(lora_pipeline)
    for name, message in bad_loras.items():
        with pytest.raises(RequestError, match=message) as raised:
            lora_pipeline.generate(dataclasses.replace(REQUEST, lora_mode=mode, loras=(LoraUse(name, 1.0),)))
        assert raised.value.field == "lora_names"
        assert_pristine(lora_pipeline, pristine)


@pytest.mark.server
def test_broken_lora_files_through_the_server(client, pipeline, bad_loras):
    good = dataclasses.replace(REQUEST, lora_mode="sync", steps=3)
    for name, message in bad_loras.items():
        with pytest.raises(InferenceServerException) as raised:
            client.generate(dataclasses.replace(good, loras=(LoraUse(name, 1.0),)))
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "lora_names:" in raised.value.message() and message in raised.value.message()
        assert max_diff(client.generate(good).image, pipeline.generate(good).image) <= 1


def test_lora_catalog_over_http_equals_local(tiny_root, lora_pipeline, tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_root / "loras"))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        model = lora_pipeline.model
        remote = LoraStore(f"http://127.0.0.1:{httpd.server_address[1]}", model.lora_target, model.device,
                           model.dtype, copies_dir=tmp_path)
        uses = [LoraUse("character_kohya", 0.8), LoraUse("style_peft", 0.3)]
        local = LoraStore(tiny_root / "loras", model.lora_target, model.device, model.dtype)
        over_http, local = remote.load(uses), local.load(uses)
        assert over_http.bytes_read == local.bytes_read > 0
        for component in ("unet", "text_encoder"):
            ours, theirs = over_http.patches[component].layers, local.patches[component].layers
            assert ours.keys() == theirs.keys()
            assert all(torch.equal(ours[k].up, theirs[k].up) and torch.equal(ours[k].down, theirs[k].down)
                       for k in ours)
        with pytest.raises(RequestError, match="lora_names"):
            remote.load([LoraUse("no_such_lora", 1.0)])
        with pytest.raises(RequestError, match="lora_names"):
            remote.locate("../secrets")
    finally:
        httpd.shutdown()

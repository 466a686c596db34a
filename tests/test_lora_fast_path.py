"""The LoRA fast path: decode plans per key layout give exactly the converters' factors for every format; the
host cache holds its byte budget and never serves a changed file; remote copies and prefetch never serve stale
bytes; staging to a device packs every factor into one buffer exactly."""

from __future__ import annotations

import functools
import http.server
import os
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from swiftdiffusion.engines import LayerDelta
from swiftdiffusion.lora import DecodePlans, Stager, decode_lora, layout_of, read_lora
from swiftdiffusion.lora_store import LoraStore
from swiftdiffusion.models import load_components, load_model
from swiftdiffusion.request import LoraUse
from swiftdiffusion.tiny import model_lora_targets, random_lora


@pytest.fixture(scope="module")
def model(tiny_root):
    return load_model(tiny_root / "model")


def write(path, state: dict[str, torch.Tensor], metadata: dict | None = None):
    save_file(state, path, metadata=metadata or {"format": "pt"})
    return path


@pytest.fixture(scope="module")
def variants(tiny_root, model, tmp_path_factory) -> dict[str, object]:
    """LoRA files of every format and layout family: the tiny model's three, kohya without alphas, kohya with
    another alpha, kohya with LoCon 3x3 convs, PEFT UNet-only, diffusers with text-encoder keys."""
    folder = tmp_path_factory.mktemp("variants")
    files = {name: tiny_root / "loras" / f"{name}.safetensors" for name in ("character_kohya", "style_peft",
                                                                               "style_diffusers")}
    kohya = load_file(files["character_kohya"])
    files["kohya_no_alpha"] = write(folder / "kohya_no_alpha.safetensors",
                                    {k: v for k, v in kohya.items() if not k.endswith(".alpha")})
    files["kohya_other_alpha"] = write(folder / "kohya_other_alpha.safetensors",
                                       {k: (torch.tensor(3.0) if k.endswith(".alpha") else v) for k, v in kohya.items()})
    unet = model.engines["unet"].weights.params
    generator = torch.Generator().manual_seed(5)
    convs = {}
    for module in ("down_blocks.0.resnets.0.conv1", "up_blocks.3.resnets.0.conv2"):
        out_channels, in_channels, kh, kw = unet[f"{module}.weight"].shape
        key = "lora_unet_" + module.replace(".", "_")
        convs[f"{key}.lora_down.weight"] = torch.randn(2, in_channels, kh, kw, generator=generator) * 0.1
        convs[f"{key}.lora_up.weight"] = torch.randn(out_channels, 2, 1, 1, generator=generator) * 0.1
        convs[f"{key}.alpha"] = torch.tensor(1.0)
    files["kohya_locon"] = write(folder / "kohya_locon.safetensors", {**kohya, **convs})
    peft = load_file(files["style_peft"])
    files["peft_unet_only"] = write(folder / "peft_unet_only.safetensors",
                                    {k: v for k, v in peft.items() if k.startswith("unet.")})
    targets = model_lora_targets(load_components(tiny_root / "model", parts=("text", "unet")).lora_modules())
    files["diffusers_with_text"] = write(folder / "diffusers_with_text.safetensors",
                                         random_lora(targets, 4, generator, "diffusers", 4))
    return files


FORMATS = ("character_kohya", "style_peft", "style_diffusers", "kohya_no_alpha", "kohya_other_alpha", "kohya_locon",
           "peft_unet_only", "diffusers_with_text")


def assert_same_factors(a, b) -> None:
    assert a.layers.keys() == b.layers.keys()
    for component in a.layers:
        assert a.layers[component].keys() == b.layers[component].keys()
        for weight, (down, up) in a.layers[component].items():
            assert torch.equal(down, b.layers[component][weight][0]) and torch.equal(up, b.layers[component][weight][1])


@pytest.mark.parametrize("name", FORMATS)
def test_plan_miss_and_hit_equal_the_converters_bit_for_bit(model, variants, name):
    shapes = model.lora_target
    converters = decode_lora(name, read_lora(name, variants[name]), shapes)
    plans = DecodePlans()
    miss = decode_lora(name, read_lora(name, variants[name]), shapes, plans)
    hit = decode_lora(name, read_lora(name, variants[name]), shapes, plans)
    assert (plans.misses, plans.hits) == (1, 1)
    assert plans.plans[layout_of(read_lora(name, variants[name]))] is not None  # the hit went through the plan
    assert_same_factors(miss, converters)
    assert_same_factors(hit, converters)


def test_a_plan_serves_another_file_of_its_layout_and_not_one_of_another(model, variants, tmp_path):
    """Same keys and shapes, other values: the plan decodes it exactly; another alpha is another layout."""
    shapes, plans = model.lora_target, DecodePlans()
    decode_lora("first", read_lora("first", variants["character_kohya"]), shapes, plans)
    state = load_file(variants["character_kohya"])
    other = write(tmp_path / "other.safetensors", {k: v if k.endswith(".alpha") else v.flip(0) for k, v in state.items()})
    via_plan = decode_lora("other", read_lora("other", other), shapes, plans)
    assert plans.hits == 1
    assert_same_factors(via_plan, decode_lora("other", read_lora("other", other), shapes))
    decode_lora("alpha", read_lora("alpha", variants["kohya_other_alpha"]), shapes, plans)
    assert (plans.hits, plans.misses) == (1, 2)


def copy_catalog(source, folder, names):
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / f"{name}.safetensors").write_bytes((source / f"{name}.safetensors").read_bytes())
    return folder


def test_host_cache_hits_repeats_keeps_its_budget_and_sees_changed_files(tiny_root, model, tmp_path):
    catalog = copy_catalog(tiny_root / "loras", tmp_path / "catalog", ("character_kohya", "style_peft"))
    one = read_lora("x", catalog / "style_peft.safetensors")
    budget_mb = 1 + 2 * decode_lora("x", one, model.lora_target).nbytes // (1 << 20)
    store = LoraStore(catalog, model.lora_target, model.device, model.dtype, cache_mb=budget_mb)
    first = store.load([LoraUse("style_peft")])
    again = store.load([LoraUse("style_peft")])
    assert first.cache_hits == 0 and again.cache_hits == 1 and again.bytes_read == 0
    store.load([LoraUse("character_kohya")])
    assert store.cache.bytes <= store.cache.budget_bytes
    # A new file under the same name: a new version, decoded afresh.
    state = load_file(catalog / "style_peft.safetensors")
    write(catalog / "style_peft.safetensors", {k: v * 2 for k, v in state.items()})
    changed = store.load([LoraUse("style_peft")])
    assert changed.cache_hits == 0
    fresh = LoraStore(catalog, model.lora_target, model.device, model.dtype).load([LoraUse("style_peft")])
    for weight, delta in fresh.patches["unet"].layers.items():
        assert torch.equal(changed.patches["unet"].layers[weight].up, delta.up)


@pytest.fixture
def http_catalog(tiny_root, tmp_path):
    catalog = copy_catalog(tiny_root / "loras", tmp_path / "served", ("character_kohya", "style_peft"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(catalog))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield catalog, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_prefetched_copies_are_used_and_never_stale(model, http_catalog, tmp_path):
    catalog, url = http_catalog
    copies = tmp_path / "copies"
    store = LoraStore(url, model.lora_target, model.device, model.dtype, copies_dir=copies, cache_mb=0)
    store.source.prefetch(["style_peft", "no_such_lora", "../escape"])  # bad names: left for the request
    deadline = time.monotonic() + 30
    while not list(copies.glob("style_peft.*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.05)
    (copy,) = copies.glob("style_peft.*.safetensors")
    assert copy.read_bytes() == (catalog / "style_peft.safetensors").read_bytes()
    served = store.load([LoraUse("style_peft")])
    # The file changes on the server (other values, other size): the next load fetches the new version.
    state = load_file(catalog / "style_peft.safetensors")
    write(catalog / "style_peft.safetensors", {**{k: v * 3 for k, v in state.items()}, "extra": torch.zeros(7)})
    os.utime(catalog / "style_peft.safetensors", (time.time() + 5, time.time() + 5))
    changed = store.load([LoraUse("style_peft")])
    local = LoraStore(catalog, model.lora_target, model.device, model.dtype).load([LoraUse("style_peft")])
    for weight, delta in local.patches["unet"].layers.items():
        assert torch.equal(changed.patches["unet"].layers[weight].up, delta.up)
        assert not torch.equal(served.patches["unet"].layers[weight].up, delta.up)
    assert len(list(copies.glob("style_peft.*.safetensors"))) == 2


def test_copies_keep_their_byte_budget(model, http_catalog, tmp_path):
    catalog, url = http_catalog
    store = LoraStore(url, model.lora_target, model.device, model.dtype, copies_dir=tmp_path / "copies")
    store.source.copies.budget_bytes = (catalog / "style_peft.safetensors").stat().st_size
    store.load([LoraUse("character_kohya")])
    store.load([LoraUse("style_peft")])
    assert [p.name.split(".")[0] for p in (tmp_path / "copies").glob("*.safetensors")] == ["style_peft"]


def test_stager_packs_every_factor_into_one_buffer_exactly():
    """The staging path of a GPU deployment, with the CPU as its 'device': one buffer, views equal to the
    factors, the host buffer reused for the next patch without touching the first one's views."""
    generator = torch.Generator().manual_seed(0)
    layers = {f"w{i}": LayerDelta(torch.randn(8, 2 + i, generator=generator), torch.randn(2 + i, 5, generator=generator))
              for i in range(4)}
    stager = Stager(torch.device("cpu"))
    staged = stager.stage(layers)
    buffers = {delta.up.untyped_storage().data_ptr() for delta in staged.values()}
    assert len(buffers) == 1
    for weight, delta in layers.items():
        assert torch.equal(staged[weight].up, delta.up) and torch.equal(staged[weight].down, delta.down)
    kept = {weight: (d.up.clone(), d.down.clone()) for weight, d in staged.items()}
    stager.stage({"other": LayerDelta(torch.ones(8, 40), torch.ones(40, 5))})
    for weight, (up, down) in kept.items():
        assert torch.equal(staged[weight].up, up) and torch.equal(staged[weight].down, down)

"""GPU benchmark: swiftdiffusion (eager and CUDA-graphed engines) against diffusers' own pipelines, plus device
checks of graph replay (plain, side streams, compiled) against eager.

One run builds a model of one family with random weights on local disk (`--family sd15`: full SD1.5 widths, 512x512,
50 DDIM steps, rank-64 LoRAs; `--family sdxl`: full SDXL widths and depths, 1024x1024, 30 steps of the base model's
Euler scheduler, rank-32 LoRAs of the UNet and both text encoders; two ControlNets; LoRAs in kohya and PEFT
formats), then for each case (0, 1, 2 ControlNets with as many cold LoRAs) runs
  diffusers        StableDiffusion(XL)(ControlNet)Pipeline; per request load_lora_weights + set_adapters +
                   fuse_lora, generate, unfuse_lora + unload_lora_weights: how a typical deployment serves LoRAs;
  ours_<variant>_<mode>  swiftdiffusion's Pipeline, LoRA mode sync or bounded, with engines
                   eager; graphed (CUDA graphs, channels-last); overlap (graphed, ControlNets on side streams);
                   cnasync (overlap, step t uses step t-1's residuals); compiled (overlap, per-step engines
                   through torch.compile before capture),
and records the median of N timed runs after warm-up, per-graph times per call (CUDA events), per-step wall
time, peak GPU memory, LoRA load times, graph capture times and the ratios diffusers/ours, and the FLOP floor of a
step (the UNet and a ControlNet on the CFG batch, counted by `torch.utils.flop_counter`, at a dense peak).

A "cold" LoRA is a new hard link of the file, under a name no cache has seen, whose pages were just dropped
from the page cache. The JSON is rewritten after every section and case; a failing case records its error.

    python perf/gpu_bench.py --out $OUT/gpu_bench.json        # GPU: SD1.5 shapes, fp16, 512x512, 50 steps, N=3
    python perf/gpu_bench.py --family sdxl --out $OUT/gpu_bench_sdxl.json   # GPU: SDXL, 1024x1024, 30 steps
    python perf/gpu_bench.py --dry-run --out /tmp/dry.json     # CPU: tiny model, fp32, 64x64, 4 steps, N=1
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, ControlNetModel  # noqa: E402
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from measuring import evict, image_difference  # noqa: E402
from swiftdiffusion import tiny  # noqa: E402
from swiftdiffusion.controlnets import ControlNetCatalog, LocalControlNets  # noqa: E402
from swiftdiffusion.diffusers_baseline import call_kwargs, fused_loras, pipelines, to_uint8  # noqa: E402
from swiftdiffusion.cuda_graphs import GraphedControlNetCatalog, GraphedEngine, graph_engines  # noqa: E402
from swiftdiffusion.family import FAMILIES, ModelFamily  # noqa: E402
from swiftdiffusion.lora_store import LoraStore  # noqa: E402
from swiftdiffusion.models import LoadedModel, cast, load_components, torch_engines  # noqa: E402
from swiftdiffusion.pipeline import Pipeline  # noqa: E402
from swiftdiffusion.request import ControlNetUse, GenerationRequest, LoraUse  # noqa: E402
from swiftdiffusion.schedulers import make_scheduler  # noqa: E402

# The real models' shapes (random weights).
FULL_SIZES = {
    "sd15": tiny.ModelSize(unet_channels=(320, 640, 1280, 1280), norm_groups=32, text_widths=(768,),
                           text_layers=(12,), vae_channels=(128, 256, 512, 512), vae_layers=2,
                           controlnet_embedding=(16, 32, 96, 256), lora_rank=64),
    "sdxl": tiny.ModelSize(unet_channels=(320, 640, 1280), norm_groups=32, text_widths=(768, 1280),
                           text_layers=(12, 32), vae_channels=(128, 256, 512, 512), vae_layers=2,
                           controlnet_embedding=(16, 32, 96, 256), lora_rank=32, transformer_depth=(1, 2, 10),
                           attention_heads=(5, 10, 20), time_id_width=256),
}
TEXT_HEADS = {768: 12, 1280: 20}  # CLIP ViT-L's and OpenCLIP bigG's attention heads
# Per family: image size, steps, guidance, scheduler of the GPU runs (SD1.5: as earlier results; SDXL: the base
# model's defaults, its folder's Euler scheduler).
RUN_DEFAULTS = {"sd15": (512, 50, 7.5, "ddim"), "sdxl": (1024, 30, 5.0, None)}
DENSE_PEAK_TFLOPS = 800  # fp16 dense, what an H100/H200 sustains at best (the FLOP floor's yardstick)
EXTRA_VARIANTS = ("overlap", "cnasync", "compiled")
CASES = {"0C/0L": (0, 0), "1C/0L": (1, 0), "1C/1L": (1, 1), "2C/2L": (2, 2)}  # case -> (ControlNets, LoRAs)
CONTROLS = (("canny", 1.0), ("depth", 0.6))
LORAS = (("character_kohya", 0.8), ("style_peft", 0.5))  # kohya (UNet + text encoder), PEFT (UNet + text encoder)
PROMPT, NEGATIVE, SEED = "a photograph of an astronaut riding a horse", "blurry, low quality", 42
TOLERANCE = {"max_abs": 8, "mean_abs": 1.0}  # graph replay against eager, in 1/255 of the uint8 image
START = time.perf_counter()
LINKS = itertools.count()


@dataclasses.dataclass(frozen=True)
class Settings:
    device: str
    dtype: torch.dtype
    size: int
    steps: int
    check_steps: int
    runs: int
    warmup: int
    probe_iters: int
    family: str = "sd15"
    guidance_scale: float = 7.5
    scheduler: str | None = "ddim"

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def say(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


# ---- model on disk ---------------------------------------------------------------------------------------------
def build_full(out: Path, family: ModelFamily, device: str) -> Path:
    """tiny.build_model's layout at the family's real widths, stored in fp16. The VAE (32 norm groups) and the text
    encoders (real heads, CLIP's vocabulary size) are built here since tiny.py fixes those to its small sizes."""
    marker = out / "swiftdiffusion.json"
    if marker.exists() and json.loads(marker.read_text()) == {"size": "full", "family": family.name}:
        return out
    size = FULL_SIZES[family.name]
    torch.manual_seed(0)
    tokenizers = [tiny.build_tokenizer("!" if part.projected else "<|endoftext|>") for part in family.text_encoders]
    with torch.device(device):  # random init on the GPU: seconds instead of minutes on the CPU
        unet = tiny.build_unet(size, family)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=size.vae_channels, layers_per_block=size.vae_layers, latent_channels=4,
                            norm_num_groups=32, sample_size=8 * unet.config.sample_size,
                            scaling_factor=0.18215 if family.name == "sd15" else 0.13025, force_upcast=True)
        texts = [full_text_encoder(size, i, part.projected, tokenizer)
                 for i, (part, tokenizer) in enumerate(zip(family.text_encoders, tokenizers))]
        controlnets = {name: tiny.build_controlnet(unet, size) for name in tiny.CONTROLNET_NAMES}
    modules = {"unet": unet, **{part.component: text for part, text in zip(family.text_encoders, texts)}}
    tiny.write_loras(out / "loras", modules, family, size.lora_rank, seed=0)
    model_dir = out / "model"
    for name, module in (("vae", vae), *modules.items()):
        module.half().save_pretrained(model_dir / name)
    for part, tokenizer in zip(family.text_encoders, tokenizers):
        tokenizer.save_pretrained(model_dir / part.tokenizer)
    for name, controlnet in controlnets.items():
        controlnet.half().save_pretrained(out / "controlnets" / name)
    (model_dir / "scheduler").mkdir(exist_ok=True)
    (model_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(tiny.SCHEDULER_CONFIGS[family.name]))
    (model_dir / "model_index.json").write_text(json.dumps(tiny.model_index(family)))
    marker.write_text(json.dumps({"size": "full", "family": family.name}))
    return out


def full_text_encoder(size: tiny.ModelSize, index: int, projected: bool, tokenizer) -> CLIPTextModel:
    width = size.text_widths[index]
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=size.text_layers[index],
        num_attention_heads=TEXT_HEADS[width], max_position_embeddings=tiny.TEXT_LENGTH,
        hidden_act="gelu" if projected else "quick_gelu", projection_dim=width, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config) if projected else CLIPTextModel(config)


@contextlib.contextmanager
def cold_loras(root: Path, uses: tuple[LoraUse, ...]):
    """The same LoRAs under fresh names (hard links: no bytes written), evicted from the page cache."""
    fresh, paths = [], []
    for use in uses:
        name = f"{use.name}_{next(LINKS)}"
        path = root / "loras" / f"{name}.safetensors"
        os.link(root / "loras" / f"{use.name}.safetensors", path)
        evict(path)
        fresh.append(LoraUse(name, use.scale))
        paths.append(path)
    try:
        yield tuple(fresh)
    finally:
        for path in paths:
            path.unlink()


def lora_read_check(root: Path) -> dict:
    """Read time of each LoRA file right after eviction and again (page cache): shows whether eviction works."""
    result = {}
    for name, _ in LORAS:
        path = root / "loras" / f"{name}.safetensors"
        evict(path)
        begin = time.perf_counter()
        size = len(path.read_bytes())
        cold = time.perf_counter() - begin
        begin = time.perf_counter()
        path.read_bytes()
        result[name] = {"bytes": size, "cold_read_s": cold, "hot_read_s": time.perf_counter() - begin}
    return result


# ---- timing ----------------------------------------------------------------------------------------------------
class Timings:
    """Per-graph call times: CUDA events (read once the run is over) on a GPU, wall clock on a CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: dict[str, list] = collections.defaultdict(list)

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, name: str, start) -> None:
        self.marks[name].append((start, self.start()))

    def medians_ms(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = (lambda a, b: a.elapsed_time(b)) if self.cuda else (lambda a, b: (b - a) * 1e3)
        return {name: statistics.median(elapsed(a, b) for a, b in pairs) for name, pairs in self.marks.items()}


class TimedEngine:
    """An engine that records the time of each call under its graph name."""

    def __init__(self, engine, name: str, timings: Timings):
        self.engine, self.name, self.timings, self.spec = engine, name, timings, engine.spec

    def __call__(self, inputs):
        start = self.timings.start()
        outputs = self.engine(inputs)
        self.timings.stop(self.name, start)
        return outputs

    def patch(self, patch) -> None:
        self.engine.patch(patch)

    def restore(self) -> None:
        self.engine.restore()


class TimedControlNets(LocalControlNets):
    """Times submission only: with overlap on, the work itself runs on a side stream (see step_wall_ms)."""

    def __init__(self, catalog: ControlNetCatalog, timings: Timings, overlap: bool):
        super().__init__(catalog, overlap)
        self.timings = timings

    def submit(self, name, inputs):
        start = self.timings.start()
        future = super().submit(name, inputs)
        self.timings.stop("controlnet", start)
        return future


def time_module(module: torch.nn.Module, name: str, timings: Timings) -> None:
    starts = []
    module.register_forward_pre_hook(lambda _module, _args: starts.append(timings.start()))
    module.register_forward_hook(lambda _module, _args, _out: timings.stop(name, starts.pop()))


def step_wall_ms(stamps: list[float]) -> float | None:
    return statistics.median(np.diff(stamps)) * 1e3 if len(stamps) > 1 else None


def call_ms(fn: Callable[[], object], settings: Settings) -> float:
    """Median time of one call after warm-up, CUDA events on a GPU."""
    timings = Timings(settings.cuda)
    for _ in range(3 if settings.cuda else 1):
        fn()
    for _ in range(settings.probe_iters):
        start = timings.start()
        fn()
        timings.stop("call", start)
    return timings.medians_ms()["call"]


def synced_s(fn: Callable[[], object], cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    begin = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - begin


def mb(value: int) -> float:
    return round(value / 2**20, 1)


# ---- requests --------------------------------------------------------------------------------------------------
def make_request(settings: Settings, controls: int, loras: int, mode: str = "sync",
                 steps: int | None = None) -> GenerationRequest:
    return GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=steps or settings.steps,
        guidance_scale=settings.guidance_scale, height=settings.size, width=settings.size,
        scheduler=settings.scheduler, lora_mode=mode,
        controlnets=tuple(ControlNetUse(name, tiny.control_image(i, settings.size), scale)
                          for i, (name, scale) in enumerate(CONTROLS[:controls])),
        loras=tuple(LoraUse(name, scale) for name, scale in LORAS[:loras]))


def image_stats(image: np.ndarray) -> dict:
    return {"mean": float(image.mean()), "std": float(image.std())}


def within_tolerance(diff: dict) -> bool:
    return diff["max_abs"] <= TOLERANCE["max_abs"] and diff["mean_abs"] <= TOLERANCE["mean_abs"]


# ---- the two systems -------------------------------------------------------------------------------------------
class Diffusers:
    """diffusers' pipelines over their own copy of the weights; per request LoRAs loaded, fused, unfused, unloaded."""

    def __init__(self, root: Path, settings: Settings):
        self.root = root
        self.timings = Timings(settings.cuda)
        self.components = load_components(root / "model")
        for module in self.components.pipeline_parts().values():
            if isinstance(module, torch.nn.Module):
                cast(module, settings.device, settings.dtype)
        self.unet = self.components.unet
        self.controlnets = {name: ControlNetModel.from_pretrained(
            root / "controlnets" / name, torch_dtype=settings.dtype, local_files_only=True).to(settings.device)
            for name, _ in CONTROLS}
        time_module(self.unet, "unet", self.timings)
        for controlnet in self.controlnets.values():
            time_module(controlnet, "controlnet", self.timings)

    def pipeline(self, request: GenerationRequest):
        scheduler = make_scheduler(request.scheduler, self.components.scheduler_config, request.seed)
        plain, control = pipelines(self.components, scheduler)
        if not request.controlnets:
            return plain
        control.controlnet = MultiControlNetModel([self.controlnets[c.name] for c in request.controlnets])
        return control

    def run(self, pipe, request: GenerationRequest) -> dict:
        stamps: list[float] = []

        def on_step(_pipe, _index, _t, callback_kwargs):
            stamps.append(time.perf_counter())
            return callback_kwargs

        begin = time.perf_counter()
        with fused_loras(pipe, [str(self.root / "loras" / f"{lora.name}.safetensors") for lora in request.loras],
                         [lora.scale for lora in request.loras]):
            loaded = time.perf_counter()
            image = pipe(**call_kwargs(request), callback_on_step_end=on_step).images[0]
            done = time.perf_counter()
        end = time.perf_counter()
        return {"seconds": end - begin, "latency_s": done - begin, "lora_load_s": loaded - begin,
                "lora_unload_s": end - done, "step_wall_ms": step_wall_ms(stamps),
                "finite": bool(np.isfinite(image).all()), "image": to_uint8(np.nan_to_num(image))}


@dataclasses.dataclass
class Ours:
    """swiftdiffusion's pipeline over one set of engines (eager or graphed), timed per graph."""

    pipeline: Pipeline
    store: LoraStore
    timings: Timings
    model: LoadedModel
    catalog: ControlNetCatalog
    controlnet_mode: str = "overlap"

    @classmethod
    def create(cls, root: Path, model: LoadedModel, catalog: ControlNetCatalog, settings: Settings,
               overlap: bool = False, controlnet_mode: str = "overlap") -> Ours:
        """`overlap`: ControlNets on their own CUDA streams; `controlnet_mode` async: step t uses step t-1's
        residuals."""
        timings = Timings(settings.cuda)
        timed = dataclasses.replace(model, engines={n: TimedEngine(e, n, timings) for n, e in model.engines.items()})
        store = LoraStore(root / "loras", model.lora_target, model.device, model.dtype)
        return cls(Pipeline(timed, TimedControlNets(catalog, timings, overlap), store), store, timings, model,
                   catalog, controlnet_mode)

    def run(self, request: GenerationRequest, exact_lora_step: int | None = None) -> dict:
        request = dataclasses.replace(request, controlnet_mode=self.controlnet_mode)
        stamps: list[float] = []
        begin = time.perf_counter()
        result = self.pipeline.generate(request, lambda _done, _total, seconds: stamps.append(seconds),
                                        exact_lora_step)
        seconds = time.perf_counter() - begin
        return {"seconds": seconds, "latency_s": seconds, "lora_load_s": result.timings.load_s,
                "lora_step": result.lora_step, "lora_wait_s": result.lora_wait_s,
                "step_wall_ms": step_wall_ms(stamps), "image": result.image}

    def graphed(self) -> dict[str, GraphedEngine]:
        engines = {**self.model.engines, **{f"controlnet:{n}": e for n, e in self.catalog.cache.entries.items()}}
        return {name: engine for name, engine in engines.items() if isinstance(engine, GraphedEngine)}

    def capture_s(self) -> dict[str, float]:
        return {name: round(sum(e.capture_s.values()), 3) for name, e in self.graphed().items() if e.capture_s}

    def capture_failures(self) -> dict[str, list[str]]:
        return {name: list(e.failures.values()) for name, e in self.graphed().items() if e.failures}


def measure(run_once: Callable[[], dict], timings: Timings, settings: Settings) -> dict:
    """Warm-up runs, then `runs` timed ones: medians, per-graph call times, peak GPU memory, the last image."""
    warmup_s = [run_once()["seconds"] for _ in range(settings.warmup)]
    timings.marks.clear()
    if settings.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    runs = [run_once() for _ in range(settings.runs)]
    result = {"warmup_s": warmup_s, "runs_s": [r["seconds"] for r in runs]}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r[key], (int, float)) and not isinstance(r[key], bool)]
        if values:
            result[f"median_{key}" if key != "seconds" else "median_s"] = statistics.median(values)
    result["graph_ms"] = timings.medians_ms()
    if settings.cuda:
        peak = torch.cuda.max_memory_allocated()
        result.update(peak_allocated_mb=mb(peak), resident_mb=mb(resident), peak_extra_mb=mb(peak - resident),
                      reserved_mb=mb(torch.cuda.memory_reserved()))
    result["finite"] = all(r.get("finite", True) for r in runs)
    result["image"] = image_stats(runs[-1]["image"])
    result["_image"] = runs[-1]["image"]
    return result


# ---- sections --------------------------------------------------------------------------------------------------
def device_checks(eager: Ours, replay: Ours, root: Path, settings: Settings) -> dict:
    """Graph replay against eager on whole images: plain, LoRA patched before encoding, patched between two
    replays mid-denoise, then restored (image and every UNet/text-encoder weight identical to before)."""
    weights = [eager.model.engines[name].weights for name in eager.model.family.lora_components]
    w0 = [{name: p.detach().clone() for name, p in w.params.items()} for w in weights]
    steps = settings.check_steps
    plain = make_request(settings, 1, 0, steps=steps)
    checks: dict = {"tolerance": TOLERANCE, "steps": steps}

    def compare(label: str, request: GenerationRequest, exact_lora_step: int | None = None) -> np.ndarray:
        with cold_loras(root, request.loras) as uses:
            request = dataclasses.replace(request, loras=uses)
            reference = eager.run(request, exact_lora_step)["image"]
            replayed = replay.run(request, exact_lora_step)["image"]
        diff = image_difference(replayed, reference)
        checks[label] = {**diff, "pass": within_tolerance(diff)}
        say(f"check {label}: {checks[label]}")
        return replayed

    first = compare("1C/0L", plain)
    patched = compare("1C/1L sync", make_request(settings, 1, 1, "sync", steps))
    compare("0C/1L sync", make_request(settings, 0, 1, "sync", steps))
    compare("1C/1L patched between replays", make_request(settings, 1, 1, "bounded", steps), steps // 2)
    checks["lora_changes_image"] = image_difference(patched, first)
    again = replay.run(plain)["image"]
    diff = image_difference(again, first)
    checks["after_restore"] = {**diff, "pass": within_tolerance(diff), "identical": bool(np.array_equal(again, first))}
    checks["restored_weights_identical"] = all(torch.equal(p, w0[i][name]) for i, w in enumerate(weights)
                                               for name, p in w.params.items())
    checks["all_pass"] = (all(v["pass"] for v in checks.values() if isinstance(v, dict) and "pass" in v)
                          and checks["restored_weights_identical"]
                          and checks["lora_changes_image"]["max_abs"] > TOLERANCE["max_abs"])
    checks["capture_s"] = replay.capture_s()
    checks["capture_failures"] = replay.capture_failures()
    say(f"checks: all_pass={checks['all_pass']} after_restore={checks['after_restore']} "
        f"restored_weights_identical={checks['restored_weights_identical']} capture_s={checks['capture_s']} "
        f"failures={checks['capture_failures']}")
    return checks


def run_case(case: str, diffusers_: Diffusers, ours: dict[str, Ours], root: Path, settings: Settings,
             save: Callable[[], None], results: dict, variants: tuple[str, ...], images: dict) -> None:
    """diffusers (the first time a case runs) and these variants of ours; `images` keeps each case's last image
    per system across calls, for the comparisons with diffusers."""
    controls, loras = CASES[case]
    entry = results["cases"].setdefault(case, {})
    images = images.setdefault(case, {})
    modes = ("sync", "bounded") if loras else ("sync",)
    systems: dict[str, Callable[[GenerationRequest], dict]] = {}
    pipe = None

    def diffusers_run(request):
        nonlocal pipe
        if pipe is None:
            pipe = diffusers_.pipeline(request)
        return diffusers_.run(pipe, request)

    if "diffusers" not in entry:
        systems["diffusers"] = diffusers_run
    for variant in variants:
        system = ours[variant]
        if variant in ("overlap", "cnasync") and not controls:
            continue  # they differ from `graphed` only in how ControlNets run
        for mode in modes:
            name = f"ours_{variant}_{mode}" if loras else f"ours_{variant}"
            systems[name] = lambda request, system=system, mode=mode: system.run(
                dataclasses.replace(request, lora_mode=mode))
    for name, run in systems.items():
        say(f"case {case}: {name}")
        request = make_request(settings, controls, loras)
        timings = diffusers_.timings if name == "diffusers" else ours[name.split("_")[1]].timings

        def run_once():
            with cold_loras(root, request.loras) as uses:
                return run(dataclasses.replace(request, loras=uses))

        try:
            system = ours.get(name.split("_")[1]) if name != "diffusers" else None
            capture_before = sum(system.capture_s().values()) if system else 0.0
            entry[name] = measure(run_once, timings, settings)
            if system is not None and system.graphed():
                entry[name]["capture_s_during"] = sum(system.capture_s().values()) - capture_before
            images[name] = entry[name].pop("_image")
        except Exception as error:  # noqa: BLE001 - one failure must not lose the other systems
            entry[name] = {"error": repr(error), "traceback": traceback.format_exc()}
            say(f"case {case}: {name} FAILED: {error!r}")
        else:
            say(f"case {case}: {name} median {entry[name]['median_s']:.3f}s graphs {entry[name]['graph_ms']}")
        if name != "diffusers" and "median_s" in entry.get("diffusers", {}) and "median_s" in entry[name]:
            entry.setdefault("ratios", {})[name] = entry["diffusers"]["median_s"] / entry[name]["median_s"]
            entry.setdefault("ratios_latency", {})[name] = (entry["diffusers"]["median_latency_s"]
                                                            / entry[name]["median_latency_s"])
        if "diffusers" in images and name in images and name.endswith(("sync", "eager", "graphed", "compiled")):
            entry[name]["vs_diffusers"] = image_difference(images[name], images["diffusers"])
        save()


def step_probe(ours: dict[str, Ours], settings: Settings, variants: tuple[str, ...]) -> dict:
    """Each graph alone, per call (CFG batch 2), for these variants of our engines."""
    inputs = probe_inputs(ours["eager"].model, settings)
    result: dict = {}
    for name in (n for n in inputs if n != "controlnet"):
        result[name] = {variant: call_ms(lambda m=ours[variant].model: m.engines[name](inputs[name]), settings)
                        for variant in variants}
    result["controlnet"] = {variant: call_ms(lambda o=ours[variant]: o.catalog.get("canny")(inputs["controlnet"]),
                                             settings) for variant in variants}
    return result


def flop_floor(ours: dict[str, Ours], settings: Settings) -> dict:
    """The work of one CFG step, counted: the UNet and one ControlNet on the batch of two, in TFLOP, and the time
    it takes at the dense fp16 peak (the floor a step cannot beat)."""
    inputs = probe_inputs(ours["eager"].model, settings)
    counts = {}
    for name, call in (("unet", lambda: ours["eager"].model.engines["unet"](inputs["unet"])),
                       ("controlnet", lambda: ours["eager"].catalog.get("canny")(inputs["controlnet"]))):
        with FlopCounterMode(display=False) as counter:
            call()
        counts[name] = counter.get_total_flops() / 1e12
    floor = {case: (counts["unet"] + controls * counts["controlnet"]) / DENSE_PEAK_TFLOPS * 1e3
             for case, controls in (("0C", 0), ("1C", 1), ("2C", 2))}
    return {"unet_tflop": counts["unet"], "controlnet_tflop": counts["controlnet"],
            "peak_tflops": DENSE_PEAK_TFLOPS, "floor_ms_per_step": floor}


def lora_patch_probe(ours: dict[str, Ours], settings: Settings) -> dict:
    """Patching two LoRAs into the UNet and the text encoders, and restoring them."""
    model = ours["eager"].model
    lora_set = ours["eager"].store.load([LoraUse(name, scale) for name, scale in LORAS])
    engines = {component: model.engines[component] for component in model.family.lora_components}
    patch_s, restore_s = [], []
    for _ in range(3):
        patch_s.append(synced_s(lambda: [e.patch(lora_set.patches[c]) for c, e in engines.items()], settings.cuda))
        restore_s.append(synced_s(lambda: [e.restore() for e in engines.values()], settings.cuda))
    return {"two_loras_unet_and_text": statistics.median(patch_s) * 1e3, "restore": statistics.median(restore_s) * 1e3,
            "layers": sum(len(patch.layers) for patch in lora_set.patches.values()), "first_patch_ms": patch_s[0] * 1e3}


def transfer_probe(ours: dict[str, Ours], settings: Settings) -> dict:
    """One ControlNet call's residuals (CFG batch 2): their bytes, and what moving them costs per call through
    host memory (device -> numpy -> device, as BLS with numpy tensors does) against a copy on the device (the
    lower bound a DLPack hand-over between GPUs would approach; peer links are faster than the host path)."""
    inputs = probe_inputs(ours["eager"].model, settings)["controlnet"]
    tensors = list(ours["graphed"].catalog.get("canny")(inputs).values())

    def median_ms(fn: Callable[[], object]) -> float:
        fn()
        return statistics.median(synced_s(fn, settings.cuda) for _ in range(settings.probe_iters)) * 1e3

    return {"bytes": sum(t.numel() * t.element_size() for t in tensors), "tensors": len(tensors),
            "via_host_ms": median_ms(lambda: [torch.from_numpy(t.cpu().numpy()).to(settings.device)
                                              for t in tensors]),
            "device_copy_ms": median_ms(lambda: [t.clone() for t in tensors])}


def cfg_parallel_probe(root: Path, ours: dict[str, Ours], settings: Settings) -> dict:
    """CFG halves as two concurrent batch-1 passes, the unconditional one on a UNet copy with graphs of its own
    (on this same GPU; production puts the copy on a second one), against the batched graphs: images, the LoRA
    patched into both copies bit for bit, seconds per image."""
    model = ours["graphed"].model
    copy = graph_engines(torch_engines(load_components(root / "model", parts=("unet",)), settings.device,
                                       settings.dtype), channels_last=settings.cuda)
    pipeline = Pipeline(model, None, LoraStore(root / "loras", model.lora_target, model.device, model.dtype),
                        cfg_model=copy)
    result: dict = {"tolerance": TOLERANCE}
    images = {}
    for case, loras in (("0C/0L", 0), ("0C/1L", 1)):
        request = make_request(settings, 0, loras)
        entry = result[case] = {}
        for mode in ("batched", "parallel"):
            seconds = []
            for _ in range(settings.warmup + settings.runs):
                with cold_loras(root, request.loras) as uses:
                    begin = time.perf_counter()
                    image = pipeline.generate(dataclasses.replace(request, loras=uses,
                                                                  cfg_parallel=mode == "parallel")).image
                    seconds.append(time.perf_counter() - begin)
            entry[f"{mode}_median_s"] = statistics.median(seconds[settings.warmup:])
            images[case, mode] = image
        if loras:
            main, twin = (dict(m.engines["unet"].engine.module.named_parameters()) for m in (model, copy))
            entry["copy_weights_equal_main"] = all(torch.equal(twin[n], w) for n, w in main.items())
        diff = image_difference(images[case, "parallel"], images[case, "batched"])
        entry["parallel_vs_batched"] = {**diff, "pass": within_tolerance(diff)}
        say(f"cfg_parallel {case}: {entry}")
    result["lora_changes_image"] = image_difference(images["0C/1L", "parallel"], images["0C/0L", "parallel"])
    pipeline.generate(make_request(settings, 0, 0, steps=1))  # both copies restored
    result["all_pass"] = (all(result[c]["parallel_vs_batched"]["pass"] for c in ("0C/0L", "0C/1L"))
                          and result["0C/1L"]["copy_weights_equal_main"]
                          and result["lora_changes_image"]["max_abs"] > TOLERANCE["max_abs"])
    return result


def probe_inputs(model: LoadedModel, settings: Settings) -> dict[str, dict[str, torch.Tensor]]:
    """Inputs of every graph on the CFG batch of two (the VAE's batch of one), as the pipeline gives them."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(settings.device, settings.dtype)

    latent = settings.size // model.vae_scale_factor
    request = make_request(settings, 0, 0)
    encoded = {"encoder_hidden_states": rand(2, tiny.TEXT_LENGTH, model.unet_config["cross_attention_dim"])}
    if "text_embeds" in model.family.added_conditioning:
        encoded["text_embeds"] = rand(2, model.unet_config["projection_class_embeddings_input_dim"]
                                      - 6 * model.unet_config["addition_time_embed_dim"])
    unet = {"sample": rand(2, model.latent_channels, latent, latent),
            "timestep": torch.tensor([500.0], device=settings.device),
            **Pipeline(model).conditioning(request, encoded)}
    hidden = model.engines["unet_encoder"](unet)
    texts = {}
    for component, tokenizer in model.tokenizers.items():
        ids = torch.randint(0, len(tokenizer), (2, tiny.TEXT_LENGTH), generator=generator).to(settings.device)
        texts[component] = {"input_ids": ids, "hidden_layer": torch.full(
            (2,), model.text_layers[component] - model.family.skipped_layers, device=settings.device)}
    return {"unet": unet, "unet_encoder": unet,
            "unet_decoder": {**hidden, "encoder_hidden_states": unet["encoder_hidden_states"]}, **texts,
            "vae_decoder": {"latent": rand(1, model.latent_channels, latent, latent)},
            "controlnet": {**unet, "controlnet_cond": rand(2, 3, settings.size, settings.size)}}


def attention_processors(module: torch.nn.Module) -> dict[str, int]:
    return dict(collections.Counter(type(p).__name__ for p in module.attn_processors.values()))


# ---- main ------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else None
    parser.add_argument("--out", type=Path, default=default_out, required=default_out is None)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, fp32, 64x64, 4 steps, N=1")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd15",
                        help="the model family: its real shapes, size, steps, guidance and scheduler")
    parser.add_argument("--root", type=Path, default=Path("/tmp/gpu_bench"),
                        help="where the model of real shapes is built (a folder per family)")
    parser.add_argument("--cases", nargs="*", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variants", nargs="*", choices=EXTRA_VARIANTS, default=list(EXTRA_VARIANTS),
                        help="extra graphed variants: ControlNets on side streams (cases with ControlNets); "
                             "and asynchronous residuals; side streams plus per-step engines through torch.compile "
                             "(measured last, after its own device checks)")
    parser.add_argument("--skip-eager", action="store_true", help="measure only graphed variants (and diffusers)")
    parser.add_argument("--cfg-parallel", action="store_true",
                        help="also CFG halves on two concurrent graphs, the unconditional one on a UNet copy")
    parser.add_argument("--steps", type=int, help="default: 50 for sd15, 30 for sdxl")
    parser.add_argument("--size", type=int, help="default: 512 for sd15, 1024 for sdxl")
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # a second adapter: expected
    size, steps, guidance, scheduler = RUN_DEFAULTS[args.family]
    family_settings = dict(family=args.family, guidance_scale=guidance, scheduler=scheduler)
    if args.dry_run:
        settings = Settings("cpu", torch.float32, 64, 4, 2, runs=1, warmup=0, probe_iters=1, **family_settings)
        torch.set_num_threads(1)  # the tiny model gains nothing from more, and CI machines are shared
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --dry-run on a CPU machine")
        settings = Settings("cuda", {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype], args.size or size,
                            args.steps or steps, 20, args.runs, warmup=1, probe_iters=20, **family_settings)
    results: dict = {"settings": {**dataclasses.asdict(settings), "dtype": str(settings.dtype), "cases": args.cases,
                                  "dry_run": args.dry_run},
                     "env": {"python": sys.version.split()[0], "torch": torch.__version__,
                             "diffusers": diffusers.__version__, "numpy": np.__version__,
                             "device": torch.cuda.get_device_name() if settings.cuda else "cpu"},
                     "cases": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        temporary = args.out.with_suffix(".tmp")
        temporary.write_text(json.dumps(results, indent=2, default=str))
        temporary.replace(args.out)

    def section(name: str, fn: Callable[[], object]) -> object:
        say(f"{name} ...")
        begin = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as error:  # noqa: BLE001 - record and go on with the next section
            results[name] = {"error": repr(error), "traceback": traceback.format_exc()}
            say(f"{name} FAILED: {error!r}")
        results.setdefault("section_s", {})[name] = time.perf_counter() - begin
        save()
        return results[name]

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "tiny" if args.dry_run else args.root / args.family

        def build() -> dict:
            if args.dry_run:
                tiny.build_model(root, "tiny", family=args.family)
            else:
                build_full(root, FAMILIES[args.family], settings.device)
            return {"root": str(root), "lora_files": lora_read_check(root)}

        section("build", build)
        state: dict = {}

        def load() -> dict:
            model = torch_engines(load_components(root / "model"), settings.device, settings.dtype)
            graphed_model = graph_engines(model, channels_last=settings.cuda)
            graphed_catalog = GraphedControlNetCatalog(root / "controlnets", settings.device, settings.dtype,
                                                       channels_last=settings.cuda)
            variants = {
                "eager": lambda: Ours.create(root, model, ControlNetCatalog(root / "controlnets", settings.device,
                                                                            settings.dtype), settings),
                "graphed": lambda: Ours.create(root, graphed_model, graphed_catalog, settings),
                "overlap": lambda: Ours.create(root, graphed_model, graphed_catalog, settings, overlap=True),
                "cnasync": lambda: Ours.create(root, graphed_model, graphed_catalog, settings, overlap=True,
                                               controlnet_mode="async"),
                # Everything on: `overlap` plus compiled per-step engines, so `overlap` -> `compiled` is what
                # compilation adds. The modules are graphed_model's, already channels-last; each shape compiles
                # on first use.
                "compiled": lambda: Ours.create(root, graph_engines(model, compile=True), GraphedControlNetCatalog(
                    root / "controlnets", settings.device, settings.dtype, channels_last=settings.cuda, compile=True),
                                                settings, overlap=True)}
            state["ours"] = {name: variants[name]() for name in ("eager", "graphed", *args.variants)}
            state["diffusers"] = Diffusers(root, settings)
            unet = model.engines["unet"].module.unet
            return {"attention_processors": {"ours_unet": attention_processors(unet),
                                             "diffusers_unet": attention_processors(state["diffusers"].unet)},
                    "unet_parameters": sum(p.numel() for p in unet.parameters()),
                    "allocated_mb": mb(torch.cuda.memory_allocated()) if settings.cuda else None}

        section("load", load)
        if "ours" not in state or "diffusers" not in state:
            return 1
        ours = state["ours"]
        images: dict = {}
        section("checks", lambda: device_checks(ours["eager"], ours["graphed"], root, settings))
        if "overlap" in ours:
            section("checks_overlap", lambda: device_checks(ours["eager"], ours["overlap"], root, settings))
        first = tuple(v for v in ours if v != "compiled" and not (args.skip_eager and v == "eager"))
        for case in args.cases:
            run_case(case, state["diffusers"], ours, root, settings, save, results, first, images)
        section("step_probe", lambda: step_probe(ours, settings, ("eager", "graphed")))
        section("flop_floor", lambda: flop_floor(ours, settings))
        section("lora_patch_probe", lambda: lora_patch_probe(ours, settings))
        section("transfer_probe", lambda: transfer_probe(ours, settings))
        if args.cfg_parallel:
            section("cfg_parallel", lambda: cfg_parallel_probe(root, ours, settings))
        if "compiled" in ours:  # last: its first use of each shape compiles for a minute or so
            section("checks_compiled", lambda: device_checks(ours["eager"], ours["compiled"], root, settings))
            for case in args.cases:
                run_case(case, state["diffusers"], ours, root, settings, save, results, ("compiled",), images)
            section("step_probe_compiled", lambda: step_probe(ours, settings, ("compiled",)))
    results["summary"] = {**{f"{name}_all_pass": results[name].get("all_pass") for name in
                             ("checks", "checks_overlap", "checks_compiled", "cfg_parallel") if name in results},
                          **{
        case: {"median_s": {n: v.get("median_s") for n, v in entry.items() if n.startswith(("diffusers", "ours"))},
               "ratios": entry.get("ratios", {})} for case, entry in results["cases"].items()}}
    save()
    say(json.dumps(results["summary"], indent=2))
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a cold LoRA adds to a request: ours (`sync`, `bounded`) vs the diffusers way, from three sources.

    python perf/lora_bench.py --out perf/results/lora_bench.json

In-process on the `small` model (CPU here; `--device cuda` on a GPU), side by side in one run, interleaved
round by round so that drift hits every case alike. Each request uses a LoRA it has never used before (a fresh
catalog entry per request), so nothing is reused. Sources:
  warm     the file is in the page cache
  cold     the file was just evicted from the page cache (posix_fadvise DONTNEED)
  remote   a loopback HTTP server throttled to `--rate` MB/s (default: the rate at which fetching one file costs
           `--fetch-share` of a request without LoRA, the share production traces show for SDXL LoRAs)
The diffusers way is `load_lora_weights` + `set_adapters` + `fuse_lora`, run, `unfuse_lora` + `unload_lora_weights`
on a diffusers pipeline over the same weights (warm files).
Then a closed loop at concurrency 2 (requests queue for the one pipeline, as for a denoiser instance) with cold
remote LoRAs in `bounded` mode, without and with the look-ahead prefetch. The per-size decode breakdown against
`load_file` is perf/lora_decode_bench.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import http.server
import io
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from measuring import evict, seconds
from swiftdiffusion.diffusers_baseline import call_kwargs, fused_loras
from swiftdiffusion.lora_store import LoraStore
from swiftdiffusion.models import load_components, torch_engines
from swiftdiffusion.pipeline import Pipeline
from swiftdiffusion.schedulers import make_scheduler
from swiftdiffusion.request import GenerationRequest, LoraUse
from swiftdiffusion.tiny import SIZE_NAMES, SIZES, ensure_model, model_lora_targets, random_lora

PROJECT = Path(__file__).resolve().parents[1]


class ThrottledHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files at `rate` bytes per second per connection, in 64 KiB chunks, with byte ranges (as object
    stores do, whose per-connection rate parallel range reads multiply)."""

    rate = 200e6

    def do_GET(self):
        wanted = self.headers.get("Range", "")
        path = Path(self.translate_path(self.path))
        if not wanted.startswith("bytes=") or not path.is_file():
            return super().do_GET()
        size = path.stat().st_size
        first, _, last = wanted.removeprefix("bytes=").partition("-")
        start, end = int(first or 0), min(int(last) if last else size - 1, size - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        with path.open("rb") as file:
            file.seek(start)
            self.copyfile(io.BytesIO(file.read(end - start + 1)), self.wfile)

    def copyfile(self, source, destination):
        began = time.perf_counter()
        sent = 0
        while chunk := source.read(65536):
            destination.write(chunk)
            sent += len(chunk)
            ahead = sent / self.rate - (time.perf_counter() - began)
            if ahead > 0:
                time.sleep(ahead)

    def log_message(self, *args):
        pass


def write_catalog(folder: Path, components, count: int, rank: int) -> list[str]:
    """`count` distinct kohya-format LoRAs (UNet and text-encoder layers): every request gets a new one."""
    folder.mkdir(parents=True, exist_ok=True)
    targets = model_lora_targets(components.lora_modules())
    names = []
    for index in range(count):
        tensors = random_lora(targets, rank, torch.Generator().manual_seed(10_000 + index), "kohya", rank)
        names.append(f"bench_{index:03d}")
        save_file(tensors, folder / f"{names[-1]}.safetensors")
    return names


def remote_url(httpd) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def closed_loop(pipeline: Pipeline, requests: list[GenerationRequest], store: LoraStore | None,
                prefetch: bool) -> list[float]:
    """Two clients, one pipeline (one denoiser instance): each client sends its next request when its last one
    returns, and requests wait in FIFO order for the pipeline, as in Triton's queue. With `prefetch` a request's
    LoRAs start coming when it is queued, as the ensemble's `lora_prefetch` step does. Latencies in seconds."""
    if store is not None:
        pipeline.loras = store
    denoiser = concurrent.futures.ThreadPoolExecutor(1)
    pending = iter(requests)
    lock = threading.Lock()
    latencies: list[float] = []

    def client() -> None:
        while True:
            with lock:
                request = next(pending, None)
            if request is None:
                return
            begin = time.perf_counter()
            if prefetch:
                store.source.prefetch([lora.name for lora in request.loras])
            denoiser.submit(pipeline.generate, request).result()
            with lock:
                latencies.append(time.perf_counter() - begin)

    clients = [threading.Thread(target=client) for _ in range(2)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    denoiser.shutdown()
    return latencies


def queued_with_prefetch(pipeline: Pipeline, base: GenerationRequest, names, url: str, model, args) -> dict:
    """Mean latency at concurrency 2: no LoRA, a cold remote LoRA per request (`bounded`) without and with the
    look-ahead prefetch, each request with a LoRA never fetched before."""
    count = 2 * args.rounds + 2
    plain = [base] * count

    def with_loras() -> list[GenerationRequest]:
        return [dataclasses.replace(base, loras=(LoraUse(next(names), 0.8),), lora_mode="bounded")
                for _ in range(count)]

    def store() -> LoraStore:
        copies = PROJECT / "build" / "lora_bench_copies"
        shutil.rmtree(copies, ignore_errors=True)
        return LoraStore(url, model.lora_target, model.device, model.dtype, copies_dir=copies)

    means = {"no_lora": statistics.mean(closed_loop(pipeline, plain, None, False)),
             "bounded_remote": statistics.mean(closed_loop(pipeline, with_loras(), store(), False)),
             "bounded_remote_prefetch": statistics.mean(closed_loop(pipeline, with_loras(), store(), True))}
    return {"requests_per_case": count, "mean_latency_s": means,
            "added_vs_no_lora": {case: means[case] / means["no_lora"] - 1 for case in means if case != "no_lora"}}


def diffusers_request(pipe, request: GenerationRequest, lora_file: Path | None) -> None:
    sources = [] if lora_file is None else [str(lora_file)]
    with fused_loras(pipe, sources, [lora.scale for lora in request.loras][:len(sources)]):
        pipe(**call_kwargs(request))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=SIZE_NAMES)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rate", type=float, default=None, help="remote source MB/s (default: from --fetch-share)")
    parser.add_argument("--fetch-share", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=PROJECT / "perf" / "results" / "lora_bench.json")
    args = parser.parse_args()

    root = ensure_model(PROJECT / "models" / args.size, args.size)
    components = load_components(root / "model")
    catalog = PROJECT / "build" / "lora_bench_catalog"
    shutil.rmtree(catalog, ignore_errors=True)
    names = iter(write_catalog(catalog, components, 12 * args.rounds + 12, SIZES["sd15"][args.size].lora_rank))
    reference = load_components(root / "model")  # diffusers gets its own copy of the weights
    model = torch_engines(components, args.device, torch.float32)
    local = LoraStore(catalog, model.lora_target, model.device, model.dtype)
    pipeline = Pipeline(model, loras=local)
    pipe = StableDiffusionPipeline(**reference.pipeline_parts(),
                                   scheduler=make_scheduler("ddim", reference.scheduler_config, 0))
    pipe.set_progress_bar_config(disable=True)
    base = GenerationRequest("a castle in the clouds", negative_prompt="blurry", seed=1, steps=args.steps,
                             height=args.resolution, width=args.resolution)
    pipeline.generate(base)  # warm-up
    no_lora = statistics.median(seconds(lambda: pipeline.generate(base)) for _ in range(2))
    file_bytes = (catalog / "bench_000.safetensors").stat().st_size
    rate = args.rate * 1e6 if args.rate else file_bytes / (args.fetch_share * no_lora)
    ThrottledHandler.rate = rate
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(ThrottledHandler,
                                                                                 directory=str(catalog)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    remote = LoraStore(remote_url(httpd), model.lora_target, model.device, model.dtype,
                       copies_dir=PROJECT / "build" / "lora_bench_copies")

    def ours(mode: str, store: LoraStore, source: str):
        def run():
            name = next(names)
            if source == "cold":
                evict(catalog / f"{name}.safetensors")
            pipeline.loras = store
            result = pipeline.generate(dataclasses.replace(base, loras=(LoraUse(name, 0.8),), lora_mode=mode))
            steps_applied.setdefault(f"{mode}_{source}", []).append(result.lora_step)
        return run

    steps_applied: dict[str, list[int]] = {}
    cases = {
        "ours_no_lora": lambda: pipeline.generate(base),
        **{f"ours_{mode}_{source}": ours(mode, store, source)
           for mode in ("sync", "bounded") for source, store in (("warm", local), ("cold", local), ("remote", remote))},
        "diffusers_no_lora": lambda: diffusers_request(pipe, base, None),
        "diffusers_lora_warm": lambda: diffusers_request(
            pipe, dataclasses.replace(base, loras=(LoraUse("x", 0.8),)), catalog / f"{next(names)}.safetensors"),
    }
    diffusers_request(pipe, base, None)  # warm-up
    samples: dict[str, list[float]] = {case: [] for case in cases}
    for round_index in range(args.rounds):
        for case, run in cases.items():
            samples[case].append(seconds(run))
        print(f"round {round_index + 1}/{args.rounds}:", {k: round(v[-1], 3) for k, v in samples.items()}, flush=True)
    queued = queued_with_prefetch(pipeline, base, names, remote_url(httpd), model, args)
    httpd.shutdown()

    medians = {case: statistics.median(values) for case, values in samples.items()}
    report = {
        "machine": f"{os.cpu_count()} CPU cores" if args.device == "cpu" else torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python perf/lora_bench.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                           if k != "out"),
        "model": args.size, "resolution": args.resolution, "steps": args.steps, "rounds": args.rounds,
        "lora_file_bytes": file_bytes, "remote_rate_MBps": rate / 1e6,
        "remote_fetch_s": file_bytes / rate,
        "median_s": medians, "samples_s": samples,
        "added_vs_no_lora": {case: medians[case] / medians["ours_no_lora"] - 1 for case in medians if
                             case.startswith("ours_")},
        "diffusers_added_vs_no_lora": medians["diffusers_lora_warm"] / medians["diffusers_no_lora"] - 1,
        "lora_step_applied": steps_applied,
        "closed_loop_concurrency_2": queued,
    }
    report["added_vs_no_lora"]["diffusers_lora_warm"] = report["diffusers_added_vs_no_lora"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("added_vs_no_lora", "remote_rate_MBps", "lora_step_applied",
                                             "closed_loop_concurrency_2")}, indent=2))
    print(args.out)


if __name__ == "__main__":
    main()

"""A cold LoRA's way to patch-ready, per size and source, against the floor: `load_file` of the same file.

    python perf/lora_decode_bench.py --out perf/results/lora_decode_bench.json

SD1.5's widths (UNet and text encoder shapes from meta-device modules; no weights are built), kohya files
(UNet + text encoder, fp16 on disk) of rank 8, 64 and 128. Each sample reads a file never read before by that
store (a fresh copy), so neither the host cache nor a plan of the previous sample's file... the plan is per
layout, so after the first file of a rank every file goes through it, as in production. Sources:
  page_cache  the file is in the page cache
  cold        evicted from the page cache just before (posix_fadvise DONTNEED)
  remote      a loopback HTTP server throttled to --rate MB/s (copied once into the local copies folder)
Side by side, interleaved, in one run: `safetensors.torch.load_file` (the floor), ours (split into read, decode,
stage), the previous path (bytes read, parsed, converters every time), and ours' first call after `warm()`.
Patching is not here: it needs the model's weights (perf/gpu_bench.py measures it on a GPU, 4.6 ms for two
rank-64 LoRAs on an H100).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file

from lora_bench import ThrottledHandler
from lora_value_check import lora_target, sd15_modules, write_lora
from measuring import evict, seconds
from swiftdiffusion import lora
from swiftdiffusion.lora_store import LoraStore
from swiftdiffusion.request import LoraUse


def previous_path(path: Path, shapes, dtype: torch.dtype) -> None:
    """Before the fast path: the file's bytes read, parsed, and every file through the converters."""
    data = path.read_bytes()
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    factors = lora.decode_lora("previous", lora.LoraFile(load_bytes(data), metadata, len(data)), shapes)
    for component in ("unet", "text_encoder"):
        lora.build_patch(component, [(factors, 0.8)], torch.device("cpu"), dtype)


def bench_rank(rank: int, folder: Path, url: str, shapes, modules, args) -> dict:
    source = folder / f"rank{rank}.safetensors"
    write_lora(source, *modules, rank, torch.float16)
    copies = iter(range(10_000))

    def fresh() -> tuple[str, Path]:
        name = f"rank{rank}_{next(copies)}"
        shutil.copy(source, folder / f"{name}.safetensors")
        return name, folder / f"{name}.safetensors"

    stores = {"page_cache": LoraStore(folder, shapes, torch.device("cpu"), torch.float32, cache_mb=0),
              "cold": LoraStore(folder, shapes, torch.device("cpu"), torch.float32, cache_mb=0),
              "remote": LoraStore(url, shapes, torch.device("cpu"), torch.float32, cache_mb=0,
                                  copies_dir=folder / "copies")}
    first = LoraStore(folder, shapes, torch.device("cpu"), torch.float32, cache_mb=0)
    first.warm()
    name, path = fresh()
    split = first.load([LoraUse(name, 0.8)])
    result = {"file_mb": source.stat().st_size / 1e6,
              "first_call_after_warm": {"total_s": split.load_s, "read_s": split.read_s, "decode_s": split.decode_s,
                                        "stage_s": split.stage_s}}
    for store in stores.values():  # each store's plan for this layout, as after its first request
        store.load([LoraUse(fresh()[0], 0.8)])
    samples: dict[str, list] = {k: [] for k in ("load_file", "previous_path", *stores)}
    for _ in range(args.runs):
        name, path = fresh()
        samples["load_file"].append(seconds(lambda: load_file(path)))
        samples["previous_path"].append(seconds(lambda: previous_path(path, shapes, torch.float32)))
        for source_name, store in stores.items():
            name, path = fresh()
            if source_name == "cold":
                evict(path)
            loaded = store.load([LoraUse(name, 0.8)])
            samples[source_name].append({"total_s": loaded.load_s, "read_s": loaded.read_s,
                                         "decode_s": loaded.decode_s, "stage_s": loaded.stage_s})
    floor = statistics.median(samples["load_file"])
    result["load_file_s"] = floor
    result["previous_path_s"] = statistics.median(samples["previous_path"])
    for source_name in stores:
        result[source_name] = {part: statistics.median(s[part] for s in samples[source_name])
                               for part in ("total_s", "read_s", "decode_s", "stage_s")}
        result[source_name]["x_load_file"] = result[source_name]["total_s"] / floor
    result["first_call_x_load_file"] = result["first_call_after_warm"]["total_s"] / floor
    result["previous_x_load_file"] = result["previous_path_s"] / floor
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 128])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--rate", type=float, default=200.0, help="remote source, MB/s")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    modules = sd15_modules()
    shapes = lora_target(*modules)
    ThrottledHandler.rate = args.rate * 1e6
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1] / "build") as tmp:
        folder = Path(tmp)
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(ThrottledHandler,
                                                                                     directory=str(folder)))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        try:
            ranks = {str(rank): bench_rank(rank, folder, url, shapes, modules, args) for rank in args.ranks}
        finally:
            httpd.shutdown()
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d"), "remote_rate_MBps": args.rate, "runs": args.runs,
        "engine_dtype": "float32", "file_dtype": "float16", "request_scale": 0.8, "ranks": ranks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for rank, r in ranks.items():
        print(f"rank {rank}: {r['file_mb']:.0f} MB, load_file {r['load_file_s'] * 1e3:.1f} ms, ours "
              + ", ".join(f"{s} {r[s]['total_s'] * 1e3:.1f} ms ({r[s]['x_load_file']:.1f}x)"
                          for s in ("page_cache", "cold", "remote"))
              + f", first call {r['first_call_x_load_file']:.1f}x, previous path {r['previous_x_load_file']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

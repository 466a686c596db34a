"""`make bench`: ours (`text_to_image`) against a typical diffusers deployment (`baseline_diffusers`), same server.

    python perf/bench.py --out perf/results                       # builds models/small + catalogs, starts a server
    python perf/bench.py --family sdxl --out perf/results/bench_sdxl   # the same on the small SDXL model
    python perf/bench.py --url 127.0.0.1:8001 --controlnets DIR --loras DIR --out DIR   # a running server

Both systems get the same requests: production-shaped mixes (`swiftdiffusion.workload`, services A and B), the
same seeded traces, one system at a time on one tritonserver. Phases:
1. warm-up (every ControlNet loaded, first calls done);
2. closed loop on mix A at concurrency 1..N: single-request cost and peak throughput;
3. open loop (Poisson) per mix at offered loads given as fractions of the baseline's single-request service
   rate on mix A (or absolute `--rates`), so the run sizes itself to the machine.
4. optionally (`--perf-analyzer 1:3`) perf_analyzer over both models, into OUT/perf_analyzer.
Writes bench.json, bench.md, PNG charts and the traces it sent (replayable with perf/workload.py).

The defaults (small model, 192x192, 10 steps, 12 requests per open-loop run) take about 12-15 minutes on 2 CPU
cores, where one mix-A request costs about 3 s (ours) and 4.5 s (baseline) alone; 256x256 doubles that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from swiftdiffusion.models import load_components
from swiftdiffusion.serve import SHM_ARGS
from swiftdiffusion.tiny import (LORA_FORMATS, SIZE_NAMES, SIZES, add_controlnets, ensure_model, model_lora_targets,
                                 random_lora)
from swiftdiffusion.triton.launcher import TritonServer, free_ports
from swiftdiffusion.triton.repository import Deployment, write_repository
from swiftdiffusion.workload import (TraceEntry, catalog_names, generate, mix, read_trace, run_closed_loop,
                                     run_open_loop, summarize, write_trace)

PROJECT = Path(__file__).resolve().parents[1]
SYSTEMS = {"ours": "text_to_image", "baseline": "baseline_diffusers"}
EXTRA_CONTROLNETS = ("openpose", "segmentation")  # sort after canny and depth: the popularity order
# Histogram sums on the metrics endpoint: the time a request's critical path spent on LoRAs, per system.
LORA_METRICS = {
    "ours": {"wait": ("swiftdiffusion_lora_wait_seconds", "denoiser"),
             "patch": ("swiftdiffusion_lora_patch_seconds", "denoiser"),
             "restore": ("swiftdiffusion_lora_restore_seconds", "denoiser"),
             "load_background": ("swiftdiffusion_lora_load_seconds", "denoiser")},
    "baseline": {"load_fuse_unfuse_unload": ("swiftdiffusion_baseline_lora_seconds", "baseline_diffusers")},
}
CRITICAL = {"ours": ("wait", "patch", "restore"), "baseline": ("load_fuse_unfuse_unload",)}


# ---- catalogs -------------------------------------------------------------------------------------------------
def prepare(root: Path, size: str, lora_count: int, seed: int = 0, family: str = "sd15") -> tuple[Path, Path, Path]:
    """The model, a ControlNet catalog with two more ControlNets, a catalog of `lora_count` LoRAs (built once)
    plus the model's three named ones."""
    ensure_model(root, size, seed, family)
    model, controlnets, loras = root / "model", root / "controlnets", root / "lora_catalog"
    add_controlnets(root, EXTRA_CONTROLNETS, size, seed, family)
    if len(list(loras.glob("lora_*.safetensors"))) != lora_count:
        write_lora_catalog(loras, load_components(model, parts=("text", "unet")).lora_modules(),
                           SIZES[family][size].lora_rank, lora_count, seed)
    for builtin in (root / "loras").glob("*.safetensors"):  # the names perf/inputs (perf_analyzer) ask for
        shutil.copy(builtin, loras / builtin.name)
    return model, controlnets, loras


def write_lora_catalog(out: Path, modules: dict, rank: int, count: int, seed: int) -> None:
    """`lora_000..`: random LoRAs (UNet and text encoders: component -> module) in the three real key formats in
    turn, as `tiny.write_loras` writes its three."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    formats = sorted(set(LORA_FORMATS.values()))
    for index in range(count):
        key_format = formats[index % len(formats)]
        generator = torch.Generator().manual_seed(seed * 1_000_000 + index)
        targets = model_lora_targets({c: m for c, m in modules.items() if c == "unet" or key_format != "diffusers"})
        alpha = rank / 2 if key_format == "kohya" else rank
        save_file(random_lora(targets, rank, generator, key_format, alpha), out / f"lora_{index:03d}.safetensors",
                  metadata={"format": "pt"})


# ---- LoRA time from the metrics endpoint ----------------------------------------------------------------------
METRIC_LINE = re.compile(r'^(\w+)_sum\{([^}]*)\}\s+(\S+)$')


def scrape(metrics_url: str | None) -> dict[tuple[str, str], float] | None:
    """(histogram, model) -> sum of observations so far; None without a metrics endpoint."""
    if metrics_url is None:
        return None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    sums = {}
    for line in opener.open(metrics_url, timeout=10).read().decode().splitlines():
        match = METRIC_LINE.match(line)
        if match:
            model = re.search(r'model="([^"]*)"', match.group(2))
            sums[(match.group(1), model.group(1) if model else "")] = float(match.group(3))
    return sums


def lora_seconds(system: str, before, after, completed: int) -> dict | None:
    """Mean seconds per completed request in each LoRA phase, and `critical_s`: those on the request's path."""
    if before is None or after is None or not completed:
        return None
    phases = {phase: (after.get(key, 0.0) - before.get(key, 0.0)) / completed
              for phase, key in LORA_METRICS[system].items()}
    return {**phases, "critical_s": sum(phases[p] for p in CRITICAL[system])}


# ---- runs -----------------------------------------------------------------------------------------------------
def measure(kind: str, system: str, mix_name: str, entries: list[TraceEntry], args, extra: dict) -> dict:
    before = scrape(args.metrics_url)
    if kind == "open":
        outcomes, wall = run_open_loop(args.url, SYSTEMS[system], entries, args.timeout)
    else:
        outcomes, wall = run_closed_loop(args.url, SYSTEMS[system], entries, extra["concurrency"], args.timeout)
    stats = summarize(outcomes, wall)
    if kind == "open":  # a short Poisson sample arrives faster or slower than its nominal rate
        stats["arrival_per_min"] = 60.0 * len(entries) / max(entries[-1].time_s, 1e-9)
    run = {"kind": kind, "system": system, "mix": mix_name, **extra, **stats,
           "lora_s": lora_seconds(system, before, scrape(args.metrics_url), stats["requests"] - stats["failures"]),
           "latencies_s": [o.latency_s for o in outcomes if o.ok], "errors": sorted({o.error for o in outcomes
                                                                                    if not o.ok})[:5]}
    load = ", ".join(f"{k} {v:.3g}" for k, v in extra.items())
    print(f"{kind:6} {system:8} mix {mix_name} {load}: mean {_fmt(stats['mean_s'])} s, p95 {_fmt(stats['p95_s'])} s, "
          f"{stats['throughput_per_min']:.1f}/min, {stats['failures']} failed", flush=True)
    return run


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def benchmark(args) -> dict:
    controlnets, loras = catalog_names(args.controlnets, args.loras)
    shape = dict(steps=args.steps, size=args.resolution)
    warmup = [TraceEntry(0.0, tuple(controlnets[:4]), tuple(loras[:2]), seed=10_000 + i, **shape)
              for i in range(args.warmup)]
    for system in SYSTEMS:
        run_closed_loop(args.url, SYSTEMS[system], warmup, 1, args.timeout)
    runs = []
    closed = generate(mix("A"), args.closed_requests, controlnets, loras, seed=args.seed, **shape)
    for concurrency in args.concurrency:
        for system in SYSTEMS:
            runs.append(measure("closed", system, "A", closed, args, {"concurrency": concurrency}))
    single = {r["system"]: r["mean_s"] for r in runs if r["kind"] == "closed" and r["concurrency"] == 1}
    if args.trace is not None:
        traces = {("trace", None): read_trace(args.trace)}
    else:
        if args.rates is None and not single.get("baseline"):
            raise SystemExit("offered loads need the baseline's single-request time: add concurrency 1, or --rates")
        rates = args.rates or [60.0 * load / single["baseline"] for load in args.loads]
        traces = {(name, rate): generate(mix(name), args.requests, controlnets, loras, rate_per_s=rate / 60.0,
                                         seed=args.seed + 1 + i, **shape)
                  for name in args.mixes for i, rate in enumerate(rates)}
    traces_dir = args.out / "traces"
    traces_dir.mkdir(parents=True, exist_ok=True)
    for (name, rate), entries in traces.items():
        offered = rate if rate is not None else 60.0 * len(entries) / max(entries[-1].time_s, 1e-9)
        write_trace(traces_dir / f"mix_{name}_{offered:.2f}_per_min.csv", entries)
        for system in SYSTEMS:
            runs.append(measure("open", system, name, entries, args, {"offered_per_min": offered}))
    swept = None
    if args.perf_analyzer:
        import perf_analyzer  # perf/perf_analyzer.py, next to this script

        folder = args.out / "perf_analyzer"
        perf_analyzer.write_inputs(folder / "inputs", args.resolution, args.steps)
        swept = json.loads(perf_analyzer.sweep(
            args.url, list(SYSTEMS.values()), "1c1l", folder / "inputs", args.perf_analyzer, args.closed_requests,
            folder, ("--max-trials", "3", "--stability-percentage", "1000")).read_text())  # see its --stability
    return {"config": config(args, controlnets, loras), "single_request_s": single, "runs": runs,
            "perf_analyzer": swept,
            "ratios": ratios(runs), "peak_throughput_per_min": {
                s: max((r["throughput_per_min"] for r in runs if r["kind"] == "closed" and r["system"] == s),
                       default=None) for s in SYSTEMS}}


def ratios(runs: list[dict]) -> list[dict]:
    """ours / baseline for every pair of runs with the same workload: below 1 is better for latency."""
    rows = []
    for ours in (r for r in runs if r["system"] == "ours"):
        key = ("concurrency", "offered_per_min")
        base = next(r for r in runs if r["system"] == "baseline" and r["kind"] == ours["kind"]
                    and r["mix"] == ours["mix"] and all(r.get(k) == ours.get(k) for k in key))
        row = {"kind": ours["kind"], "mix": ours["mix"], **{k: ours[k] for k in key if k in ours}}
        for field in ("mean_s", "p50_s", "p95_s", "p99_s", "throughput_per_min"):
            row[field] = ours[field] / base[field] if ours[field] and base[field] else None
        rows.append(row)
    return rows


def config(args, controlnets: list[str], loras: list[str]) -> dict:
    return {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "controlnet_names": controlnets, "lora_catalog_size": len(loras), "cpu_count": os.cpu_count(),
            "machine": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


# ---- reports --------------------------------------------------------------------------------------------------
def charts(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ours": "tab:blue", "baseline": "tab:orange"}
    opened = [r for r in result["runs"] if r["kind"] == "open"]
    mixes = sorted({r["mix"] for r in opened})
    paths = []

    figure, axes = plt.subplots(1, len(mixes), figsize=(5.5 * len(mixes), 4), squeeze=False)
    for axis, name in zip(axes[0], mixes):
        runs = [r for r in opened if r["mix"] == name]
        loads = sorted({r["offered_per_min"] for r in runs})
        for r in runs:
            latencies = np.sort(r["latencies_s"])
            style = ["-", "--", ":", "-."][loads.index(r["offered_per_min"]) % 4]
            axis.step(latencies, np.arange(1, len(latencies) + 1) / max(len(latencies), 1), style, where="post",
                      color=colors[r["system"]], label=f"{r['system']} @ {r['offered_per_min']:.1f}/min")
        axis.set(title=f"mix {name}: latency CDF (open loop)", xlabel="latency (s)", ylabel="fraction of requests")
        axis.legend(fontsize=7)
    paths.append(_save(figure, out / "latency_cdf.png"))

    figure, axes = plt.subplots(2, len(mixes), figsize=(5.5 * len(mixes), 7), squeeze=False)
    for column, name in enumerate(mixes):
        for system in SYSTEMS:
            runs = sorted((r for r in opened if r["mix"] == name and r["system"] == system),
                          key=lambda r: r["offered_per_min"])
            offered = [r["offered_per_min"] for r in runs]
            top, bottom = axes[0][column], axes[1][column]
            top.plot(offered, [r["mean_s"] for r in runs], "o-", color=colors[system], label=f"{system} mean")
            top.plot(offered, [r["p95_s"] for r in runs], "s--", color=colors[system], label=f"{system} p95")
            bottom.plot(offered, [r["throughput_per_min"] for r in runs], "o-", color=colors[system], label=system)
        axes[0][column].set(title=f"mix {name}: latency vs offered load", xlabel="offered (requests/min)",
                            ylabel="latency (s)")
        axes[1][column].set(title=f"mix {name}: throughput vs offered load", xlabel="offered (requests/min)",
                            ylabel="completed (images/min)")
        for axis in axes[:, column]:
            axis.legend(fontsize=7)
    paths.append(_save(figure, out / "load_sweep.png"))

    closed = [r for r in result["runs"] if r["kind"] == "closed"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for system in SYSTEMS:
        runs = sorted((r for r in closed if r["system"] == system), key=lambda r: r["concurrency"])
        levels = [r["concurrency"] for r in runs]
        axes[0].plot(levels, [r["throughput_per_min"] for r in runs], "o-", color=colors[system], label=system)
        axes[1].plot(levels, [r["mean_s"] for r in runs], "o-", color=colors[system], label=system)
    axes[0].set(title="closed loop (mix A): throughput", xlabel="concurrency", ylabel="images/min")
    axes[1].set(title="closed loop (mix A): mean latency", xlabel="concurrency", ylabel="latency (s)")
    for axis in axes:
        axis.legend()
    paths.append(_save(figure, out / "closed_loop.png"))
    return paths


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def report(result: dict, charts_written: list[Path]) -> str:
    c = result["config"]
    lines = [
        "# Benchmark: ours (`text_to_image`) vs typical diffusers deployment (`baseline_diffusers`)", "",
        f"{c['time']}, {c['machine']}, {c['cpu_count']} CPUs, torch {c['torch']}, torch_threads {c['torch_threads']}. "
        f"Model {c['model']}, {c['resolution']}x{c['resolution']}, {c['steps']} steps; "
        f"{len(c['controlnet_names'])} ControlNets, {c['lora_catalog_size']} LoRAs in the catalog. "
        "Ours runs LoRAs in `bounded` mode; the baseline loads, fuses, unfuses and unloads them per request. "
        "Each model instance runs torch_threads threads: ours' denoiser and two ControlNet instances may compute "
        "at once, the baseline's single instance computes one request at a time.", "",
        "Single request (closed loop, concurrency 1, mix A): " + ", ".join(
            f"{s} {_fmt(v)} s" for s, v in result["single_request_s"].items()) + ". Peak throughput (closed loop): "
        + ", ".join(f"{s} {_fmt(v)}/min" for s, v in result["peak_throughput_per_min"].items()) + ".", "",
        "| run | system | mix | load | mean s | p50 s | p95 s | p99 s | images/min | failed | LoRA s/request |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        load = f"c={r['concurrency']}" if r["kind"] == "closed" else f"{r['offered_per_min']:.1f}/min"
        lora = _fmt(r["lora_s"]["critical_s"]) if r["lora_s"] else "n/a"
        lines.append(f"| {r['kind']} | {r['system']} | {r['mix']} | {load} | {_fmt(r['mean_s'])} | {_fmt(r['p50_s'])} "
                     f"| {_fmt(r['p95_s'])} | {_fmt(r['p99_s'])} | {r['throughput_per_min']:.1f} | {r['failures']} "
                     f"| {lora} |")
    lines += ["", "Ratios ours / baseline (latency below 1 and throughput above 1 favour ours):", "",
              "| run | mix | load | mean | p50 | p95 | p99 | throughput |", "|---|---|---|---|---|---|---|---|"]
    for r in result["ratios"]:
        load = f"c={r['concurrency']}" if r["kind"] == "closed" else f"{r['offered_per_min']:.1f}/min"
        lines.append(f"| {r['kind']} | {r['mix']} | {load} | " + " | ".join(
            _fmt(r[k]) for k in ("mean_s", "p50_s", "p95_s", "p99_s", "throughput_per_min")) + " |")
    lines += ["", "LoRA s/request: time on the request's critical path per completed request, from the server's "
              "metrics. Ours: waiting for the background load at the deadline step + patching + restoring "
              "(`swiftdiffusion_lora_{wait,patch,restore}_seconds` of `denoiser`; the response itself carries only "
              "`lora_step`). Baseline: load_lora_weights + set_adapters + fuse + unfuse + unload "
              "(`swiftdiffusion_baseline_lora_seconds`). Open-loop latency counts from the scheduled arrival; "
              f"open-loop runs hold {c['requests']} requests each (closed-loop runs {c['closed_requests']}), so p95 "
              "and p99 are close to the maximum; a run's realized arrival rate is `arrival_per_min` in bench.json.",
              "",
              "Charts: " + ", ".join(f"`{p.name}`" for p in charts_written) + "."]
    return "\n".join(lines) + "\n"


# ---- main -----------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=PROJECT / "perf" / "results")
    p.add_argument("--url", help="gRPC host:port of a running server (default: start one here)")
    p.add_argument("--metrics-url", help="with --url: its metrics endpoint, for the LoRA times")
    p.add_argument("--controlnets", type=Path, help="with --url: the server's ControlNet catalog folder")
    p.add_argument("--loras", type=Path, help="with --url: the server's LoRA catalog folder")
    p.add_argument("--family", choices=("sd15", "sdxl"), default="sd15", help="the built-in model's family")
    p.add_argument("--models", type=Path, help="model root to build/use (default: models/small, models/small_sdxl)")
    p.add_argument("--size", choices=SIZE_NAMES, default="small")
    p.add_argument("--lora-count", type=int, default=200, help="LoRAs in the generated catalog")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads per model instance; 1 on 2 cores: ours runs up to 3 instances at once "
                        "(denoiser + 2 ControlNets), and 2 threads each oversubscribe the cores and stall on spinning")
    p.add_argument("--resolution", type=int, default=192)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--mixes", nargs="+", default=["A", "B"], choices=["A", "B"])
    p.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.9],
                   help="offered loads, as fractions of the baseline's single-request rate on mix A")
    p.add_argument("--rates", type=float, nargs="+", help="offered loads in requests/min (instead of --loads)")
    p.add_argument("--trace", type=Path, help="replay this trace file (CSV/JSON) instead of generated mixes")
    p.add_argument("--requests", type=int, default=12, help="requests per open-loop run")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 3], help="closed-loop levels")
    p.add_argument("--closed-requests", type=int, default=6, help="requests per closed-loop run")
    p.add_argument("--perf-analyzer", metavar="RANGE",
                   help="also sweep perf_analyzer over this concurrency range (e.g. 1:3), both models, into OUT/"
                        "perf_analyzer (1 ControlNet + 1 LoRA inputs at --resolution/--steps)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests per system")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a request counts as failed")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    server = None
    begin = time.perf_counter()
    try:
        if args.url is None:
            root = args.models or PROJECT / "models" / (args.size if args.family == "sd15" else f"{args.size}_sdxl")
            model, args.controlnets, args.loras = prepare(root, args.size, args.lora_count, args.seed, args.family)
            repository = write_repository(args.out / "tmp" / "repository", Deployment(
                model=model, controlnet_catalog=args.controlnets, lora_catalog=str(args.loras),
                controlnet_instances=2, resident_controlnets=len(EXTRA_CONTROLNETS) + 2,
                torch_threads=args.torch_threads, baseline=True))
            server = TritonServer()
            server.start(repository, free_ports(3), extra_args=SHM_ARGS, log_file=args.out / "tmp" / "server.log")
            server.wait_ready(timeout=900)
            args.url, args.metrics_url = server.grpc_url, server.metrics_url
            args.model = f"`{args.size}` {args.family} ({model})"
            print(f"server ready after {time.perf_counter() - begin:.0f} s", flush=True)
        elif args.controlnets is None or args.loras is None:
            raise SystemExit("--url needs --controlnets and --loras (the server's catalogs)")
        else:
            args.model = f"served at {args.url}"
        result = benchmark(args)
    finally:
        if server is not None:
            server.stop()
    result["config"]["total_s"] = time.perf_counter() - begin
    (args.out / "bench.json").write_text(json.dumps(result, indent=1))
    written = charts(result, args.out)
    (args.out / "bench.md").write_text(report(result, written))
    print(f"wrote {args.out / 'bench.json'}, {args.out / 'bench.md'} and {len(written)} charts "
          f"in {result['config']['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""perf_analyzer against a running server: `inputs` writes the input-data files, `run` measures and saves CSVs,
`sweep` measures ours (`text_to_image`) and the baseline (`baseline_diffusers`) over the same concurrency levels.

    python perf/perf_analyzer.py inputs                      # perf/inputs/*.json (committed; tiny-model sizes)
    python perf/perf_analyzer.py run --url 127.0.0.1:8001 --concurrency 1:4 --out perf/results/perf_analyzer
    python perf/perf_analyzer.py sweep --url 127.0.0.1:8001 --concurrency 1:3 --size 192 --steps 10
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from swiftdiffusion.request import ControlNetUse, GenerationRequest, LoraUse
from swiftdiffusion.tiny import control_image
from swiftdiffusion.triton.perf_analyzer import input_data, run_perf_analyzer

HERE = Path(__file__).resolve().parent


def workloads(size: int, steps: int) -> dict[str, list[GenerationRequest]]:
    """Three request mixes over the built-in catalog: plain, the common 1 ControlNet + 1 LoRA, and 2 + 2."""
    base = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", steps=steps, height=size, width=size)
    canny = ControlNetUse("canny", control_image(1, size), 1.0)
    depth = ControlNetUse("depth", control_image(2, size), 0.7)
    return {
        "plain": [GenerationRequest(seed=s, **base) for s in range(4)],
        "1c1l": [GenerationRequest(seed=s, controlnets=(canny,), loras=(LoraUse(name, 0.8),), **base)
                 for s, name in enumerate(("style_peft", "character_kohya", "style_diffusers", "style_peft"))],
        "2c2l": [GenerationRequest(seed=s, controlnets=(canny, depth),
                                   loras=(LoraUse("character_kohya", 0.8), LoraUse("style_peft", 0.5)), **base)
                 for s in range(2)],
    }


def write_inputs(out: Path, size: int, steps: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, requests in workloads(size, steps).items():
        path = out / f"text_to_image_{name}.json"
        path.write_text(json.dumps(input_data(requests)))
        paths.append(path)
    return paths


MODELS = ("text_to_image", "baseline_diffusers")
LATENCIES = ("p50 latency", "p90 latency", "p95 latency", "p99 latency")  # microseconds in the CSV


def read_csv(path: Path) -> list[dict[str, float]]:
    """perf_analyzer's CSV rows: concurrency, inferences/s and latencies (converted to seconds)."""
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    return [{"concurrency": int(row["Concurrency"]), "inferences_per_s": float(row["Inferences/Second"]),
             **{name.split()[0] + "_latency_s": float(row[name]) / 1e6 for name in LATENCIES}}
            for row in rows]


def sweep(url: str, models: list[str], mix: str, inputs: Path, concurrency: str, requests: int, out: Path,
          extra: tuple[str, ...] = ()) -> Path:
    """Every model over the same concurrency levels and input data: a CSV each, and sweep_<mix>.json with the
    parsed rows and ours / baseline ratios per level (inferences/s above 1 and latency below 1 favour ours)."""
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for model in models:
        path = out / f"{model}_{mix}.csv"
        run_perf_analyzer(model, url, inputs / f"text_to_image_{mix}.json", path, concurrency_range=concurrency,
                          measurement_request_count=requests, extra=extra)
        results[model] = read_csv(path)
    summary = {"mix": mix, "concurrency": concurrency, "requests_per_window": requests, "models": results}
    if set(MODELS) <= set(results):
        summary["ours_over_baseline"] = [
            {"concurrency": a["concurrency"], **{k: a[k] / b[k] if b[k] else None for k in a if k != "concurrency"}}
            for a, b in zip(results[MODELS[0]], results[MODELS[1]])]
    path = out / f"sweep_{mix}.json"
    path.write_text(json.dumps(summary, indent=1))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inputs = sub.add_parser("inputs")
    inputs.add_argument("--size", type=int, default=64)
    inputs.add_argument("--steps", type=int, default=4)
    inputs.add_argument("--out", type=Path, default=HERE / "inputs")
    run = sub.add_parser("run")
    run.add_argument("--url", default="127.0.0.1:8001")
    run.add_argument("--model", default="text_to_image")
    run.add_argument("--mix", default="1c1l", choices=("plain", "1c1l", "2c2l"))
    run.add_argument("--inputs", type=Path, default=HERE / "inputs")
    run.add_argument("--concurrency", default="1:2")
    run.add_argument("--requests", type=int, default=10, help="requests per measurement window")
    run.add_argument("--out", type=Path, default=HERE / "results" / "perf_analyzer")
    swept = sub.add_parser("sweep")
    swept.add_argument("--url", default="127.0.0.1:8001")
    swept.add_argument("--models", nargs="+", default=list(MODELS))
    swept.add_argument("--mix", default="1c1l", choices=("plain", "1c1l", "2c2l"))
    swept.add_argument("--inputs", type=Path, default=HERE / "inputs", help="input-data folder (see --size)")
    swept.add_argument("--size", type=int, help="write fresh inputs at this size into OUT/inputs and use them")
    swept.add_argument("--steps", type=int, default=10, help="with --size: denoising steps of the fresh inputs")
    swept.add_argument("--concurrency", default="1:3")
    swept.add_argument("--requests", type=int, default=6, help="requests per measurement window")
    swept.add_argument("--max-trials", type=int, default=3, help="windows before perf_analyzer settles")
    swept.add_argument("--stability", type=float, default=1000,
                       help="perf_analyzer's --stability-percentage (default: the first 3 windows whatever their "
                            "spread: seconds-long requests give few per window, and an unstable run exits 2)")
    swept.add_argument("--out", type=Path, default=HERE / "results" / "perf_analyzer")
    args = parser.parse_args()
    if args.command == "sweep":
        if args.size is not None:
            args.inputs = args.out / "inputs"
            write_inputs(args.inputs, args.size, args.steps)
        print(sweep(args.url, args.models, args.mix, args.inputs, args.concurrency, args.requests, args.out,
                    ("--max-trials", str(args.max_trials), "--stability-percentage", str(args.stability))))
        return
    if args.command == "inputs":
        for path in write_inputs(args.out, args.size, args.steps):
            print(path)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    csv = args.out / f"{args.model}_{args.mix}.csv"
    result = run_perf_analyzer(args.model, args.url, args.inputs / f"text_to_image_{args.mix}.json", csv,
                               concurrency_range=args.concurrency, measurement_request_count=args.requests)
    print(result.stdout)
    print(csv)


if __name__ == "__main__":
    main()

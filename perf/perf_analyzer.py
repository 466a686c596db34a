"""perf_analyzer against a running server: `inputs` writes the input-data files, `run` measures and saves CSVs.

    python perf/perf_analyzer.py inputs                      # perf/inputs/*.json (committed; tiny-model sizes)
    python perf/perf_analyzer.py run --url 127.0.0.1:8001 --concurrency 1:4 --out perf/results/perf_analyzer
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from swiftdiffusion.request import ControlNetUse, GenerationRequest, LoraUse
from swiftdiffusion.triton.perf_analyzer import input_data, run_perf_analyzer

HERE = Path(__file__).resolve().parent


def control_image(seed: int, size: int) -> np.ndarray:
    blocks = np.random.default_rng(seed).integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return np.ascontiguousarray(blocks.repeat(8, axis=0).repeat(8, axis=1))


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
    args = parser.parse_args()
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

"""Builds TensorRT engines from an export folder (`export_onnx.py`): one plan per graph, the LoRA-patched graphs
(those with a weight map: the UNet's graphs and the text encoders) refittable; a graph the manifest marks `fp32`
(SDXL's VAE, which overflows in fp16) without FP16.

    python export/build_engines.py --onnx artifacts/sd15 --out artifacts/sd15/plans
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from swiftdiffusion import tensorrt_runtime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True, help="export folder with manifest.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--min-size", type=int, default=64, help="smallest image side, pixels")
    parser.add_argument("--opt-size", type=int, help="image side TensorRT tunes for, pixels (default: the model's "
                                                     "default size, 512 for SD1.5, 1024 for SDXL)")
    parser.add_argument("--max-size", type=int, default=1024, help="largest image side, pixels")
    parser.add_argument("--max-batch", type=int, default=2, help="2 runs classifier-free guidance in one call")
    parser.add_argument("--no-fp16", action="store_true")
    parser.add_argument("--graphs", nargs="*", help="only these graphs (default: all in the manifest)")
    args = parser.parse_args()

    try:
        tensorrt_runtime.import_tensorrt()
    except tensorrt_runtime.TensorRTMissing as error:
        print(error, file=sys.stderr)
        return 2
    manifest = json.loads((args.onnx / "manifest.json").read_text())
    low, high = manifest["latent_range"]
    sizes = [args.min_size, args.opt_size or manifest["default_size"], args.max_size]
    if any(side % 8 or not low <= side // 8 <= high for side in sizes) or not sizes == sorted(sizes):
        parser.error(f"sizes must be multiples of 8 in {8 * low}..{8 * high} pixels, min <= opt <= max")
    if not 1 <= args.max_batch <= manifest["batch_range"][1]:
        parser.error(f"--max-batch must be in 1..{manifest['batch_range'][1]}, the exported range")
    min_size, opt_size, max_size = ((batch, side // 8, side // 8) for batch, side in
                                    zip((1, args.max_batch, args.max_batch), sizes))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, graph in manifest["graphs"].items():
        if args.graphs and name not in args.graphs:
            continue
        start = time.perf_counter()
        refittable = "weights" in graph
        tensorrt_runtime.build_engine(
            args.onnx / graph["file"], args.out / f"{name}.plan",
            [tensorrt_runtime.profile_shapes(graph, min_size, opt_size, max_size)],
            fp16=not (args.no_fp16 or graph.get("fp32")), refittable=refittable)
        print(f"{name:<20} {time.perf_counter() - start:7.1f}s{'  refittable' if refittable else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

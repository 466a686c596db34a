"""`swiftdiffusion export`: every graph of an SD1.5 or SDXL model and its ControlNets to ONNX, with weight maps and
a manifest, each graph checked against torch in onnxruntime.

    swiftdiffusion export --size tiny --out artifacts/tiny
    swiftdiffusion export --size tiny --family sdxl --out artifacts/tiny_sdxl
    swiftdiffusion export --model models/sd15 --controlnets models/controlnets --out artifacts/sd15
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import onnx_export, tiny


def controlnet_folders(root: Path | None) -> dict[str, Path]:
    """Each subfolder with a config.json is a ControlNet, named after the subfolder."""
    if root is None:
        return {}
    return {path.name: path for path in sorted(root.iterdir()) if (path / "config.json").exists()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swiftdiffusion export", description=__doc__.splitlines()[0],
                                     epilog="example: swiftdiffusion export --size tiny --out artifacts/tiny")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="diffusers SD1.5 or SDXL folder")
    source.add_argument("--size", choices=tiny.SIZE_NAMES, help="build the built-in model into OUT/source first")
    parser.add_argument("--family", choices=sorted(tiny.FAMILIES), default="sd15", help="with --size: its family")
    parser.add_argument("--controlnets", type=Path, help="folder of diffusers ControlNet folders")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--opset", type=int, default=onnx_export.OPSET)
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime checks")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max abs diff allowed (fp32; exit 1 above)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads: traces and checks run at 8x8..12x8 latents, where more mostly wait")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    model, controlnets = args.model, args.controlnets
    if args.size:
        built = tiny.ensure_model(args.out / "source", args.size, family=args.family)
        model, controlnets = built / "model", controlnets or built / "controlnets"
        print(f"built-in {args.size} model in {built} ({time.perf_counter() - start:.1f}s)")
    print(f"{'graph':<20} {'export':>8}  max abs diff onnxruntime vs torch (batch, latent size)")
    manifest = onnx_export.export_model(model, controlnet_folders(controlnets), args.out, args.opset,
                                        verify=not args.no_verify)
    worst = max((c["max_abs_diff"] for g in manifest["graphs"].values() for c in g.get("checks", [])), default=0.0)
    print(f"wrote {args.out / 'manifest.json'}; worst diff {worst:.2e}; total {time.perf_counter() - start:.1f}s")
    if worst > args.tolerance:
        print(f"FAIL: a graph differs from torch by more than {args.tolerance}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The fidelity tests' numbers: for every case and scheduler of `tests/test_fidelity.py`, both families, the
largest and mean per-pixel difference (1/255) between our pipeline and diffusers' own pipeline on the same weights,
seed and scheduler, and how far each add-on moves the image from the plain one (the tests assert <= 2 and > 8).

    python perf/fidelity_report.py --out perf/results/fidelity.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "tests"))  # the cases are the tests' own

from conftest import make_pipeline  # noqa: E402
from measuring import image_difference  # noqa: E402
from swiftdiffusion.schedulers import SCHEDULER_NAMES  # noqa: E402
from swiftdiffusion.tiny import build_model  # noqa: E402
from test_fidelity import CASES, SDXL_CASES, diffusers_image, request  # noqa: E402
from diffusers import ControlNetModel  # noqa: E402
from swiftdiffusion.models import load_components  # noqa: E402


def family_report(root: Path, family: str) -> dict:
    pipeline = make_pipeline(root)
    reference = (root, load_components(root / "model"),
                 {name: ControlNetModel.from_pretrained(root / "controlnets" / name) for name in ("canny", "depth")})
    plain = pipeline.generate(CASES["no_addons"]).image
    cases = {**CASES, **(SDXL_CASES if family == "sdxl" else {})}
    cases.update({f"scheduler_{name}": request(scheduler=name, steps=5) for name in SCHEDULER_NAMES})
    report = {}
    for name, case in cases.items():
        ours = pipeline.generate(case).image
        report[name] = {"vs_diffusers": image_difference(ours, diffusers_image(reference, case)),
                        "vs_plain_max_abs": image_difference(ours, plain)["max_abs"] if ours.shape == plain.shape
                        else None}
        print(f"{family} {name}: {report[name]}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        families = {family: family_report(build_model(Path(scratch) / family, "tiny", 0, family), family)
                    for family in ("sd15", "sdxl")}
    result = {"command": [Path(sys.executable).name, *sys.argv], "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": platform.platform(), "torch": torch.__version__, "model": "tiny, fp32, CPU",
              "tolerance_max_abs": 2, "families": families,
              "worst_max_abs": {f: max(c["vs_diffusers"]["max_abs"] for c in r.values()) for f, r in families.items()},
              "seconds": time.perf_counter() - begin}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"worst: {result['worst_max_abs']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

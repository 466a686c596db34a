"""The FLOP floor of a denoising step of each family at its real shapes, counted on the meta device (no weights, no
GPU): the UNet and one ControlNet on the CFG batch of two, by `torch.utils.flop_counter`, and the time one step
cannot beat at a dense fp16 peak. `perf/gpu_bench.py` counts the same on the GPU it measures.

    python perf/flop_floor.py --out perf/results/flop_floor.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from diffusers import ControlNetModel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_bench: next to this script

from gpu_bench import DENSE_PEAK_TFLOPS, FULL_SIZES, RUN_DEFAULTS  # noqa: E402
from swiftdiffusion import graphs, tiny  # noqa: E402
from swiftdiffusion.family import FAMILIES  # noqa: E402


def count(family_name: str) -> dict:
    family, size = FAMILIES[family_name], FULL_SIZES[family_name]
    pixels = RUN_DEFAULTS[family_name][0]
    with torch.device("meta"):
        unet = tiny.build_unet(size, family).half()
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=size.controlnet_embedding,
                                               load_weights_from_unet=False).half()

    def empty(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.float16)

    inputs = [empty(2, 4, pixels // 8, pixels // 8), torch.empty(1, device="meta"),
              empty(2, tiny.TEXT_LENGTH, unet.config.cross_attention_dim)]
    if family.added_conditioning:
        inputs += [empty(2, size.text_widths[-1]), empty(2, 6)]
    tflop = {}
    for name, module, args in (("unet", graphs.FullUNet(unet), inputs),
                               ("controlnet", graphs.ControlNetResiduals(controlnet), [*inputs, empty(2, 3, pixels, pixels)])):
        with FlopCounterMode(display=False) as counter:
            module(*args)
        tflop[name] = counter.get_total_flops() / 1e12
    return {"image_size": pixels, "unet_tflop": tflop["unet"], "controlnet_tflop": tflop["controlnet"],
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "controlnet_parameters": sum(p.numel() for p in controlnet.parameters()),
            "floor_ms_per_step": {f"{n}C": (tflop["unet"] + n * tflop["controlnet"]) / DENSE_PEAK_TFLOPS * 1e3
                                  for n in range(3)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = {"command": [Path(sys.executable).name, *sys.argv], "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": platform.platform(), "torch": torch.__version__, "peak_tflops": DENSE_PEAK_TFLOPS,
              "what": "per CFG step (batch of two), fp16 shapes", "families": {f: count(f) for f in FAMILIES}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["families"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

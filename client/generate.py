"""Command line for the swiftdiffusion server: one image, optionally streamed with a progress bar.

    python client/generate.py --prompt "a lighthouse" --lora style_peft:0.8 --controlnet canny:edges.png \
        --size 512x512 --steps 20 --out lighthouse.png --stream
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tritonclient.utils import InferenceServerException

from swiftdiffusion.client import Client, Progress
from swiftdiffusion.request import LORA_MODES, SCHEDULER_NAMES, ControlNetUse, GenerationRequest, LoraUse


def parse_size(text: str) -> tuple[int, int]:
    """`WIDTHxHEIGHT` or one number for a square."""
    width, _, height = text.lower().partition("x")
    return int(height or width), int(width)


def parse_lora(text: str) -> LoraUse:
    name, _, scale = text.partition(":")
    return LoraUse(name, float(scale) if scale else 1.0)


def parse_controlnet(text: str, height: int, width: int) -> ControlNetUse:
    """`NAME:IMAGE[:SCALE]`; the image is resized to the output size, as diffusers does."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--controlnet {text!r}: expected NAME:IMAGE[:SCALE]")
    image = Image.open(parts[1]).convert("RGB").resize((width, height))
    return ControlNetUse(parts[0], np.asarray(image, dtype=np.uint8), float(parts[2]) if len(parts) == 3 else 1.0)


def progress_bar(progress: Progress) -> None:
    done = int(30 * progress.step / progress.total_steps)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {progress.step}/{progress.total_steps} "
                     f"{progress.elapsed_s:6.2f}s")
    if progress.step == progress.total_steps:
        sys.stderr.write("\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--size", default="512x512", help="WIDTHxHEIGHT")
    p.add_argument("--scheduler", default="ddim", choices=SCHEDULER_NAMES)
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]")
    p.add_argument("--lora-mode", default=LORA_MODES[0], choices=LORA_MODES)
    p.add_argument("--controlnet", action="append", default=[], metavar="NAME:IMAGE[:SCALE]")
    p.add_argument("--timeout", type=float, help="seconds to wait; the server stops the request then too")
    p.add_argument("--retries", type=int, default=0, help="resend a request refused as over capacity (UNAVAILABLE) "
                                                          "up to this often, with exponential backoff")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--stream", action="store_true", help="stream progress (a bar on stderr)")
    args = p.parse_args(argv)
    height, width = parse_size(args.size)
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
        guidance_scale=args.guidance, height=height, width=width, scheduler=args.scheduler,
        loras=tuple(parse_lora(text) for text in args.lora), lora_mode=args.lora_mode,
        controlnets=tuple(parse_controlnet(text, height, width) for text in args.controlnet))
    client = Client(args.url, timeout_s=args.timeout, retries=args.retries)
    try:
        result = client.generate_streaming(request, progress_bar) if args.stream else client.generate(request)
    except InferenceServerException as error:
        print(f"error: {error.status()}: {error.message()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    Image.fromarray(result.image).save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`swiftdiffusion generate`: images from a running server, every request field a flag.

    swiftdiffusion generate --prompt "a lighthouse" --lora style_peft:0.8 --controlnet canny:edges.png:1.0 \\
        --size 512x512 --steps 20 --out lighthouse.png --stream
    swiftdiffusion generate --prompts prompts.txt --out images/ --json --retries 5

The flags are made from the request schema (`schema.REQUEST_INPUTS`): `--<field>` for each field, so the CLI
cannot fall behind the server; `--size`, `--lora` and `--controlnet` are shorthands for the fields they fill.
The request is built by the server's own parser (`schema.request_from_tensors`), so a bad value gets the
server's message, naming the field, before anything is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm
from tritonclient.utils import InferenceServerException

from .client import AsyncClient, Client, Generated, Progress
from .request import GenerationRequest, Limits, RequestError, validate
from .schedulers import find_scheduler
from .schema import REQUEST_INPUTS, TensorSpec, request_from_tensors

SHORTHANDS = {"size": ("height", "width"), "lora": ("lora_names", "lora_scales"),
              "controlnet": ("controlnet_names", "controlnet_images", "controlnet_scales")}
NUMPY = {"TYPE_STRING": str, "TYPE_INT32": int, "TYPE_INT64": int, "TYPE_FP32": float}


def flag(spec: TensorSpec) -> str:
    return "--" + spec.name.replace("_", "-")


# Fields whose values have other spellings, mapped to the one the schema lists (A1111's scheduler names).
SPELLINGS = {"scheduler": lambda name: find_scheduler(name).name if find_scheduler(name) else name}
# Names of the values of fixed-size vector fields.
VECTOR_METAVARS = {"original_size": ("HEIGHT", "WIDTH"), "target_size": ("HEIGHT", "WIDTH"),
                   "crops_coords_top_left": ("TOP", "LEFT")}


def add_field(parser: argparse.ArgumentParser, spec: TensorSpec) -> None:
    """One flag for a schema field: a list for variable-length fields, N values for fixed-size vectors, a switch
    for BOOL."""
    if spec.triton_type == "TYPE_BOOL":
        parser.add_argument(flag(spec), action="store_true", default=None, help=spec.doc)
    elif spec.triton_type == "TYPE_UINT8":  # images: files, resized to the output size as diffusers does
        parser.add_argument(flag(spec), nargs="+", type=Path, metavar="IMAGE", help=spec.doc + " (image files)")
    elif spec.dims[0] > 1:
        parser.add_argument(flag(spec), type=NUMPY[spec.triton_type], nargs=spec.dims[0],
                            metavar=VECTOR_METAVARS.get(spec.name), help=spec.doc)
    else:
        parser.add_argument(flag(spec), type=SPELLINGS.get(spec.name, NUMPY[spec.triton_type]),
                            nargs="+" if spec.dims[0] == -1 else None, choices=spec.choices or None,
                            metavar="NAME" if len(spec.choices) > 10 else None, help=_help(spec))


def _help(spec: TensorSpec) -> str:
    return f"{spec.doc}: {', '.join(spec.choices)}" if len(spec.choices) > 10 else spec.doc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swiftdiffusion generate", description=__doc__.splitlines()[0],
                                epilog="example: swiftdiffusion generate --prompt 'a lighthouse at dusk' "
                                       "--lora style_peft:0.8 --steps 20 --out lighthouse.png --stream",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address")
    fields = p.add_argument_group("request fields (schema)")
    for spec in REQUEST_INPUTS:
        add_field(fields, spec)
    short = p.add_argument_group("shorthands")
    short.add_argument("--size", help="WIDTHxHEIGHT, or one number for a square (height, width)")
    short.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]",
                       help="a LoRA and its scale (lora_names, lora_scales); repeatable")
    short.add_argument("--controlnet", action="append", default=[], metavar="NAME:IMAGE[:SCALE]",
                       help="a ControlNet, its control image and scale (controlnet_*); repeatable")
    run = p.add_argument_group("running")
    run.add_argument("--prompts", type=Path, help="a file of prompts, one per line: one request each, sent "
                                                  "concurrently, one PNG each in --out (a folder)")
    run.add_argument("--out", type=Path, required=True, help="PNG file to write (a folder with --prompts)")
    run.add_argument("--stream", action="store_true", help="stream progress (a bar on stderr)")
    run.add_argument("--json", action="store_true", help="print one JSON line per image: path, seed, lora_step, "
                                                        "seconds")
    run.add_argument("--retries", type=int, default=0, help="resend a request refused as over capacity "
                                                            "(UNAVAILABLE) up to this often, with exponential backoff")
    return p


def _shorthands(args: argparse.Namespace) -> None:
    """Fills the fields that a shorthand stands for (a field's own flag wins)."""
    if args.size and args.height is None and args.width is None:
        width, _, height = args.size.lower().partition("x")
        args.height, args.width = int(height or width), int(width)
    if args.lora and args.lora_names is None:
        pairs = [text.partition(":") for text in args.lora]
        args.lora_names = [name for name, _, _ in pairs]
        args.lora_scales = [float(scale) if scale else 1.0 for _, _, scale in pairs]
    if args.controlnet and args.controlnet_names is None:
        parts = [text.split(":") for text in args.controlnet]
        if any(len(p) not in (2, 3) for p in parts):
            raise SystemExit("--controlnet: expected NAME:IMAGE[:SCALE]")
        args.controlnet_names = [p[0] for p in parts]
        args.controlnet_images = [Path(p[1]) for p in parts]
        args.controlnet_scales = [float(p[2]) if len(p) == 3 else 1.0 for p in parts]


def tensors_from_args(args: argparse.Namespace, prompt: str | None = None) -> dict[str, np.ndarray]:
    """The request's tensors from the flags, as a client would send them (batch dimension of 1)."""
    tensors = {}
    for spec in REQUEST_INPUTS:
        value = prompt if spec.name == "prompt" and prompt is not None else getattr(args, spec.name)
        if value is None:
            continue
        if spec.name == "controlnet_images":
            tensors[spec.name] = control_images(value, args.height, args.width)
            continue
        values = value if isinstance(value, list) else [value]
        if spec.triton_type == "TYPE_STRING":
            values = [v.encode("utf-8") for v in values]
        tensors[spec.name] = np.array([values], dtype=spec.numpy_type)
    return tensors


def control_images(paths: list[Path], height: int | None, width: int | None) -> np.ndarray:
    """[1, count, height, width, 3] uint8, every image resized to the request's size, or without one to the first
    image's size rounded down to a multiple of 8 (as diffusers' image processor rounds to the VAE's factor)."""
    images = [Image.open(path).convert("RGB") for path in paths]
    size = (width, height) if height and width else tuple(side // 8 * 8 for side in images[0].size)
    return np.stack([np.asarray(image if image.size == size else image.resize(size), np.uint8)
                     for image in images])[None]


def requests_from_args(args: argparse.Namespace) -> list[GenerationRequest]:
    _shorthands(args)
    prompts = [None] if args.prompts is None else [
        line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    if args.prompts is None and args.prompt is None:
        raise SystemExit("--prompt (or --prompts FILE) is required")
    requests = []
    for prompt in prompts:
        try:
            request = request_from_tensors(tensors_from_args(args, prompt))
            validate(request, Limits(max_steps=10_000, max_size=16_384))  # the server applies its own limits
        except RequestError as error:
            raise SystemExit(f"error: {error}") from None
        requests.append(request)
    return requests


class ProgressBar:
    """tqdm over the streamed steps."""

    def __init__(self):
        self.bar = None

    def __call__(self, progress: Progress) -> None:
        if self.bar is None:
            self.bar = tqdm(total=progress.total_steps, unit="step", file=sys.stderr)
        self.bar.update(progress.step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def save(result: Generated, request: GenerationRequest, path: Path, seconds: float, as_json: bool) -> None:
    Image.fromarray(result.image).save(path)
    print(json.dumps({"image": str(path), "seed": request.seed, "lora_step": result.lora_step,
                      "seconds": round(seconds, 3)}) if as_json else path, flush=True)


def generate_one(args: argparse.Namespace, request: GenerationRequest) -> None:
    bar = ProgressBar()
    with Client(args.url, retries=args.retries) as client:
        begin = time.perf_counter()
        try:
            result = client.generate_streaming(request, bar) if args.stream else client.generate(request)
        finally:
            bar.close()
        save(result, request, args.out, time.perf_counter() - begin, args.json)


async def generate_batch(args: argparse.Namespace, requests: list[GenerationRequest]) -> None:
    """All requests at once over one asyncio client; each image saved as it arrives."""
    args.out.mkdir(parents=True, exist_ok=True)
    async with AsyncClient(args.url, retries=args.retries) as client:
        begin = time.perf_counter()

        async def one(index: int, request: GenerationRequest) -> None:
            result = await client.generate(request)
            save(result, request, args.out / f"{index:04d}.png", time.perf_counter() - begin, args.json)

        await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    requests = requests_from_args(args)
    try:
        if args.prompts is None:
            generate_one(args, requests[0])
        else:
            asyncio.run(generate_batch(args, requests))
    except InferenceServerException as error:
        print(f"error: {error.status()}: {error.message()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

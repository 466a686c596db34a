"""`make demo`: start the server on a tiny model (SD1.5 or SDXL), make one image with a LoRA and a ControlNet, stop.

The image goes through the real path (gRPC -> ensemble -> denoiser + ControlNet model over BLS -> VAE), streamed
with a progress bar; the PNG's path is the last line printed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
from PIL import Image

from .serve import PROJECT, SHM_ARGS, TINY_FOLDERS
from .tiny import ensure_model
from .triton.launcher import TritonServer, free_ports
from .triton.repository import Deployment, write_repository


def edge_image(size: int) -> Image.Image:
    """A simple synthetic edge map (a square and a diagonal) as the ControlNet's control image."""
    image = np.zeros((size, size, 3), np.uint8)
    image[size // 4, size // 4: 3 * size // 4] = image[3 * size // 4, size // 4: 3 * size // 4] = 255
    image[size // 4: 3 * size // 4, size // 4] = image[size // 4: 3 * size // 4, 3 * size // 4] = 255
    image[np.arange(size), np.arange(size)] = 255
    return Image.fromarray(image)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swiftdiffusion demo", description=__doc__.splitlines()[0],
                                     epilog="example: swiftdiffusion demo --family sdxl")
    parser.add_argument("--family", choices=sorted(TINY_FOLDERS), default="sd15", help="the built-in model's family")
    args = parser.parse_args(argv)
    root = ensure_model(PROJECT / "models" / TINY_FOLDERS[args.family], "tiny", family=args.family)
    out = PROJECT / "build" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    edge_image(128).save(out / "edges.png")
    repository = write_repository(out / "model_repository", Deployment(
        model=root / "model", controlnet_catalog=root / "controlnets", lora_catalog=str(root / "loras")))
    with TritonServer() as server:
        server.start(repository, free_ports(3), extra_args=SHM_ARGS, log_file=out / "server.log")
        server.wait_ready(timeout=600)
        subprocess.run([sys.executable, "-m", "swiftdiffusion", "generate", "--url", server.grpc_url,
                        "--prompt", "a lighthouse on a cliff at dusk", "--lora", "style_peft:0.8",
                        "--controlnet", f"canny:{out / 'edges.png'}:1.0", "--size", "128x128", "--steps", "12",
                        "--stream", "--out", str(out / "demo.png")], check=True, stdout=subprocess.DEVNULL)
    print(out / "demo.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

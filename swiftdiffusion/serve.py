"""`make serve`: render the model repository for one deployment and run tritonserver in the foreground.

Without `--model` it serves the built-in tiny model of `--family` (built on first use under `models/tiny` or
`models/tiny_sdxl`). A real deployment is `--model DIR` (a diffusers SD1.5 or SDXL folder: the family comes from
it), `--controlnets DIR` (diffusers ControlNet folders by name, of the model's family), `--loras LOCATION` (a folder
or fsspec URL of `<name>.safetensors` files). Every flag can also come from the environment, as
`SWIFTDIFFUSION_<FLAG>` (`SWIFTDIFFUSION_MAX_QUEUE=8`): what containers are configured with.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from .request import Limits
from .tiny import ensure_model
from .triton.gpu_settings import SHM_ARGS, read_gpu_check
from .triton.launcher import Ports, run_foreground
from .triton.repository import PLACEMENTS, Deployment, write_repository
from .triton.serving import TRANSPORTS

PROJECT = Path(__file__).resolve().parents[1]
TINY_FOLDERS = {"sd15": "tiny", "sdxl": "tiny_sdxl"}  # under models/: the built-in tiny model of each family
ENV_PREFIX = "SWIFTDIFFUSION_"  # SWIFTDIFFUSION_<FLAG>: a flag's value from the environment (containers)


def residual_route(args: argparse.Namespace, verdict: Mapping[str, Any] | None) -> tuple[str, str]:
    """(residual_transport, controlnet_placement): the flags where given, else what the device check found for a GPU
    deployment (`dlpack`: DLPack between the processes; `local`: ControlNets in the denoiser's process), else host
    memory between the processes."""
    found = verdict.get("residual_path") if verdict and verdict.get("gpu") and args.device == "cuda" else "host"
    placement = args.controlnet_placement or ("local" if found == "local" else "service")
    transport = args.residual_transport or ("dlpack" if found == "dlpack" and placement == "service" else "host")
    return transport, placement


def deployment_from_args(args: argparse.Namespace, verdict: Mapping[str, Any] | None = None) -> Deployment:
    if args.model is None:
        root = ensure_model(PROJECT / "models" / TINY_FOLDERS[args.family], "tiny", family=args.family)
        args.model = root / "model"
        args.controlnets = args.controlnets or root / "controlnets"
        args.loras = args.loras or str(root / "loras")
    if args.controlnets is None or args.loras is None:
        raise SystemExit("--model needs --controlnets and --loras too")
    gpus = {"denoiser": [[0]], "text_encoder": [[0]], "vae_decoder": [[0]],
            "controlnet": [[g] for g in args.controlnet_gpus]} if args.device == "cuda" else {}
    transport, placement = residual_route(args, verdict)
    try:
        return Deployment(model=Path(args.model), model_config=args.model_config,
                          controlnet_catalog=Path(args.controlnets), lora_catalog=str(args.loras),
                          dtype=args.dtype, gpus=gpus, controlnet_instances=args.controlnet_instances,
                          torch_threads=args.torch_threads, compile=args.compile,
                          cfg_device=f"cuda:{args.cfg_gpu}" if args.cfg_gpu is not None else "",
                          max_queue=args.max_queue, lora_cache_mb=args.lora_cache_mb, lora_copies=args.lora_copies,
                          residual_transport=transport, controlnet_placement=placement, streaming=not args.no_stream,
                          limits=Limits(max_steps=args.max_steps, max_size=args.max_size,
                                        max_request_seconds=args.max_request_seconds))
    except ValueError as error:  # contradicting flags
        raise SystemExit(f"swiftdiffusion serve: {error}") from error


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swiftdiffusion serve", description=__doc__.splitlines()[0],
                                epilog="example: swiftdiffusion serve --model /models/sd15 --controlnets "
                                       "/models/controlnets --loras /models/loras --device cuda --dtype float16")
    p.add_argument("--model", type=Path, help="diffusers SD1.5 or SDXL folder, or a single-file .safetensors "
                                              "checkpoint (default: the built-in tiny model of --family)")
    p.add_argument("--family", choices=sorted(TINY_FOLDERS), default="sd15",
                   help="without --model: the family of the built-in tiny model to serve")
    p.add_argument("--model-config", type=Path, help="with a single-file checkpoint: its diffusers config folder")
    p.add_argument("--controlnets", type=Path, help="folder of ControlNet folders, one per name")
    p.add_argument("--loras", help="folder or fsspec URL of <name>.safetensors LoRA files")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--controlnet-instances", type=int, default=2,
                   help="CPU instances of the ControlNet model (with --controlnet-placement local: CPU devices)")
    p.add_argument("--controlnet-gpus", type=int, nargs="*", default=[0], help="with --device cuda: one instance each")
    p.add_argument("--controlnet-placement", choices=PLACEMENTS,
                   help="service: ControlNets on the controlnet model's instances, through BLS; local: in each "
                        "denoising instance's process, on the same devices (default: service, or what --gpu-check "
                        "found)")
    p.add_argument("--residual-transport", choices=TRANSPORTS,
                   help="with the service placement: host (numpy through shared memory) or dlpack (tensors where "
                        "they lie; GPU tensors by CUDA IPC) (default: host, or what --gpu-check found)")
    p.add_argument("--compile", action="store_true",
                   help="with --device cuda: torch.compile the UNet and ControlNets before graph capture "
                        "(minutes at first use of each shape; pays back in a long-lived server)")
    p.add_argument("--cfg-gpu", type=int, help="with --device cuda: a UNet copy on this GPU runs the unconditional "
                                                "branch of cfg_parallel requests")
    p.add_argument("--torch-threads", type=int, default=0, help="threads per model instance (0: torch's default)")
    p.add_argument("--max-steps", type=int, default=Limits.max_steps)
    p.add_argument("--max-size", type=int, default=Limits.max_size)
    p.add_argument("--max-request-seconds", type=float, default=Limits.max_request_seconds,
                   help="stop any request running longer than this since its arrival (0: no limit; a request's "
                        "timeout_s can only shorten it)")
    p.add_argument("--lora-cache-mb", type=int, default=Deployment.lora_cache_mb,
                   help="decoded LoRAs kept in host memory per denoising instance (repeats skip read and decode)")
    p.add_argument("--lora-copies", default=Deployment.lora_copies,
                   help="folder for local copies of a remote LoRA catalog (default: under the temporary directory)")
    p.add_argument("--max-queue", type=int, default=Deployment.max_queue,
                   help="requests that may wait per denoising model; beyond it UNAVAILABLE at once (0: unbounded)")
    p.add_argument("--gpu-check", type=Path,
                   help="with --device cuda: the JSON of perf/triton_gpu_check.py run on this machine; the server "
                        "settings and ControlNet residual path it found to work, unless --residual-transport or "
                        "--controlnet-placement say otherwise (default: the documented defaults)")
    p.add_argument("--no-stream", action="store_true",
                   help="leave out the streaming model (text_to_image_stream): fewer processes per replica")
    p.add_argument("--repository", type=Path, default=PROJECT / "build" / "model_repository")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--ports", type=int, nargs=3, default=list(Ports()), metavar=("HTTP", "GRPC", "METRICS"))
    p.add_argument("--write-only", action="store_true", help="render the repository and exit")
    return p


def with_environment(p: argparse.ArgumentParser, argv: list[str], environ: Mapping[str, str]) -> list[str]:
    """The command line with `SWIFTDIFFUSION_<FLAG>` environment variables put before it, so that a container is
    configured by its environment (`SWIFTDIFFUSION_MODEL=/models/sdxl` is `--model /models/sdxl`; a list flag's
    values are separated by spaces or commas; a switch is on when its variable says 1, true or yes). Flags on the
    command line win: argparse keeps the last value given."""
    first = []
    for action in p._actions:  # argparse has no public list of its options
        value = environ.get(ENV_PREFIX + action.dest.upper())
        if value is None or not action.option_strings or action.dest == "help":
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:
            first += [flag] if value.strip().lower() in ("1", "true", "yes") else []
        elif action.nargs in ("*", "+") or isinstance(action.nargs, int):
            first += [flag, *value.replace(",", " ").split()]
        else:
            first += [flag, value]
    return first + argv


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(with_environment(p, sys.argv[1:] if argv is None else list(argv), os.environ))
    gpu_check = read_gpu_check(args.gpu_check) if args.gpu_check else None
    repository = write_repository(args.repository, deployment_from_args(args, gpu_check))
    print(f"model repository: {repository}", flush=True)
    if args.write_only:
        return 0
    return run_foreground(repository, Ports(*args.ports), args.host, SHM_ARGS, gpu_check=gpu_check)


if __name__ == "__main__":
    sys.exit(main())

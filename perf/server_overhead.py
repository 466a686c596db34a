"""What the server itself costs: start-up time, memory per model instance, and a small request's latency through
Triton against the same request in-process.

    python perf/server_overhead.py --out perf/results/server_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from measuring import seconds
from swiftdiffusion.client import Client
from swiftdiffusion.controlnets import ControlNetCatalog, LocalControlNets
from swiftdiffusion.lora_store import LoraStore
from swiftdiffusion.models import load_model
from swiftdiffusion.pipeline import Pipeline
from swiftdiffusion.request import ControlNetUse, GenerationRequest, LoraUse
from swiftdiffusion.serve import SHM_ARGS
from swiftdiffusion.tiny import ensure_model
from swiftdiffusion.triton.launcher import TritonServer, free_ports
from swiftdiffusion.triton.repository import MODELS, Deployment, write_repository

PROJECT = Path(__file__).resolve().parents[1]


def stub_memory_mb(repository: Path) -> dict[str, list[float]]:
    """Resident memory of each Python-backend stub process (one per model instance), by model."""
    memory: dict[str, list[float]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if not args or not args[0].endswith(b"triton_python_backend_stub"):
            continue
        model = Path(args[1].decode()).parent.parent.name
        if str(repository) in args[1].decode() and model in MODELS:
            rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
            memory.setdefault(model, []).append(round(rss_kb / 1024, 1))
    return memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--out", type=Path, default=PROJECT / "perf" / "results" / "server_overhead.json")
    args = parser.parse_args()
    root = ensure_model(PROJECT / "models" / args.size, args.size)
    image = torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()
    requests = {
        "plain": GenerationRequest("a lighthouse", steps=args.steps, height=64, width=64),
        "1 ControlNet + 1 LoRA (sync)": GenerationRequest(
            "a lighthouse", steps=args.steps, height=64, width=64, lora_mode="sync",
            loras=(LoraUse("style_peft", 0.8),), controlnets=(ControlNetUse("canny", image, 1.0),)),
    }
    repository = write_repository(PROJECT / "build" / "overhead_repository", Deployment(
        model=root / "model", controlnet_catalog=root / "controlnets", lora_catalog=str(root / "loras")))
    report: dict = {"machine": f"{os.cpu_count()} CPU cores", "date": time.strftime("%Y-%m-%d"),
                    "command": "python perf/server_overhead.py", "model": args.size, "steps": args.steps}
    with TritonServer() as server:
        began = time.perf_counter()
        server.start(repository, free_ports(3), extra_args=SHM_ARGS, log_file=repository / "server.log")
        server.wait_ready(timeout=600)
        report["startup_s"] = time.perf_counter() - began
        report["stub_rss_mb"] = stub_memory_mb(repository)
        client = Client(server.grpc_url)
        served = {}
        for name, request in requests.items():
            client.generate(request)  # warm-up: first BLS calls grow the shared-memory pool
            served[name] = statistics.median(seconds(lambda: client.generate(request)) for _ in range(args.requests))
        client.close()
    model = load_model(root / "model")
    pipeline = Pipeline(model, LocalControlNets(ControlNetCatalog(root / "controlnets")),
                        LoraStore(root / "loras", model.lora_target, model.device, model.dtype))
    local = {}
    for name, request in requests.items():
        pipeline.generate(request)
        local[name] = statistics.median(seconds(lambda: pipeline.generate(request)) for _ in range(args.requests))
    report["latency_s"] = {name: {"triton": served[name], "in_process": local[name],
                                  "triton_minus_in_process": served[name] - local[name]} for name in requests}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

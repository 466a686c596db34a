"""`perf/triton_gpu_check.py --bench`: requests through tritonserver against the same pipeline in-process, per
residual path, in one run (issue 14, part 4).

SD1.5-shaped random weights (perf/gpu_bench.py's `build_full`), fp16, 512x512, 50 DDIM steps, CUDA graphs, one GPU
(every model on GPU 0, two ControlNet instances or devices there; the dry run: one). Cases: 0C/0L, 1C/1L and 2C/2L
(ControlNets and cold LoRAs, `bounded`). For each residual path (`host`, `dlpack`, the `local` placement) a server
of that deployment serves the cases over HTTP (Triton's binary tensor extension, the standard library only: no
tritonclient on the GPU machines); the in-process pipeline (graphs, ControlNets on side streams) runs the same
requests in the same process. Per case and path: `through_triton_s` and `in_process_s` (medians of `--runs` after a
warm-up), `max_abs_diff` (the served image against the in-process one with the LoRAs applied at the step the server
reported), and the residual transfer per step: the residual bytes a step moves, and
`controlnet_overhead_per_step_ms`, what serving adds per step over in-process beyond what it adds to the case
without ControlNets (the hand-over of inputs and residuals, and the BLS calls). A server that dies or fails is
recorded and the next path goes on. The JSON, `<out>/triton_gpu_<gpu>_<date>.json`, is rewritten after every case.

    PYTHONPATH=/tmp/pytriton:/tmp/hf python3 perf/triton_gpu_check.py --bench --out $OUT  # GPU (diffusers too)
    .venv/bin/python perf/triton_gpu_check.py --bench --dry-run --out /tmp/bench    # CPU: tiny model, 64x64, 4 steps

Without a GPU (and without --dry-run) it says why and writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import re
import statistics
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np

PATHS = {"host": {}, "dlpack": {"residual_transport": "dlpack"}, "local": {"controlnet_placement": "local"}}
CASES = {"0C/0L": (0, 0), "1C/1L": (1, 1), "2C/2L": (2, 2)}  # case -> (ControlNets, cold LoRAs)
# The ensemble and what it needs (no streaming model: a second UNet on the GPU; the controlnet model only where
# the placement has it).
UNARY_MODELS = ("text_encoder", "lora_prefetch", "denoiser", "vae_decoder", "text_to_image")
NUMPY_TO_TRITON = {np.dtype(np.object_): "BYTES", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
                   np.dtype(np.float32): "FP32", np.dtype(np.uint8): "UINT8", np.dtype(np.bool_): "BOOL"}
TRITON_TO_NUMPY = {name: dtype for dtype, name in NUMPY_TO_TRITON.items() if name != "BYTES"}
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local server: never via a proxy
# A request takes seconds (its first, graph capture included, under a minute): beyond this one hangs, and the device
# time it would hold is better spent on the next path.
REQUEST_TIMEOUT_S = 180
SERVER_START_TIMEOUT_S = 300


def gpu_missing() -> str | None:
    """Why the bench cannot run on the GPU here (None where it can)."""
    try:
        import torch
    except ImportError as error:
        return f"torch is not installed ({error})"
    return None if torch.cuda.is_available() else "no CUDA device (torch.cuda.is_available() is False)"


# ---- Triton's HTTP API with binary tensors ----------------------------------------------------------------------
def _tensor_bytes(array: np.ndarray) -> bytes:
    if array.dtype == np.object_:  # BYTES: each element as a 4-byte little-endian length and its bytes
        items = [item if isinstance(item, bytes) else str(item).encode() for item in array.reshape(-1)]
        return b"".join(len(item).to_bytes(4, "little") + item for item in items)
    return np.ascontiguousarray(array).tobytes()


def encode_request(tensors: dict[str, np.ndarray], outputs: tuple[str, ...]) -> tuple[bytes, int]:
    """An inference request's body with every tensor binary, and the JSON header's length."""
    blobs = {name: _tensor_bytes(array) for name, array in tensors.items()}
    header = json.dumps({
        "inputs": [{"name": name, "shape": list(array.shape), "datatype": NUMPY_TO_TRITON[array.dtype],
                    "parameters": {"binary_data_size": len(blobs[name])}} for name, array in tensors.items()],
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs]}).encode()
    return header + b"".join(blobs.values()), len(header)


def decode_response(body: bytes, header_length: int) -> dict[str, np.ndarray]:
    header = json.loads(body[:header_length])
    arrays, offset = {}, header_length
    for output in header["outputs"]:
        size = output["parameters"]["binary_data_size"]
        dtype = TRITON_TO_NUMPY[output["datatype"]]
        arrays[output["name"]] = np.frombuffer(body[offset:offset + size], dtype).reshape(output["shape"])
        offset += size
    return arrays


def infer(http_url: str, body: bytes, header_length: int, timeout: float) -> dict[str, np.ndarray]:
    """`text_to_image` over HTTP; raises RuntimeError with the server's message."""
    request = urllib.request.Request(
        f"http://{http_url}/v2/models/text_to_image/infer", data=body,
        headers={"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)})
    try:
        with OPENER.open(request, timeout=timeout) as response:
            return decode_response(response.read(), int(response.headers["Inference-Header-Content-Length"]))
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"HTTP {error.code}: {error.read().decode(errors='replace')}") from error


# ---- the run ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Bench:
    """One run's model, settings, in-process pipeline and results."""

    root: Path
    settings: Any  # gpu_bench.Settings
    pipeline: Any  # swiftdiffusion.pipeline.Pipeline, graphed on a GPU
    out: Path
    results: dict[str, Any]

    def save(self) -> None:
        temporary = self.out.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.results, indent=1, default=str))
        temporary.replace(self.out)


def in_process_pipeline(root: Path, settings) -> Any:
    """The pipeline as the fastest in-process path runs it: CUDA graphs with channels-last weights, ControlNets on
    side streams (on a CPU: eager, one after the other)."""
    from swiftdiffusion.controlnets import LocalControlNets
    from swiftdiffusion.cuda_graphs import GraphedControlNetCatalog, graph_engines
    from swiftdiffusion.lora_store import LoraStore
    from swiftdiffusion.models import load_model
    from swiftdiffusion.pipeline import Pipeline

    model = graph_engines(load_model(root / "model", settings.device, settings.dtype), channels_last=settings.cuda)
    catalog = GraphedControlNetCatalog(root / "controlnets", settings.device, settings.dtype, family=model.family,
                                       channels_last=settings.cuda)
    store = LoraStore(root / "loras", model.lora_target, model.device, model.dtype)
    return Pipeline(model, LocalControlNets(catalog, overlap=True), store)


def residual_bytes_per_call(bench: Bench) -> int:
    """What one ControlNet call's residuals weigh (CFG batch of two, the deployment's dtype)."""
    from gpu_bench import probe_inputs

    inputs = probe_inputs(bench.pipeline.model, bench.settings)["controlnet"]
    residuals = bench.pipeline.controlnets.catalog.get("canny")(inputs)
    return sum(tensor.numel() * tensor.element_size() for tensor in residuals.values())


def median_s(values: list[float]) -> float:
    return round(statistics.median(values), 4)


@contextlib.contextmanager
def served(bench: Bench, path: str, verdict: dict | None) -> Iterator[Any]:
    """A tritonserver of the deployment for `path` (every model on GPU 0 on a GPU), ready."""
    from swiftdiffusion.serve import SHM_ARGS
    from swiftdiffusion.triton.launcher import TritonServer, free_ports
    from swiftdiffusion.triton.repository import Deployment, write_repository

    settings = bench.settings
    # Two ControlNet instances (or devices) on GPU 0, as in-process runs two ControlNets on two streams.
    gpus = {"denoiser": [[0]], "text_encoder": [[0]], "vae_decoder": [[0]], "controlnet": [[0], [0]]}
    repository = write_repository(Path(tempfile.mkdtemp(prefix=f"triton-bench-{path}-")), Deployment(
        model=bench.root / "model", controlnet_catalog=bench.root / "controlnets",
        lora_catalog=str(bench.root / "loras"), dtype="float16" if settings.cuda else "float32",
        gpus=gpus if settings.cuda else {}, controlnet_instances=1, torch_threads=0 if settings.cuda else 1,
        **PATHS[path]))
    models = (*UNARY_MODELS, *(("controlnet",) if path != "local" else ()))
    log = bench.out.parent / f"{bench.out.stem}_{path}_server.log"
    with TritonServer() as server:
        server.start(repository, free_ports(3), extra_args=[*SHM_ARGS, *(f"--load-model={m}" for m in models)],
                     log_file=log, gpu_check=verdict)
        server.wait_ready(timeout=SERVER_START_TIMEOUT_S)
        yield server


def run_case(bench: Bench, server, path: str, case: str, per_call: int) -> dict[str, Any]:
    """One case through the server and in-process, each run with LoRAs never seen (cold): medians, the last served
    image against in-process with its LoRAs applied at the step the server reported, per-step figures."""
    from gpu_bench import cold_loras, make_request, synced_s
    from measuring import image_difference
    from swiftdiffusion.schema import tensors_from_request

    controls, loras = CASES[case]
    settings = bench.settings
    request = make_request(settings, controls, loras, mode="bounded")
    through, in_process = [], []
    for _ in range(settings.warmup + settings.runs):
        with cold_loras(bench.root, request.loras) as fresh:
            body, header_length = encode_request(tensors_from_request(dataclasses.replace(request, loras=fresh)),
                                                 ("image", "lora_step"))
            begin = time.perf_counter()
            outputs = infer(server.http_url, body, header_length, REQUEST_TIMEOUT_S)
            through.append(time.perf_counter() - begin)
        with cold_loras(bench.root, request.loras) as fresh:
            generation = dataclasses.replace(request, loras=fresh)
            in_process.append(synced_s(lambda: bench.pipeline.generate(generation), settings.cuda))
    lora_step = int(outputs["lora_step"].reshape(-1)[0])
    with cold_loras(bench.root, request.loras) as fresh:
        reference = bench.pipeline.generate(dataclasses.replace(request, loras=fresh),
                                            exact_lora_step=lora_step if loras else None).image
    through, in_process = through[settings.warmup:], in_process[settings.warmup:]
    return {"residual_path": path, "through_triton_s": median_s(through), "in_process_s": median_s(in_process),
            "through_triton_runs_s": [round(s, 4) for s in through],
            "in_process_runs_s": [round(s, 4) for s in in_process],
            "max_abs_diff": image_difference(outputs["image"][0], reference)["max_abs"], "lora_step": lora_step,
            "overhead_per_step_ms": round(1e3 * (median_s(through) - median_s(in_process)) / settings.steps, 3),
            "residual_bytes_per_step": per_call * controls}


def controlnet_overheads(cases: dict[str, dict[str, Any]]) -> None:
    """Per case with ControlNets: what serving adds per step beyond the case without (the residual transfer and
    the ControlNet calls' BLS round trips), in place."""
    plain = cases.get("0C/0L", {}).get("overhead_per_step_ms")
    for result in cases.values():
        if plain is not None and "overhead_per_step_ms" in result and result["residual_bytes_per_step"]:
            result["controlnet_overhead_per_step_ms"] = round(result["overhead_per_step_ms"] - plain, 3)


def run_path(bench: Bench, path: str, verdict: dict | None, per_call: int) -> None:
    record = bench.results["paths"][path] = {"cases": {}}
    try:
        with served(bench, path, verdict) as server:
            for case in CASES:
                try:
                    record["cases"][case] = run_case(bench, server, path, case, per_call)
                except Exception as error:  # a case that fails is recorded; the next one goes on
                    record["cases"][case] = {"residual_path": path, "error": f"{type(error).__name__}: {error}"}
                    if server.process.poll() is not None:
                        raise RuntimeError(f"the server exited with code {server.process.returncode}") from error
                controlnet_overheads(record["cases"])
                bench.save()
    except Exception as error:
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc(limit=5)
    bench.save()


def output_path(out: Path, device: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    return out / f"triton_gpu_{slug}_{datetime.date.today().isoformat()}.json"


def run_bench(args: argparse.Namespace) -> int:
    """The bench; 0 also when it cannot run here (the reason printed)."""
    if not args.dry_run and (reason := gpu_missing()):
        print(f"triton_gpu_check --bench: skipped: {reason} (--dry-run runs the tiny model on the CPU)", flush=True)
        return 0
    import torch
    from gpu_bench import Settings, build_full
    from swiftdiffusion.family import SD15
    from swiftdiffusion.tiny import ensure_model
    from swiftdiffusion.triton.gpu_settings import read_gpu_check

    if args.dry_run:
        settings = Settings("cpu", torch.float32, 64, 4, 0, runs=1, warmup=0, probe_iters=0, scheduler="ddim")
        torch.set_num_threads(1)  # as the servers' instances (torch_threads=1): comparable, and CI cores are shared
        root, device = ensure_model(args.model_root / "tiny", "tiny"), "cpu (dry run)"
    else:
        settings = Settings("cuda", torch.float16, 512, 50, 0, runs=args.runs, warmup=1, probe_iters=0,
                            scheduler="ddim")
        root, device = build_full(args.model_root / "sd15", SD15, "cuda"), torch.cuda.get_device_name(0)
    args.out.mkdir(parents=True, exist_ok=True)
    verdict = read_gpu_check(args.verdict) if args.verdict else None
    results = {"command": [Path(sys.executable).name, *sys.argv], "device": device, "torch": torch.__version__,
               "settings": {**dataclasses.asdict(settings), "dtype": str(settings.dtype)},
               "verdict": verdict, "paths": {}}
    bench = Bench(root, settings, in_process_pipeline(root, settings), output_path(args.out, device), results)
    per_call = results["residual_bytes_per_call"] = residual_bytes_per_call(bench)
    for path in args.paths:
        run_path(bench, path, verdict, per_call)
        record = results["paths"][path]
        if "error" in record:
            print(f"{path}: {record['error']}", flush=True)
        for case, result in record["cases"].items():
            print(f"{path} {case}: " + (result.get("error") or (
                f"through Triton {result['through_triton_s']} s, in-process {result['in_process_s']} s, "
                f"max abs diff {result['max_abs_diff']}/255")), flush=True)
    print(f"results: {bench.out}", flush=True)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's flags on perf/triton_gpu_check.py's parser."""
    group = parser.add_argument_group("--bench")
    group.add_argument("--bench", action="store_true", help="requests through tritonserver against in-process, per "
                                                            "residual path (see perf/triton_gpu_bench.py)")
    group.add_argument("--dry-run", action="store_true", help="with --bench: the tiny model on the CPU, 4 steps")
    group.add_argument("--paths", nargs="+", choices=sorted(PATHS), default=list(PATHS),
                       help="with --bench: the residual paths to serve, one server each")
    group.add_argument("--runs", type=int, default=3, help="with --bench: timed runs per case after a warm-up")
    group.add_argument("--verdict", type=Path, help="with --bench: a device check's JSON, whose settings the servers "
                                                    "take (as serve --gpu-check)")
    group.add_argument("--model-root", type=Path, default=Path(tempfile.gettempdir()) / "triton_gpu_bench",
                       help="with --bench: where the random-weight model is built")

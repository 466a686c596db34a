"""ControlNet modes through Triton: per-step and per-image latency of `sequential`, `overlap` and `async`.

    python perf/controlnet_bench.py --out perf/results/controlnet_bench.json

On the CPU, `small` model, through a tritonserver started here: ControlNets on the `controlnet` model's two
instances (separate processes, BLS from the orchestrator), every instance on one torch thread, so that the
comparison is about work running in parallel on the cores, not about thread pools sharing them. For 0 to 3
ControlNets, every mode side by side in one run, interleaved round by round so that drift hits every case alike.

- Per step: from the streaming model's progress messages (`elapsed_s` per step; the first step, which includes
  text encoding, is left out). Per image: the wall time of that streaming request (encode, denoise, decode).
- Ideal speedups over `sequential`, from the graphs timed in-process, alone, on one thread each (CFG batch 2):
  t_enc, t_dec (UNet encoder/decoder), t_cn (one ControlNet). On 2 cores with 2 ControlNet instances, N ControlNets:
    overlap: (N t_cn + t_enc + t_dec) / (max((N t_cn + t_enc) / 2, ceil(N / 2) t_cn, t_enc) + t_dec)
             (for N = 1: (t_cn + t_enc + t_dec) / (max(t_enc, t_cn) + t_dec))
    async:   (N t_cn + t_enc + t_dec) / max((N t_cn + t_enc + t_dec) / 2, ceil(N / 2) t_cn, t_enc + t_dec)
  Beside them, the encoder and a ControlNet timed side by side (started together on two threads): on a machine
  whose cores slow each other down, the overlap's real bound is (t_cn + t_enc + t_dec) / (t_pair + t_dec).
- Residual transfer through BLS, per ControlNet call: a bench-only `bls_probe` model sends one call's residual
  tensors by BLS to a bench-only `residual_echo` model, which returns them (as many bytes each way as a real call
  moves, give or take the control image), and times each round trip; plus Triton's statistics of `controlnet`.
- Batching: 4 clients at once sending the same ControlNet's calls straight to `controlnet` (no batching) and to
  `controlnet_batched` (a bench-only variant: dynamic batching, requests grouped by name in `execute`); calls/s.
  A gain counts only if every batched round beats every unbatched one and the median gain exceeds 5%. In-process
  beside it: one ControlNet call per request against four requests' calls as one batch, per request.
- CFG parallelism in-process (all cores): per step, the guidance batch of two against two concurrent batch-1 branches.
- The asynchronous mode's effect on the image, in-process on the `--effect-sizes` models: async against the
  synchronous image, next to the synchronous image against the one without ControlNets (its scale).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

# The in-process timings wait as the server's instances do (the launcher sets it for them): OpenMP's default
# spinning steals the cores from the thread that computes when the machine is shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import tritonclient.grpc as grpcclient

from measuring import image_difference, seconds
from swiftdiffusion.client import Client, Generated, Progress, infer_inputs
from swiftdiffusion.controlnets import ControlNetCatalog, LocalControlNets
from swiftdiffusion.models import load_model
from swiftdiffusion.pipeline import Pipeline
from swiftdiffusion.request import ControlNetUse, GenerationRequest
from swiftdiffusion.serve import SHM_ARGS
from swiftdiffusion.tiny import SIZE_NAMES, add_controlnets, control_image, ensure_model
from swiftdiffusion.triton.launcher import TritonServer, free_ports
from swiftdiffusion.triton.repository import Deployment, write_repository

PROJECT = Path(__file__).resolve().parents[1]
CONTROLNETS = ("canny", "depth", "openpose")  # openpose: built as perf/bench.py builds it
MODES = ("sequential", "overlap", "async")
CORES = 2
ECHO_MODEL = '''"""Bench-only: returns its inputs (residual tensors) as `echo_<name>`."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(f"echo_{t.name()}", t.as_numpy()) for t in r.inputs()])
                for r in requests]
'''
PROBE_MODEL = '''"""Bench-only: `calls` BLS round trips of its input tensors through `residual_echo`, each timed."""

import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            tensors = [t for t in request.inputs() if t.name() != "calls"]
            seconds = []
            for _ in range(int(pb_utils.get_input_tensor_by_name(request, "calls").as_numpy()[0])):
                began = time.perf_counter()
                response = pb_utils.InferenceRequest(
                    model_name="residual_echo", inputs=[pb_utils.Tensor(t.name(), t.as_numpy()) for t in tensors],
                    requested_output_names=[f"echo_{t.name()}" for t in tensors]).exec()
                if response.has_error():
                    raise pb_utils.TritonModelException(response.error().message())
                for t in tensors:  # read back, as the orchestrator reads a ControlNet's residuals
                    pb_utils.get_output_tensor_by_name(response, f"echo_{t.name()}").as_numpy()
                seconds.append(time.perf_counter() - began)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("seconds", np.array(seconds, np.float32))]))
        return responses
'''
BATCHED_MODEL = '''"""Bench-only: the ControlNet service with dynamic batching; a batch's requests grouped by name."""

import torch
import triton_python_backend_utils as pb_utils

from swiftdiffusion.triton.serving import ControlNetServiceModel


class TritonPythonModel(ControlNetServiceModel):
    pb = pb_utils

    def execute(self, requests):
        groups = {}
        for index, request in enumerate(requests):
            name = pb_utils.get_input_tensor_by_name(request, "controlnet_name").as_numpy().reshape(-1)[0].decode()
            groups.setdefault(name, []).append(index)
        responses = [None] * len(requests)
        for name, members in groups.items():
            inputs = {n: torch.cat([torch.from_numpy(pb_utils.get_input_tensor_by_name(requests[i], n).as_numpy())
                                    for i in members]).to(self.device, self.dtype) for n in self.input_names}
            inputs["timestep"] = inputs["timestep"].reshape(-1)
            engine = self.catalog.get(name)
            outputs = engine(inputs)
            parts = [outputs[n].split(2) for n in engine.spec.outputs]  # two rows (the CFG pair) per request
            for row, index in enumerate(members):
                responses[index] = pb_utils.InferenceResponse(
                    [self.tensor(n, part[row]) for n, part in zip(engine.spec.outputs, parts)])
        return responses
'''


def prepare(root: Path, size: str) -> Path:
    """The model and its ControlNet catalog with a third ControlNet (built once, as perf/bench.py builds it)."""
    ensure_model(root, size)
    add_controlnets(root, CONTROLNETS[2:], size)
    return root


def text_width(root: Path) -> int:
    return int(json.loads((root / "model" / "unet" / "config.json").read_text())["cross_attention_dim"])


def timed(call, repeats: int) -> float:
    call()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def graph_times(root: Path, resolution: int, repeats: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Seconds per call of each graph, in-process on one torch thread, with the CFG batch of two; and one
    ControlNet call's residuals."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_model(root / "model", parts=("unet",))
        engines = model.engines
        controlnet = ControlNetCatalog(root / "controlnets").get(CONTROLNETS[0])
        latent = resolution // model.vae_scale_factor
        inputs = {"sample": torch.randn(2, model.latent_channels, latent, latent), "timestep": torch.tensor([500.0]),
                  "encoder_hidden_states": torch.randn(2, 77, text_width(root))}
        hidden = engines["unet_encoder"](inputs)
        decoder_inputs = {name: hidden.get(name, inputs.get(name)) for name in engines["unet_decoder"].spec.inputs}
        control = {**inputs, "controlnet_cond": torch.rand(2, 3, resolution, resolution)}
        four = {name: value.repeat(4, *[1] * (value.dim() - 1)) if value.shape[0] == 2 else value
                for name, value in control.items()}
        residuals = {name: value.numpy() for name, value in controlnet(control).items()}
        beside = side_by_side(lambda: engines["unet_encoder"](inputs), lambda: controlnet(control), repeats)
        return {**beside, "t_enc": timed(lambda: engines["unet_encoder"](inputs), repeats),
                "t_dec": timed(lambda: engines["unet_decoder"](decoder_inputs), repeats),
                "t_cn": timed(lambda: controlnet(control), repeats),
                "t_cn_per_request_in_batch_of_4": timed(lambda: controlnet(four), repeats) / 4,
                "t_unet": timed(lambda: engines["unet"](inputs), repeats),
                "residual_bytes_per_call": sum(value.nbytes for value in residuals.values()),
                "input_bytes_per_call": sum(t.numel() * t.element_size() for t in control.values())}, residuals
    finally:
        torch.set_num_threads(threads)


def side_by_side(encoder, controlnet, repeats: int) -> dict[str, float]:
    """The UNet encoder and one ControlNet call started together on two threads (one torch thread each), as the
    overlap runs them: median seconds of each and of the pair. Slower than alone where the two cores share
    something (memory bandwidth, caches, a hypervisor's scheduling)."""
    samples = []
    with concurrent.futures.ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for _ in range(repeats + 1):
            began = time.perf_counter()
            futures = [pool.submit(seconds, encoder), pool.submit(seconds, controlnet)]
            samples.append([future.result() for future in futures] + [time.perf_counter() - began])
    encoder_s, controlnet_s, pair_s = (statistics.median(column) for column in zip(*samples[1:]))
    return {"t_enc_beside_cn": encoder_s, "t_cn_beside_enc": controlnet_s, "t_enc_cn_pair": pair_s}


def ideal_speedups(t: dict[str, float], count: int) -> dict[str, float]:
    """Over `sequential`, on CORES cores with two ControlNet instances (see the module docstring)."""
    work = count * t["t_cn"] + t["t_enc"] + t["t_dec"]
    rounds = math.ceil(count / 2) * t["t_cn"]
    overlap = max((count * t["t_cn"] + t["t_enc"]) / CORES, rounds, t["t_enc"]) + t["t_dec"]
    asynchronous = max(work / CORES, rounds, t["t_enc"] + t["t_dec"])
    return {"overlap": work / overlap, "async": work / asynchronous}


def _config(name: str, inputs: list[tuple[str, str, str]], outputs: list[tuple[str, str, str]]) -> str:
    """A one-CPU-instance Python model's config; tensors as (name, data type, dims)."""
    def tensors(specs):
        return ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {d} ] }}' for n, t, d in specs)
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\ninput [\n{tensors(inputs)}\n]\n'
            f'output [\n{tensors(outputs)}\n]\ninstance_group [ {{ count: 1 kind: KIND_CPU }} ]\n')


def write_bench_repository(out: Path, root: Path, residual_names: list[str]) -> Path:
    """The project's repository for this model, plus the bench-only `controlnet_batched`, `residual_echo` and
    `bls_probe`."""
    repository = write_repository(out, Deployment(
        model=root / "model", controlnet_catalog=root / "controlnets", lora_catalog=str(root / "loras"),
        controlnet_instances=2, torch_threads=1, resident_controlnets=len(CONTROLNETS)))
    config = (repository / "controlnet" / "config.pbtxt").read_text()
    # With a batch dimension, every input carries it: the batched model's dims drop the leading CFG dim.
    config = config.replace('name: "controlnet"', 'name: "controlnet_batched"').replace(
        "max_batch_size: 0\n", "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 5000 }\n")
    config = config.replace("dims: [ -1, ", "dims: [ ")
    (repository / "controlnet_batched" / "1").mkdir(parents=True)
    (repository / "controlnet_batched" / "config.pbtxt").write_text(config)
    (repository / "controlnet_batched" / "1" / "model.py").write_text(BATCHED_MODEL)
    residuals = [(name, "TYPE_FP32", "-1, -1, -1, -1") for name in residual_names]
    configs = {"residual_echo": (residuals, [(f"echo_{n}", t, d) for n, t, d in residuals], ECHO_MODEL),
               "bls_probe": ([*residuals, ("calls", "TYPE_INT32", "1")], [("seconds", "TYPE_FP32", "-1")], PROBE_MODEL)}
    for name, (inputs, outputs, code) in configs.items():
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "config.pbtxt").write_text(_config(name, inputs, outputs))
        (repository / name / "1" / "model.py").write_text(code)
    return repository


def stream(client: Client, request: GenerationRequest) -> tuple[float, float]:
    """(median seconds per step after the first, seconds for the image)."""
    began = time.perf_counter()
    elapsed = []
    for message in client.stream(request):
        if isinstance(message, Progress):
            elapsed.append(message.elapsed_s)
        elif isinstance(message, Generated):
            image_s = time.perf_counter() - began
    return statistics.median(np.diff(elapsed)), image_s


def controlnet_stats(http_url: str, model: str) -> dict[str, int]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    stats = json.loads(opener.open(f"http://{http_url}/v2/models/{model}/stats", timeout=10).read())["model_stats"][0]
    found = {key: int(value["ns"]) for key, value in stats["inference_stats"].items() if key != "fail"}
    found["calls"] = int(stats["inference_stats"]["success"]["count"])
    found["executions"] = int(stats["execution_count"])
    return found


def bls_round_trips(url: str, residuals: dict[str, np.ndarray], calls: int) -> list[float]:
    """Seconds per BLS round trip of one call's residuals, timed inside the server by `bls_probe`."""
    grpc = grpcclient.InferenceServerClient(url)
    try:
        inputs = infer_inputs({**residuals, "calls": np.array([calls], np.int32)})
        return grpc.infer("bls_probe", inputs, client_timeout=600).as_numpy("seconds").tolist()
    finally:
        grpc.close()


def batching(url: str, resolution: int, width: int, clients: int, calls: int, rounds: int) -> dict:
    """Calls/s with `clients` concurrent senders of one ControlNet: unbatched model against dynamic batching."""
    latent = resolution // 8
    rng = np.random.default_rng(0)
    tensors = {"sample": rng.standard_normal((2, 4, latent, latent), np.float32),
               "encoder_hidden_states": rng.standard_normal((2, 77, width), np.float32),
               "controlnet_cond": rng.random((2, 3, resolution, resolution), np.float32)}
    plain = {"controlnet_name": np.array([CONTROLNETS[0].encode()], np.object_),
             "timestep": np.array([500.0], np.float32), **tensors}
    batched = {**tensors, "controlnet_name": np.array([[CONTROLNETS[0].encode()]] * 2, np.object_),
               "timestep": np.full((2, 1), 500.0, np.float32)}
    cases = {"controlnet": plain, "controlnet_batched": batched}

    def send(model: str) -> None:
        grpc = grpcclient.InferenceServerClient(url)
        for _ in range(calls):
            grpc.infer(model, infer_inputs(cases[model]))
        grpc.close()

    samples: dict[str, list[float]] = {model: [] for model in cases}
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for model in cases:
            send(model)  # loads the ControlNet on the instances
        for _ in range(rounds):
            for model in cases:
                began = time.perf_counter()
                list(pool.map(send, [model] * clients))
                samples[model].append(clients * calls / (time.perf_counter() - began))
    return {"clients": clients, "calls_per_client": calls, "calls_per_s": samples,
            "median_calls_per_s": {model: statistics.median(v) for model, v in samples.items()}}


def cfg_parallel_in_process(root: Path, resolution: int, steps: int, rounds: int) -> dict:
    """Seconds per step in-process on all cores: CFG as one batch of two against two concurrent branches."""
    model = load_model(root / "model")
    pipeline = Pipeline(model, LocalControlNets(ControlNetCatalog(root / "controlnets")))
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for count in (0, 1):
            for parallel in (False, True):
                request = GenerationRequest("a lighthouse at dusk", seed=2, steps=steps, height=resolution,
                                            width=resolution, cfg_parallel=parallel,
                                            controlnets=tuple(ControlNetUse(name, control_image(1, resolution))
                                                              for name in CONTROLNETS[:count]))
                elapsed: list[float] = []
                pipeline.generate(request, on_step=lambda step, total, seconds: elapsed.append(seconds))
                samples.setdefault(f"{count}cn_{'parallel' if parallel else 'batched'}", []).append(
                    statistics.median(np.diff(elapsed)))
    return {"threads": torch.get_num_threads(), "step_s": samples,
            "median_step_s": {case: statistics.median(v) for case, v in samples.items()}}


def async_image_effect(roots: dict[str, Path], resolution: int, steps: int) -> dict:
    """In-process, per model size and ControlNet count: how far `async` moves the image from the synchronous
    one, next to how far the ControlNets move it from the image without them (in 1/255 of the uint8 image)."""
    effect = {}
    for size, root in roots.items():
        pipeline = Pipeline(load_model(root / "model"), LocalControlNets(ControlNetCatalog(root / "controlnets")))
        side = 64 if size == "tiny" else resolution
        base = GenerationRequest("a lighthouse at dusk", negative_prompt="blurry", seed=3, steps=steps, height=side,
                                 width=side)
        plain = pipeline.generate(base).image
        for count in range(1, len(CONTROLNETS) + 1):
            controlled = dataclasses.replace(base, controlnets=tuple(
                ControlNetUse(name, control_image(i, side), 1.0) for i, name in enumerate(CONTROLNETS[:count])))
            synchronous = pipeline.generate(controlled).image
            asynchronous = pipeline.generate(dataclasses.replace(controlled, controlnet_mode="async")).image
            effect[f"{size}_{count}cn"] = {"resolution": side, "steps": steps,
                                           "async_vs_sync": image_difference(asynchronous, synchronous),
                                           "sync_vs_no_controlnet": image_difference(synchronous, plain)}
    return effect


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = list(range(len(CONTROLNETS) + 1))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, key, title in ((axes[0], "median_step_s", "seconds per step"),
                             (axes[1], "median_image_s", "seconds per image")):
        for mode in MODES:
            axis.plot(counts, [report[key][f"{n}_{mode}"] for n in counts], marker="o", label=mode)
        if key == "median_step_s":
            for mode, style in (("overlap", "--"), ("async", ":")):
                ideal = [report[key][f"{n}_sequential"] / report["ideal_speedup"][str(n)][mode] for n in counts]
                axis.plot(counts, ideal, style, color="grey", marker="x", label=f"ideal {mode}")
        axis.set_xlabel("ControlNets per request")
        axis.set_ylabel(title)
        axis.set_xticks(counts)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(f"ControlNet modes through Triton ({report['model']}, {report['resolution']}px, "
                    f"{report['machine']}, 1 torch thread per instance)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=SIZE_NAMES)
    parser.add_argument("--root", type=Path, default=None, help="model folder (default models/<size>)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="calls per graph for the in-process timings")
    parser.add_argument("--batching-calls", type=int, default=4, help="calls per client in the batching test")
    parser.add_argument("--effect-sizes", nargs="*", default=["tiny", "small"], choices=SIZE_NAMES,
                        help="models on which to measure the asynchronous mode's effect on the image")
    parser.add_argument("--effect-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=PROJECT / "perf" / "results" / "controlnet_bench.json")
    args = parser.parse_args()

    root = prepare(args.root or PROJECT / "models" / args.size, args.size)
    effect = async_image_effect({size: root if size == args.size else prepare(PROJECT / "models" / size, size)
                                 for size in args.effect_sizes}, args.resolution, args.effect_steps)
    times, residuals = graph_times(root, args.resolution, args.repeats)
    cfg = cfg_parallel_in_process(root, args.resolution, max(3, args.steps // 2), max(1, args.rounds - 1))
    print("graphs (s):", {k: round(v, 4) for k, v in times.items()}, flush=True)
    work = Path(tempfile.mkdtemp(prefix="controlnet_bench_"))
    repository = write_bench_repository(work / "repository", root, list(residuals))
    server = TritonServer()
    server.start(repository, free_ports(3), log_file=work / "server.log", model_control_mode="explicit",
                 extra_args=[*SHM_ARGS, "--load-model=text_to_image_stream", "--load-model=controlnet",
                             "--load-model=controlnet_batched", "--load-model=bls_probe",
                             "--load-model=residual_echo"])
    try:
        server.wait_ready(timeout=900)
        client = Client(server.grpc_url, timeout_s=600)
        base = GenerationRequest("a lighthouse at dusk", negative_prompt="blurry", seed=1, steps=args.steps,
                                 height=args.resolution, width=args.resolution)
        cases = {f"{n}_{mode}": dataclasses.replace(base, controlnet_mode=mode, controlnets=tuple(
            ControlNetUse(name, control_image(i, args.resolution), 1.0) for i, name in enumerate(CONTROLNETS[:n])))
            for n in range(len(CONTROLNETS) + 1) for mode in (MODES if n else MODES[:1])}
        for request in cases.values():
            stream(client, dataclasses.replace(request, steps=2))  # warm-up: ControlNets loaded, first calls done
        before = controlnet_stats(server.http_url, "controlnet")
        step_s: dict[str, list[float]] = {case: [] for case in cases}
        image_s: dict[str, list[float]] = {case: [] for case in cases}
        for round_index in range(args.rounds):
            for case, request in cases.items():
                step, image = stream(client, request)
                step_s[case].append(step)
                image_s[case].append(image)
            print(f"round {round_index + 1}/{args.rounds} step s:", {k: round(v[-1], 3) for k, v in step_s.items()},
                  flush=True)
        after = controlnet_stats(server.http_url, "controlnet")
        batch = batching(server.grpc_url, args.resolution, text_width(root), 4, args.batching_calls, args.rounds)
        batched_stats = controlnet_stats(server.http_url, "controlnet_batched")
        round_trips = bls_round_trips(server.grpc_url, residuals, 5 * args.repeats)[1:]  # the first one warms up
        client.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    median_step = {case: statistics.median(v) for case, v in step_s.items()}
    median_image = {case: statistics.median(v) for case, v in image_s.items()}
    for mode in MODES[1:]:  # the mode plays no part without ControlNets: one measurement stands for all three
        median_step[f"0_{mode}"], median_image[f"0_{mode}"] = median_step["0_sequential"], median_image["0_sequential"]
    counts = range(len(CONTROLNETS) + 1)
    ideal = {str(n): ideal_speedups(times, n) if n else {"overlap": 1.0, "async": 1.0} for n in counts}
    measured = {str(n): {mode: median_step[f"{n}_sequential"] / median_step[f"{n}_{mode}"] for mode in MODES[1:]}
                for n in counts}
    calls = after["calls"] - before["calls"]
    per_call_ms = {key: (after[key] - before[key]) / max(calls, 1) / 1e6 for key in after
                   if key not in ("calls", "executions")}
    rates = batch["calls_per_s"]
    batching_gain = batch["median_calls_per_s"]["controlnet_batched"] / batch["median_calls_per_s"]["controlnet"]
    batching_helps = batching_gain > 1.05 and min(rates["controlnet_batched"]) > max(rates["controlnet"])
    report = {
        "machine": f"{os.cpu_count()} CPU cores", "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d"),
        "command": "python perf/controlnet_bench.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in ("out", "root")),
        "model": args.size, "resolution": args.resolution, "steps": args.steps, "rounds": args.rounds,
        "controlnet_instances": 2, "torch_threads_per_instance": 1,
        "graphs_in_process_1_thread_s": times,
        "median_step_s": median_step, "median_image_s": median_image, "step_s": step_s, "image_s": image_s,
        "speedup_vs_sequential": {"measured": measured, "ideal": ideal},
        "ideal_speedup": ideal,
        "overlap_share_of_ideal_1cn": measured["1"]["overlap"] / ideal["1"]["overlap"],
        # The same ideal with the encoder and ControlNet timed side by side instead of alone.
        "ideal_overlap_1cn_side_by_side": (times["t_cn"] + times["t_enc"] + times["t_dec"])
        / (times["t_enc_cn_pair"] + times["t_dec"]),
        "bls_transfer": {
            "echo_round_trip_s": {"median": statistics.median(round_trips), "min": min(round_trips),
                                  "max": max(round_trips), "samples": round_trips},
            "bytes_each_way": times["residual_bytes_per_call"],
            "share_of_controlnet_call": statistics.median(round_trips) / times["t_cn"],
            "controlnet_model_stats_per_call_ms": per_call_ms,
        },
        "batching": {**batch, "gain": batching_gain, "batched_model_executions": batched_stats["executions"],
                     "batched_model_calls": batched_stats["calls"],
                     "in_process_per_request_s": {"alone": times["t_cn"],
                                                  "in_batch_of_4": times["t_cn_per_request_in_batch_of_4"]},
                     "verdict": "faster in this run (every round, > 5%)" if batching_helps else
                     "no consistent gain in this run",
                     "product": "the controlnet model stays unbatched: the one denoiser instance runs requests one "
                                "at a time, so calls of different requests never reach it together (a batch would "
                                "need >= 2 denoiser instances, and a batch dimension on every ControlNet input)"},
        "cfg_parallel_in_process": cfg,
        "async_image_effect": effect,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    chart(report, args.out.with_suffix(".png"))
    print(json.dumps({k: report[k] for k in ("median_step_s", "speedup_vs_sequential", "overlap_share_of_ideal_1cn",
                                             "bls_transfer")}, indent=2))
    print("batching gain", round(batching_gain, 3), "cfg", cfg["median_step_s"])
    print(args.out)


if __name__ == "__main__":
    main()

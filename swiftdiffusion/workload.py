"""Production-shaped load: request mixes drawn from published trace statistics, open- and closed-loop drivers.

Why this shape: the claim under test is about add-ons, so the load must carry them as production does
(`data/trace_stats.json`, SwiftDiffusion's two services): almost every request has 1-2 ControlNets drawn from a
few popular ones, and 1-2 LoRAs drawn from a catalog so large that consecutive requests almost never share one.
- ControlNets per request and LoRAs per request: drawn from the service's published distributions (a count above
  the local catalog's size is capped to it).
- ControlNet identities: Zipf over the catalog in the given order (most popular first), with the exponent fitted
  so that the service's top-k ControlNets cover its published share of uses among its distinct ControlNets.
- LoRA identities: uniform over the catalog (99.8% of production LoRAs each get under 1% of uses; with 200
  entries each gets 0.5%), distinct within a request.
- Arrivals: Poisson at a given rate (open loop), or none (closed loop at a given concurrency).
Everything comes from one seed, so a workload replays exactly; a trace file (CSV or JSON) records or replays one.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import functools
import json
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import tritonclient.grpc as grpcclient

from .client import AsyncClient, infer_inputs, lora_step_of
from .request import ControlNetUse, GenerationRequest, LoraUse
from .schema import tensors_from_request
from .tiny import control_image

STATS_PATH = Path(__file__).resolve().parent / "data" / "trace_stats.json"
PROMPTS = ("a lighthouse at dusk", "a portrait of a woman in a red coat", "a cat on a windowsill",
           "a mountain village in winter")
LORA_SCALE = 0.8
CONTROLNET_SCALE = 1.0
TRACE_FIELDS = ("time_s", "controlnets", "loras", "steps", "size", "seed")


@dataclasses.dataclass(frozen=True)
class TraceEntry:
    """One request of a workload: when it arrives (seconds after the start; 0 in closed loop) and what it asks."""

    time_s: float
    controlnets: tuple[str, ...]
    loras: tuple[str, ...]
    steps: int
    size: int
    seed: int


@dataclasses.dataclass(frozen=True)
class Mix:
    """One service's published request shape."""

    name: str
    controlnet_counts: dict[int, float]
    lora_counts: dict[int, float]
    controlnet_zipf: float


def load_stats(path: Path = STATS_PATH) -> dict:
    """The published trace statistics, kept as data so that the numbers and their source travel together."""
    return json.loads(Path(path).read_text())


def zipf_exponent(distinct: int, top: int, share: float) -> float:
    """The exponent s for which the `top` most popular of `distinct` items (weights 1/rank^s) get `share` of uses."""
    ranks = np.arange(1, distinct + 1, dtype=np.float64)
    low, high = 0.0, 20.0
    for _ in range(60):  # the top share grows with s: bisect
        middle = (low + high) / 2
        weights = ranks ** -middle
        low, high = (middle, high) if weights[:top].sum() / weights.sum() < share else (low, middle)
    return (low + high) / 2


def mix(name: str, stats: dict | None = None) -> Mix:
    """Service `name` ("A" or "B") of the trace statistics."""
    service = (stats or load_stats())["services"][name]
    top = service["top_controlnets"]
    return Mix(name, {int(k): v for k, v in service["controlnets_per_request"].items()},
               {int(k): v for k, v in service["loras_per_request"].items()},
               zipf_exponent(service["distinct_controlnets"], top["count"], top["share_of_uses"]))


def generate(service: Mix, count: int, controlnets: Sequence[str], loras: Sequence[str],
             rate_per_s: float | None = None, steps: int = 10, size: int = 192, seed: int = 0) -> list[TraceEntry]:
    """`count` requests shaped as `service` over these catalogs (`controlnets` most popular first), arriving as a
    Poisson process at `rate_per_s` (None: closed loop, every time 0)."""
    rng = np.random.default_rng(seed)
    popularity = np.arange(1, len(controlnets) + 1, dtype=np.float64) ** -service.controlnet_zipf
    popularity /= popularity.sum()
    cn_counts, cn_probs = zip(*sorted(service.controlnet_counts.items()))
    lora_counts, lora_probs = zip(*sorted(service.lora_counts.items()))
    time_s, entries = 0.0, []
    for _ in range(count):
        if rate_per_s is not None:
            time_s += float(rng.exponential(1.0 / rate_per_s))
        n_cn = min(int(rng.choice(cn_counts, p=cn_probs)), len(controlnets))
        n_lora = min(int(rng.choice(lora_counts, p=lora_probs)), len(loras))
        chosen_cn = rng.choice(len(controlnets), n_cn, replace=False, p=popularity) if n_cn else []
        chosen_lora = rng.choice(len(loras), n_lora, replace=False) if n_lora else []
        entries.append(TraceEntry(round(time_s, 6), tuple(controlnets[i] for i in chosen_cn),
                                  tuple(loras[i] for i in chosen_lora), steps, size, int(rng.integers(2**31))))
    return entries


# ---- trace files ----------------------------------------------------------------------------------------------
def write_trace(path: Path, entries: Sequence[TraceEntry]) -> Path:
    """CSV (lists joined by '|') or JSON, by the file's suffix."""
    path = Path(path)
    rows = [dataclasses.asdict(e) for e in entries]
    if path.suffix == ".json":
        path.write_text(json.dumps({"entries": rows}, indent=1))
        return path
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, TRACE_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "controlnets": "|".join(row["controlnets"]), "loras": "|".join(row["loras"])})
    return path


def read_trace(path: Path) -> list[TraceEntry]:
    path = Path(path)
    if path.suffix == ".json":
        rows = json.loads(path.read_text())["entries"]
    else:
        with path.open(newline="") as file:
            rows = [{**row, "controlnets": [n for n in row["controlnets"].split("|") if n],
                     "loras": [n for n in row["loras"].split("|") if n]} for row in csv.DictReader(file)]
    return [TraceEntry(float(r["time_s"]), tuple(r["controlnets"]), tuple(r["loras"]), int(r["steps"]),
                       int(r["size"]), int(r["seed"])) for r in rows]


# ---- requests -------------------------------------------------------------------------------------------------
def to_request(entry: TraceEntry) -> GenerationRequest:
    """The entry as a request: default (`bounded`) LoRA mode; the baseline ignores the mode."""
    return GenerationRequest(
        PROMPTS[entry.seed % len(PROMPTS)], negative_prompt="blurry", seed=entry.seed, steps=entry.steps,
        height=entry.size, width=entry.size, loras=tuple(LoraUse(n, LORA_SCALE) for n in entry.loras),
        controlnets=tuple(ControlNetUse(n, control_image(entry.seed + i, entry.size), CONTROLNET_SCALE)
                          for i, n in enumerate(entry.controlnets)))


# ---- drivers --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    """One request's result; latency runs from its scheduled arrival (open loop) or its send (closed loop)."""

    index: int
    latency_s: float
    ok: bool
    lora_step: int = -1
    error: str = ""


OUTPUTS = ("image", "lora_step")


def _outcome(index: int, began: float, result, error) -> Outcome:
    latency = time.perf_counter() - began
    if error is not None:
        return Outcome(index, latency, False, error=str(error)[:300])
    return Outcome(index, latency, True, lora_step_of(result))


def run_open_loop(url: str, model: str, entries: Sequence[TraceEntry],
                  timeout_s: float = 600.0) -> tuple[list[Outcome], float]:
    """Sends each entry at its arrival time whatever the server's state; (outcomes, wall seconds).

    Latency counts from the scheduled arrival, so a sender running late cannot hide queueing (no coordinated
    omission). Requests are built before the clock starts.
    """
    inputs = [infer_inputs(tensors_from_request(to_request(e))) for e in entries]
    outcomes: list[Outcome] = []
    finished = threading.Condition()
    client = grpcclient.InferenceServerClient(url)
    start = time.perf_counter()

    def done(index: int, began: float, result, error) -> None:
        with finished:
            outcomes.append(_outcome(index, began, result, error))
            finished.notify()

    try:
        for index, (entry, tensors) in enumerate(zip(entries, inputs)):
            arrival = start + entry.time_s
            time.sleep(max(0.0, arrival - time.perf_counter()))
            client.async_infer(model, tensors, callback=functools.partial(done, index, arrival),  # (result=, error=)
                               outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUTS],
                               client_timeout=timeout_s)
        with finished:
            finished.wait_for(lambda: len(outcomes) == len(entries), timeout=timeout_s)
            answered = {o.index for o in outcomes}
            outcomes += [Outcome(i, float("nan"), False, error="no response") for i in range(len(entries))
                         if i not in answered]
            return sorted(outcomes, key=lambda o: o.index), time.perf_counter() - start
    finally:
        client.close()


def run_closed_loop(url: str, model: str, entries: Sequence[TraceEntry], concurrency: int,
                    timeout_s: float = 600.0) -> tuple[list[Outcome], float]:
    """`concurrency` clients each send their next entry when the last one returns; (outcomes, wall seconds).

    The clients are coroutines sharing one asyncio gRPC client; requests are built before the clock starts.
    """
    requests = [to_request(e) for e in entries]
    return asyncio.run(_closed_loop(url, model, requests, concurrency, timeout_s))


async def _closed_loop(url: str, model: str, requests: list[GenerationRequest], concurrency: int,
                       timeout_s: float) -> tuple[list[Outcome], float]:
    pending = iter(range(len(requests)))  # shared: each client takes the next entry
    outcomes: list[Outcome] = []
    async with AsyncClient(url, timeout_s=timeout_s) as client:
        async def one_client() -> None:
            for index in pending:
                began = time.perf_counter()
                try:
                    result = await client.generate(requests[index], model)
                    outcomes.append(Outcome(index, time.perf_counter() - began, True, result.lora_step))
                except Exception as failure:  # recorded as a failed request, the run goes on
                    outcomes.append(Outcome(index, time.perf_counter() - began, False, error=str(failure)[:300]))

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return sorted(outcomes, key=lambda o: o.index), time.perf_counter() - start


def summarize(outcomes: Sequence[Outcome], wall_s: float) -> dict:
    """Latency statistics over successful requests, throughput in images per minute, failures."""
    latencies = np.array([o.latency_s for o in outcomes if o.ok])
    stats = {"requests": len(outcomes), "failures": sum(not o.ok for o in outcomes), "wall_s": wall_s,
             "throughput_per_min": 60.0 * len(latencies) / wall_s if wall_s > 0 else 0.0,
             "mean_s": None, "p50_s": None, "p95_s": None, "p99_s": None}
    if len(latencies):
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
        stats.update(mean_s=float(latencies.mean()), p50_s=float(p50), p95_s=float(p95), p99_s=float(p99))
    return stats


def catalog_names(controlnets: Path, loras: Path) -> tuple[list[str], list[str]]:
    """Names in two local catalogs: ControlNet folders (sorted, which is their popularity order) and LoRA files."""
    return (sorted(p.name for p in Path(controlnets).iterdir() if (p / "config.json").is_file()),
            sorted(p.stem for p in Path(loras).glob("*.safetensors")))

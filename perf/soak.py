"""Soak test with injected faults: a real tritonserver under open-loop production load for N minutes.

    python perf/soak.py --minutes 30 --window-minutes 5 --load 0.8 --out perf/results/soak

Starts its own server on the built-in tiny model (`--models`, built there on first use) with a 200-LoRA catalog
(`bench.write_lora_catalog`), measures its capacity with a short closed loop (concurrency 2), then sends Poisson
arrivals at `--load` x that capacity: production mixes (`swiftdiffusion.workload`, services A and B window by
window), LoRAs drawn from the 200, ControlNets `canny` and `depth`. In every window, at fixed fractions of it,
one fault of each kind is injected:
- `kill_controlnet`: SIGKILL of one `controlnet_*` Python-backend stub. The launcher's supervisor reloads the
  model (`server.supervisor.reloads`). Requests failing with INTERNAL `... is not healthy` / `ControlNet '...'
  failed` (or NOT_FOUND `... has no available versions` while it is unloaded) from the kill until 30 s after the
  reload are expected.
- `corrupt_lora`: a LoRA of random bytes or a truncated safetensors file -> INVALID_ARG `lora_names: ...`.
- `nan_lora`: a catalog LoRA with one tensor set to NaN -> INVALID_ARG `lora_names: ... non-finite ...`.
- `expired_deadline`: a long request with `timeout_s=0.5` -> CANCELLED `timeout_s: ...`, or the client's own
  DEADLINE_EXCEEDED; the server's `swiftdiffusion_requests_stopped_total` must count the stop, and a probe right
  after must be served in normal time.
- `cancelled_stream`: a long streaming request closed after two progress messages; the stream model must count
  the stop within a few steps, and a streaming probe right after must be served in normal time.
- `queue_burst`: max_queue + 4 requests at once, never resent -> UNAVAILABLE `Exceeds maximum queue size` within
  a second for those the queue has no room for, the rest served.
The open loop's clients behave as the README asks clients to: a request refused with a full queue is resent after
the client library's jittered backoff until its client's deadline (`--request-timeout`, 120 s from its arrival;
the JSON counts the resends). At 80% load a bounded queue refuses some arrivals even without faults (an M/M/1
queue with room for 8 turns away ~3% of them), and its full spells last tens of seconds: in the 30-minute runs of
2026-12-02 one request in eight met a full queue at least once; 19 of 4211 were still refused after 6 resends,
1 of 5004 after 12 (`perf/results/soak/run_2026-12-02_retries*.json`), so a client that gives up after a count
of resends, rather than at its deadline, loses some. A request still refused after its retries is a failure;
queue-full failures of ordinary requests are expected only during a burst and while a reload takes the cores.
Every other failure is unexpected. Every `--sample-seconds` the RSS of the tritonserver process and of every
Python-backend stub (by instance name) and the use of /dev/shm are sampled.

Writes OUT/soak.json (command line, machine, parameters, capacity, per-window stats, fault log, totals, criteria),
OUT/soak_samples.json (every sample) and OUT/soak.png. Criteria: no unexpected failure; spot-checked served images
equal the in-process pipeline's (max abs difference <= 1/255, at least one per window; computed after the server
stopped); no window's RSS more than 5% above the first window's, per model process (a stub restarted by a reload
is a new process: compared from its reload on; the tritonserver process's own ratio is reported beside it); no stub of a replaced model version still alive at the end; /dev/shm
back to its start after shutdown (what this server mapped, and new files nobody maps); the server free again
right after a stopped request. Exit code 1 if any fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench, measuring: next to this script

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from measuring import image_difference
from swiftdiffusion.client import MODEL, Client, Generated, Progress, backoff_s, infer_inputs, lora_step_of
from swiftdiffusion.request import GenerationRequest, LoraUse
from swiftdiffusion.schema import tensors_from_request
from swiftdiffusion.serve import SHM_ARGS
from swiftdiffusion.tiny import SIZE_NAMES, SIZES, ensure_model
from swiftdiffusion.workload import PROMPTS, TraceEntry, generate, mix, to_request

PROJECT = Path(__file__).resolve().parents[1]
CONTROLNETS = ("canny", "depth")  # the tiny model's two, most popular first
LORA_FOLDER = "soak_loras"
FAULTS = ("kill_controlnet", "corrupt_lora", "nan_lora", "expired_deadline", "cancelled_stream", "queue_burst")
# When in each window each fault is injected (fraction of the window). The kill comes first, so that the
# restarted ControlNet stubs are measured over most of the window they start in.
FAULT_AT = {"kill_controlnet": 0.05, "corrupt_lora": 0.25, "nan_lora": 0.35, "expired_deadline": 0.45,
            "cancelled_stream": 0.6, "queue_burst": 0.8}
CORRUPT_VARIANTS = ("corrupt_truncated", "corrupt_random")
NAN_LORA = "nan_lora"
DEADLINE_S = 0.5
RELOAD_GRACE_S = 30.0  # failures this long after a reload completed still count as the kill's (at least)
RELOAD_TIMEOUT_S = 180.0
BURST_GRACE_S = 2.0  # queue-full refusals this long after a burst's last answer still count as the burst's
# (at least): a full queue drains at (1 - load) x capacity, so after a burst or a reload the queue may stay full
# for max_queue / that; twice it (Poisson arrivals) is the grace both get, capped at half a window.
REFUSED_AT_ONCE_S = 1.0  # a burst's queue-full refusals come back within this (they never wait in the queue)
RSS_LIMIT = 1.05
SHM_SLACK_BYTES = 64 * 1024
SPOT_TOLERANCE = 1  # in 1/255
UNAVAILABLE, INTERNAL, CANCELLED, DEADLINE, INVALID, NOT_FOUND = (
    "StatusCode.UNAVAILABLE", "StatusCode.INTERNAL", "StatusCode.CANCELLED", "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND")
QUEUE_FULL = "Exceeds maximum queue size"
# A request meeting the killed stub, or the ControlNet model while the supervisor has it unloaded.
DEAD_STUB = re.compile(r"is not healthy|ControlNet '[^']*' failed|has no available versions")
FAULT_RETRIES = 8  # fault requests and probes are resent while refused with UNAVAILABLE (a full queue)
OUTPUTS = ("image", "lora_step")


# ---- catalogs -------------------------------------------------------------------------------------------------
def prepare(root: Path, size: str, lora_count: int, seed: int = 0) -> tuple[Path, Path, Path, list[str]]:
    """The model (built once), its ControlNet catalog, and a catalog of `lora_count` LoRAs beside it
    (`root/soak_loras`, built once); returns (model, controlnets, loras, LoRA names)."""
    from bench import write_lora_catalog  # perf/bench.py: the 200-file catalog the benchmark uses

    ensure_model(root, size, seed)
    model, controlnets, loras = root / "model", root / "controlnets", root / LORA_FOLDER
    names = [f"lora_{i:03d}" for i in range(lora_count)]
    if sorted(p.stem for p in loras.glob("lora_*.safetensors")) != names:
        from swiftdiffusion.models import load_components

        write_lora_catalog(loras, load_components(model, parts=("text", "unet")).lora_modules(),
                           SIZES["sd15"][size].lora_rank, lora_count, seed)
    return model, controlnets, loras, names


def write_fault_loras(loras: Path, source: str, seed: int = 0) -> dict[str, str]:
    """The bad files in the catalog: a truncated safetensors file, random bytes, a LoRA with a NaN tensor."""
    import torch
    from safetensors.torch import load_file, save_file

    data = (loras / f"{source}.safetensors").read_bytes()
    (loras / f"{CORRUPT_VARIANTS[0]}.safetensors").write_bytes(data[: len(data) // 2])
    (loras / f"{CORRUPT_VARIANTS[1]}.safetensors").write_bytes(np.random.default_rng(seed).bytes(len(data)))
    tensors = load_file(loras / f"{source}.safetensors")
    poisoned = next(k for k in sorted(tensors) if tensors[k].ndim >= 2)
    tensors[poisoned] = torch.full_like(tensors[poisoned], float("nan"))
    save_file(tensors, loras / f"{NAN_LORA}.safetensors", metadata={"format": "pt"})
    return {"source": source, "nan_tensor": poisoned, "truncated_bytes": len(data) // 2, "random_bytes": len(data)}


def remove_fault_loras(loras: Path) -> None:
    for name in (*CORRUPT_VARIANTS, NAN_LORA):
        (loras / f"{name}.safetensors").unlink(missing_ok=True)


# ---- processes and /dev/shm -----------------------------------------------------------------------------------
def all_stubs(repository: Path) -> list[tuple[str, int, int]]:
    """(instance name, pid, start time in clock ticks) of this repository's live Python-backend stubs; an instance
    can have more than one (a stub of a model version that never finished unloading)."""
    root = str(repository.resolve()) + os.sep
    stubs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if len(args) > 1 and args[0].endswith("triton_python_backend_stub") and args[1].startswith(root):
            model = Path(args[1]).parents[1].name
            # A stub without an instance name is the model-level one Triton starts while it loads the model.
            name = next((a for a in args[2:] if re.fullmatch(rf"{re.escape(model)}_\d+_\d+", a)), f"{model}@{pid}")
            if stat[0] != "Z":
                stubs.append((name, int(pid), int(stat[19])))
    return stubs


def stub_processes(repository: Path) -> dict[str, int]:
    """Instance name (`denoiser_0_0`, `controlnet_0_1`, ...) -> pid of its newest live stub."""
    return {name: pid for name, pid, _ in sorted(all_stubs(repository), key=lambda s: s[2])}


def stale_stubs(repository: Path, superseded: dict[str, set[int]] | None = None) -> dict[str, list[int]]:
    """Instance name -> pids of its stubs still alive that a newer stub replaced (there should be none once a
    reload is over). `superseded` carries what earlier calls saw: a replaced stub stays stale once its
    replacement has gone."""
    superseded = {} if superseded is None else superseded
    newest, stale = stub_processes(repository), {}
    for name, pid, _ in all_stubs(repository):
        if pid != newest[name]:
            superseded.setdefault(name, set()).add(pid)
        if pid in superseded.get(name, ()):
            stale.setdefault(name, []).append(pid)
    return stale


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def shm_mapped(pids) -> set[str]:
    """/dev/shm files these processes map (deleted ones left out)."""
    files = set()
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/dev/shm/") and not fields[5].endswith("(deleted)"):
                files.add(fields[5])
    return files


def metric(metrics_url: str, name: str, **labels: str) -> float:
    """The sum of one metric's samples with these labels on the server's metrics endpoint (0 if absent)."""
    import urllib.request

    text = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(metrics_url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line.split("}", 1)[0] for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


STOPPED = "swiftdiffusion_requests_stopped_total"
STEPS = "swiftdiffusion_denoise_steps_total"
STOP_SEEN_S = 10.0  # a stopped request must show in the server's stop counter this soon


def shm_files() -> dict[str, int]:
    """Path -> bytes in use, of every file under /dev/shm."""
    used = {}
    for folder, _, names in os.walk("/dev/shm"):
        for name in names:
            path = os.path.join(folder, name)
            try:
                used[path] = os.stat(path).st_blocks * 512
            except OSError:
                pass
    return used


def shm_used() -> int:
    return shutil.disk_usage("/dev/shm").used


def mapped_by_anyone() -> set[str]:
    return shm_mapped(p for p in os.listdir("/proc") if p.isdigit())


def tritonservers() -> set[int]:
    """Pids of every tritonserver process on the machine (another one's /dev/shm files are not ours)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"/tritonserver"):
                found.add(int(pid))
        except OSError:
            pass
    return found


class Monitor(threading.Thread):
    """Samples RSS of the server and every stub, and /dev/shm, every `period` seconds."""

    def __init__(self, server_pid: int, repository: Path, period: float, clock):
        super().__init__(daemon=True, name="soak-monitor")
        self.server_pid, self.repository, self.period, self.clock = server_pid, repository, period, clock
        self.samples: list[dict] = []
        self.ours: set[str] = set()  # every /dev/shm file the server or a stub mapped
        self.superseded: dict[str, set[int]] = {}  # instance name -> pids a newer stub replaced
        self.other_servers: set[int] = set()  # other tritonservers seen while this one ran
        self.halt = threading.Event()

    def sample(self) -> dict:
        stale = stale_stubs(self.repository, self.superseded)
        stale_pids = {pid for pids in stale.values() for pid in pids}
        procs = {"tritonserver": self.server_pid,
                 **{name: pid for name, pid in stub_processes(self.repository).items() if pid not in stale_pids},
                 **{f"{name}@{pid}": pid for name, pids in stale.items() for pid in pids}}
        mapped = shm_mapped(procs.values())
        self.ours |= mapped
        self.other_servers |= tritonservers() - {self.server_pid}
        files = shm_files()
        entry = {"t": round(self.clock(), 2), "rss_kb": {}, "pid": {}, "shm_used_bytes": shm_used(),
                 "shm_ours_bytes": sum(files.get(f, 0) for f in mapped), "shm_ours_files": len(mapped),
                 "stale_stubs": stale}
        for name, pid in sorted(procs.items()):
            value = rss_kb(pid)
            if value is not None:
                entry["rss_kb"][name], entry["pid"][name] = value, pid
        self.samples.append(entry)
        return entry

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(self.period)

    def stop(self) -> None:
        self.halt.set()
        self.join()


# ---- requests and results -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    """One request: `arrival` and `done` in seconds since the load started (arrival as scheduled, so that a late
    sender cannot hide queueing); `kind` classifies a failure, `expected` says whether the run allowed it."""

    source: str  # "load" (the open loop), "burst", or "capacity"
    index: int
    arrival: float
    done: float = math.nan
    ok: bool = False
    status: str = ""
    message: str = ""
    lora_step: int = -1
    kind: str = ""
    expected: bool | None = None
    refusals: int = 0  # queue-full answers absorbed by resending (the client library's backoff)

    @property
    def latency_s(self) -> float:
        return self.done - self.arrival


def error_fields(error) -> tuple[str, str]:
    if isinstance(error, InferenceServerException):
        return str(error.status()), str(error.message())
    return type(error).__name__, str(error)


def is_queue_full(status: str, message: str) -> bool:
    return status == UNAVAILABLE and QUEUE_FULL in message


def small_request(seed: int, size: int, steps: int, loras: tuple[str, ...] = ()) -> GenerationRequest:
    """A request without ControlNets (fault requests and probes: a reload in progress cannot touch them)."""
    return GenerationRequest(PROMPTS[seed % len(PROMPTS)], negative_prompt="blurry", seed=seed, steps=steps,
                             height=size, width=size, loras=tuple(LoraUse(n, 0.8) for n in loras))


class Soak:
    """The open loop, the faults, and everything they recorded."""

    def __init__(self, args, server, repository: Path, lora_names: list[str]):
        self.args, self.server, self.repository, self.lora_names = args, server, repository, lora_names
        self.url = server.grpc_url
        self.grpc = grpcclient.InferenceServerClient(self.url)
        self.lock = threading.Lock()
        self.settled = threading.Condition(self.lock)
        self.pending = 0
        self.results: list[Result] = []
        self.faults: list[dict] = []
        self.disturbances: list[dict] = []  # {"kind", "start", "end"}: when queue-full / dead-stub errors are ok
        self.kept: dict[int, tuple[GenerationRequest, np.ndarray, int]] = {}  # spot-check candidates' answers
        self.spot_candidates: set[int] = set()
        self.t0 = time.monotonic()
        self.window_s = args.window_minutes * 60.0
        self.free_threshold_s = math.inf
        self.drain_s = 0.0  # how long a full queue takes to drain under the offered load
        self.fault_threads: list[threading.Thread] = []

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def window_of(self, t: float) -> int:
        return min(max(int(t // self.window_s), 0), self.windows - 1)

    @property
    def windows(self) -> int:
        return max(1, round(self.args.minutes / self.args.window_minutes))

    # ---- sending ---------------------------------------------------------------------------------------------
    def send(self, record: Result, request: GenerationRequest, keep: bool = False, on_done=None,
             retries: int = 0) -> None:
        """Sends one unary request asynchronously; its answer fills `record`. A queue-full refusal is resent after
        the client library's backoff, up to `retries` times and while the client's deadline (`--request-timeout`
        from its arrival) leaves time for it: a client that waits gives up at its deadline, not after a count."""
        inputs = infer_inputs(tensors_from_request(request))
        outputs = [grpcclient.InferRequestedOutput(n) for n in OUTPUTS]
        deadline = record.arrival + self.args.request_timeout

        def dispatch() -> None:
            try:
                self.grpc.async_infer(MODEL, inputs, callback=callback, outputs=outputs,
                                      client_timeout=max(deadline - self.clock(), 1.0))
            except Exception as error:  # not sent at all: a failure of this request
                callback(result=None, error=error)

        def callback(result, error) -> None:  # tritonclient calls it with keywords: (result=, error=)
            if error is not None and record.refusals < retries and is_queue_full(*error_fields(error)):
                wait = backoff_s(record.refusals)
                if self.clock() + wait < deadline:
                    record.refusals += 1
                    threading.Timer(wait, dispatch).start()
                    return
            done = self.clock()
            try:
                with self.lock:
                    record.done = done
                    if error is None:
                        record.ok, record.lora_step = True, lora_step_of(result)
                        if keep:
                            self.kept[record.index] = (request, result.as_numpy("image")[0].copy(), record.lora_step)
                    else:
                        record.status, record.message = error_fields(error)
                        record.message = record.message[:500]
            except Exception as failure:  # an answer we cannot read is a failure, never a lost callback
                record.ok, record.status, record.message = False, type(failure).__name__, str(failure)[:500]
            finally:
                with self.lock:
                    self.pending -= 1
                    self.settled.notify_all()
                if on_done is not None:
                    on_done(record)

        with self.lock:
            self.results.append(record)
            self.pending += 1
        dispatch()

    def wait_settled(self, timeout: float) -> bool:
        with self.lock:
            return self.settled.wait_for(lambda: self.pending == 0, timeout=timeout)

    # ---- capacity ----------------------------------------------------------------------------------------------
    def measure_capacity(self) -> dict:
        """Closed loop, `--capacity-concurrency` clients for `--capacity-seconds`: requests/s and latencies."""
        args = self.args
        entries = generate(mix("A"), 10_000, CONTROLNETS, self.lora_names, steps=args.steps, size=args.resolution,
                           seed=args.seed + 999)
        warm = Client(self.url, timeout_s=args.request_timeout)
        for entry in (TraceEntry(0.0, CONTROLNETS, tuple(self.lora_names[:2]), args.steps, args.resolution, 1),
                      TraceEntry(0.0, CONTROLNETS[:1], (), args.steps, args.resolution, 2)):  # first calls: warm-up
            warm.generate(to_request(entry))
        warm.close()
        counter, lock, latencies, failures = iter(range(len(entries))), threading.Lock(), [], []
        began = time.perf_counter()
        stop_at = began + args.capacity_seconds

        def worker() -> None:
            client = Client(self.url, timeout_s=args.request_timeout)
            while time.perf_counter() < stop_at:
                with lock:
                    index = next(counter)
                sent = time.perf_counter()
                try:
                    client.generate(to_request(entries[index]))
                    with lock:
                        latencies.append(time.perf_counter() - sent)
                except Exception as error:
                    with lock:
                        failures.append(" ".join(error_fields(error))[:300])
            client.close()

        threads = [threading.Thread(target=worker) for _ in range(args.capacity_concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
        p50 = float(np.percentile(latencies, 50)) if latencies else math.nan
        return {"concurrency": args.capacity_concurrency, "wall_s": wall, "served": len(latencies),
                "requests_per_s": len(latencies) / wall, "p50_s": p50,
                "p99_s": float(np.percentile(latencies, 99)) if latencies else math.nan,
                "failures": len(failures), "errors": sorted(set(failures))[:5]}

    # ---- the open loop ---------------------------------------------------------------------------------------
    def plan(self, rate: float) -> list[tuple[float, int, TraceEntry, str]]:
        """(arrival s, window, entry, mix) for the whole run: Poisson arrivals at `rate`, mix per window."""
        args, planned = self.args, []
        for window in range(self.windows):
            name = args.mix if args.mix != "alternate" else "AB"[window % 2]
            count = int(rate * self.window_s * 1.5) + 20
            entries = generate(mix(name), count, CONTROLNETS, self.lora_names, rate_per_s=rate, steps=args.steps,
                               size=args.resolution, seed=args.seed + window)
            planned += [(window * self.window_s + e.time_s, window, e, name) for e in entries
                        if e.time_s < self.window_s]
        rng = random.Random(args.seed)
        for window in range(self.windows):
            indices = [i for i, p in enumerate(planned) if p[1] == window]
            self.spot_candidates |= set(rng.sample(indices, min(len(indices), 3 * args.spot_checks)))
        return planned

    def run_load(self, planned) -> None:
        window = 0
        for index, (arrival, _, entry, _) in enumerate(planned):
            time.sleep(max(0.0, arrival - self.clock()))
            if self.window_of(arrival) != window:
                self.progress(window)
                window = self.window_of(arrival)
            self.send(Result("load", index, arrival), to_request(entry), keep=index in self.spot_candidates,
                      retries=self.args.retries)

    def progress(self, window: int) -> None:
        with self.lock:
            results = [r for r in self.results if self.window_of(r.arrival) == window]
            served, failed = sum(r.ok for r in results), sum(not r.ok and not math.isnan(r.done) for r in results)
            pending = self.pending
        print(f"[{self.clock():7.1f} s] window {window} over: {served} served, {failed} failed so far, "
              f"{pending} in flight", flush=True)

    # ---- faults ----------------------------------------------------------------------------------------------
    def schedule(self) -> list[tuple[float, str, int]]:
        return sorted((w * self.window_s + FAULT_AT[kind] * self.window_s, kind, w)
                      for w in range(self.windows) for kind in self.args.faults)

    def run_faults(self, schedule) -> None:
        for at, kind, window in schedule:
            time.sleep(max(0.0, at - self.clock()))
            thread = threading.Thread(target=self.inject, args=(kind, window), name=f"fault-{kind}", daemon=True)
            thread.start()
            self.fault_threads.append(thread)

    def inject(self, kind: str, window: int) -> None:
        record = {"t": round(self.clock(), 2), "window": window, "kind": kind}
        try:
            record.update(getattr(self, f"fault_{kind}")(window))
        except Exception as error:  # the fault itself broke: unexpected
            record.update(expected=False, outcome=f"fault raised {type(error).__name__}: {error}"[:500])
        record["ended"] = round(self.clock(), 2)
        with self.lock:
            self.faults.append(record)
        print(f"[{record['t']:7.1f} s] {kind}: {'expected' if record['expected'] else 'UNEXPECTED'} - "
              f"{record['outcome']}", flush=True)

    def _refused(self, request: GenerationRequest, status: str, contains: tuple[str, ...]) -> dict:
        client = Client(self.url, timeout_s=self.args.request_timeout, retries=FAULT_RETRIES)
        try:
            client.generate(request)
        except InferenceServerException as error:
            got, message = error_fields(error)
            ok = got == status and all(c in message for c in contains)
            return {"expected": ok, "outcome": f"{got}: {message}"[:500]}
        finally:
            client.close()
        return {"expected": False, "outcome": "served, not refused"}

    def fault_corrupt_lora(self, window: int) -> dict:
        name = CORRUPT_VARIANTS[window % len(CORRUPT_VARIANTS)]
        request = small_request(window, self.args.resolution, self.args.steps, (name, self.lora_names[window]))
        return {"variant": name, **self._refused(request, INVALID, ("lora_names:",))}

    def fault_nan_lora(self, window: int) -> dict:
        request = small_request(window, self.args.resolution, self.args.steps, (NAN_LORA,))
        return self._refused(request, INVALID, ("lora_names:", "non-finite"))

    def long_request(self, seed: int, **kwargs) -> GenerationRequest:
        return dataclasses.replace(small_request(seed, self.args.long_resolution, self.args.long_steps), **kwargs)

    def probe(self, streaming: bool) -> dict:
        """A small request right after a stopped one. The time of its accepted attempt is judged against its
        window's at the end: attempts refused with a full queue (resent after the client library's backoff) waited
        for the open loop's backlog, not for the stopped request, and are reported apart."""
        request = small_request(7, self.args.resolution, self.args.steps)
        client = Client(self.url, timeout_s=self.args.request_timeout)
        send = client.generate_streaming if streaming else client.generate
        began = time.perf_counter()
        try:
            for refusals in range(FAULT_RETRIES + 1):
                sent = time.perf_counter()
                try:
                    send(request)
                    return {"probe_latency_s": round(time.perf_counter() - sent, 3), "probe_refusals": refusals,
                            "probe_waited_s": round(sent - began, 3)}
                except InferenceServerException as error:
                    if refusals == FAULT_RETRIES or not is_queue_full(*error_fields(error)):
                        raise
                time.sleep(backoff_s(refusals))
        except Exception as error:
            return {"probe_latency_s": None, "probe_error": " ".join(error_fields(error))[:300]}
        finally:
            client.close()

    def stop_counters(self, model: str, reason: str) -> tuple[float, float]:
        """(requests stopped for `reason`, denoising steps run) so far by `model`'s instances."""
        url = self.server.metrics_url
        return metric(url, STOPPED, model=model, reason=reason), metric(url, STEPS, model=model)

    def stopped_by_server(self, model: str, reason: str, before: tuple[float, float]) -> dict:
        """Waits for the server's stop counter to count the stopped request; the steps it ran meanwhile."""
        began = time.monotonic()
        while True:
            now = self.stop_counters(model, reason)
            if now[0] > before[0] or time.monotonic() - began > STOP_SEEN_S:
                break
            time.sleep(0.2)
        return {"stopped_by_server": now[0] > before[0], "stop_seen_after_s": round(time.monotonic() - began, 2),
                "steps_run_meanwhile": now[1] - before[1]}

    def fault_expired_deadline(self, window: int) -> dict:
        request = self.long_request(100 + window, timeout_s=DEADLINE_S)
        before = self.stop_counters("denoiser", "timeout_s")
        began = time.perf_counter()
        outcome = self._refused(request, CANCELLED, ("timeout_s:",))
        waited = time.perf_counter() - began
        if not outcome["expected"] and outcome["outcome"].startswith(DEADLINE):  # the client's own deadline
            outcome["expected"] = True
        stopped = self.stopped_by_server("denoiser", "timeout_s", before)  # steps: the open loop's too
        time.sleep(self.args.probe_delay)
        return {**outcome, "waited_s": round(waited, 3), **stopped, **self.probe(streaming=False)}

    def fault_cancelled_stream(self, window: int) -> dict:
        before = self.stop_counters("text_to_image_stream", "cancelled")
        client = Client(self.url, timeout_s=self.args.request_timeout)
        stream = client.stream(self.long_request(200 + window))
        progress, outcome = 0, None
        try:
            for message in stream:
                if isinstance(message, Progress):
                    progress += 1
                    if progress == 2:
                        break
                elif isinstance(message, Generated):
                    outcome = {"expected": False, "outcome": "the stream finished before it was closed"}
                    break
        except InferenceServerException as error:
            outcome = {"expected": False, "outcome": " ".join(error_fields(error))[:500]}
        finally:
            stream.close()  # closes the gRPC stream: the server stops the request at its next step
            client.close()
        outcome = outcome or {"expected": True, "outcome": f"closed after {progress} progress messages"}
        stopped = self.stopped_by_server("text_to_image_stream", "cancelled", before)  # only faults use it
        stopped["stopped_soon"] = stopped["stopped_by_server"] and stopped["steps_run_meanwhile"] <= progress + 5
        time.sleep(self.args.probe_delay)
        return {**outcome, "progress_messages": progress, **stopped, **self.probe(streaming=True)}

    def fault_kill_controlnet(self, window: int) -> dict:
        stubs = {n: p for n, p in stub_processes(self.repository).items() if n.startswith("controlnet_")}
        if not stubs:
            return {"expected": False, "outcome": "no ControlNet stub found"}
        victim = sorted(stubs)[window % len(stubs)]
        supervisor = getattr(self.server, "supervisor", None)
        reloads_before = len(getattr(supervisor, "reloads", []))
        loads_before = self.log_loads()
        killed_at = self.clock()
        os.kill(stubs[victim], signal.SIGKILL)
        disturbance = {"kind": "kill_controlnet", "start": killed_at, "end": killed_at + RELOAD_TIMEOUT_S}
        with self.lock:
            self.disturbances.append(disturbance)
        print(f"[{killed_at:7.1f} s] killed {victim} (pid {stubs[victim]})", flush=True)
        deadline = min(time.monotonic() + RELOAD_TIMEOUT_S, self.t0 + self.windows * self.window_s + RELOAD_GRACE_S)
        seen = None
        while time.monotonic() < deadline:
            fresh = stub_processes(self.repository)
            replaced = victim in fresh and fresh[victim] != stubs[victim]
            reloads = list(getattr(supervisor, "reloads", []))[reloads_before:]
            if any(model == "controlnet" for _, model in reloads):
                seen = "supervisor"
            elif self.log_loads() > loads_before:
                seen = "server log"
            if seen and replaced:
                break
            seen = None
            time.sleep(0.5)
        reloaded_at = self.clock()
        with self.lock:
            # Without a reload the failures it would have explained count as unexpected after a normal
            # reload's time.
            grace = max(RELOAD_GRACE_S, 2 * self.drain_s)
            disturbance["end"] = (reloaded_at if seen else killed_at + grace) + grace
        if seen is None:
            fresh = stub_processes(self.repository)
            return {"expected": False, "victim": victim, "pid": stubs[victim],
                    "stubs_before": stubs, "stubs_after": fresh,
                    "supervisor_reloads": [[round(t - self.t0, 2), m] for t, m in getattr(supervisor, "reloads", [])],
                    "outcome": f"{victim} (pid {stubs[victim]}) killed: no reload of 'controlnet' within "
                               f"{RELOAD_TIMEOUT_S:.0f} s (stubs now {fresh})"}
        return {"expected": True, "victim": victim, "pid": stubs[victim], "reload_seen_by": seen,
                "reload_s": round(reloaded_at - killed_at, 2),
                "outcome": f"{victim} (pid {stubs[victim]}) killed, reloaded after {reloaded_at - killed_at:.1f} s"}

    def log_loads(self) -> int:
        """How often the server log says the ControlNet model finished loading."""
        log = self.server.log_file
        if log is None or not log.is_file():
            return 0
        return log.read_text(errors="replace").count("successfully loaded 'controlnet'")

    def fault_queue_burst(self, window: int) -> dict:
        count = self.args.max_queue + 4
        entries = generate(mix("A"), count, CONTROLNETS, self.lora_names, steps=self.args.steps,
                           size=self.args.resolution, seed=self.args.seed + 5000 + window)
        answered = threading.Semaphore(0)
        results = [Result("burst", window * 1000 + i, self.clock()) for i in range(count)]
        disturbance = {"kind": "queue_burst", "start": results[0].arrival, "end": math.inf}
        with self.lock:
            self.disturbances.append(disturbance)
        for result, entry in zip(results, entries):
            self.send(result, to_request(entry), on_done=lambda _: answered.release())
        deadline = time.monotonic() + self.args.request_timeout + 10
        for _ in results:
            answered.acquire(timeout=max(0.0, deadline - time.monotonic()))
        with self.lock:
            disturbance["end"] = max((r.done for r in results if not math.isnan(r.done)),
                                     default=self.clock()) + max(BURST_GRACE_S, 2 * self.drain_s)
            refusals = [r for r in results if not r.ok and is_queue_full(r.status, r.message)]
            served = sum(r.ok for r in results)
        refused = len(refusals)
        others = count - refused - served  # classified with the ordinary requests (e.g. a reload's)
        # "Rejected at once": a refusal must not wait for the queue. How many of the burst the queue still had
        # room for depends on the load at that moment (none, when the open loop had just filled it).
        slowest_refusal_s = max((r.latency_s for r in refusals), default=math.nan)
        return {"expected": refused > 0 and slowest_refusal_s <= REFUSED_AT_ONCE_S, "sent": count,
                "refused": refused, "served": served, "other_failures": others,
                "slowest_refusal_s": round(slowest_refusal_s, 3),
                "outcome": f"{count} at once: {served} served, {refused} refused (queue full) within "
                           f"{slowest_refusal_s:.2f} s, {others} other"}

    # ---- the run ---------------------------------------------------------------------------------------------
    def run(self, rate: float) -> None:
        planned = self.plan(rate)
        self.planned = planned
        self.t0 = time.monotonic()
        self.monitor = Monitor(self.server.process.pid, self.repository, self.args.sample_seconds, self.clock)
        self.monitor.start()
        faults = threading.Thread(target=self.run_faults, args=(self.schedule(),), daemon=True, name="faults")
        faults.start()
        self.run_load(planned)
        time.sleep(max(0.0, self.windows * self.window_s - self.clock()))
        faults.join()
        for thread in self.fault_threads:
            thread.join(RELOAD_TIMEOUT_S + self.args.request_timeout)
        self.wait_settled(self.args.request_timeout)
        self.monitor.sample()
        self.monitor.stop()
        self.grpc.close()

    def classify(self) -> None:
        """Every failed request's kind, and whether the run allowed it.

        A queue-full refusal is a fault's if it falls in the fault's window, or continues a saturation the fault
        started: within `drain_s` of the previous such refusal. A saturation that starts on its own is not.
        """
        saturated_until = -math.inf
        for r in sorted(self.results, key=lambda r: r.done if not math.isnan(r.done) else math.inf):
            if r.ok:
                continue
            if math.isnan(r.done):
                r.kind, r.expected = "no_response", False
                continue
            during = [d["kind"] for d in self.disturbances if r.done >= d["start"] and r.arrival <= d["end"]]
            if is_queue_full(r.status, r.message):
                r.expected = bool(during) or r.done <= saturated_until
                r.kind = "queue_full" if r.expected else "queue_full_outside_burst_or_reload"
                if r.expected:
                    saturated_until = r.done + max(BURST_GRACE_S, self.drain_s)
            elif r.status in (INTERNAL, NOT_FOUND) and DEAD_STUB.search(r.message):
                r.kind, r.expected = "killed_controlnet", "kill_controlnet" in during
                if not r.expected:
                    r.kind = "dead_controlnet_outside_kill"
            else:
                r.kind, r.expected = f"{r.status}", False


# ---- statistics -----------------------------------------------------------------------------------------------
def percentile(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def window_stats(soak: Soak, rate: float) -> list[dict]:
    windows = []
    for w in range(soak.windows):
        start, end = w * soak.window_s, (w + 1) * soak.window_s
        results = [r for r in soak.results if soak.window_of(r.arrival) == w]
        ordinary = [r for r in results if r.source == "load"]
        latencies = [r.latency_s for r in ordinary if r.ok]
        expected, unexpected = {}, {}
        for r in results:
            if not r.ok:
                counts = expected if r.expected else unexpected
                counts[r.kind] = counts.get(r.kind, 0) + 1
        faults = [f for f in soak.faults if f["window"] == w]
        for f in faults:
            counts = expected if f["expected"] else unexpected
            key = f"fault:{f['kind']}"
            counts[key] = counts.get(key, 0) + 1
        samples = [s for s in soak.monitor.samples if soak.window_of(s["t"]) == w]
        rss, pids = {}, {}
        for s in samples:
            for name, value in s["rss_kb"].items():
                rss[name] = max(rss.get(name, 0), value)
                pids.setdefault(name, [])
                if s["pid"][name] not in pids[name]:
                    pids[name].append(s["pid"][name])
        windows.append({
            "window": w, "start_s": start, "end_s": end,
            "mix": next((p[3] for p in soak.planned if p[1] == w), None), "offered_per_s": rate,
            "arrivals": len(ordinary), "served": sum(r.ok for r in results), "served_ordinary": len(latencies),
            "failures": {"expected": expected, "unexpected": unexpected},
            "refusals_resent": sum(r.refusals for r in ordinary),
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "max_latency_s": max(latencies, default=None),
            "rss_max_kb": rss, "pids": pids, "samples": len(samples),
            "shm_used_max_bytes": max((s["shm_used_bytes"] for s in samples), default=None),
            "shm_ours_max_bytes": max((s["shm_ours_bytes"] for s in samples), default=None),
            "faults": [f["kind"] for f in faults]})
    return windows


def rss_check(soak: Soak) -> dict:
    """Per process (instance name and pid: a stub restarted by a reload is a new process, compared from its reload
    on against its own first window), each later window's max RSS against that first window's."""
    maxima: dict[tuple[str, int], dict[int, int]] = {}
    for s in soak.monitor.samples:
        for name, value in s["rss_kb"].items():
            per_window = maxima.setdefault((name, s["pid"][name]), {})
            w = soak.window_of(s["t"])
            per_window[w] = max(per_window.get(w, 0), value)
    processes = []
    for (name, pid), per_window in sorted(maxima.items()):
        first = min(per_window)
        ratios = {w: per_window[w] / per_window[first] for w in sorted(per_window) if w != first}
        processes.append({"process": name, "pid": pid, "first_window": first, "rss_max_kb": per_window,
                          "ratio_to_first": ratios, "ok": all(r <= RSS_LIMIT for r in ratios.values())})
    # The criterion is the model processes'. The server's own RSS is reported beside it: it grows by the old model
    # versions that Triton 2.51 never finishes unloading after a stub died with requests in flight (each kill).
    models = [p for p in processes if p["process"] != "tritonserver"]
    server = [r for p in processes if p["process"] == "tritonserver" for r in p["ratio_to_first"].values()]
    return {"rule": "per model process incarnation (instance name + pid): a ControlNet stub restarted by a reload "
                    "is a new process, compared from its reload on, against its own first window's max RSS",
            "limit": RSS_LIMIT, "worst_ratio": max((r for p in models for r in p["ratio_to_first"].values()),
                                                    default=0.0),
            "server_worst_ratio": max(server, default=0.0), "processes": processes,
            "ok": all(p["ok"] for p in models) and bool(models)}


def spot_checks(soak: Soak, model: Path, controlnets: Path, loras: Path) -> list[dict]:
    """The in-process pipeline's images for the first `--spot-checks` kept answers of every window."""
    import torch

    from swiftdiffusion.controlnets import ControlNetCatalog, LocalControlNets
    from swiftdiffusion.lora_store import LoraStore
    from swiftdiffusion.models import load_model
    from swiftdiffusion.pipeline import Pipeline

    chosen = []
    for w in range(soak.windows):
        indices = sorted(i for i in soak.kept if soak.window_of(soak.planned[i][0]) == w)
        chosen += indices[:soak.args.spot_checks]
    if not chosen:
        return []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server's instances run one torch thread each (oneDNN splits reductions by it)
    try:
        loaded = load_model(model)
        pipeline = Pipeline(loaded, LocalControlNets(ControlNetCatalog(controlnets)),
                            LoraStore(loras, loaded.lora_target, loaded.device, loaded.dtype))
        checks = []
        for index in chosen:
            request, served, lora_step = soak.kept[index]
            # Served `overlap` equals `sequential` bit for bit (tests/test_controlnet_service.py).
            reference = pipeline.generate(dataclasses.replace(request, controlnet_mode="sequential"),
                                          exact_lora_step=lora_step if request.loras else None)
            difference = image_difference(served, reference.image)
            checks.append({"index": index, "window": soak.window_of(soak.planned[index][0]),
                           "controlnets": [c.name for c in request.controlnets],
                           "loras": [lora.name for lora in request.loras], "lora_step": lora_step, **difference,
                           "ok": difference["max_abs"] <= SPOT_TOLERANCE})
        return checks
    finally:
        torch.set_num_threads(threads)


# ---- chart ----------------------------------------------------------------------------------------------------
def chart(result: dict, samples: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = result["windows"]
    figure, axes = plt.subplots(3, 1, figsize=(10, 10))
    middles = [(w["start_s"] + w["end_s"]) / 120 for w in windows]
    width = result["parameters"]["window_minutes"]
    axis = axes[0]
    axis.plot(middles, [w["p50_s"] for w in windows], "o-", label="p50")
    axis.plot(middles, [w["p99_s"] for w in windows], "s--", label="p99")
    axis.set(title=f"latency per {width:g}-minute window (served ordinary requests)", xlabel="minutes",
             ylabel="seconds")
    twin = axis.twinx()
    twin.bar(middles, [w["served"] for w in windows], width=0.8 * width, alpha=0.15, color="gray", label="served")
    twin.set_ylabel("served per window")
    axis.legend(loc="upper left")
    times = [s["t"] / 60 for s in samples]
    names = sorted({n for s in samples for n in s["rss_kb"]})
    for name in names:
        axes[1].plot([s["t"] / 60 for s in samples if name in s["rss_kb"]],
                     [s["rss_kb"][name] / 1024 for s in samples if name in s["rss_kb"]], label=name)
    for fault in result["faults"]:
        if fault["kind"] == "kill_controlnet":
            axes[1].axvline(fault["t"] / 60, color="red", alpha=0.3)
    axes[1].set(title="RSS per process (red: a ControlNet stub killed)", xlabel="minutes", ylabel="MiB")
    axes[1].legend(fontsize=7, ncol=2)
    axes[2].plot(times, [s["shm_used_bytes"] / 2**20 for s in samples], label="/dev/shm used (all)")
    axes[2].plot(times, [s["shm_ours_bytes"] / 2**20 for s in samples], "--", label="mapped by this server")
    shm = result["shm"]
    axes[2].set(title=f"/dev/shm (before the server started {shm['before_bytes'] / 2**20:.1f} MiB, after it "
                      f"stopped {shm['after_bytes'] / 2**20:.1f} MiB)", xlabel="minutes", ylabel="MiB")
    axes[2].legend()
    for axis in axes:
        for w in windows[1:]:
            axis.axvline(w["start_s"] / 60, color="black", alpha=0.1)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ---- main -----------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0, help="length of the open-loop phase")
    p.add_argument("--window-minutes", type=float, default=5.0, help="statistics window; every fault once in each")
    p.add_argument("--load", type=float, default=0.8, help="offered load, as a fraction of the measured capacity")
    p.add_argument("--out", type=Path, default=PROJECT / "perf" / "results" / "soak")
    p.add_argument("--work", type=Path, help="model repository and server log (default: build/soak)")
    p.add_argument("--models", type=Path, default=PROJECT / "models" / "tiny", help="model root to build/use")
    p.add_argument("--size", choices=SIZE_NAMES, default="tiny")
    p.add_argument("--lora-count", type=int, default=200)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--long-resolution", type=int, default=256, help="the stopped requests' size")
    p.add_argument("--long-steps", type=int, default=150, help="the stopped requests' steps")
    p.add_argument("--mix", choices=("A", "B", "alternate"), default="alternate", help="service mix per window")
    p.add_argument("--max-queue", type=int, default=8, help="the denoising models' queue bound")
    p.add_argument("--capacity-seconds", type=float, default=25.0)
    p.add_argument("--capacity-concurrency", type=int, default=2)
    p.add_argument("--sample-seconds", type=float, default=5.0, help="RSS and /dev/shm sampling period")
    p.add_argument("--spot-checks", type=int, default=2, help="served images checked per window")
    p.add_argument("--probe-delay", type=float, default=1.0,
                   help="seconds between a stopped request and the probe that must find the server free")
    p.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    p.add_argument("--request-timeout", type=float, default=120.0, help="client deadline of ordinary requests")
    p.add_argument("--retries", type=int, default=100,
                   help="how often at most an ordinary request refused with a full queue is resent (the client "
                        "library's backoff, as the README asks clients to), within its deadline (--request-timeout); "
                        "bursts are never resent")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    from swiftdiffusion.triton.launcher import TritonServer, free_ports
    from swiftdiffusion.triton.repository import Deployment, write_repository

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or PROJECT / "build" / "soak"
    begin = time.perf_counter()
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
               "python": platform.python_version(), "load_average_before": os.getloadavg()}
    model, controlnets, loras, lora_names = prepare(args.models, args.size, args.lora_count, args.seed)
    fault_files = write_fault_loras(loras, lora_names[1], args.seed)
    repository = write_repository(work / "repository", Deployment(
        model=model, controlnet_catalog=controlnets, lora_catalog=str(loras), controlnet_instances=2,
        torch_threads=1, max_queue=args.max_queue))
    shm_before, shm_files_before = shm_used(), shm_files()
    server = TritonServer()
    soak = None
    try:
        server.start(repository, free_ports(3), extra_args=SHM_ARGS, log_file=work / "server.log")
        server.wait_ready(timeout=900)
        print(f"server ready after {time.perf_counter() - begin:.0f} s", flush=True)
        soak = Soak(args, server, repository, lora_names)
        capacity = soak.measure_capacity()
        rate = args.load * capacity["requests_per_s"]
        # A probe after a stopped request queues behind the open loop: free if within a few requests' time.
        soak.free_threshold_s = max(3.0, 6 * capacity["p50_s"])
        soak.drain_s = min(args.max_queue / max((1 - args.load) * capacity["requests_per_s"], 1e-6),
                           soak.window_s / 4)
        print(f"capacity {capacity['requests_per_s']:.2f} requests/s (p50 {capacity['p50_s']:.2f} s); "
              f"open loop at {rate:.2f}/s for {args.minutes:g} min", flush=True)
        soak.run(rate)
    finally:
        server.stop()
        remove_fault_loras(loras)
    stopped_at = time.perf_counter()
    shm_after, leaked = released_shm(soak.monitor.ours if soak else set(), shm_files_before)
    leaked["other_tritonservers_during_run"] = sorted(soak.monitor.other_servers | (tritonservers() - {server.pid}))
    # New files nobody maps are this server's unless another server ran meanwhile (then they may be its leftovers).
    leaked["new_unmapped_counted"] = not leaked["other_tritonservers_during_run"]
    if not leaked["new_unmapped_counted"]:
        leaked["bytes"] = sum(leaked["left_by_server"].values())
    soak.classify()
    checks = spot_checks(soak, model, controlnets, loras)
    windows = window_stats(soak, rate)
    rss = rss_check(soak)
    faults = sorted(soak.faults, key=lambda f: f["t"])
    probes = [f for f in faults if f["kind"] in ("expired_deadline", "cancelled_stream") and "outcome" in f]
    for fault in probes:  # the server let go: it counted the stop, and the next request was served in normal time
        p99 = windows[fault["window"]]["p99_s"] or 0.0
        fault["probe_threshold_s"] = round(max(soak.free_threshold_s, 1.5 * p99), 3)
        fault["server_free"] = (bool(fault.get("stopped_by_server")) and fault.get("stopped_soon", True)
                                and fault.get("probe_latency_s") is not None
                                and fault["probe_latency_s"] <= fault["probe_threshold_s"])
    unexpected = [r for r in soak.results if not r.ok and not r.expected]
    unexpected_faults = [f for f in faults if not f["expected"]]
    injected = {kind: sum(f["kind"] == kind for f in faults) for kind in args.faults}
    criteria = {
        "no_unexpected_failures": {"ok": not unexpected and not unexpected_faults and not capacity["failures"],
                                   "requests": len(unexpected), "faults": len(unexpected_faults),
                                   "capacity_phase": capacity["failures"]},
        "every_fault_injected_each_window": {"ok": all(n >= soak.windows for n in injected.values()),
                                             "injected": injected},
        "spot_checks_equal": {"ok": bool(checks) and all(c["ok"] for c in checks)
                              and {c["window"] for c in checks} == set(range(soak.windows)),
                              "checked": len(checks), "tolerance": SPOT_TOLERANCE,
                              "max_abs": max((c["max_abs"] for c in checks), default=None)},
        "rss_within_5_percent": {"ok": rss["ok"], "worst_ratio": rss["worst_ratio"],
                                 "server_worst_ratio": rss["server_worst_ratio"]},
        "shm_released": {"ok": leaked["bytes"] <= SHM_SLACK_BYTES, "before_bytes": shm_before,
                         "after_bytes": shm_after, "leaked_bytes": leaked["bytes"], "slack_bytes": SHM_SLACK_BYTES},
        # A reload must replace a model's stubs, not add to them: an old stub still alive holds its memory and
        # /dev/shm region, and shares its instance name with the new one.
        "no_stale_stub_processes_at_end": {
            "ok": not soak.monitor.samples[-1]["stale_stubs"], "at_end": soak.monitor.samples[-1]["stale_stubs"],
            "most_during_run": max((sum(map(len, s["stale_stubs"].values())) for s in soak.monitor.samples),
                                   default=0)},
        "server_free_after_stopped_request": {
            "ok": bool(probes) and all(f["server_free"] for f in probes),
            "rule": f"the server's {STOPPED} counts the stop within {STOP_SEEN_S:g} s (a closed stream: within 5 "
                    "steps of its last progress message), and a probe right after is served within max(3 s, 6 x "
                    "the closed loop's p50, 1.5 x its window's p99), counted from its accepted attempt (attempts "
                    "refused with a full queue waited for the open loop's backlog: probe_waited_s)",
            "probes": [{k: f.get(k) for k in ("kind", "t", "stopped_by_server", "stop_seen_after_s",
                                              "steps_run_meanwhile", "probe_latency_s", "probe_refusals",
                                              "probe_waited_s", "probe_threshold_s", "server_free")}
                       for f in probes]},
    }
    ordinary = [r for r in soak.results if r.source == "load"]
    latencies = [r.latency_s for r in ordinary if r.ok]
    totals = {"requests": len(soak.results), "served": sum(r.ok for r in soak.results),
              "ordinary_requests": len(ordinary), "ordinary_served": len(latencies),
              "expected_failures": sum(not r.ok and bool(r.expected) for r in soak.results),
              "refusals_resent": sum(r.refusals for r in ordinary),
              "requests_resent": sum(r.refusals > 0 for r in ordinary),
              "unexpected_failures": len(unexpected) + len(unexpected_faults),
              "faults": len(faults), "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
              "offered_per_s": rate, "achieved_per_s": len(latencies) / (soak.windows * soak.window_s)}
    supervisor = getattr(server, "supervisor", None)
    machine["load_average_after"] = os.getloadavg()
    result = {
        "command": [sys.executable, str(Path(__file__).resolve()), *argv],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine,
        "parameters": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                       "lora_catalog": str(loras), "controlnets": list(CONTROLNETS), "fault_files": fault_files,
                       "fault_at_fraction_of_window": {k: FAULT_AT[k] for k in args.faults},
                       "deadline_s": DEADLINE_S, "reload_grace_s": max(RELOAD_GRACE_S, 2 * soak.drain_s),
                       "burst_grace_s": max(BURST_GRACE_S, 2 * soak.drain_s), "queue_drain_s": soak.drain_s},
        "capacity": capacity, "windows": windows, "faults": faults,
        "supervisor_reloads": [[round(t - soak.t0, 2), m] for t, m in getattr(supervisor, "reloads", [])],
        "disturbances": [{**d, "start": round(d["start"], 2), "end": round(d["end"], 2)} for d in soak.disturbances],
        "unexpected": [dataclasses.asdict(r) for r in unexpected][:50],
        "expected_failure_examples": sorted({f"{r.kind}: {r.status} {r.message[:200]}" for r in soak.results
                                             if not r.ok and r.expected})[:20],
        "spot_checks": checks, "rss": rss, "shm": {"before_bytes": shm_before, "after_bytes": shm_after,
                                                   "ours_files": sorted(soak.monitor.ours), **leaked},
        "totals": totals, "criteria": criteria, "passed": all(c["ok"] for c in criteria.values()),
        "wall_s": {"total": time.perf_counter() - begin, "reference_after_stop": time.perf_counter() - stopped_at},
    }
    (args.out / "soak.json").write_text(json.dumps(_finite(result), indent=1, default=_json_default))
    (args.out / "soak_samples.json").write_text(json.dumps(soak.monitor.samples))
    chart(result, soak.monitor.samples, args.out / "soak.png")
    for name, criterion in criteria.items():
        print(f"{'PASS' if criterion['ok'] else 'FAIL'} {name}: "
              + ", ".join(f"{k} {v}" for k, v in criterion.items() if k != "ok"), flush=True)
    print(f"served {totals['served']} of {totals['requests']} ({totals['expected_failures']} expected failures, "
          f"{totals['unexpected_failures']} unexpected); p50 {totals['p50_s']} s, p99 {totals['p99_s']} s; "
          f"wrote {args.out / 'soak.json'} and soak.png in {result['wall_s']['total']:.0f} s", flush=True)
    return 0 if result["passed"] else 1


def released_shm(ours: set[str], before: dict[str, int], wait_s: float = 10.0) -> tuple[int, dict]:
    """After shutdown: /dev/shm's use, and what is left of it by this server: files it mapped that still exist,
    and new files no live process maps (another server's regions, mapped by it, are left out)."""
    deadline = time.monotonic() + wait_s
    while True:
        now = shm_files()
        left = {f: b for f, b in now.items() if f in ours}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    live = mapped_by_anyone()
    orphans = {f: b for f, b in now.items() if f not in before and f not in ours and f not in live}
    return shm_used(), {"left_by_server": left, "new_unmapped": orphans,
                        "bytes": sum(left.values()) + sum(orphans.values())}


def _finite(value):
    """JSON without NaN/Infinity (not JSON): None instead."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


if __name__ == "__main__":
    import faulthandler

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID`: every thread's stack, for a run that seems stuck
    # SIGTERM (a timeout, a CI runner) ends the run through `finally`, which stops the server and its stubs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise SystemExit(main())

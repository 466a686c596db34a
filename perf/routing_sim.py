"""Which routing policy should Envoy use in front of N replicas? A discrete-event simulation that decides it.

    python perf/routing_sim.py --out perf/results/routing_sim.json      # and routing_sim.png beside it

N replicas (2..64) behind two Envoy pods (as deploy/ runs them), each replica one denoising instance on one GPU
(a FIFO queue; the README's 1/2/4-GPU layouts all have one), fed by Poisson arrivals shaped as the production services of `swiftdiffusion/data/trace_stats.json`
(ControlNets and LoRAs per request as published; LoRA identities Zipf over the service's ~7,000 LoRAs, see
`lora_zipf_exponent`), routed by the policies Envoy offers:
  round_robin        Envoy's ROUND_ROBIN
  least_request_p2c  Envoy's LEAST_REQUEST as it comes (N_CHOICES, 2): of two random replicas the one with fewer
                     requests in flight from this Envoy
  least_request_full_scan  LEAST_REQUEST with selection_method FULL_SCAN: the replica with the fewest, ties at
                     random (routing.py's `least_request`)
  ring_hash          RING_HASH on the request's LoRA-set header (swiftdiffusion.routing), the ring as Envoy builds
                     it (routing.RING_SIZE entries); a request without LoRAs goes to a random replica
  ring_hash_bounded  the same with Envoy's hash_balance_factor (bounded-load consistent hashing, Mirrokni et al.):
                     a replica with as many active requests as its share of factor x (cluster active + 1) passes
                     the request on, probing the others in a hash-seeded random order, as Envoy's implementation does
Each replica keeps the server's LoRA state: the set patched into its weights (a request with the same set is
served without load, restore or patch: `swiftdiffusion_lora_reuse_total`) and its host cache of decoded LoRAs
(`--lora-cache-mb` over the LoRA file size, least recently used first). Service times are those measured on an
H100 by perf/gpu_bench.py (`service_times` names every file and field, and how the derived ones were derived).
Load is the offered work over the capacity of N replicas when routing ignores LoRAs (`baseline_service_s`):
0.5, 0.8 and 0.95 of it; a policy that reuses more runs its replicas below that. Queues are unbounded here (the
server refuses beyond `--max-queue`; the refused requests would be retried elsewhere, which this model leaves out).
Service times are fixed per kind of request (the H100 runs vary by under 1%); steps and sizes are SD1.5's 50 at
512x512 for every request, as the trace statistics publish no distribution of them.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import dataclasses
import hashlib
import heapq
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

from swiftdiffusion.routing import RING_SIZE, lora_set_key
from swiftdiffusion.request import LoraUse
from swiftdiffusion.workload import LORA_SCALE, Mix, load_stats, mix

PROJECT = Path(__file__).resolve().parents[1]
GPU_BENCH = "perf/results/gpu_bench_h100_2026-11-26_final.json"
LORA_CACHE_MB = 1024  # serve --lora-cache-mb's default (Deployment.lora_cache_mb)
POLICIES = ("round_robin", "least_request_p2c", "least_request_full_scan", "ring_hash", "ring_hash_bounded")
HASH_BALANCE_FACTOR = 125  # percent of the average load a replica may take under ring_hash_bounded
# deploy/: two Envoy pods (each sees only its own requests in flight), two worker threads each.
PROXIES = 2
WORKERS = 2


# ---- inputs ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ServiceTimes:
    """Seconds one request occupies its replica's denoising instance, from measurements."""

    warm_s: dict[int, float]  # by ControlNet count: LoRA set already patched in (or no LoRAs)
    uncached_lora_s: dict[int, float]  # added when the set is not patched, by LoRAs not in the host cache
    restore_s: float  # a request without LoRAs after one with them
    sources: dict[str, str]

    def of(self, controlnets: int, reused: bool, uncached: int, had_loras: bool, has_loras: bool) -> float:
        base = self.warm_s[controlnets]
        if not has_loras:
            return base + (self.restore_s if had_loras else 0.0)
        return base if reused else base + self.uncached_lora_s[uncached]


def service_times(path: Path = PROJECT / GPU_BENCH) -> ServiceTimes:
    """Service times from the H100 run of perf/gpu_bench.py (SD1.5 shapes, fp16, 512x512, 50 steps, CFG, graphed,
    ControlNets beside the UNet encoder (`overlap`, the serving default), cold 127 MB LoRAs in `bounded` mode).

    Measured: 0, 1 ControlNet without LoRA; 1 ControlNet + 1 cold LoRA and 2 ControlNets + 2 cold LoRAs, bounded;
    the in-place patch of two LoRAs and the restore. Derived:
    - 2 ControlNets with the set already patched = the `sync` run of 2C/2L less its LoRA load (sync loads, then
      patches, then denoises): the same derivation for 1 ControlNet gives 0.748 s against 0.735 s measured.
    - 3 ControlNets (service B, 3% of its requests) = 2 + (2 - 1): each ControlNet adds the same.
    - LoRAs to read and decode: 1 -> (1C/1L bounded) - (1C without LoRA); 2 -> (2C/2L bounded) - (2C patched).
      A LoRA served from the host cache costs no load; a set not patched costs the patch and restore.
    """
    data = json.loads(Path(path).read_text())
    fields = {
        "warm_0": "cases.0C/0L.ours_graphed.median_s",
        "warm_1": "cases.1C/0L.ours_overlap.median_s",
        "sync_2": "cases.2C/2L.ours_overlap_sync.median_s",
        "sync_2_load": "cases.2C/2L.ours_overlap_sync.median_lora_load_s",
        "cold_1": "cases.1C/1L.ours_overlap_bounded.median_s",
        "cold_2": "cases.2C/2L.ours_overlap_bounded.median_s",
        "patch_ms": "lora_patch_probe.two_loras_unet_and_text",
        "restore_ms": "lora_patch_probe.restore",
    }
    v = {name: _lookup(data, field) for name, field in fields.items()}
    patch_restore = (v["patch_ms"] + v["restore_ms"]) / 1000
    warm_2 = v["sync_2"] - v["sync_2_load"] - v["patch_ms"] / 1000
    warm = {0: v["warm_0"], 1: v["warm_1"], 2: warm_2}
    warm[3] = warm[2] + (warm[2] - warm[1])
    uncached = {0: patch_restore, 1: v["cold_1"] - v["warm_1"], 2: v["cold_2"] - warm_2}
    sources = {name: f"{GPU_BENCH}: {f}" for name, f in fields.items()}
    return ServiceTimes(warm, uncached, v["restore_ms"] / 1000, sources)


def _lookup(data: dict, path: str) -> float:
    """A dotted path into a JSON object whose keys may hold '/' but no '.' (e.g. cases.2C/2L.ours_graphed)."""
    for part in path.split("."):
        data = data[part]
    return float(data)


def zipf_weights(count: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, count + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


def lru_misses_per_request(exponent: float, count: int, per_request: int, cache: int = 10,
                           requests: int = 100_000, seed: int = 0) -> float:
    """LoRAs per request that an LRU cache of `cache` LoRAs misses, requests of `per_request` distinct LoRAs."""
    draws = sample_loras(zipf_weights(count, exponent), np.full(requests, per_request), np.random.default_rng(seed))
    lru: collections.OrderedDict[int, None] = collections.OrderedDict()
    misses = 0
    for loras in draws:
        for lora in loras:
            if lora in lru:
                lru.move_to_end(lora)
                continue
            misses += 1
            lru[lora] = None
            if len(lru) > cache:
                lru.popitem(last=False)
    return misses / requests


def fit_exponent(count: int, misses_per_request: float) -> float:
    """The Zipf exponent at which an LRU cache of 10 LoRAs misses `misses_per_request` of a 2-LoRA request's LoRAs."""
    low, high = 0.0, 3.0
    for _ in range(20):  # misses fall as the exponent (skew) grows: bisect
        middle = (low + high) / 2
        low, high = (middle, high) if lru_misses_per_request(middle, count, 2) > misses_per_request else (low, middle)
    return (low + high) / 2


def lora_zipf_exponent(stats: dict, service: str = "A") -> dict:
    """The Zipf exponent of LoRA popularity that reproduces the published LRU figure, read as: an LRU cache of 10
    LoRAs misses `lru10_misses_per_request_pair` of the 2 LoRAs of a service-A request. Checked against the other
    published figure: the share of LoRAs with under 1% of uses each (`rare_fraction`)."""
    target = stats["loras"]["lru10_misses_per_request_pair"]
    count = stats["services"][service]["distinct_loras"]
    exponent = fit_exponent(count, target)
    shares = zipf_weights(count, exponent)
    bound = stats["loras"]["rare_means_share_of_uses_below"]
    return {"exponent": exponent, "fitted_to": f"loras.lru10_misses_per_request_pair = {target} (LRU-10, service A)",
            "check_rare_fraction": {"published": stats["loras"]["rare_fraction"],
                                    "fit": float(np.mean(shares < bound)),
                                    "loras_with_share_at_least_1pct": int(np.sum(shares >= bound))},
            "top_lora_share": float(shares[0]), "top_10_share": float(shares[:10].sum())}


# ---- requests -------------------------------------------------------------------------------------------------
def sample_loras(weights: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Per request, `counts[i]` distinct LoRAs drawn by popularity, in draw order (the order a client lists them)."""
    cumulative = np.cumsum(weights)
    cumulative /= cumulative[-1]
    width = int(counts.max(initial=0))
    draws = np.searchsorted(cumulative, rng.random((len(counts), width)), side="right")
    for column in range(1, width):
        while True:  # a LoRA drawn twice for one request is drawn again
            clash = (draws[:, column:column + 1] == draws[:, :column]).any(axis=1)
            if not clash.any():
                break
            draws[clash, column] = np.searchsorted(cumulative, rng.random(int(clash.sum())), side="right")
    return [tuple(row[:count]) for row, count in zip(draws.tolist(), counts)]


@dataclasses.dataclass(frozen=True)
class Request:
    arrival_s: float
    controlnets: int
    loras: tuple[int, ...]
    key_hash: int | None  # the LoRA-set header's hash (None: no header)


def _hash64(text: str) -> int:
    """A 64-bit hash standing in for Envoy's xxHash64 (of header values and of ring entries)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def requests_for(service: Mix, lora_weights: np.ndarray, count: int, rate_per_s: float, seed: int) -> list[Request]:
    """`count` requests of `service`, Poisson arrivals at `rate_per_s`, LoRAs drawn by `lora_weights`."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate_per_s, count))
    cn_counts, cn_probs = zip(*sorted(service.controlnet_counts.items()))
    lora_counts, lora_probs = zip(*sorted(service.lora_counts.items()))
    controlnets = rng.choice(cn_counts, size=count, p=cn_probs)
    loras = sample_loras(lora_weights, rng.choice(lora_counts, size=count, p=lora_probs), rng)
    keys: dict[tuple[int, ...], int | None] = {}
    for chosen in loras:
        if chosen not in keys:
            key = lora_set_key([LoraUse(f"lora_{i:04d}", LORA_SCALE) for i in chosen])
            keys[chosen] = None if key is None else _hash64(key)
    return [Request(float(t), int(c), chosen, keys[chosen]) for t, c, chosen in zip(arrivals, controlnets, loras)]


# ---- routing --------------------------------------------------------------------------------------------------
class Ring:
    """Envoy's hash ring: RING_SIZE / N entries per host, each the hash of "<address>_<i>"; a key goes to the
    first entry at or after its hash (wrapping)."""

    def __init__(self, hosts: int):
        entries = sorted((_hash64(f"10.0.{h // 256}.{h % 256}:8001_{i}"), h)
                         for h in range(hosts) for i in range(math.ceil(RING_SIZE / hosts)))
        self.hashes = [h for h, _ in entries]
        self.hosts = [host for _, host in entries]

    def host(self, key_hash: int) -> int:
        index = bisect.bisect_left(self.hashes, key_hash)
        return self.hosts[index if index < len(self.hosts) else 0]


class Router:
    """One Envoy process: its view of the replicas is the requests it has in flight to each (Envoy's per-host
    `rq_active`), so two Envoy pods balance on two partial views; each worker thread keeps its own round-robin
    position, from a random start."""

    def __init__(self, policy: str, hosts: int, ring: Ring | None, rng: random.Random):
        self.policy = policy
        self.hosts = hosts
        self.ring = ring
        self.random = rng
        self.next_host = [rng.randrange(hosts) for _ in range(WORKERS)]
        self.active = [0] * hosts
        self.total_active = 0

    def choose(self, request: Request) -> int:
        if self.policy == "round_robin":
            worker = self.random.randrange(WORKERS)  # the worker that owns the client's connection
            self.next_host[worker] = (self.next_host[worker] + 1) % self.hosts
            return self.next_host[worker]
        if self.policy == "least_request_p2c":
            return self._two_choices()
        if self.policy == "least_request_full_scan":
            return self._full_scan()
        if request.key_hash is None:
            return self.random.randrange(self.hosts)
        host = self.ring.host(request.key_hash)
        return host if self.policy == "ring_hash" else self._bounded(host, request.key_hash)

    def _two_choices(self) -> int:
        """Envoy's N_CHOICES with its default of 2: two draws (with replacement), the second kept if it has fewer
        active requests."""
        first, second = self.random.randrange(self.hosts), self.random.randrange(self.hosts)
        return second if self.active[second] < self.active[first] else first

    def _full_scan(self) -> int:
        """Envoy's FULL_SCAN: the replica with the fewest active requests, ties broken at random."""
        fewest = min(self.active)
        return self.random.choice([h for h, n in enumerate(self.active) if n == fewest])

    def _bounded(self, host: int, key_hash: int) -> int:
        """Envoy's BoundedLoadHashingLoadBalancer: slots = max(ceil(ceil((active + 1) x factor) / N), 1); the ring's
        host if it has fewer active requests than that, else the first such host in a hash-seeded shuffle, else the
        least overloaded."""
        slots = max(math.ceil(math.ceil((self.total_active + 1) * HASH_BALANCE_FACTOR / 100) / self.hosts), 1)
        if self.active[host] < slots:
            return host
        order = list(range(self.hosts))
        random.Random(key_hash).shuffle(order)
        for candidate in order:
            if self.active[candidate] < slots:
                return candidate
        return min(order, key=lambda h: self.active[h])

    def sent(self, host: int, change: int) -> None:
        self.active[host] += change
        self.total_active += change


# ---- the replicas ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Replica:
    cache_capacity: int
    queue: collections.deque = dataclasses.field(default_factory=collections.deque)  # (request index, proxy)
    patched: tuple[int, ...] = ()  # the LoRA set in its weights (the server's applied key)
    cache: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)

    def serve(self, request: Request, times: ServiceTimes) -> tuple[float, bool, int]:
        """(service seconds, reused, LoRAs found in the host cache), updating the weights and the cache."""
        reused = bool(request.loras) and request.loras == self.patched
        cached = sum(lora in self.cache for lora in request.loras) if not reused else len(request.loras)
        seconds = times.of(request.controlnets, reused, len(request.loras) - cached, bool(self.patched),
                           bool(request.loras))
        for lora in request.loras:
            self.cache[lora] = None
            self.cache.move_to_end(lora)
            if len(self.cache) > self.cache_capacity:
                self.cache.popitem(last=False)
        self.patched = request.loras
        return seconds, reused, cached


class Cluster:
    """N replicas behind PROXIES Envoy processes, as discrete events: arrivals in time order, each routed by a
    random proxy (the client's connection), queued at its replica; departures start the replica's next request."""

    def __init__(self, policy: str, hosts: int, requests: list[Request], times: ServiceTimes, cache_capacity: int,
                 counted_from: int, seed: int):
        rng = random.Random(seed)
        ring = Ring(hosts) if policy.startswith("ring_hash") else None
        self.proxies = [Router(policy, hosts, ring, rng) for _ in range(PROXIES)]
        self.random = rng
        self.replicas = [Replica(cache_capacity) for _ in range(hosts)]
        self.requests, self.times, self.counted_from = requests, times, counted_from
        self.events: list[tuple[float, int]] = []  # (departure time, host)
        self.in_service: dict[int, tuple[int, int]] = {}  # host -> (request index, proxy)
        self.latencies: list[float] = []
        self.counts = collections.Counter()
        self.busy_s = [0.0] * hosts
        self.served_by = [0] * hosts

    def run(self) -> None:
        for index, request in enumerate(self.requests):
            while self.events and self.events[0][0] <= request.arrival_s:
                self._depart(*heapq.heappop(self.events))
            proxy = self.random.randrange(PROXIES)
            host = self.proxies[proxy].choose(request)
            self.proxies[proxy].sent(host, 1)
            self.replicas[host].queue.append((index, proxy))
            self.served_by[host] += index >= self.counted_from
            if host not in self.in_service:
                self._start(host, request.arrival_s)
        while self.events:
            self._depart(*heapq.heappop(self.events))

    def _start(self, host: int, now: float) -> None:
        index, proxy = self.replicas[host].queue.popleft()
        request = self.requests[index]
        seconds, reused, cached = self.replicas[host].serve(request, self.times)
        self.busy_s[host] += seconds
        self.in_service[host] = (index, proxy)
        heapq.heappush(self.events, (now + seconds, host))
        if index >= self.counted_from and request.loras:
            self.counts["with_loras"] += 1
            self.counts["reused"] += reused
            if not reused:
                self.counts["cache_hits"] += cached
                self.counts["loras_loaded"] += len(request.loras)

    def _depart(self, now: float, host: int) -> None:
        index, proxy = self.in_service.pop(host)
        self.proxies[proxy].sent(host, -1)
        if index >= self.counted_from:
            self.latencies.append(now - self.requests[index].arrival_s)
        if self.replicas[host].queue:
            self._start(host, now)

    def summary(self) -> dict:
        latency = np.array(self.latencies)
        span = self.requests[-1].arrival_s
        return {"requests": len(latency), "mean_s": float(latency.mean()),
                "p50_s": float(np.percentile(latency, 50)), "p99_s": float(np.percentile(latency, 99)),
                "lora_reuse_rate": self.counts["reused"] / max(self.counts["with_loras"], 1),
                "host_cache_hit_rate": self.counts["cache_hits"] / max(self.counts["loras_loaded"], 1),
                "busiest_replica_share": max(self.served_by) / max(sum(self.served_by), 1),
                "busiest_replica_utilization": max(self.busy_s) / span,
                "mean_utilization": sum(self.busy_s) / len(self.busy_s) / span}


def simulate(policy: str, hosts: int, requests: list[Request], times: ServiceTimes, cache_capacity: int,
             warmup_fraction: float = 0.1, seed: int = 0) -> dict:
    """Runs the requests through `hosts` replicas under `policy`; statistics over the requests after the warm-up."""
    cluster = Cluster(policy, hosts, requests, times, cache_capacity, int(len(requests) * warmup_fraction), seed)
    cluster.run()
    return cluster.summary()


def baseline_service_s(requests: list[Request], times: ServiceTimes, cache_capacity: int) -> float:
    """Mean service time of one replica serving the whole stream in order: what a replica costs per request when
    routing ignores LoRAs (its host cache and patched set see the whole distribution, whatever N). Load is
    relative to N replicas of this capacity."""
    replica = Replica(cache_capacity)
    return float(np.mean([replica.serve(request, times)[0] for request in requests]))


# ---- the study ------------------------------------------------------------------------------------------------
def run(services: list[str], replica_counts: list[int], loads: list[float], requests_per_replica: int,
        min_requests: int, seed: int) -> dict:
    stats = load_stats()
    times = service_times()
    popularity = lora_zipf_exponent(stats)
    lora_mb = json.loads((PROJECT / GPU_BENCH).read_text())["build"]["lora_files"]["style_peft"]["bytes"] / 2**20
    cache_capacity = int(LORA_CACHE_MB // lora_mb)
    study = {"service_times_s": {"warm_by_controlnets": times.warm_s, "added_by_uncached_loras": times.uncached_lora_s,
                                 "restore": times.restore_s, "sources": times.sources,
                                 "derivations": service_times.__doc__},
             "lora_popularity": popularity, "host_cache_loras": cache_capacity,
             "host_cache_derivation": f"serve --lora-cache-mb {LORA_CACHE_MB} // {lora_mb:.1f} MB "
                                      f"({GPU_BENCH}: build.lora_files.style_peft.bytes)",
             "hash_balance_factor": HASH_BALANCE_FACTOR, "proxies": PROXIES, "workers_per_proxy": WORKERS,
             "ring_size": RING_SIZE, "baseline_service_s": {}, "top_lora_set_shares": {}, "results": []}
    for name in services:
        service = mix(name, stats)
        weights = zipf_weights(stats["services"][name]["distinct_loras"], popularity["exponent"])
        calibration = requests_for(service, weights, min_requests, 1.0, seed + 1)
        capacity_s = study["baseline_service_s"][name] = baseline_service_s(calibration, times, cache_capacity)
        study["top_lora_set_shares"][name] = top_set_shares(calibration)
        for hosts in replica_counts:
            for load in loads:
                count = max(min_requests, requests_per_replica * hosts)
                requests = requests_for(service, weights, count, load * hosts / capacity_s, seed)
                study["results"] += [{"service": name, "replicas": hosts, "load": load, "policy": policy,
                                      **simulate(policy, hosts, requests, times, cache_capacity, seed=seed)}
                                     for policy in POLICIES]
                print(f"service {name}, {hosts} replicas, load {load:.2f}: done", flush=True)
    study["decision"] = decide(study["results"])
    study["skew_sensitivity"] = skew_sensitivity(services, times, cache_capacity, 16, 0.8, min_requests, seed)
    return study


def skew_sensitivity(services: list[str], times: ServiceTimes, cache_capacity: int, hosts: int, load: float,
                     count: int, seed: int) -> list[dict]:
    """The same comparison under other readings of LoRA skew: the published LRU figure read per LoRA (0.54 of
    each LoRA missed, a flatter distribution) and no skew at all (uniform, as workload.py draws LoRAs)."""
    stats = load_stats()
    readings = {"fit (0.54 misses per request)": lora_zipf_exponent(stats)["exponent"],
                "0.54 misses per LoRA": fit_exponent(stats["services"]["A"]["distinct_loras"],
                                                     2 * stats["loras"]["lru10_misses_per_request_pair"]),
                "uniform": 0.0}
    rows = []
    for reading, exponent in readings.items():
        for name in services:
            service = mix(name, stats)
            weights = zipf_weights(stats["services"][name]["distinct_loras"], exponent)
            capacity_s = baseline_service_s(requests_for(service, weights, count, 1.0, seed + 1), times, cache_capacity)
            requests = requests_for(service, weights, count, load * hosts / capacity_s, seed)
            for policy in POLICIES:
                rows.append({"reading": reading, "exponent": exponent, "service": name, "replicas": hosts,
                             "load": load, "policy": policy,
                             **simulate(policy, hosts, requests, times, cache_capacity, seed=seed)})
    return rows


def top_set_shares(requests: list[Request], count: int = 5) -> list[float]:
    """The shares of all requests that the most used LoRA sets have (what one replica gets under plain hashing)."""
    sets = collections.Counter(request.loras for request in requests if request.loras)
    return [round(n / len(requests), 4) for _, n in sets.most_common(count)]


def decide(results: list[dict], load: float = 0.8) -> dict:
    """The default: the policy with the lowest p99 latency at `load` in the most (service, N) cells."""
    cells = collections.defaultdict(list)
    for row in results:
        if row["load"] == load:
            cells[(row["service"], row["replicas"])].append(row)
    wins = collections.Counter(min(rows, key=lambda r: r["p99_s"])["policy"] for rows in cells.values())
    return {"rule": f"lowest p99 latency at {load:.0%} load in the most (service, replicas) cells",
            "wins": dict(wins), "default": wins.most_common(1)[0][0]}


def table(results: list[dict], services: list[str], replica_counts: list[int]) -> str:
    lines = ["| service | N | load | " + " | ".join(POLICIES) + " |", "|---|---|---|" + "---|" * len(POLICIES)]
    index = {(r["service"], r["replicas"], r["load"], r["policy"]): r for r in results}
    for name in services:
        for hosts in replica_counts:
            for load in sorted({r["load"] for r in results}):
                cells = [index[(name, hosts, load, p)] for p in POLICIES]
                lines.append(f"| {name} | {hosts} | {load:.0%} | " + " | ".join(
                    f"{c['mean_s']:.2f} / {c['p99_s']:.2f} s, reuse {c['lora_reuse_rate']:.0%}" for c in cells) + " |")
    return "\n".join(lines)


def chart(results: list[dict], services: list[str], path: Path) -> None:
    """Per service: p99 latency against N at each load (plain ring hash leaves the chart above 100 s), and the LoRA
    sets reused at the middle load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = sorted({r["load"] for r in results})
    panels = [(load, "p99_s") for load in loads] + [(loads[len(loads) // 2], "lora_reuse_rate")]
    fig, axes = plt.subplots(len(services), len(panels), figsize=(4.2 * len(panels), 3.6 * len(services)),
                             squeeze=False)
    for row, name in enumerate(services):
        for ax, (load, metric) in zip(axes[row], panels):
            for policy in POLICIES:
                points = sorted((r["replicas"], r[metric]) for r in results
                                if r["service"] == name and r["load"] == load and r["policy"] == policy)
                ax.plot(*zip(*points), marker="o", label=policy)
            replicas = sorted({r["replicas"] for r in results})
            ax.set_xscale("log", base=2)
            ax.set_xticks(replicas, [str(n) for n in replicas])
            ax.set_xlabel("replicas")
            if metric == "p99_s":
                ax.set(yscale="log", ylim=(1, 100), ylabel="p99 latency (s)", title=f"service {name}, {load:.0%} load")
            else:
                ax.set(ylim=(0, 1), ylabel="LoRA sets reused", title=f"service {name}, {load:.0%} load: reuse")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=PROJECT / "perf" / "results" / "routing_sim.json")
    p.add_argument("--services", nargs="+", default=["A", "B"])
    p.add_argument("--replicas", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    p.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.8, 0.95])
    p.add_argument("--requests-per-replica", type=int, default=1500)
    p.add_argument("--min-requests", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    began = time.perf_counter()
    study = run(args.services, args.replicas, args.loads, args.requests_per_replica, args.min_requests, args.seed)
    study["config"] = {"command": " ".join(["python perf/routing_sim.py", *(sys.argv[1:] if argv is None else argv)]),
                       **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                       "machine": platform.platform(), "date": time.strftime("%Y-%m-%d"),
                       "seconds": round(time.perf_counter() - began, 1)}
    study["table"] = table(study["results"], args.services, args.replicas)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(study, indent=1))
    chart(study["results"], args.services, args.out.with_suffix(".png"))
    print(study["table"])
    print(json.dumps(study["decision"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

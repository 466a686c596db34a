"""Three real tritonserver replicas on the tiny model, the real Envoy in front (swiftdiffusion.routing's
configurations, loopback ports), the project's client through Envoy: every request served and equal to its
in-process image; with LoRA affinity a set's requests land on one replica (read from each replica's metrics); a
replica killed mid-run costs no request once Envoy's health check has noticed; a full replica's refusals are
served by the others; everything stops cleanly.

The replicas are lean (one ControlNet instance, one torch thread per model, no baseline or streaming model):
15 model processes on this machine's 2 cores. Figures are printed (pytest -s): requests, failures,
affinity share, failover gap.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from tritonclient.utils import InferenceServerException

from conftest import control_image, max_diff
from swiftdiffusion.client import Client
from swiftdiffusion.envoy import EnvoyProxy
from swiftdiffusion.request import ControlNetUse, GenerationRequest, LoraUse
from swiftdiffusion.routing import HealthCheck, Upstreams, envoy_config
from swiftdiffusion.serve import SHM_ARGS
from swiftdiffusion.triton.launcher import TritonServer, free_ports
from swiftdiffusion.triton.repository import Deployment, write_repository

pytestmark = pytest.mark.server
REPLICAS = 3
TOLERANCE = 1  # of 255, as tests/test_server.py: one torch thread per model process against torch's default
# Faster than production's 2 s x 2 so that the test is short; the failover gap printed is this setting's.
HEALTH = HealthCheck(interval_s=1.0, timeout_s=1.0, unhealthy_threshold=1, healthy_threshold=1)
LORA_SETS = [(LoraUse("style_peft", 0.8),), (LoraUse("character_kohya", 0.7),),
             (LoraUse("style_diffusers", 0.9), LoraUse("style_peft", 0.4))]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def request(index: int, loras: tuple[LoraUse, ...] = ()) -> GenerationRequest:
    """Small and deterministic: `sync` LoRAs (patched before the first step, so the image does not depend on
    when a background load finished), a ControlNet on every third."""
    controlnets = (ControlNetUse("canny", control_image(index), 1.0),) if index % 3 == 0 else ()
    return GenerationRequest("a harbour at night", seed=index, steps=3, height=64, width=64, lora_mode="sync",
                             loras=loras, controlnets=controlnets)


def mixed(count: int) -> list[GenerationRequest]:
    """Requests without LoRAs and with each LoRA set, in turn."""
    choices = [(), *LORA_SETS]
    return [request(i, choices[i % len(choices)]) for i in range(count)]


@pytest.fixture(scope="module")
def replicas(tiny_root, tmp_path_factory) -> Iterator[list[TritonServer]]:
    folder = tmp_path_factory.mktemp("replicas")
    repository = write_repository(folder / "repository", Deployment(
        model=tiny_root / "model", controlnet_catalog=tiny_root / "controlnets", lora_catalog=str(tiny_root / "loras"),
        controlnet_instances=1, torch_threads=1, resident_controlnets=1,
        streaming=False))  # no test here streams: 15 model processes instead of 18
    servers = [TritonServer() for _ in range(REPLICAS)]
    try:
        for index, server in enumerate(servers):
            server.start(repository, free_ports(3), log_file=folder / f"replica{index}.log", extra_args=SHM_ARGS)
        for server in servers:
            server.wait_ready(timeout=900)
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def references(pipeline):
    """The in-process image of each request (by its fields), computed once."""
    cache: dict[str, object] = {}

    def reference(generation: GenerationRequest):
        key = repr(dataclasses.replace(generation, controlnets=tuple(c.name for c in generation.controlnets)))
        if key not in cache:
            cache[key] = pipeline.generate(generation).image
        return cache[key]

    return reference


def start_envoy(folder: Path, replicas: list[TritonServer], policy: str) -> EnvoyProxy:
    listen, admin = free_ports(2)
    upstreams = Upstreams(tuple(("127.0.0.1", server.ports.grpc) for server in replicas))
    proxy = EnvoyProxy(envoy_config(upstreams, policy, listen=("127.0.0.1", listen), admin=("127.0.0.1", admin),
                                    health=HEALTH), folder, f"envoy-{policy}")
    proxy.start()
    proxy.wait_healthy(len(replicas))
    return proxy


def metric(server: TritonServer, name: str, **labels: str) -> float:
    """The sum of a metric's samples with these labels on one replica's metrics endpoint (0 if absent)."""
    text = _OPENER.open(server.metrics_url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line.split("}", 1)[0] for k, v in labels.items()))


def served(replicas: list[TritonServer]) -> list[float]:
    return [metric(s, "nv_inference_request_success", model="text_to_image") for s in replicas]


def refused(replicas: list[TritonServer]) -> list[float]:
    return [metric(s, "nv_inference_request_failure", model="text_to_image") for s in replicas]


def lora_requests(replicas: list[TritonServer]) -> list[tuple[float, float]]:
    """Per replica: (requests whose LoRA set was already patched in, requests that loaded theirs)."""
    return [(metric(s, "swiftdiffusion_lora_reuse_total", model="denoiser"),
             metric(s, "swiftdiffusion_lora_loads_total", model="denoiser")) for s in replicas]


def send_all(url: str, generations: list[GenerationRequest], concurrency: int) -> list:
    def one(generation: GenerationRequest):
        with Client(url, timeout_s=300) as client:
            return client.generate(generation).image

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, generations))


def test_least_request_serves_every_request_equal_to_its_in_process_image(replicas, references, tmp_path):
    generations = mixed(12)
    before = served(replicas)
    with start_envoy(tmp_path, replicas, "least_request") as proxy:
        images = send_all(proxy.grpc_url, generations, concurrency=6)
        assert proxy.stop() == 0
    per_replica = [after - b for after, b in zip(served(replicas), before)]
    for generation, image in zip(generations, images):
        assert max_diff(image, references(generation)) <= TOLERANCE
    print(f"\nleast_request: {len(images)} requests, 0 failed, per replica {per_replica}")
    assert sum(per_replica) == len(generations) and all(n > 0 for n in per_replica)


def test_lora_affinity_sends_a_sets_requests_to_one_replica(replicas, references, tmp_path):
    shares = []
    with start_envoy(tmp_path, replicas, "lora_affinity") as proxy, Client(proxy.grpc_url, timeout_s=300) as client:
        for loras in LORA_SETS:
            before = lora_requests(replicas)
            generations = [request(10 + i, loras) for i in range(4)]
            for generation in generations:  # one at a time: the bound never diverts a request
                assert max_diff(client.generate(generation).image, references(generation)) <= TOLERANCE
            delta = [(r - rb, l - lb) for (r, l), (rb, lb) in zip(lora_requests(replicas), before)]
            got = [sum(d) for d in delta]
            shares.append(max(got) / len(generations))
            print(f"\nlora_affinity: set {[u.name for u in loras]}: (reused, loaded) per replica {delta}")
            assert got.count(0) == REPLICAS - 1 and max(got) == len(generations)
            assert delta[got.index(max(got))][0] >= len(generations) - 1  # repeats skip restore and patch
        assert proxy.stop() == 0
    print(f"lora_affinity: share of a set's requests on its replica: {shares}")


def test_a_full_replicas_refusals_are_served_by_the_others(replicas, references, tmp_path):
    """Unbounded LoRA affinity sends a burst of one set to one replica: beyond its queue (`max_queue` 8 waiting +
    1 running) Triton refuses with UNAVAILABLE, and Envoy retries those requests on the other replicas."""
    generations = [GenerationRequest("a harbour at dawn", seed=i, steps=2, height=64, width=64, lora_mode="sync",
                                     loras=LORA_SETS[0]) for i in range(14)]
    before, failed_before = served(replicas), refused(replicas)
    listen, admin = free_ports(2)
    upstreams = Upstreams(tuple(("127.0.0.1", server.ports.grpc) for server in replicas))
    config = envoy_config(upstreams, "lora_affinity", listen=("127.0.0.1", listen), admin=("127.0.0.1", admin),
                          hash_balance_factor=None, health=HEALTH)
    with EnvoyProxy(config, tmp_path, "envoy-unbounded") as proxy:
        proxy.start()
        proxy.wait_healthy(len(replicas))
        images = send_all(proxy.grpc_url, generations, concurrency=len(generations))
        assert proxy.stop() == 0
    for generation, image in zip(generations, images):
        assert max_diff(image, references(generation)) <= TOLERANCE
    per_replica = [after - b for after, b in zip(served(replicas), before)]
    refusals = [after - b for after, b in zip(refused(replicas), failed_before)]
    print(f"\nburst of one set: {len(images)} requests, 0 failed; served per replica {per_replica}, refused "
          f"per replica {refusals}")
    hot = refusals.index(max(refusals))
    assert refusals[hot] > 0 and sum(per_replica) == len(generations) and per_replica[hot] < len(generations)


def test_a_replica_killed_mid_run_fails_no_request_once_envoy_noticed(replicas, references, tmp_path):
    generations = mixed(24)
    victim = replicas[-1]
    victim_address = f"127.0.0.1:{victim.ports.grpc}"
    outcomes: list[tuple[float, float, bool, str]] = [None] * len(generations)  # (sent, ended, ok, error)
    pending = iter(range(len(generations)))
    lock, six_done, noticed = threading.Lock(), threading.Event(), {}

    def client_loop(url: str) -> None:
        with Client(url, timeout_s=300) as client:
            for index in pending:
                sent = time.monotonic()
                try:
                    image = client.generate(generations[index]).image
                    ok, error = max_diff(image, references(generations[index])) <= TOLERANCE, ""
                except InferenceServerException as failure:
                    ok, error = False, f"{failure.status()}: {failure.message()}"[:200]
                with lock:
                    outcomes[index] = (sent, time.monotonic(), ok, error)
                    if sum(o is not None for o in outcomes) >= 6:
                        six_done.set()

    with start_envoy(tmp_path, replicas, "least_request") as proxy:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            loops = [pool.submit(client_loop, proxy.grpc_url) for _ in range(3)]
            six_done.wait(timeout=300)
            assert served([victim])[0] > 0  # it was taking requests
            killed_at = time.monotonic()
            os.killpg(victim.pid, signal.SIGKILL)  # the pod is gone: server and model processes at once
            while proxy.hosts()[victim_address]["healthy"]:
                time.sleep(0.02)
            noticed["at"] = time.monotonic()
            for loop in loops:
                loop.result()
        retried = proxy.admin("/stats?filter=^cluster.triton.upstream_rq_retry$").split(": ")[-1].strip()
        assert proxy.stop() == 0
    gap = noticed["at"] - killed_at
    in_flight = [o for o in outcomes if o[0] < killed_at < o[1]]
    before_notice = [o for o in outcomes if killed_at <= o[0] < noticed["at"]]
    after = [o for o in outcomes if o[0] >= noticed["at"]]
    failures = [o[3] for o in outcomes if not o[2]]
    print(f"\nfailover: {len(outcomes)} requests, {len(failures)} failed {failures}; in flight at the kill "
          f"{len(in_flight)} ({sum(not o[2] for o in in_flight)} failed), sent before Envoy noticed "
          f"{len(before_notice)} ({sum(not o[2] for o in before_notice)} failed), after {len(after)} "
          f"({sum(not o[2] for o in after)} failed); Envoy noticed {gap:.2f} s after the kill, retried {retried}")
    assert len(after) >= 10 and all(o[2] for o in after)


def test_the_replicas_stop_cleanly(replicas):
    """Last: the surviving replicas stop gracefully, leaving no process of theirs behind."""
    for server in replicas[:-1]:
        assert server.stop() == 0
        with pytest.raises(ProcessLookupError):
            os.killpg(server.pid, 0)
    assert replicas[-1].stop() == -signal.SIGKILL

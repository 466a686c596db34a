"""perf/routing_sim.py: its inputs are the project's measurements (every cited field resolves to the number used),
its policies behave as Envoy's do, and a small run writes the JSON and chart with a decision."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PERF = Path(__file__).resolve().parents[1] / "perf"
sys.path.insert(0, str(PERF))
import routing_sim  # noqa: E402  (a script of perf/, which is not a package)

from swiftdiffusion.workload import load_stats, mix  # noqa: E402


def test_service_times_are_the_cited_measurements():
    times = routing_sim.service_times()
    cited = {}
    for name, source in times.sources.items():
        path, field = source.split(": ")
        cited[name] = routing_sim._lookup(json.loads((PERF.parent / path).read_text()), field)
    assert times.warm_s[0] == cited["warm_0"] and times.warm_s[1] == cited["warm_1"]
    assert times.warm_s[2] == pytest.approx(cited["sync_2"] - cited["sync_2_load"] - cited["patch_ms"] / 1000)
    assert times.uncached_lora_s[1] == pytest.approx(cited["cold_1"] - cited["warm_1"])
    assert times.uncached_lora_s[2] == pytest.approx(cited["cold_2"] - times.warm_s[2])
    assert times.restore_s == pytest.approx(cited["restore_ms"] / 1000)
    assert times.warm_s[0] < times.warm_s[1] < times.warm_s[2] < times.warm_s[3]  # each ControlNet adds time


def test_the_lora_skew_fit_reproduces_the_published_lru_figure():
    stats = load_stats()
    fit = routing_sim.lora_zipf_exponent(stats)
    misses = routing_sim.lru_misses_per_request(fit["exponent"], stats["services"]["A"]["distinct_loras"], 2)
    assert misses == pytest.approx(stats["loras"]["lru10_misses_per_request_pair"], abs=0.01)
    assert fit["check_rare_fraction"]["fit"] == pytest.approx(stats["loras"]["rare_fraction"], abs=0.001)


@pytest.fixture(scope="module")
def small_study():
    """Service A, 4 replicas at 80% load, every policy on the same requests."""
    stats = load_stats()
    times = routing_sim.service_times()
    weights = routing_sim.zipf_weights(stats["services"]["A"]["distinct_loras"],
                                       routing_sim.lora_zipf_exponent(stats)["exponent"])
    service = mix("A", stats)
    capacity = routing_sim.baseline_service_s(routing_sim.requests_for(service, weights, 3000, 1.0, 1), times, 8)
    requests = routing_sim.requests_for(service, weights, 6000, 0.8 * 4 / capacity, 0)
    return {policy: routing_sim.simulate(policy, 4, requests, times, 8) for policy in routing_sim.POLICIES}


def test_every_request_is_served_under_every_policy(small_study):
    assert {row["requests"] for row in small_study.values()} == {6000 - 600}  # after the 10% warm-up


def test_hashing_on_the_lora_set_reuses_more_and_bounding_it_balances(small_study):
    ring, bounded = small_study["ring_hash"], small_study["ring_hash_bounded"]
    scan, two_choices = small_study["least_request_full_scan"], small_study["least_request_p2c"]
    assert ring["lora_reuse_rate"] > 2 * scan["lora_reuse_rate"]
    assert bounded["lora_reuse_rate"] > scan["lora_reuse_rate"]
    assert bounded["busiest_replica_share"] < ring["busiest_replica_share"]
    assert scan["mean_s"] < two_choices["mean_s"]


def test_a_small_run_writes_json_chart_and_decision(tmp_path):
    out = tmp_path / "routing_sim.json"
    subprocess.run([sys.executable, str(PERF / "routing_sim.py"), "--out", str(out), "--services", "A",
                    "--replicas", "2", "4", "--loads", "0.8", "--requests-per-replica", "500",
                    "--min-requests", "2000"], check=True, timeout=300, cwd=PERF.parent, capture_output=True)
    study = json.loads(out.read_text())
    assert {(r["replicas"], r["policy"]) for r in study["results"]} == \
           {(n, p) for n in (2, 4) for p in routing_sim.POLICIES}
    assert study["decision"]["default"] in routing_sim.POLICIES
    assert study["config"]["command"].startswith("python perf/routing_sim.py")
    assert out.with_suffix(".png").stat().st_size > 10_000

"""The workload generator draws what the published traces say, replays exactly, and round-trips trace files."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from swiftdiffusion.workload import generate, load_stats, mix, read_trace, to_request, write_trace

CONTROLNETS = ("canny", "depth", "openpose", "segmentation")
LORAS = tuple(f"lora_{i:03d}" for i in range(200))
DRAWS = 20_000


def _within_sampling_error(entries, attribute: str, published: dict[int, float]) -> None:
    counts = collections.Counter(len(getattr(e, attribute)) for e in entries)
    assert set(counts) <= set(published)
    for count, p in published.items():
        error = 4 * np.sqrt(p * (1 - p) / len(entries))  # 4 sigma: a false alarm about once in 16000 runs
        assert abs(counts[count] / len(entries) - p) <= error, (attribute, count, counts[count] / len(entries), p)


@pytest.mark.parametrize("service", ["A", "B"])
def test_drawn_counts_match_the_published_distributions(service):
    stats = load_stats()["services"][service]
    entries = generate(mix(service), DRAWS, CONTROLNETS, LORAS, seed=1)
    _within_sampling_error(entries, "controlnets", {int(k): v for k, v in stats["controlnets_per_request"].items()})
    _within_sampling_error(entries, "loras", {int(k): v for k, v in stats["loras_per_request"].items()})


@pytest.mark.parametrize("service", ["A", "B"])
def test_identities_popular_controlnets_rare_loras(service):
    entries = generate(mix(service), DRAWS, CONTROLNETS, LORAS, seed=2)
    controlnet_uses = collections.Counter(name for e in entries for name in e.controlnets)
    lora_uses = collections.Counter(name for e in entries for name in e.loras)
    assert [name for name, _ in controlnet_uses.most_common()] == list(CONTROLNETS)
    assert all(len(set(e.controlnets)) == len(e.controlnets) and len(set(e.loras)) == len(e.loras) for e in entries)
    assert max(lora_uses.values()) / sum(lora_uses.values()) < 0.01  # every LoRA is "rare", as 99.8% are
    shared = sum(bool(set(a.loras) & set(b.loras)) for a, b in zip(entries, entries[1:]))
    assert shared / len(entries) < 0.05  # consecutive requests almost never share a LoRA


def test_zipf_exponent_reproduces_the_top_share():
    for service in ("A", "B"):
        published = load_stats()["services"][service]
        top, distinct = published["top_controlnets"], published["distinct_controlnets"]
        weights = np.arange(1, distinct + 1) ** -mix(service).controlnet_zipf
        assert weights[:top["count"]].sum() / weights.sum() == pytest.approx(top["share_of_uses"], abs=1e-6)


def test_poisson_arrivals_at_the_given_rate():
    entries = generate(mix("A"), DRAWS, CONTROLNETS, LORAS, rate_per_s=2.0, seed=3)
    gaps = np.diff([0.0] + [e.time_s for e in entries])
    assert gaps.min() >= 0
    assert gaps.mean() == pytest.approx(0.5, rel=4 / np.sqrt(DRAWS))  # exponential: sd = mean
    assert np.std(gaps) == pytest.approx(0.5, rel=0.05)
    assert all(e.time_s == 0.0 for e in generate(mix("A"), 5, CONTROLNETS, LORAS))  # closed loop: no arrivals


def test_seeded_replay_is_identical():
    first = generate(mix("B"), 500, CONTROLNETS, LORAS, rate_per_s=1.0, seed=7)
    assert generate(mix("B"), 500, CONTROLNETS, LORAS, rate_per_s=1.0, seed=7) == first
    assert generate(mix("B"), 500, CONTROLNETS, LORAS, rate_per_s=1.0, seed=8) != first
    a, b = to_request(first[0]), to_request(first[0])
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a.controlnets, b.controlnets))


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_trace_file_round_trip(tmp_path, suffix):
    entries = generate(mix("B"), 300, CONTROLNETS, LORAS, rate_per_s=0.5, steps=12, size=192, seed=4)
    assert any(not e.controlnets for e in entries) and any(not e.loras for e in entries)  # empty lists survive too
    assert read_trace(write_trace(tmp_path / f"trace{suffix}", entries)) == entries

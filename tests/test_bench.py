"""`perf/bench.py` end to end in a smoke configuration against the session server: every report is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server
PROJECT = Path(__file__).resolve().parents[1]
STATS = ("mean_s", "p50_s", "p95_s", "p99_s", "throughput_per_min", "failures", "requests", "lora_s")


def test_bench_smoke_writes_json_charts_and_summary(server, tiny_root, tmp_path):
    command = [sys.executable, str(PROJECT / "perf" / "bench.py"), "--url", server.grpc_url,
               "--metrics-url", server.metrics_url, "--controlnets", str(tiny_root / "controlnets"),
               "--loras", str(tiny_root / "loras"), "--out", str(tmp_path), "--resolution", "64", "--steps", "2",
               "--mixes", "A", "--loads", "0.8", "--requests", "2", "--concurrency", "1", "--closed-requests", "2",
               "--warmup", "1", "--perf-analyzer", "1:1"]
    subprocess.run(command, check=True, cwd=PROJECT, timeout=300)

    result = json.loads((tmp_path / "bench.json").read_text())
    runs = result["runs"]
    pairs = {(kind, system) for kind in ("open", "closed") for system in ("ours", "baseline")}
    assert {(r["kind"], r["system"]) for r in runs} == pairs
    for run in runs:
        assert set(STATS) <= set(run)
        assert run["requests"] == 2 and run["failures"] == 0 and len(run["latencies_s"]) == 2
        assert 0 < run["p50_s"] <= run["p95_s"] <= run["p99_s"]
    if any(r["lora_s"] for r in runs):  # a draw may hold no LoRA at all, rarely (0.2% of mix A requests)
        assert {"wait", "patch", "restore", "critical_s"} <= set(next(r["lora_s"] for r in runs
                                                                      if r["system"] == "ours"))
    assert {r["kind"] for r in result["ratios"]} == {"open", "closed"}
    assert all(r["mean_s"] > 0 for r in result["ratios"])
    assert set(result["single_request_s"]) == set(result["peak_throughput_per_min"]) == {"ours", "baseline"}
    for chart in ("latency_cdf.png", "load_sweep.png", "closed_loop.png"):
        assert (tmp_path / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (tmp_path / "bench.md").read_text()
    assert "Ratios ours / baseline" in summary and "| open | ours | A |" in summary
    assert list((tmp_path / "traces").glob("mix_A_*.csv"))
    swept = result["perf_analyzer"]
    assert set(swept["models"]) == {"text_to_image", "baseline_diffusers"}
    assert swept["ours_over_baseline"][0]["concurrency"] == 1
    assert all((tmp_path / "perf_analyzer" / f"{m}_1c1l.csv").is_file() for m in swept["models"])

"""`perf/controlnet_bench.py` end to end in a smoke configuration (tiny model): the JSON and the chart are written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server
PROJECT = Path(__file__).resolve().parents[1]


def test_controlnet_bench_smoke_writes_json_and_chart(tiny_root, tmp_path):
    root = tmp_path / "tiny"
    shutil.copytree(tiny_root, root)  # the bench adds a third ControlNet to its catalog
    out = tmp_path / "controlnet_bench.json"
    subprocess.run([sys.executable, str(PROJECT / "perf" / "controlnet_bench.py"), "--size", "tiny",
                    "--root", str(root), "--resolution", "64", "--steps", "3", "--rounds", "1", "--repeats", "1",
                    "--batching-calls", "1", "--effect-sizes", "tiny", "--effect-steps", "3",
                    "--out", str(out)], check=True, cwd=PROJECT, timeout=300)

    report = json.loads(out.read_text())
    cases = {f"{n}_{mode}" for n in range(4) for mode in ("sequential", "overlap", "async")}
    assert set(report["median_step_s"]) == set(report["median_image_s"]) == cases
    assert all(value > 0 for value in report["median_step_s"].values())
    for n in "123":
        assert set(report["speedup_vs_sequential"]["measured"][n]) == {"overlap", "async"}
        assert report["ideal_speedup"][n]["overlap"] >= 1.0 and report["ideal_speedup"][n]["async"] >= 1.0
    assert 0 < report["bls_transfer"]["echo_round_trip_s"]["median"] < 10
    assert report["graphs_in_process_1_thread_s"]["t_enc_cn_pair"] > 0 and report["ideal_overlap_1cn_side_by_side"] > 0
    assert report["batching"]["batched_model_calls"] > 0 and report["batching"]["verdict"]
    assert set(report["cfg_parallel_in_process"]["median_step_s"]) == {"0cn_batched", "0cn_parallel", "1cn_batched",
                                                                        "1cn_parallel"}
    effect = report["async_image_effect"]
    assert set(effect) == {"tiny_1cn", "tiny_2cn", "tiny_3cn"}
    assert all(case["sync_vs_no_controlnet"]["max_abs"] > 0 for case in effect.values())
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

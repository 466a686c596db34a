"""perf/triton_gpu_check.py --bench (perf/triton_gpu_bench.py): without a GPU it says why and writes nothing; its
dry run serves the tiny model through real tritonservers of the DLPack path and the local placement and records,
per case, the times through Triton and in-process, the served image's difference and the per-step figures."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

SCRIPT = Path(__file__).resolve().parents[1] / "perf" / "triton_gpu_check.py"
CASES = {"0C/0L": 0, "1C/1L": 1, "2C/2L": 2}  # case -> ControlNets


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--bench", *args], capture_output=True, text=True,
                          timeout=600)


def test_without_a_gpu_the_bench_says_why_and_writes_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU here: the bench would run")
    run = bench("--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    assert "skipped: no CUDA device (torch.cuda.is_available() is False)" in run.stdout
    assert not (tmp_path / "out").exists()


def test_the_dry_run_serves_each_path_and_records_every_case(tmp_path):
    run = bench("--dry-run", "--paths", "dlpack", "local", "--out", str(tmp_path / "out"), "--model-root",
                str(tmp_path / "models"))
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out" / f"triton_gpu_cpu_dry_run_{datetime.date.today().isoformat()}.json"
    results = json.loads(out.read_text())
    per_call = results["residual_bytes_per_call"]
    assert per_call > 0 and set(results["paths"]) == {"dlpack", "local"}
    for path, record in results["paths"].items():
        assert "error" not in record and set(record["cases"]) == set(CASES), record
        assert (tmp_path / "out" / f"{out.stem}_{path}_server.log").is_file()
        for case, result in record["cases"].items():
            assert result["residual_path"] == path and result["max_abs_diff"] <= 1, result
            assert result["through_triton_s"] > 0 and result["in_process_s"] > 0
            assert result["residual_bytes_per_step"] == CASES[case] * per_call
            assert ("controlnet_overhead_per_step_ms" in result) == (CASES[case] > 0)
            # Cases with ControlNets have as many cold LoRAs, patched in at a step of the request (bounded mode).
            assert (0 <= result["lora_step"] < results["settings"]["steps"]) if CASES[case] else (
                result["lora_step"] == -1)
        assert f"{path} 2C/2L: through Triton" in run.stdout

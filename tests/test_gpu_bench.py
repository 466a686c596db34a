"""perf/gpu_bench.py's --dry-run (CPU, tiny models of both families): every section, case and system lands in the
JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "perf" / "gpu_bench.py"
WITH_LORAS = tuple(f"ours_{variant}_{mode}" for variant in ("eager", "graphed", "overlap", "cnasync", "compiled")
                   for mode in ("sync", "bounded"))
SYSTEMS = {
    "0C/0L": ("ours_eager", "ours_graphed", "ours_compiled"),
    "1C/0L": ("ours_eager", "ours_graphed", "ours_overlap", "ours_cnasync", "ours_compiled"),
    "1C/1L": WITH_LORAS,
    "2C/2L": WITH_LORAS,
}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_dry_run_records_every_case_system_and_ratio(tmp_path, family):
    out = tmp_path / "gpu_dry.json"
    subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--family", family, "--cfg-parallel", "--out", str(out)],
                   check=True, timeout=300, capture_output=True, text=True)
    results = json.loads(out.read_text())
    assert results["settings"]["family"] == family
    checks = ("checks", "checks_overlap", "checks_compiled")
    for section in ("build", "load", *checks, "step_probe", "flop_floor", "lora_patch_probe", "transfer_probe",
                    "step_probe_compiled"):
        assert "error" not in results[section], results[section]
    for section in checks:
        assert results[section]["all_pass"]
        assert results[section]["restored_weights_identical"] and results[section]["after_restore"]["identical"]
    processors = results["load"]["attention_processors"]
    assert set(processors["ours_unet"]) == {"AttnProcessor2_0"} and processors["ours_unet"] == processors["diffusers_unet"]
    floor = results["flop_floor"]
    assert 0 < floor["controlnet_tflop"] < floor["unet_tflop"]
    assert floor["floor_ms_per_step"]["0C"] < floor["floor_ms_per_step"]["1C"] < floor["floor_ms_per_step"]["2C"]
    assert set(results["step_probe"]) >= {"unet", "unet_encoder", "unet_decoder", "controlnet", "vae_decoder",
                                          *(("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",))}
    assert set(results["cases"]) == set(SYSTEMS)
    for case, systems in SYSTEMS.items():
        entry = results["cases"][case]
        for system in ("diffusers", *systems):
            assert "error" not in entry[system], entry[system]
            assert entry[system]["median_s"] > 0 and entry[system]["graph_ms"]
        assert set(entry["ratios"]) == set(entry["ratios_latency"]) == set(systems)
        assert all(ratio > 0 for ratio in entry["ratios"].values())
        if case not in ("0C/0L", "1C/0L"):
            assert entry["diffusers"]["median_lora_load_s"] > 0
            assert all(entry[system]["median_lora_load_s"] > 0 for system in systems)
            assert entry["ours_eager_sync"]["vs_diffusers"]["max_abs"] <= 2  # fp32: the fidelity tests' bound
    assert all(results["summary"][f"{section}_all_pass"] for section in (*checks, "cfg_parallel"))
    assert results["cfg_parallel"]["0C/1L"]["copy_weights_equal_main"]

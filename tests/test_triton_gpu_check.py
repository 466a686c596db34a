"""perf/triton_gpu_check.py end to end on this machine, through real tritonservers: the host path (shared memory
grown on demand and pre-sized) and DLPack with CPU tensors move every byte of ControlNet-shaped traffic through BLS;
an injected server crash is recorded and the server started again for the remaining probes; without a GPU every
GPU case is recorded as skipped with the reason, and the verdict is the host path."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from swiftdiffusion.triton.gpu_settings import SHM_PRESIZED_BYTES, GpuSettings
from swiftdiffusion.triton.launcher import find_tritonserver

pytestmark = pytest.mark.server

SCRIPT = Path(__file__).resolve().parents[1] / "perf" / "triton_gpu_check.py"
RESIDUAL_BYTES_512 = 26_869_760  # SD1.5's 13 residuals, fp16, CFG batch of two, 512x512 (README: 26.9 MB)
GPU_PROBES = ("host_gpu", "dlpack_gpu", "dlpack_cpu_kind_on_cuda", "dlpack_model_kind")
GPU_ONLY_ENVIRONMENTS = ("libcuda_link", "cuda_pool", "launcher_gpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, Path]:
    try:
        find_tritonserver()
    except FileNotFoundError as error:
        pytest.skip(f"no tritonserver: {error}")
    out = tmp_path_factory.mktemp("triton_gpu_check")
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--inject-crash"], check=True, timeout=300,
                   capture_output=True, text=True)
    return json.loads((out / "triton_gpu_check.json").read_text()), out


def _check_workloads(probe: dict, transport: str) -> None:
    assert probe["status"] == "pass", probe
    for report, (size, calls, concurrency) in zip(probe["reports"], [(512, 8, 4), (1024, 2, 1)], strict=True):
        assert (report["size"], report["calls"], report["concurrency"]) == (size, calls, concurrency)
        assert report["transport"] == transport and report["error"] is None
        assert report["inputs_intact"] and report["outputs_intact"]
        assert report["bytes_out"] == calls * RESIDUAL_BYTES_512 * (size // 512) ** 2
        assert report["inputs_on"] == report["outputs_on"] == ["cpu"]
        assert len(report["exchange_ms"]) == calls // concurrency and len(report["callee_ms"]) == calls


def test_host_path_with_presized_shared_memory_moves_every_byte(run):
    results, _ = run
    environment = results["environments"]["shm_presized"]
    assert environment["settings"]["shm_default_byte_size"] == SHM_PRESIZED_BYTES
    [server] = environment["servers"]
    shm_args = [a for a in server["command"] if "shm-default-byte-size" in a]
    assert shm_args == [f"--backend-config=python,shm-default-byte-size={SHM_PRESIZED_BYTES}"]
    _check_workloads(environment["probes"]["host_cpu"], "numpy")


def test_host_path_with_shared_memory_grown_on_demand_moves_every_byte(run):
    results, _ = run
    _check_workloads(results["environments"]["baseline"]["probes"]["host_cpu"], "numpy")


def test_dlpack_round_trips_cpu_tensors_through_bls(run):
    results, out = run
    baseline = results["environments"]["baseline"]
    probe = baseline["probes"]["dlpack_cpu"]
    _check_workloads(probe, "dlpack")
    # Everything a DLPack residual path needs exists in 2.51's Python backend, and it reads the callee's parameter.
    assert probe["reports"][0]["api"] == dict.fromkeys(
        ("Tensor.from_dlpack", "Tensor.to_dlpack", "Tensor.is_cpu", "PreferredMemory", "TRITONSERVER_MEMORY_GPU",
         "TRITONSERVER_MEMORY_CPU"), True)
    log = (out / "logs" / baseline["servers"][-1]["log"]).read_text()
    assert "Input tensors can be both in CPU and GPU. FORCE_CPU_ONLY_INPUT_TENSORS is off." in log


def test_a_crashed_server_is_recorded_and_started_again(run):
    results, out = run
    baseline = results["environments"]["baseline"]
    crash = baseline["probes"]["server_crash"]
    assert crash["status"] == "crash" and crash["reason"].startswith("server killed by SIGKILL"), crash
    first, second = baseline["servers"]
    assert first["stopped"] == "killed by SIGKILL" and second["stopped"] == "exit code 0"
    assert "server_crash_caller" in first["models"] and "server_crash_caller" not in second["models"]
    assert set(second["models"]) == {"host_cpu_caller", "host_cpu_callee", "dlpack_cpu_caller", "dlpack_cpu_callee"}
    assert (out / "logs" / first["log"]).is_file() and (out / "logs" / second["log"]).is_file()
    # The crashed server's probe processes are gone with it, and so are their shared-memory regions.
    assert first["shm_regions"] and not [r for r in first["shm_regions"] if Path("/dev/shm", r).exists()]


def test_without_a_gpu_every_gpu_case_is_skipped_with_the_reason(run):
    results, _ = run
    if results["machine"]["gpus"]:
        pytest.skip(f"GPUs here ({results['machine']['gpus']}): the GPU cases ran")
    reason = "no CUDA device (torch.cuda.is_available() is False)"
    for name, environment in results["environments"].items():
        for probe in GPU_PROBES:
            if probe in environment["probes"]:
                assert environment["probes"][probe] == {"status": "skipped", "reason": reason}, (name, probe)
    for name in GPU_ONLY_ENVIRONMENTS:
        environment = results["environments"][name]
        assert environment["servers"] == [] and environment["probes"]
        assert all(p == {"status": "skipped", "reason": reason} for p in environment["probes"].values())
    assert results["preflight"]["cuda_ipc"] == {"status": "skipped", "reason": reason}


def test_preflight_records_the_driver_libraries_shared_memory_and_kernel(run):
    results, _ = run
    preflight = results["preflight"]
    dlopen = preflight["driver_libraries"]["dlopen_in_server_env"]
    assert set(dlopen) == {"libcuda.so", "libcuda.so.1"}
    if not results["machine"]["gpus"]:
        assert not dlopen["libcuda.so.1"]["loads"]
    assert preflight["dev_shm"]["total_bytes"] > 0 and preflight["kernel"]["release"] == platform.release()


def test_the_verdict_without_a_gpu_is_the_host_path_and_changes_no_gpu_setting(run):
    results, _ = run
    if results["machine"]["gpus"]:
        pytest.skip("GPUs here: the verdict is about them")
    verdict = results["verdict"]
    assert (verdict["gpu"], verdict["residual_path"], verdict["host_path_works"], verdict["dlpack_api_works"]) == (
        False, "host", True, True)
    assert verdict["works_in"]["host_cpu"] == ["baseline", "shm_presized"]
    assert GpuSettings.from_check([0], verdict) == GpuSettings(
        (0,), source="defaults (the device check given ran without a GPU)")

"""The launcher's GPU settings (swiftdiffusion/triton/gpu_settings.py): a CPU deployment gets none of them, a GPU
deployment all of them (checked on the command line and environment a stand-in server binary receives, and taken
by the real tritonserver); the libcuda.so link against fake library folders; a device check's verdict applied."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from swiftdiffusion.triton.gpu_settings import (CUDA_POOL_BYTES, SHM_ARGS, SHM_PRESIZED_BYTES, GpuSettings,
                                                deployment_gpus, deployment_residual_path, driver_link_target,
                                                library_search_dirs, link_libcuda, merge_backend_config,
                                                read_gpu_check)
from swiftdiffusion.triton.launcher import ServerInstall, TritonServer, find_tritonserver, free_ports

PRESIZED = f"--backend-config=python,shm-default-byte-size={SHM_PRESIZED_BYTES}"
# Records its arguments and LD_LIBRARY_PATH, then waits to be stopped like a server.
FAKE_SERVER = """#!/bin/sh
printf '%s\\n' "$@" > "$RECORD/args.tmp" && mv "$RECORD/args.tmp" "$RECORD/args"
printf '%s' "$LD_LIBRARY_PATH" > "$RECORD/ld_library_path"
exec sleep 60
"""
VERDICT = {"gpu": True, "residual_path": "dlpack", "instance_kind": "KIND_GPU", "host_path_works": True,
           "checked_at": "2026-12-02 06:00:00", "device": "NVIDIA H100 80GB HBM3",
           "settings": {"libcuda_link": True, "cuda_memory_pool_byte_size": 2 << 30,
                        "shm_default_byte_size": 128 << 20}}


def fake_libraries(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(b"\x7fELF")
    return folder


def write_deployment(repository: Path, gpus: dict[str, list[list[int]]], **fields: str) -> Path:
    repository.mkdir(parents=True, exist_ok=True)
    (repository / "deployment.json").write_text(json.dumps({"model": "/models/sd15", "gpus": gpus, **fields}))
    return repository


def test_deployment_gpus_are_every_gpu_of_every_instance_group(tmp_path):
    gpus = {"denoiser": [[0]], "text_encoder": [[0]], "controlnet": [[2], [1]]}
    assert deployment_gpus(write_deployment(tmp_path / "gpu", gpus)) == (0, 1, 2)
    assert deployment_gpus(write_deployment(tmp_path / "cpu", {})) == ()
    assert deployment_gpus(tmp_path / "not_rendered") == ()


def test_the_link_is_made_when_only_the_versioned_driver_exists(tmp_path):
    lib = fake_libraries(tmp_path / "lib", "libcuda.so.1")
    driver, note = driver_link_target([lib])
    assert driver == lib / "libcuda.so.1" and note == f"libcuda.so -> {driver}"
    folder = link_libcuda(tmp_path / "link", driver)
    assert (folder / "libcuda.so").is_symlink() and (folder / "libcuda.so").resolve() == driver.resolve()


def test_no_link_where_dlopen_finds_the_driver_or_there_is_none(tmp_path):
    both = fake_libraries(tmp_path / "both", "libcuda.so", "libcuda.so.1")
    assert driver_link_target([both]) == (None, f"libcuda.so found at {both / 'libcuda.so'}")
    driver, note = driver_link_target([fake_libraries(tmp_path / "none", "libcudart.so.12")])
    assert driver is None and note.startswith("WARNING: no libcuda.so.1 found")


def test_a_toolkit_stub_is_not_the_driver(tmp_path):
    stubs = fake_libraries(tmp_path / "cuda" / "lib64" / "stubs", "libcuda.so")
    lib = fake_libraries(tmp_path / "lib", "libcuda.so.1")
    assert driver_link_target([stubs, lib])[0] == lib / "libcuda.so.1"


def test_library_search_starts_with_ld_library_path(tmp_path):
    dirs = library_search_dirs(os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    assert dirs[:2] == [tmp_path / "a", tmp_path / "b"] and Path("/usr/lib64") in dirs


def test_presized_shared_memory_replaces_the_default_size_only():
    args = merge_backend_config([*SHM_ARGS, "--log-verbose=0"], GpuSettings((0,)).server_args())
    assert [a for a in args if "shm-default-byte-size" in a] == [PRESIZED]
    assert SHM_ARGS[1] in args and "--log-verbose=0" in args


def test_defaults_without_a_device_check():
    settings = GpuSettings.from_check([1, 0, 1], None)
    assert settings.gpus == (0, 1) and settings.libcuda_link and settings.served_path == "host"
    assert settings.server_args() == [f"--cuda-memory-pool-byte-size=0:{CUDA_POOL_BYTES}",
                                      f"--cuda-memory-pool-byte-size=1:{CUDA_POOL_BYTES}", PRESIZED]
    line = settings.describe("libcuda.so -> /usr/lib/libcuda.so.1")
    assert line.startswith("ControlNet residuals: host memory") and "no device check given" in line


def test_a_verdict_sets_the_settings_and_the_line_says_what_is_served(tmp_path):
    (tmp_path / "check.json").write_text(json.dumps({"verdict": VERDICT, "environments": {}}))
    settings = GpuSettings.from_check([0], read_gpu_check(tmp_path / "check.json"), "dlpack")
    assert settings.server_args() == [f"--cuda-memory-pool-byte-size=0:{2 << 30}",
                                      f"--backend-config=python,shm-default-byte-size={128 << 20}"]
    assert settings.checked_path == settings.served_path == "dlpack"
    line = settings.describe("x")
    assert line.startswith("ControlNet residuals: GPU tensors through BLS (DLPack, CUDA IPC); from device check of "
                           "2026-12-02 06:00:00 on NVIDIA H100 80GB HBM3")


@pytest.mark.parametrize(("checked", "served", "says"), [
    ("dlpack", "host", "ControlNet residuals: host memory (numpy through the Python backend's shared memory) (the "
                       "device check chose 'dlpack': GPU tensors through BLS (DLPack, CUDA IPC); the deployment's "
                       "residual_transport and controlnet_placement ask for 'host');"),
    ("local", "dlpack", "ask for 'dlpack') (WARNING: the device check saw no DLPack GPU path work on this machine);"),
    ("local", "local", "ControlNet residuals: on the device, ControlNets in the denoiser's process; from device"),
])
def test_the_line_names_the_served_path_and_a_differing_verdict(checked, served, says):
    settings = GpuSettings.from_check([0], {**VERDICT, "residual_path": checked}, served)
    assert says in settings.describe("x")


def test_the_served_path_is_the_rendered_deployments(tmp_path):
    assert deployment_residual_path(write_deployment(tmp_path / "default", {})) == "host"
    assert deployment_residual_path(write_deployment(tmp_path / "dlpack", {}, residual_transport="dlpack")) == "dlpack"
    assert deployment_residual_path(write_deployment(tmp_path / "local", {}, controlnet_placement="local",
                                                     residual_transport="host")) == "local"
    assert deployment_residual_path(tmp_path / "not_rendered") == "host"


def test_a_verdict_from_a_machine_without_gpu_changes_nothing():
    cpu_verdict = {"gpu": False, "residual_path": "host", "settings": None, "host_path_works": True}
    settings = GpuSettings.from_check([0], cpu_verdict)
    assert settings == GpuSettings((0,), source="defaults (the device check given ran without a GPU)")


def test_a_result_without_verdict_is_refused(tmp_path):
    (tmp_path / "partial.json").write_text(json.dumps({"environments": {}}))
    with pytest.raises(ValueError, match="no verdict"):
        read_gpu_check(tmp_path / "partial.json")


def _start_fake_server(tmp_path: Path, gpus: dict[str, list[list[int]]], libraries: Path,
                       gpu_check: dict | None = None, **fields: str) -> tuple[TritonServer, list[str], str]:
    """TritonServer.start on a rendered repository, with a binary that records what it was started with."""
    binary = tmp_path / "fake_tritonserver"
    binary.write_text(FAKE_SERVER)
    binary.chmod(0o755)
    record = tmp_path / "record"
    record.mkdir()
    install = ServerInstall(binary, tmp_path / "backends", None,
                            {"RECORD": str(record), "LD_LIBRARY_PATH": str(libraries)})
    server = TritonServer(install)
    server.start(write_deployment(tmp_path / "repository", gpus, **fields), free_ports(3), extra_args=SHM_ARGS,
                 gpu_check=gpu_check)
    deadline = time.monotonic() + 30
    while not (record / "args").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return server, (record / "args").read_text().splitlines(), (record / "ld_library_path").read_text()


def test_a_gpu_deployment_gets_the_link_the_pool_and_presized_shared_memory(tmp_path, capsys):
    libraries = fake_libraries(tmp_path / "driver", "libcuda.so.1")
    gpus = {"denoiser": [[0]], "controlnet": [[1]]}
    server, args, ld_library_path = _start_fake_server(tmp_path, gpus, libraries)
    try:
        link_dir = server.library_dir
        assert link_dir is not None and (link_dir / "libcuda.so").resolve() == (libraries / "libcuda.so.1").resolve()
        assert ld_library_path.split(os.pathsep) == [str(link_dir), str(libraries)]
        assert f"--cuda-memory-pool-byte-size=0:{CUDA_POOL_BYTES}" in args
        assert f"--cuda-memory-pool-byte-size=1:{CUDA_POOL_BYTES}" in args
        assert [a for a in args if "shm-default-byte-size" in a] == [PRESIZED] and SHM_ARGS[1] in args
    finally:
        server.stop()
    assert not link_dir.exists()  # removed once the server is gone
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("swiftdiffusion: ")]
    assert len(lines) == 1 and lines[0].startswith("swiftdiffusion: ControlNet residuals: host memory")
    assert f"libcuda.so -> {libraries / 'libcuda.so.1'} in {link_dir}" in lines[0]


@pytest.mark.parametrize(("fields", "path", "says"), [
    ({"residual_transport": "dlpack"}, "dlpack", "GPU tensors through BLS (DLPack, CUDA IPC); from device check"),
    ({"controlnet_placement": "local"}, "local",
     "on the device, ControlNets in the denoiser's process; from device check"),
])
def test_the_launchers_line_names_the_path_the_deployment_serves(tmp_path, capsys, fields, path, says):
    libraries = fake_libraries(tmp_path / "driver", "libcuda.so.1")
    server, _, _ = _start_fake_server(tmp_path, {"denoiser": [[0]], "controlnet": [[1]]}, libraries,
                                      {**VERDICT, "residual_path": path}, **fields)
    server.stop()
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("swiftdiffusion: ")]
    assert line.startswith(f"swiftdiffusion: ControlNet residuals: {says}"), line


def test_a_verdict_without_the_link_is_followed(tmp_path):
    libraries = fake_libraries(tmp_path / "driver", "libcuda.so.1")
    gpu_check = {**VERDICT, "settings": {**VERDICT["settings"], "libcuda_link": False}}
    server, args, ld_library_path = _start_fake_server(tmp_path, {"denoiser": [[0]]}, libraries, gpu_check)
    server.stop()
    assert server.library_dir is None and ld_library_path == str(libraries)
    assert f"--cuda-memory-pool-byte-size=0:{2 << 30}" in args


def test_a_cpu_deployment_gets_none_of_them(tmp_path, capsys):
    libraries = fake_libraries(tmp_path / "driver", "libcuda.so.1")
    server, args, ld_library_path = _start_fake_server(tmp_path, {}, libraries, VERDICT)
    server.stop()
    assert server.gpu_settings is None and server.library_dir is None and ld_library_path == str(libraries)
    assert not [a for a in args if a.startswith("--cuda-memory-pool-byte-size")]
    assert [a for a in args if a.startswith("--backend-config")] == list(SHM_ARGS)
    assert "swiftdiffusion: " not in capsys.readouterr().err


@pytest.mark.server
def test_tritonserver_2_51_takes_the_gpu_settings(tmp_path):
    """The flags reach the real server: it starts with them (on CPU too) and reports the pool and the backend's
    shared-memory size in its settings table."""
    try:
        install = find_tritonserver()
    except FileNotFoundError as error:
        pytest.skip(f"no tritonserver: {error}")
    repository = write_deployment(tmp_path / "repository", {"echo": [[0]]})
    (repository / "echo" / "1").mkdir(parents=True)
    (repository / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repository / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    with TritonServer(install) as server:
        server.start(repository, free_ports(3), extra_args=SHM_ARGS, log_file=tmp_path / "server.log")
        server.wait_ready(timeout=120, supervise=False)
    log = (tmp_path / "server.log").read_text()
    assert re.search(rf"cuda_memory_pool_byte_size\{{0\}}\s+\|\s+{CUDA_POOL_BYTES}\s", log)
    backend_config = json.loads(re.search(r"libtriton_python\.so \| (\{.*\}) \|", log).group(1))["cmdline"]
    assert backend_config["shm-default-byte-size"] == str(SHM_PRESIZED_BYTES)
    assert backend_config["shm-growth-byte-size"] == SHM_ARGS[1].split("=")[-1]


ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
ECHO_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", pb_utils.get_input_tensor_by_name(
            request, "INPUT0").as_numpy())]) for request in requests]
"""

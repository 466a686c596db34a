"""What a GPU deployment's tritonserver needs so that GPU tensors can cross between Python-backend processes.

Facts from the Python backend's source (r24.10, the 2.51 server bundled in nvidia-pytriton) that this module acts on:
- The backend and its stubs find the CUDA driver with ``dlopen("libcuda.so")``, the unversioned name, which many
  machines lack (the driver installs ``libcuda.so.1``; ``libcuda.so`` comes with development packages). Without it
  the driver's function pointers stay null, and the first GPU tensor that crosses a process boundary calls through
  them (``cuPointerGetAttribute``): the server segfaults. The fix here is a private folder holding
  ``libcuda.so -> <the driver's libcuda.so.1>``, first on the server's LD_LIBRARY_PATH (never the CUDA toolkit's
  ``stubs/libcuda.so``, which has no driver behind it).
- GPU tensors cross processes by legacy CUDA IPC, out of Triton's CUDA memory pool: one block per GPU, 64 MB by
  default, never grown. One ControlNet call's residuals for SD1.5 at 512x512 (CFG batch of two, fp16) are 26.9 MB,
  at 1024x1024 107.5 MB, so the pool is raised (``--cuda-memory-pool-byte-size=<gpu>:<bytes>``, default 1 GiB).
- Host tensors cross through each stub's shared-memory region, grown on demand; on the GPU machines a numpy input
  once arrived with 0 bytes, and the growth path is the suspect, so GPU deployments pre-size the region
  (``shm-default-byte-size``, default 256 MiB per model process: two 1024x1024 calls or nine 512x512 calls in
  flight before it grows; /dev/shm pages are used only when written).
- A callee sees GPU inputs only with its model parameter ``FORCE_CPU_ONLY_INPUT_TENSORS: "no"``, and a BLS
  request's ``preferred_memory`` chooses where its outputs land: those belong to the model configs and the serving
  code (``repository.py``, ``serving.py``), not to the server's command line.

``perf/triton_gpu_check.py`` establishes on a machine which residual path works (``dlpack``: GPU tensors through
BLS; ``local``: no cross-process GPU path, ControlNets run in the denoiser's process; ``host``: numpy through shared
memory) with which of these settings; its JSON is this module's input (`serve --gpu-check FILE`, which also renders
the deployment for that path). Without one the documented defaults above apply; the path served is the rendered
deployment's (`deployment.json`: `residual_transport`, `controlnet_placement`), host memory unless it says otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

CUDA_POOL_BYTES = 1 << 30
SHM_PRESIZED_BYTES = 256 << 20
# Every deployment's Python-backend shared memory: a region per model process, grown on demand (SD1.5 residuals are
# ~51 MiB fp32 per call). GPU deployments pre-size it instead (`GpuSettings`, which replaces the first setting).
# One setting per --backend-config flag: Triton reads a single `name=value` after the backend's name.
SHM_ARGS = ("--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=67108864")
# Where a driver is installed when no ld.so.cache lists it (containers with the driver mounted, WSL).
DEFAULT_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib/x86_64-linux-gnu", "/lib64",
                        "/usr/local/nvidia/lib64", "/usr/lib/wsl/lib")
PATH_DESCRIPTIONS = {
    "dlpack": "GPU tensors through BLS (DLPack, CUDA IPC)",
    "local": "on the device, ControlNets in the denoiser's process",
    "host": "host memory (numpy through the Python backend's shared memory)",
}
# The paths swiftdiffusion/triton/serving.py implements (every path the device check can find).
SERVED_PATHS = ("host", "dlpack", "local")


@dataclass(frozen=True)
class GpuSettings:
    """The server settings of a GPU deployment and the residual path its device check found (or the defaults)."""

    gpus: tuple[int, ...]
    libcuda_link: bool = True  # link libcuda.so -> libcuda.so.1 where only the versioned name exists
    cuda_memory_pool_byte_size: int = CUDA_POOL_BYTES
    shm_default_byte_size: int = SHM_PRESIZED_BYTES
    checked_path: str | None = None  # what a device check on a GPU found to work; None: no such check
    host_path_works: bool | None = None  # None: not checked
    source: str = "defaults (no device check given)"
    served_path: str = "host"  # the path the deployment serves (`deployment_residual_path`)

    @classmethod
    def from_check(cls, gpus: Sequence[int], verdict: Mapping[str, Any] | None,
                   served_path: str = "host") -> GpuSettings:
        """Settings from a device check's verdict (``perf/triton_gpu_check.py``); the defaults without one, or when
        the check ran on a machine without a GPU (it then established nothing about GPU paths)."""
        gpus = tuple(sorted(set(gpus)))
        if served_path not in SERVED_PATHS:
            raise ValueError(f"unknown residual path {served_path!r} (served: {', '.join(SERVED_PATHS)})")
        if verdict is None:
            return cls(gpus, served_path=served_path)
        if not verdict.get("gpu"):
            return cls(gpus, source="defaults (the device check given ran without a GPU)", served_path=served_path)
        settings = verdict["settings"]
        source = f"device check of {verdict.get('checked_at', 'unknown date')} on {verdict.get('device', '?')}"
        return cls(gpus, libcuda_link=bool(settings["libcuda_link"]),
                   cuda_memory_pool_byte_size=int(settings["cuda_memory_pool_byte_size"]),
                   shm_default_byte_size=int(settings["shm_default_byte_size"]),
                   checked_path=verdict["residual_path"], host_path_works=verdict.get("host_path_works"), source=source,
                   served_path=served_path)

    def server_args(self) -> list[str]:
        """tritonserver flags: the CUDA pool on every GPU of the deployment, the pre-sized shared memory."""
        pools = [f"--cuda-memory-pool-byte-size={gpu}:{self.cuda_memory_pool_byte_size}" for gpu in self.gpus]
        return pools + [f"--backend-config=python,shm-default-byte-size={self.shm_default_byte_size}"]

    def describe(self, driver_note: str) -> str:
        """The one log line: which residual path is in use, why, and the settings applied (``driver_note``: what
        was done about libcuda.so)."""
        line = f"ControlNet residuals: {PATH_DESCRIPTIONS[self.served_path]}"
        if self.checked_path is not None and self.checked_path != self.served_path:
            line += (f" (the device check chose {self.checked_path!r}: {PATH_DESCRIPTIONS[self.checked_path]}; the "
                     f"deployment's residual_transport and controlnet_placement ask for {self.served_path!r})")
            if self.served_path == "dlpack":
                line += " (WARNING: the device check saw no DLPack GPU path work on this machine)"
        if self.served_path == "host" and self.host_path_works is False:
            line += " (WARNING: the device check saw the host path fail on this machine)"
        return (f"{line}; from {self.source}; GPU settings: {driver_note}, CUDA memory pool "
                f"{self.cuda_memory_pool_byte_size >> 20} MiB on GPU {', '.join(map(str, self.gpus))}, "
                f"Python-backend shared memory pre-sized to {self.shm_default_byte_size >> 20} MiB per model process")


def deployment_gpus(model_repository: str | Path) -> tuple[int, ...]:
    """The GPU ids a rendered repository's models run on (its deployment.json's ``gpus``: model -> instance groups
    of ids); () for a CPU deployment or a repository that was not rendered from a Deployment."""
    path = Path(model_repository) / "deployment.json"
    if not path.is_file():
        return ()
    groups = json.loads(path.read_text()).get("gpus") or {}
    return tuple(sorted({gpu for model_groups in groups.values() for group in model_groups for gpu in group}))


def deployment_residual_path(model_repository: str | Path) -> str:
    """The residual path a rendered repository serves (its deployment.json's ``controlnet_placement`` and
    ``residual_transport``): ``local``, ``dlpack`` or ``host`` (also for a repository not rendered from a
    Deployment)."""
    path = Path(model_repository) / "deployment.json"
    deployment = json.loads(path.read_text()) if path.is_file() else {}
    if deployment.get("controlnet_placement") == "local":
        return "local"
    return "dlpack" if deployment.get("residual_transport") == "dlpack" else "host"


def read_gpu_check(path: str | Path) -> dict[str, Any]:
    """The verdict of a ``perf/triton_gpu_check.py`` JSON file."""
    results = json.loads(Path(path).read_text())
    if "verdict" not in results:
        raise ValueError(f"{path}: no verdict (not a complete perf/triton_gpu_check.py result)")
    return results["verdict"]


def library_search_dirs(ld_library_path: str) -> list[Path]:
    """The folders ``dlopen`` searches for a bare library name, in its order: LD_LIBRARY_PATH, then those of the
    ld.so cache's entries (``ldconfig -p``), then the usual system folders."""
    dirs = [Path(d) for d in ld_library_path.split(os.pathsep) if d]
    ldconfig = shutil.which("ldconfig") or ("/sbin/ldconfig" if Path("/sbin/ldconfig").exists() else None)
    if ldconfig:
        listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, check=False).stdout
        dirs += [Path(line.split(" => ")[1]).parent for line in listing.splitlines() if " => " in line]
    dirs += [Path(d) for d in DEFAULT_LIBRARY_DIRS]
    return list(dict.fromkeys(dirs))


def find_driver(search_dirs: Sequence[Path]) -> tuple[Path | None, Path | None]:
    """(what ``dlopen("libcuda.so")`` would load, the first ``libcuda.so.1``) among ``search_dirs``; a toolkit's
    ``stubs/libcuda.so`` does not count as the former (no driver behind it)."""
    unversioned = next((d / "libcuda.so" for d in search_dirs if (d / "libcuda.so").exists()), None)
    if unversioned is not None and "stubs" in unversioned.parent.parts:
        unversioned = None
    versioned = next((d / "libcuda.so.1" for d in search_dirs if (d / "libcuda.so.1").exists()), None)
    return unversioned, versioned


def driver_link_target(search_dirs: Sequence[Path]) -> tuple[Path | None, str]:
    """(the driver's ``libcuda.so.1`` when ``dlopen("libcuda.so")`` would find no driver there: the name is missing,
    or only a toolkit stub has it; else None) and what was found, for the log."""
    unversioned, versioned = find_driver(search_dirs)
    if unversioned is not None:
        return None, f"libcuda.so found at {unversioned}"
    if versioned is None:
        return None, "WARNING: no libcuda.so.1 found (no GPU tensor can cross processes)"
    return versioned, f"libcuda.so -> {versioned}"


def link_libcuda(folder: Path, driver: Path) -> Path:
    """``folder/libcuda.so -> driver`` (resolved); returns ``folder``, to go first on LD_LIBRARY_PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "libcuda.so"
    link.unlink(missing_ok=True)
    link.symlink_to(Path(driver).resolve())
    return folder


def merge_backend_config(extra_args: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """``extra_args`` + ``overrides``, without an ``extra_args`` backend setting that an override sets again (Triton
    would see both; which one wins is not documented)."""
    def key(arg: str) -> str | None:
        return arg.split("=", 2)[1] if arg.startswith("--backend-config=") and arg.count("=") >= 2 else None

    replaced = {key(arg) for arg in overrides} - {None}
    return [arg for arg in extra_args if key(arg) not in replaced] + list(overrides)

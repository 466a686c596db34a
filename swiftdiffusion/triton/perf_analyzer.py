"""Find and run Triton's ``perf_analyzer`` without NVIDIA's SDK container.

The tritonclient wheel installs a working binary into the environment's ``bin/``, but it links ``libb64.so.0d``
and ``libcudart.so.12``, which a plain machine lacks. The nvidia-pytriton wheel ships both under hashed names
(``libb64-<hash>.so.0d``, ``libcudart-<hash>.so.12.x``), so symlinks under the plain names are enough.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from ..request import GenerationRequest
from ..schema import tensors_from_request

DEFAULT_LIB_DIR = Path.home() / ".cache" / "swiftdiffusion" / "perf_analyzer_libs"
# plain soname perf_analyzer asks for -> glob of the hashed file in nvidia_pytriton.libs
_LIBS = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer exited non-zero; the message carries its output."""


def _binary() -> Path:
    """The perf_analyzer of the tritonclient wheel, else one on PATH (NVIDIA's SDK container)."""
    try:
        dist = importlib.metadata.distribution("tritonclient")
        for f in dist.files or ():
            if f.name == "perf_analyzer":
                path = Path(dist.locate_file(f)).resolve()
                if path.is_file():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    on_path = shutil.which("perf_analyzer")
    if on_path is None:
        raise FileNotFoundError("no perf_analyzer: install tritonclient==2.51.0 or use NVIDIA's Triton SDK container")
    return Path(on_path)


def _link_libs(lib_dir: Path) -> bool:
    """Symlink the libraries perf_analyzer needs from nvidia_pytriton.libs into ``lib_dir``; False if not there."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        return False
    wheel_libs = Path(spec.origin).parent.parent / "nvidia_pytriton.libs"
    lib_dir.mkdir(parents=True, exist_ok=True)
    for name, pattern in _LIBS.items():
        matches = sorted(wheel_libs.glob(pattern))
        if not matches:
            return False
        link = lib_dir / name
        if link.is_symlink() and link.resolve() == matches[-1].resolve():
            continue
        tmp = lib_dir / f".{name}.{os.getpid()}"  # link then rename: concurrent callers never see a missing file
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(matches[-1])
        os.replace(tmp, link)
    return True


def find_perf_analyzer(lib_dir: str | Path = DEFAULT_LIB_DIR) -> tuple[Path, dict[str, str]]:
    """The perf_analyzer binary and the full environment to run it with (its libraries on LD_LIBRARY_PATH)."""
    binary = _binary()
    env = dict(os.environ)
    if _link_libs(Path(lib_dir)):
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib_dir), env.get("LD_LIBRARY_PATH")]))
    return binary, env


def run_perf_analyzer(
    model: str,
    url: str,
    input_data_file: str | Path,
    csv_out: str | Path,
    concurrency_range: str = "1:1",
    protocol: str = "grpc",
    streaming: bool = False,
    measurement_mode: str = "count_windows",
    measurement_request_count: int = 50,
    extra: Sequence[str] = (),
    timeout: float | None = None,
    lib_dir: str | Path = DEFAULT_LIB_DIR,
) -> subprocess.CompletedProcess[str]:
    """Run perf_analyzer against ``url`` (``host:port``), writing its CSV report to ``csv_out``.

    ``streaming`` uses gRPC streaming, which decoupled models (per-step progress) require.
    Raises :class:`PerfAnalyzerError` with perf_analyzer's output if it fails.
    """
    binary, env = find_perf_analyzer(lib_dir)
    cmd = [
        str(binary),
        "-m", model,
        "-u", url,
        "-i", protocol,
        "--concurrency-range", concurrency_range,
        "--input-data", str(input_data_file),
        "-f", str(csv_out),
        "--measurement-mode", measurement_mode,
        "--measurement-request-count", str(measurement_request_count),
        *(["--streaming"] if streaming else []),
        *extra,
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise PerfAnalyzerError(
            f"perf_analyzer exited with code {result.returncode}: {' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
        )
    return result


def input_data(requests: Sequence[GenerationRequest]) -> dict:
    """perf_analyzer's `--input-data` JSON for `text_to_image`: one entry per request, cycled through.

    perf_analyzer adds the batch dimension itself (batch size 1), so shapes here omit it.
    """
    entries = []
    for request in requests:
        entry = {}
        for name, array in tensors_from_request(request).items():
            array = array[0]
            content = [v.decode() for v in array.reshape(-1)] if array.dtype == object else array.reshape(-1).tolist()
            entry[name] = {"content": content, "shape": list(array.shape)}
        entries.append(entry)
    return {"data": entries}

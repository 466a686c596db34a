"""Small measuring helpers the benchmark scripts share (they run as `python perf/<script>.py`, so this folder is
on their import path)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np


def seconds(call: Callable[[], object]) -> float:
    """Wall time of one call."""
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


def evict(path: Path) -> None:
    """Drops the file's pages from the page cache (written back first: dirty pages would stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def image_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """Largest and mean absolute difference of two uint8 images, in 1/255."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max_abs": int(diff.max()), "mean_abs": float(diff.mean())}

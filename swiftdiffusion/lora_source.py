"""Where a LoRA catalog's files are: a local folder, or an fsspec URL whose files are copied once into a local
folder of copies shared by the server's processes. No torch here: the ensemble's prefetch step imports only this.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Sequence

import fsspec

from .catalog import resolve
from .request import check_catalog_name

SUFFIX = ".safetensors"
BLOCK_BYTES = 16 << 20  # one range read of a remote file; files larger than one block are read in parallel


class FileCopies:
    """Local copies of remote files in one folder, at most `budget_bytes` (least recently used go first).

    A copy's name carries the remote file's version, so a changed file gets a new copy. Each copy is written
    under an exclusive lock (`flock`, across processes) to a temporary name and renamed into place, so processes
    asking for the same file at once fetch it once and nobody reads a partial copy.
    """

    def __init__(self, folder: str | Path, budget_bytes: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes

    def path(self, name: str, version: str) -> Path:
        return self.folder / f"{name}.{hashlib.sha256(version.encode()).hexdigest()[:16]}{SUFFIX}"

    def get(self, fs, url: str, name: str, version: str, size: int) -> Path:
        target = self.path(name, version)
        if not target.exists():
            with self._locked(target):
                if not target.exists():
                    partial = target.with_suffix(".partial")
                    _download(fs, url, partial, size)
                    fetched = partial.stat().st_size
                    if fetched != size:
                        partial.unlink()
                        raise FileNotFoundError(f"{url}: fetched {fetched} of {size} bytes")
                    os.replace(partial, target)
                    self._evict(keep=target)
        with contextlib.suppress(FileNotFoundError):
            os.utime(target)  # recency for eviction
        return target

    @contextlib.contextmanager
    def _locked(self, target: Path):
        with open(target.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _evict(self, keep: Path) -> None:
        copies = sorted(self.folder.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in copies)
        for old in copies:
            if total <= self.budget_bytes:
                return
            if old != keep:
                total -= old.stat().st_size
                old.unlink(missing_ok=True)


def _download(fs, url: str, path: Path, size: int) -> None:
    """The whole file, as one read or, when larger than a block, as concurrent range reads (fsspec's async
    filesystems run `cat_ranges` concurrently), each written at its offset; checked to be the file's size."""
    if size <= BLOCK_BYTES:
        path.write_bytes(fs.cat_file(url))
        return
    starts = list(range(0, size, BLOCK_BYTES))
    ends = [min(start + BLOCK_BYTES, size) for start in starts]
    blocks = fs.cat_ranges([url] * len(starts), starts, ends)
    if any(len(block) != end - start for block, start, end in zip(blocks, starts, ends)):
        path.write_bytes(fs.cat_file(url))  # a server that ignores byte ranges: one plain read
        return
    with open(path, "wb") as file:
        for start, block in zip(starts, blocks):
            os.pwrite(file.fileno(), block, start)


class LoraSource:
    """Where a catalog's files are: `path(name)` gives a local file to memory-map, fetching a remote one into
    `FileCopies` first; `version(name)` identifies the file's content (size and modification time, or ETag)."""

    def __init__(self, location: str | Path, copies_dir: str | Path | None = None, copies_mb: int = 4096):
        self.location = str(location)
        self.is_local = "://" not in self.location
        self.fs = None if self.is_local else fsspec.core.url_to_fs(self.location)[0]
        self.copies = None
        self.prefetcher = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="lora-prefetch")  # lazy threads
        if not self.is_local:
            folder = copies_dir or Path(tempfile.gettempdir()) / "swiftdiffusion-lora-copies" / hashlib.sha256(
                self.location.encode()).hexdigest()[:12]
            self.copies = FileCopies(folder, copies_mb << 20)

    def locate(self, name: str) -> str:
        if self.is_local:
            return str(resolve(Path(self.location), name, SUFFIX, "lora_names"))
        check_catalog_name("lora_names", name)
        return f"{self.location.rstrip('/')}/{name}{SUFFIX}"

    def version(self, name: str) -> tuple[str, int]:
        """(the file's version, its size in bytes); FileNotFoundError if there is none."""
        where = self.locate(name)
        if self.is_local:
            stat = os.stat(where)
            return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}", stat.st_size
        info = self.fs.info(where)
        stamp = info.get("ETag") or info.get("LastModified") or info.get("Last-Modified") or info.get("mtime")
        return f"{info['size']}:{stamp}", int(info["size"])

    def path(self, name: str, version: str | None = None, size: int | None = None) -> Path:
        if self.is_local:
            return Path(self.locate(name))
        if version is None:
            version, size = self.version(name)
        return self.copies.get(self.fs, self.locate(name), name, version, size)

    def prefetch(self, names: Sequence[str]) -> None:
        """Starts fetching remote files' copies (or the kernel's read-ahead of local files) in the background;
        a bad name or a failed fetch is left for the request itself to report."""
        for name in names:
            self.prefetcher.submit(_quietly, self._prefetch, name)

    def _prefetch(self, name: str) -> None:
        if not self.is_local:
            self.path(name)
            return
        with open(self.locate(name), "rb") as file:
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)


def _quietly(fn, *args) -> None:
    with contextlib.suppress(Exception):
        fn(*args)

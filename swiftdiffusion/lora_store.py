"""The LoRA catalog: LoRA files by name, fetched and decoded (in the background when asked) into patches.

A catalog location is a local folder or any fsspec URL (`https://host/loras`, `s3://bucket/loras`, with
credentials from the usual environment). Names are plain catalog entries (`<name>.safetensors`); anything
else is refused before a path or URL is built.

Where a cold LoRA's time goes, and what keeps it to reading its bytes:
- I/O: local files are memory-mapped by safetensors; remote files are copied once into a local folder of copies
  (`FileCopies`, shared by the server's processes, bounded in bytes, named after the file's version so a changed
  file is never served from an old copy), with large parallel range reads, then memory-mapped like local ones.
- Decoding: diffusers' converters run once per key layout (`lora.DecodePlans`); later files of that layout are
  decoded by direct lookups.
- Repeats: decoded LoRAs stay in a host cache with a byte budget (`cache_mb`), keyed by name and file version.
- Look-ahead: `prefetch` starts fetching a request's remote LoRAs (or reading local ones ahead) as soon as the
  request is seen, e.g. by the ensemble's first step, so that once requests queue their fetch is done before
  their turn.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

import fsspec
import torch

from .catalog import resolve
from .engines import WeightPatch
from .lora import DecodePlans, LoraFactors, LoraFormatError, Stager, build_patch, decode_lora, read_lora
from .request import LoraUse, RequestError, check_catalog_name

SUFFIX = ".safetensors"
BLOCK_BYTES = 16 << 20  # one range read of a remote file; files larger than one block are read in parallel


@dataclasses.dataclass(frozen=True)
class LoraSet:
    """A request's LoRAs, ready to patch: one patch per component (empty when no LoRA touches it)."""

    key: tuple
    unet: WeightPatch
    text_encoder: WeightPatch
    bytes_read: int = 0
    load_s: float = 0.0  # all of it: read + decode + stage
    read_s: float = 0.0  # files opened (and fetched, if remote)
    decode_s: float = 0.0
    stage_s: float = 0.0  # patches built: scaled, concatenated, on the device
    cache_hits: int = 0  # LoRAs of the set served decoded from the host cache


def lora_key(uses: Sequence[LoraUse]) -> tuple:
    return tuple((use.name, float(use.scale)) for use in uses)


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
    filesystems run `cat_ranges` concurrently), each written at its offset."""
    if size <= BLOCK_BYTES:
        path.write_bytes(fs.cat_file(url))
        return
    starts = list(range(0, size, BLOCK_BYTES))
    ends = [min(start + BLOCK_BYTES, size) for start in starts]
    with open(path, "wb") as file:
        for start, block in zip(starts, fs.cat_ranges([url] * len(starts), starts, ends)):
            os.pwrite(file.fileno(), block, start)


class LoraSource:
    """Where a catalog's files are: `path(name)` gives a local file to memory-map, fetching a remote one into
    `FileCopies` first; `version(name)` identifies the file's content (size and modification time, or ETag)."""

    def __init__(self, location: str | Path, copies_dir: str | Path | None = None, copies_mb: int = 4096):
        self.location = str(location)
        self.is_local = "://" not in self.location
        self.fs = None if self.is_local else fsspec.core.url_to_fs(self.location)[0]
        self.copies = None
        self.prefetcher: concurrent.futures.ThreadPoolExecutor | None = None
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
        if self.prefetcher is None:
            self.prefetcher = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="lora-prefetch")
        for name in names:
            self.prefetcher.submit(_quietly, self._prefetch, name)

    def _prefetch(self, name: str) -> None:
        if not self.is_local:
            self.path(name)
            return
        with open(self.locate(name), "rb") as file:
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)


class DecodedCache:
    """Decoded LoRAs by (name, file version), the least recently used dropped beyond `budget_bytes`."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.entries: collections.OrderedDict[tuple, LoraFactors] = collections.OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: tuple) -> LoraFactors | None:
        with self.lock:
            found = self.entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self.entries.move_to_end(key)
            return found

    def put(self, key: tuple, factors: LoraFactors) -> None:
        size = factors.nbytes
        if size > self.budget_bytes:
            return
        with self.lock:
            if key in self.entries:
                return
            self.entries[key] = factors
            self.bytes += size
            while self.bytes > self.budget_bytes:
                _, dropped = self.entries.popitem(last=False)
                self.bytes -= dropped.nbytes


class LoraStore:
    """Fetches and decodes LoRAs for one model, on `workers` background threads."""

    def __init__(self, location: str | Path, weight_shapes: Mapping[str, Mapping[str, torch.Size]],
                 device: torch.device, dtype: torch.dtype, workers: int = 2, cache_mb: int = 1024,
                 copies_dir: str | Path | None = None):
        self.source = LoraSource(location, copies_dir)
        self.weight_shapes = weight_shapes
        self.device = torch.device(device)
        self.dtype = dtype
        self.plans = DecodePlans()
        self.cache = DecodedCache(cache_mb << 20)
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="lora-loader")
        self.stagers = threading.local()  # one pinned buffer per loader thread

    def locate(self, name: str) -> str:
        return self.source.locate(name)

    def decoded(self, name: str) -> tuple[LoraFactors, int, float, float, bool]:
        """(the decoded LoRA, bytes read, read seconds, decode seconds, whether the host cache had it)."""
        try:
            version, size = self.source.version(name)
            cached = self.cache.get((name, version))
            if cached is not None:
                return cached, 0, 0.0, 0.0, True
            begin = time.perf_counter()
            file = read_lora(name, self.source.path(name, version, size))
            read = time.perf_counter()
            factors = decode_lora(name, file, self.weight_shapes, self.plans)
        except (LoraFormatError, FileNotFoundError) as error:
            raise RequestError("lora_names", str(error)) from error
        self.cache.put((name, version), factors)
        return factors, file.nbytes, read - begin, time.perf_counter() - read, False

    def load(self, uses: Sequence[LoraUse]) -> LoraSet:
        """Reads and decodes the LoRAs and sums them into patches; RequestError for any bad file (unreadable,
        not for this model, non-finite or absurd values), raised before any weight is written."""
        begin = time.perf_counter()
        decoded, bytes_read, read_s, decode_s, hits = [], 0, 0.0, 0.0, 0
        for use in uses:
            factors, nbytes, read, decode, hit = self.decoded(use.name)
            decoded.append((factors, use.scale))
            bytes_read, read_s, decode_s, hits = bytes_read + nbytes, read_s + read, decode_s + decode, hits + hit
        staged = time.perf_counter()
        try:
            patches = {component: build_patch(component, decoded, self.device, self.dtype, self._stager())
                       for component in ("unet", "text_encoder")}
        except LoraFormatError as error:
            raise RequestError("lora_names", str(error)) from error
        end = time.perf_counter()
        return LoraSet(key=lora_key(uses), **patches, bytes_read=bytes_read, load_s=end - begin, read_s=read_s,
                       decode_s=decode_s, stage_s=end - staged, cache_hits=hits)

    def load_async(self, uses: Sequence[LoraUse]) -> concurrent.futures.Future[LoraSet]:
        """Checks the names now and loads in the background."""
        for use in uses:
            self.locate(use.name)
        return self.pool.submit(self.load, uses)

    def _stager(self) -> Stager | None:
        if self.device.type != "cuda":
            return None
        if not hasattr(self.stagers, "stager"):
            self.stagers.stager = Stager(self.device)
        return self.stagers.stager


def _quietly(fn, *args) -> None:
    with contextlib.suppress(Exception):
        fn(*args)

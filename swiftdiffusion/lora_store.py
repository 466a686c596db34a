"""The LoRA catalog: LoRA files by name, fetched and decoded (in the background when asked) into patches.

A catalog location is a local folder or any fsspec URL (`https://host/loras`, `s3://bucket/loras`, with
credentials from the usual environment). Names are plain catalog entries (`<name>.safetensors`); anything
else is refused before a path or URL is built.

Where a cold LoRA's time goes, and what keeps it to reading its bytes:
- I/O (`lora_source`): local files are memory-mapped by safetensors; remote files are copied once into a local
  folder of copies (shared by the server's processes, bounded in bytes, named after the file's version so a
  changed file is never served from an old copy), with large parallel range reads, then memory-mapped.
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
import dataclasses
import tempfile
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import save_file

from .engines import WeightPatch
from .lora import DecodePlans, LoraFactors, LoraFormatError, LoraTarget, Stager, build_patch, decode_lora, read_lora
from .lora_source import SUFFIX, LoraSource
from .request import LoraUse, RequestError
from .tiny import random_lora



@dataclasses.dataclass(frozen=True)
class LoraSet:
    """A request's LoRAs, ready to patch: one patch per component of the model's family (empty when no LoRA
    touches it)."""

    key: tuple
    patches: Mapping[str, WeightPatch]
    bytes_read: int = 0
    load_s: float = 0.0  # all of it: read + decode + stage
    read_s: float = 0.0  # files opened (and fetched, if remote)
    decode_s: float = 0.0
    stage_s: float = 0.0  # patches built: scaled, concatenated, on the device
    cache_hits: int = 0  # LoRAs of the set served decoded from the host cache


def lora_key(uses: Sequence[LoraUse]) -> tuple:
    return tuple((use.name, float(use.scale)) for use in uses)


class DecodedCache:
    """Decoded LoRAs by (name, file version), the least recently used dropped beyond `budget_bytes`."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.entries: collections.OrderedDict[tuple, LoraFactors] = collections.OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, key: tuple) -> LoraFactors | None:
        with self.lock:
            found = self.entries.get(key)
            if found is not None:
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

    def __init__(self, location: str | Path, target: LoraTarget, device: torch.device, dtype: torch.dtype,
                 workers: int = 2, cache_mb: int = 1024, copies_dir: str | Path | None = None):
        self.source = LoraSource(location, copies_dir)
        self.target = target
        self.device = torch.device(device)
        self.dtype = dtype
        self.plans = DecodePlans()
        self.cache = DecodedCache(cache_mb << 20)
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="lora-loader")
        self.stager = Stager(self.device) if self.device.type == "cuda" else None  # one pinned buffer

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
            factors = decode_lora(name, file, self.target, self.plans)
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
            patches = {component: build_patch(component, decoded, self.device, self.dtype, self.stager)
                       for component in self.target.family.lora_components}
        except LoraFormatError as error:
            raise RequestError("lora_names", str(error)) from error
        end = time.perf_counter()
        return LoraSet(key=lora_key(uses), patches=patches, bytes_read=bytes_read, load_s=end - begin, read_s=read_s,
                       decode_s=decode_s, stage_s=end - staged, cache_hits=hits)

    def load_async(self, uses: Sequence[LoraUse]) -> concurrent.futures.Future[LoraSet]:
        """Checks the names now and loads in the background."""
        for use in uses:
            self.locate(use.name)
        return self.pool.submit(self.load, uses)

    def warm(self) -> None:
        """Runs the whole path once at model load, so that the first request pays nothing extra: a synthetic
        rank-1 kohya LoRA of one UNet and one text-encoder attention layer, read, converted and staged."""
        def first(component: str, suffixes: tuple[str, ...]) -> dict[str, tuple[int, int]]:
            """The first layer's weights with these suffixes (the text encoder's converter needs all four
            attention projections of a layer to recognise the format)."""
            shapes = self.target.weight_shapes.get(component, {})
            found = [w for w in shapes if w.endswith(tuple(f"{s}.weight" for s in suffixes))][:len(suffixes)]
            return {w.removesuffix(".weight"): tuple(shapes[w]) for w in found}

        unet = first("unet", ("attn1.to_q",))
        if not unet:
            return
        text = {"text_model." + k.removeprefix("text_model."): v for k, v in first(
            "text_encoder", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")).items()}
        state = random_lora({"unet": unet, "text_encoder": text}, 1, torch.Generator().manual_seed(0), "kohya", 1.0)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"warm{SUFFIX}"
            save_file(state, path)
            factors = decode_lora("warm", read_lora("warm", path), self.target, DecodePlans())
        for component in self.target.family.lora_components:
            build_patch(component, [(factors, 0.5)], self.device, self.dtype, self.stager)

"""The LoRA catalog: LoRA files by name, fetched and decoded (in the background when asked) into patches.

A catalog location is a local folder or any fsspec URL (`https://host/loras`, `s3://bucket/loras`, with
credentials from the usual environment). Names are plain catalog entries (`<name>.safetensors`); anything
else is refused before a path or URL is built.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from pathlib import Path
from typing import Mapping, Sequence

import fsspec
import torch

from .catalog import resolve
from .engines import WeightPatch
from .lora import LoraFormatError, build_patch, decode_lora
from .request import LoraUse, RequestError, check_catalog_name

SUFFIX = ".safetensors"


@dataclasses.dataclass(frozen=True)
class LoraSet:
    """A request's LoRAs, ready to patch: one patch per component (empty when no LoRA touches it)."""

    key: tuple
    unet: WeightPatch
    text_encoder: WeightPatch
    bytes_read: int = 0
    load_s: float = 0.0


def lora_key(uses: Sequence[LoraUse]) -> tuple:
    return tuple((use.name, float(use.scale)) for use in uses)


class LoraStore:
    """Fetches and decodes LoRAs for one model, on `workers` background threads."""

    def __init__(self, location: str | Path, weight_shapes: Mapping[str, Mapping[str, torch.Size]],
                 device: torch.device, dtype: torch.dtype, workers: int = 2):
        self.location = str(location)
        self.is_local = "://" not in self.location
        self.weight_shapes = weight_shapes
        self.device = device
        self.dtype = dtype
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="lora-loader")

    def locate(self, name: str) -> str:
        if self.is_local:
            return str(resolve(Path(self.location), name, SUFFIX, "lora_names"))
        check_catalog_name("lora_names", name)
        return f"{self.location.rstrip('/')}/{name}{SUFFIX}"

    def fetch(self, name: str) -> bytes:
        with fsspec.open(self.locate(name), "rb") as file:
            return file.read()

    def load(self, uses: Sequence[LoraUse]) -> LoraSet:
        """Reads and decodes the LoRAs and sums them into patches; RequestError for any bad file (unreadable,
        not for this model, non-finite or absurd values), raised before any weight is written."""
        begin = time.perf_counter()
        decoded, bytes_read = [], 0
        for use in uses:
            try:
                data = self.fetch(use.name)
                bytes_read += len(data)
                decoded.append((decode_lora(use.name, data, self.weight_shapes), use.scale))
            except (LoraFormatError, FileNotFoundError) as error:
                raise RequestError("lora_names", str(error)) from error
        try:
            patches = {component: build_patch(component, decoded, self.device, self.dtype)
                       for component in ("unet", "text_encoder")}
        except LoraFormatError as error:
            raise RequestError("lora_names", str(error)) from error
        return LoraSet(key=lora_key(uses), **patches, bytes_read=bytes_read, load_s=time.perf_counter() - begin)

    def load_async(self, uses: Sequence[LoraUse]) -> concurrent.futures.Future[LoraSet]:
        """Checks the names now and loads in the background."""
        for use in uses:
            self.locate(use.name)
        return self.pool.submit(self.load, uses)

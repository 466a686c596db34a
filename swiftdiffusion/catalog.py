"""Add-on catalogs: names from requests resolved to files inside one folder, never outside it."""

from __future__ import annotations

import collections
import threading
from pathlib import Path
from typing import Callable, Generic, TypeVar

from .request import RequestError, check_catalog_name

T = TypeVar("T")


class UnknownEntry(RequestError):
    """A well-formed name that the catalog does not hold."""


def resolve(root: Path, name: str, suffix: str, field: str) -> Path:
    """The catalog path of `name`: checked to be a plain name, to exist, and to lie inside `root`."""
    check_catalog_name(field, name)
    root = root.resolve()
    path = (root / f"{name}{suffix}").resolve()
    if path.parent != root or not path.exists():
        raise UnknownEntry(field, f"unknown name {name!r}")
    return path


class LruCache(Generic[T]):
    """The `capacity` most recently used entries, loaded on a miss by `load(name)`; thread-safe."""

    def __init__(self, capacity: int, load: Callable[[str], T]):
        self.capacity = capacity
        self.load = load
        self.entries: collections.OrderedDict[str, T] = collections.OrderedDict()
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, name: str) -> T:
        with self.lock:
            if name in self.entries:
                self.entries.move_to_end(name)
                self.hits += 1
                return self.entries[name]
            self.misses += 1
            value = self.load(name)
            self.entries[name] = value
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
            return value

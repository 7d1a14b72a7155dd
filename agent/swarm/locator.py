"""Where the data port finds the chunks it serves: the ``ChunkLocator`` interface and the
store's (``StoreLocator``). Only verified chunks are found."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol

from agent.errors import UnsafePath
from agent.manifest import chunk_span


class ChunkLocator(Protocol):
    def open_chunk(self, manifest_id: str, path: str, index: int) -> tuple[int, int, int] | None:
        """(an open fd, offset, length) of a *verified* chunk, or None. The caller closes the fd."""


class StoreLocator:
    """Finds verified chunks in a ``Store`` (complete files and ``.partial`` ones): a few
    one-row lookups per request (the manifest itself is kept), so a removed model is gone
    at once. For a manifest a content ask brought (``remember``), a chunk is found by its
    BLAKE3 wherever the store verified it."""

    MANIFESTS = 16

    def __init__(self, store):
        self.store = store
        self._manifests: OrderedDict[str, object] = OrderedDict()
        self._foreign: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, manifest) -> None:
        """A manifest peers may ask chunks of by content (bounded, the oldest forgotten)."""
        with self._lock:
            self._foreign[manifest.id] = manifest
            self._foreign.move_to_end(manifest.id)
            while len(self._foreign) > self.MANIFESTS:
                self._foreign.popitem(last=False)

    def _by_content(self, manifest_id: str, path: str, index: int) -> tuple[int, int, int] | None:
        with self._lock:
            manifest = self._foreign.get(manifest_id)
        entry = next((f for f in manifest.files if f.path == path), None) if manifest is not None else None
        if entry is None or not 0 <= index < len(entry.chunks):
            return None
        length = chunk_span(entry.size, manifest.chunk_size, index)[1]
        found = self.store.open_chunk_by_content(entry.chunks[index], length)
        return (found[0], found[1], length) if found is not None else None

    def _manifest(self, manifest_id: str):
        with self._lock:
            manifest = self._manifests.get(manifest_id)
        if manifest is None:
            manifest = self.store.manifest(manifest_id)
            with self._lock:
                self._manifests[manifest_id] = manifest
                while len(self._manifests) > self.MANIFESTS:
                    self._manifests.popitem(last=False)
        return manifest

    def open_chunk(self, manifest_id: str, path: str, index: int) -> tuple[int, int, int] | None:
        from agent.store.folders import open_model_file
        found = self.store.holding(manifest_id=manifest_id)
        if found is None:
            return self._by_content(manifest_id, path, index)
        ref, _ = found
        manifest = self._manifest(manifest_id)
        entry = next((f for f in manifest.files if f.path == path), None)
        if entry is None or not 0 <= index < len(entry.chunks):
            return None
        if self.store.chunk_hash(ref, path, index) != entry.chunks[index]:
            return None  # not verified here (yet)
        offset, length = chunk_span(entry.size, manifest.chunk_size, index)
        directory = self.store.model_dir(ref)
        if directory is None:
            return None  # removed meanwhile
        try:
            fd = open_model_file(self.store, directory, path, partial_ok=True)
        except (FileNotFoundError, UnsafePath):
            return None
        return fd, offset, length

"""``Store``: the one object the rest of the agent uses for the cache (see ``agent.store``).

It composes the index (``index``), the blobs (``blobs``, ``content``), the model folders
(``folders``) and the pure eviction rule (``eviction``); each of those imports nothing of
this module. Every method blocks: call them from a worker thread in async code.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from agent import crashpoints
from agent.errors import NotFound, UnsafePath, disk_error as _disk_error
from agent.manifest import PARTIAL_SUFFIX, FileEntry, Manifest, ModelRef, chunk_count, hub_repo
from agent.safefs import SafeDir, overlaps
from agent.store import quota as quota_rules
from agent.store.blobs import Blobs
from agent.store.content import Held
from agent.store.folders import delete_files, kind_folder, model_dir, remove_empty_folders
from agent.store.index import LINKED, NOT_LINKED, Index, ModelRow
from agent.store.locks import ModelLocks
from agent.store.manifests import ManifestShelf
from agent.store.partial import PartialFile
from agent.store.rebuild import open_index

log = logging.getLogger("shoal.store")


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    revision: str
    dir: Path
    total_size: int
    have_bytes: int
    state: str
    manifest_id: str | None
    pinned: bool = False
    last_used: float = 0.0

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.model_id, self.revision)


def model_row(m: ModelInfo, active: bool) -> dict:
    """A model as the control API and ``--json`` listings show it."""
    return {"model": m.model_id, "kind": hub_repo(m.model_id)[0], "revision": m.revision,
            "size": m.total_size, "have": m.have_bytes,
            "state": m.state, "dir": str(m.dir), "manifest_id": m.manifest_id, "pinned": m.pinned,
            "last_used": m.last_used, "active": active}


class _ModelLog:
    """The ``PartialFile`` side of the index for one model (``agent.store.partial.ChunkLog``)."""

    def __init__(self, index: Index, key: str):
        self.index, self.key = index, key

    def record(self, path: str, index: int, digest: bytes, source: str) -> None:
        self.index.record_chunk(self.key, path, index, digest, source)

    def forget(self, path: str, indices: list[int]) -> None:
        self.index.forget_chunks(self.key, path, indices)


_ROOM_KEEPS: dict[str, dict[str, str]] = {}  # cache root -> Store.room_keeps


class Store:
    """The cache at ``root``. Opening it migrates an index of the older layout in place,
    rebuilds one that is missing or damaged from the files it can verify (``rebuilt`` says
    what it found), and finishes removals a kill interrupted.

    Resource handling: ``close()`` closes the index, the folder handles and the locks; safe
    twice."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.realpath(root))
        self._dirs: dict[str, SafeDir] = {}
        self._root: SafeDir | None = None
        self.index: Index | None = None
        self.blobs: Blobs | None = None
        self.rebuilt: dict | None = None  # what a rebuild of a missing or damaged index found
        self._lock = threading.Lock()
        self.locks: ModelLocks | None = None
        try:
            self._root = SafeDir.open(self.root, create=True)
            for sub in ("manifests", "models", "locks"):
                self._dirs[sub] = self._root.subdir(sub, create=True)
            self.locks = ModelLocks(self.root, self._dirs["locks"])
            self.manifests = ManifestShelf(self._dirs["manifests"])
            for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
                if self._root.stat(name) is not None and not self._root.is_own_file(name):
                    raise UnsafePath(f"{self.root / name} is not a file of this user (a link, or another "
                                     "user's); move it away and start again")
            self.blobs = Blobs(self._root)
            self.index, self.content, self.rebuilt = open_index(self)
        except OSError as e:
            self.close()
            raise _disk_error(e, self.root) from e
        except BaseException:
            self.close()
            raise

    @property
    def room_keeps(self) -> dict[str, str]:
        """str(ref) -> why: assigned revisions the room needs this copy of (``agent.assign.keeper``
        sets it); eviction leaves them alone, `shoal du` says why. Shared by every ``Store`` of
        this cache in the process (the agent's and each pull's)."""
        return _ROOM_KEEPS.get(str(self.root), {})

    @room_keeps.setter
    def room_keeps(self, keeps: dict[str, str]) -> None:
        _ROOM_KEEPS[str(self.root)] = dict(keeps)  # replaced whole, never edited: readers need no lock

    def _close_dirs(self) -> None:
        for handle in self._dirs.values():
            handle.close()
        self._dirs.clear()
        if self.blobs is not None:
            self.blobs.close()
        if self._root is not None:
            self._root.close()

    def close(self) -> None:
        with self._lock:
            if self.index is not None:
                self.index.close()
                self.index = None
            if self.locks is not None:
                self.locks.close()
            self._close_dirs()

    # ----------------------------------------------------------------- layout

    def default_dir(self, ref: ModelRef) -> Path:
        return model_dir(self.root, ref)

    @property
    def root_dir(self) -> SafeDir:
        """The cache folder's handle (for the agent's own files in it: agent.json)."""
        return self._root

    def open_dir(self, directory: Path, *, create: bool = False) -> SafeDir:
        """A handle on a model directory: walked from the cache's own handle when it lies in
        the cache, else (a ``--to`` folder) from ``/``; never through a link. Close it."""
        directory = Path(os.path.realpath(directory))
        if self.root in directory.parents:
            return self._root.subdir(directory.relative_to(self.root).as_posix(), create=create)
        if overlaps(directory, self.root):
            raise UnsafePath(f"{directory} overlaps the cache {self.root}; a model folder outside the cache "
                             "must lie outside it entirely")
        return SafeDir.open(directory, create=create)

    # Pull and use locks (agent.store.locks): one lock file per model revision.

    def in_use(self, ref: ModelRef) -> bool:
        return self.locks.in_use(ref)

    def use(self, ref: ModelRef) -> int:
        return self.locks.use(ref)

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)

    def lock(self, ref: ModelRef) -> None:
        self.locks.lock(ref)

    def unlock(self, ref: ModelRef) -> None:
        self.locks.unlock(ref)

    # ----------------------------------------------------------------- a pull

    def begin(self, ref: ModelRef, directory: Path, chunk_size: int, files: list[tuple[str, int, bytes]]) -> None:
        """Record a pull of ``ref`` into ``directory``; reset what no longer fits the plan.

        Refuses a directory that is, contains or lies inside another model's: two models
        in one folder would overwrite each other's files (and removing one the other)."""
        self.check_dir_free(ref, directory)
        self.index.begin_model(str(ref), ref.model_id, ref.revision, str(directory), chunk_size, files)
        crashpoints.reached("pull:recorded")

    def check_dir_free(self, ref: ModelRef, directory: Path) -> None:
        """Refuse ``directory`` if another model's folder is it, contains it or lies in it."""
        for other, other_dir in self.index.other_dirs(str(ref)):
            if overlaps(Path(other_dir), directory):
                raise UnsafePath(f"{directory} overlaps the folder of {other} ({other_dir}); each model needs a "
                                 "folder of its own: choose another --to")

    def held(self, ref: ModelRef, entries, chunk_size: int, trusted: bool,
             hashed: dict[str, tuple[bytes, ...]] | None = None) -> tuple[dict[str, Held], list[str]]:
        """Of a plan's files not complete yet, those the cache holds by content under any
        model, dataset or revision (``Content.find``), and lines for the person about held
        files that may not be used. ``ManifestError`` for a plan whose size disagrees with
        held content of the same SHA-256. ``hashed``: chunk lists an import just computed."""
        done = {f.path for f in self.index.files(str(ref)) if f.complete}
        found, notes = {}, []
        for entry in entries:
            if entry.path in done:
                continue
            held, note = self.content.find(entry, chunk_size, trusted, (hashed or {}).get(entry.path))
            if held is not None:
                found[entry.path] = held
            if note:
                notes.append(note)
        return found, notes

    def link_held(self, ref: ModelRef, model: SafeDir, held: dict[str, Held]) -> int:
        """Link the held blobs into the model folder (``held``'s answer): bytes that cost no fetch."""
        return self.content.link(str(ref), model, sorted(held.items())) if held else 0

    def open_file(self, ref: ModelRef, model_dir: SafeDir, path: str, size: int, sha256: bytes,
                  chunk_size: int, expected: tuple[bytes, ...] | None) -> PartialFile | None:
        """The ``PartialFile`` of ``path`` in ``model_dir``, or None if the file is already
        complete on disk (also one a kill caught between its link into the blobs and its
        record). ``expected``: trusted chunk hashes; claimed chunks that disagree are dropped."""
        return self.open_files(ref, model_dir, [(path, size, sha256, expected)], chunk_size)[0]

    def open_files(self, ref: ModelRef, model_dir: SafeDir,
                   files: list[tuple[str, int, bytes, tuple[bytes, ...] | None]],
                   chunk_size: int) -> list[PartialFile | None]:
        """``open_file`` of many files (path, size, SHA-256, expected chunk hashes) at once:
        the index asked twice for them all, each folder opened once. A pull of 2,000 small
        files spent a second here before its first request, file by file."""
        key = str(ref)
        rows = {row.path: row for row in self.index.files(key)}
        claimed = self.held_chunks(ref)
        parents: dict[str, SafeDir] = {}
        opened: list[PartialFile | None] = []
        try:
            for path, size, sha256, expected in files:
                head, _, name = path.rpartition("/")
                parent = parents.get(head)
                if parent is None:
                    parent = parents[head] = model_dir.parent_of(path, create=True)[0]
                opened.append(self._open_one(key, model_dir, parent, name, rows.get(path), path, size, sha256,
                                             chunk_size, expected, claimed.get(path, {})))
        except BaseException:
            for pf in opened:
                if pf is not None:
                    pf.close()
            raise
        finally:
            for parent in parents.values():
                parent.close()
        return opened

    def _open_one(self, key: str, model_dir: SafeDir, parent: SafeDir, name: str, row, path: str, size: int,
                  sha256: bytes, chunk_size: int, expected: tuple[bytes, ...] | None,
                  have: dict[int, bytes]) -> PartialFile | None:
        if row is not None and row.complete:
            if parent.is_own_file(name, size):
                return None
            # The index says complete but the file is gone or resized: fetch it again.
            self.index.set_file(key, path, complete=False, linked=NOT_LINKED)
            self.index.forget_chunks(key, path, list(have))
            have = {}
        entry = FileEntry(path, size, sha256, expected)
        st, partial = parent.stat(name), parent.stat(name + PARTIAL_SUFFIX)
        if st is not None or partial is not None:  # (nothing on disk: nothing a kill left to recover)
            if self.content.recover(key, parent, name, entry, chunk_size, trusted=expected is not None):
                return None
            st, partial = parent.stat(name), parent.stat(name + PARTIAL_SUFFIX)
        if st is not None and partial is None:
            # A file renamed into place whose record a kill cut short (one no blob could
            # hold): its claimed chunks are re-hashed from it as a partial.
            if parent.is_own_file(name) and st.st_nlink == 1:
                parent.rename(name, name + PARTIAL_SUFFIX)
                partial = st
            else:
                parent.unlink(name)
        if expected is not None:
            bad = [i for i, h in have.items() if i >= len(expected) or expected[i] != h]
            if bad:
                self.index.forget_chunks(key, path, bad)
                for i in bad:
                    del have[i]
        pf = PartialFile(_ModelLog(self.index, key), model_dir, path, size, sha256, chunk_size, have)
        pf.open(parent, existed=partial is not None)
        return pf

    def reuse_chunks(self, pf: PartialFile, expected: tuple[bytes, ...]) -> int:
        """Copy into ``pf`` what the cache holds of its missing chunks elsewhere; bytes copied."""
        return self.content.reuse_chunks(pf, expected)

    def finish_files(self, files: list[PartialFile]) -> None:
        """Durable, linked into the blobs, renamed into place, recorded: a batch of proven files."""
        self.content.finish(files)

    def expect(self, ref: ModelRef, manifest: Manifest) -> None:
        """A pull of ``ref`` follows this trusted manifest: keep it and name it in the index
        now, so LAN peers can ask for the chunks verified so far (state stays 'pulling')."""
        self.index.set_manifest(str(ref), self.manifests.keep(manifest))

    def complete(self, ref: ModelRef, manifest: Manifest) -> str:
        """Mark ``ref`` complete and keep its manifest; return the manifest id."""
        mid = self.manifests.keep(manifest)
        self.index.set_complete(str(ref), mid)
        return mid

    def adopt(self, ref: ModelRef, directory: Path, manifest: Manifest, *, proven: bool = True) -> str:
        """Register files already in ``directory`` and described by ``manifest`` as a complete
        model (an adapter shoal trained, say): every chunk is claimed as verified, and each
        file becomes a blob (``proven``: the manifest's SHA-256 were computed from the files)."""
        key = str(ref)
        self.check_dir_free(ref, directory)
        files = [(f.path, f.size, f.sha256) for f in manifest.files]
        self.index.begin_model(key, ref.model_id, ref.revision, str(directory), manifest.chunk_size, files)
        for f in manifest.files:
            self.index.record_chunks(key, f.path, list(f.chunks), "local")
            self.index.set_file(key, f.path, complete=True, linked=NOT_LINKED)
        self.content.link_unlinked()
        for f in manifest.files:
            if proven and (self.index.file(key, f.path).linked == LINKED):
                self.index.add_blob(f.sha256, f.size, True)
        return self.complete(ref, manifest)

    # ------------------------------------------------------------- reading

    def chunk_map(self, ref: ModelRef) -> list[dict]:
        """Per file: path, size, complete, and the source of each chunk (None: missing)."""
        key = str(ref)
        row = self.index.model(key)
        if row is None:
            raise NotFound(f"{ref} is not in the cache")
        files = []
        for f in self.index.files(key):
            sources = [None] * chunk_count(f.size, row.chunk_size)
            for idx, source in self.index.chunk_sources(key, f.path).items():
                if idx < len(sources):
                    sources[idx] = source
            files.append({"path": f.path, "size": f.size, "complete": f.complete, "chunks": sources})
        return files

    def touch(self, ref: ModelRef) -> None:
        """Mark ``ref`` as just used (LRU)."""
        self.index.touch(str(ref))

    def set_pinned(self, ref: ModelRef, pinned: bool) -> ModelInfo:
        self.find(ref)
        self.index.set_pinned(str(ref), pinned)
        return self.find(ref)

    def usage(self) -> int:
        """Bytes the cache takes on disk, each counted once: the blobs (however many models
        link them) and the files no blob holds (partials, reserved in full; copies)."""
        return self.index.usage()

    def size_of(self, ref: ModelRef) -> int:
        row = self.index.model(str(ref))
        return row.total_size if row else 0

    def save_signature(self, manifest_id: str, envelope: bytes) -> None:
        """Keep a publisher's signature of a manifest beside it (served to peers with it)."""
        self.manifests.save_signature(manifest_id, envelope)

    def signature(self, manifest_id: str) -> bytes | None:
        return self.manifests.signature(manifest_id)

    def manifest_bytes(self, manifest_id: str) -> bytes:
        return self.manifests.encoded(manifest_id)

    def manifest(self, manifest_id: str) -> Manifest:
        return self.manifests.read(manifest_id)

    def chunk_hash(self, ref: ModelRef, path: str, index: int) -> bytes | None:
        """The verified BLAKE3 of one chunk, or None: one row (LAN peers ask per chunk)."""
        return self.index.chunk_hash(str(ref), path, index)

    def model_dir(self, ref: ModelRef) -> Path | None:
        """Where ``ref``'s files are, or None: one row, without ``find``'s byte counts."""
        row = self.index.model(str(ref))
        return Path(row.dir) if row and row.state != "removing" else None

    def chunk_hashes(self, ref: ModelRef, path: str) -> dict[int, bytes]:
        return self.index.chunk_hashes(str(ref), path)

    def held_with_sources(self, ref: ModelRef) -> dict[str, dict[int, tuple[bytes, str]]]:
        """Every verified chunk of ``ref`` with where it came from: path -> {index: (BLAKE3, source)}."""
        held: dict[str, dict[int, tuple[bytes, str]]] = {}
        for path, idx, digest, source in self.index.held(str(ref)):
            held.setdefault(path, {})[idx] = (digest, source)
        return held

    def held_chunks(self, ref: ModelRef) -> dict[str, dict[int, bytes]]:
        """Every verified chunk of ``ref``: path -> {index: BLAKE3}. One query (peers ask often)."""
        held: dict[str, dict[int, bytes]] = {}
        for path, idx, digest, _ in self.index.held(str(ref)):
            held.setdefault(path, {})[idx] = digest
        return held

    def complete_manifests(self) -> set[tuple[str, str, str]]:
        """(model id, revision, manifest id) of every complete model: one query."""
        return self.index.complete_manifests()

    def holding(self, *, manifest_id: str | None = None, model_id: str | None = None,
                revision: str | None = None) -> tuple[ModelRef, str] | None:
        """The revision held (complete or being pulled) under a manifest id, or by name, with
        its manifest id: one row, for LAN peers who ask every second."""
        found = self.index.holding(manifest_id=manifest_id, model_id=model_id, revision=revision)
        return (ModelRef(found[0], found[1]), found[2]) if found else None

    def held_by_content(self, manifest: Manifest) -> dict[str, set[int]]:
        """Which chunks of ``manifest`` (a model this cache may hold none of by name) it
        holds verified under any model: path -> chunk indices, by BLAKE3."""
        return self.content.held_by_content(manifest)

    def largest_blobs(self, min_size: int, limit: int) -> list[bytes]:
        """The SHA-256 of the largest blobs (at least ``min_size`` bytes, ``limit`` of them)."""
        return [sha for sha, size in sorted(self.index.blobs().items(), key=lambda kv: -kv[1])
                if size >= min_size][:limit]

    def open_chunk_by_content(self, digest: bytes, length: int) -> tuple[int, int] | None:
        """(an open fd, offset) of a verified chunk of that BLAKE3 and length, wherever the
        cache holds it; the caller closes the fd."""
        return self.content.open_chunk(digest, length)

    def models(self) -> list[ModelInfo]:
        have = self.index.verified_bytes()
        return [self._info(row, have.get(row.key, 0)) for row in self.index.models() if row.state != "removing"]

    @staticmethod
    def _info(row: ModelRow, have: int) -> ModelInfo:
        return ModelInfo(row.model_id, row.revision, Path(row.dir), row.total_size, have, row.state,
                         row.manifest_id, row.pinned, row.last_used)

    def find(self, ref: ModelRef) -> ModelInfo:
        row = self.index.model(str(ref))
        if row is None or row.state == "removing":
            raise NotFound(f"{ref} is not in the cache ({self.root}); `shoal ls` lists what is, "
                           f"`shoal pull {ref}` fetches it")
        return self._info(row, self.index.verified_bytes(row.key).get(row.key, 0))

    # ---------------------------------------------------------- removing

    def mark_damaged(self, ref: ModelRef, path: str, bad_chunks: list[int]) -> list[str]:
        """After ``verify`` found damage: turn the file back into a partial missing
        ``bad_chunks``. When the damaged bytes are a blob other models link, they lose it
        too and link the repaired one on their next pull; returns those models."""
        key = str(ref)
        info = self.find(ref)
        row = self.index.file(key, path)
        others = self.content.damaged(key, path, row.sha256) if row is not None and row.linked == LINKED else []
        try:
            with self.open_dir(info.dir) as model, model.parent_of(path)[0] as parent:
                name = path.rpartition("/")[2]
                st = parent.stat(name)
                if parent.is_own_file(name) and st.st_nlink == 1:
                    parent.rename(name, name + PARTIAL_SUFFIX)
                elif st is not None:  # a link, another user's file, or still linked elsewhere
                    parent.unlink(name)
                    bad_chunks = list(self.index.chunk_hashes(key, path))
        except (FileNotFoundError, UnsafePath):
            pass  # the folder itself is gone: the next pull makes it again
        self.index.set_file(key, path, complete=False, linked=NOT_LINKED)
        self.index.forget_chunks(key, path, bad_chunks)
        self.index.set_state(key, "pulling")
        return others

    def remove(self, ref: ModelRef) -> ModelInfo:
        """Forget ``ref`` and delete the files the index lists for it (and their partials),
        then the folders left empty, then the blobs no other model links. Nothing else is
        touched, no link followed. A kill part way is finished when the store next opens."""
        info = self.find(ref)
        self.index.set_state(str(ref), "removing")
        crashpoints.reached("remove:marked")
        self.finish_removal(self.index.model(str(ref)))
        return info

    def finish_removal(self, row: ModelRow) -> None:
        files = self.index.files(row.key)
        try:
            model = self.open_dir(Path(row.dir))
        except (FileNotFoundError, UnsafePath, NotADirectoryError):
            model = None
        if model is not None:
            with model:
                delete_files(model, [f.path for f in files])
        crashpoints.reached("remove:unlinked")
        self.index.delete_model(row.key)
        crashpoints.reached("remove:forgotten")
        self.content.release({f.sha256 for f in files if f.linked == LINKED})
        ref = ModelRef(row.model_id, row.revision)
        remove_empty_folders(self.open_dir, Path(row.dir), kind_folder(self.root, ref))

    def sweep(self) -> dict[str, int]:
        """Blobs no model links (a kill in a removal) go; rows of blobs gone are dropped."""
        report = self.content.sweep()
        report["linked"] = self.content.link_unlinked()
        return report

    # ---------------------------------------------------------- eviction (agent.store.quota)

    def make_room(self, ref: ModelRef, need: int, quota: int | None, high: float, low: float,
                  kept: frozenset[bytes] = frozenset()) -> list[ModelInfo]:
        """Evict least recently used models so ``need`` more bytes fit under the quota;
        ``kept``: blobs this pull will link (never counted as freed)."""
        return quota_rules.make_room(self, ref, need, quota, high, low, kept)

    def gc(self, quota: int | None, low: float) -> list[ModelInfo]:
        """Evict down to the low watermark (blobs no model links go first)."""
        return quota_rules.gc(self, quota, low)


def du_rows(store: Store, active: set[str]) -> dict:
    """What ``shoal du`` shows: bytes on disk, each file once; per model its size and what
    removing it alone frees (``unique``)."""
    unique = quota_rules.unique_bytes(store)
    rows = []
    for m in store.models():
        row = model_row(m, str(m.ref) in active)
        row["unique"] = unique.get(str(m.ref), 0)
        if str(m.ref) in store.room_keeps:
            row["room"] = store.room_keeps[str(m.ref)]
        rows.append(row)
    return {"usage_bytes": store.usage(), "logical_bytes": sum(r["size"] for r in rows), "models": rows}

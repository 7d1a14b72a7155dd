"""The store: model directories on disk plus a SQLite index of verified chunks.

Layout under the cache directory (``SHOAL_CACHE_DIR``)::

    index.sqlite                          models, files, verified chunks (WAL mode)
    manifests/{manifest-id}.shoal         manifests of complete pulls (served to peers later)
    models/{owner}/{name}/{revision}/     a plain model directory tools load directly
    datasets/{owner}/{name}/{revision}/   a dataset repository, the same way
    locks/                                one lock file per model revision being pulled

A file being fetched is ``{path}.partial`` in its model directory, preallocated to its
full size; verified chunks are written at their offsets; the file is renamed into place
once it is proven (its SHA-256, or every chunk against a trusted manifest).

Invariant: the index never claims a chunk that is not on disk and verified. A chunk row
is inserted only after its bytes were verified and written; when a ``.partial`` file is
reopened (after a crash, a kill, a reboot) the claimed chunks are re-hashed from disk
(BLAKE3 is ~2.5 GiB/s here) and rows whose bytes did not survive are dropped.

Every file is opened relative to the model directory's handle without following links
(``agent.safefs``): a link or a file of another user where the store writes is refused.

Error handling: ``ENOSPC``/``EDQUOT`` become ``DiskFull``; nothing already verified is lost.
Resource handling: ``Store.close()`` closes the index; ``PartialFile.close()`` the fd; both
are safe twice. All methods block: call them from a worker thread in async code.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import DiskFull, NotFound, StoreLocked, UnsafePath, disk_error as _disk_error
from agent.manifest import MAX_MANIFEST_BYTES, PARTIAL_SUFFIX, Manifest, ModelRef, chunk_count, decode, hub_repo
from agent.partial import PartialFile
from agent.safefs import SafeDir, overlaps
from agent.storefiles import delete_files, hold_in_use, kind_folder, lock_name, model_dir, remove_empty_folders

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    key TEXT PRIMARY KEY,            -- owner/name@revision
    model_id TEXT NOT NULL,
    revision TEXT NOT NULL,
    dir TEXT NOT NULL,
    chunk_size INTEGER NOT NULL,
    total_size INTEGER NOT NULL,
    manifest_id TEXT,                -- set when complete, or from the start by a trusted plan
    state TEXT NOT NULL,             -- 'pulling' | 'complete'
    updated REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,   -- never evicted
    last_used REAL NOT NULL DEFAULT 0    -- for LRU eviction
);
CREATE TABLE IF NOT EXISTS files (
    model_key TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 BLOB NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (model_key, path)
);
CREATE TABLE IF NOT EXISTS chunks (
    model_key TEXT NOT NULL,
    path TEXT NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (model_key, path, idx)
);
"""

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


class Store:
    """See module docstring."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.realpath(root))
        self._dirs: dict[str, SafeDir] = {}
        try:
            self._root = SafeDir.open(self.root, create=True)
            for sub in ("manifests", "models", "locks"):
                self._dirs[sub] = self._root.subdir(sub, create=True)
            for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
                if self._root.stat(name) is not None and not self._root.is_own_file(name):
                    raise UnsafePath(f"{self.root / name} is not a file of this user (a link, or another "
                                     "user's); move it away and start again")
            self._db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False,
                                       isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(models)")}
            for column, ddl in (("pinned", "INTEGER NOT NULL DEFAULT 0"), ("last_used", "REAL NOT NULL DEFAULT 0")):
                if column not in columns:  # an index from before pin/LRU existed
                    self._db.execute(f"ALTER TABLE models ADD COLUMN {column} {ddl}")
        except OSError as e:
            self._close_dirs()
            raise _disk_error(e, self.root) from e
        except sqlite3.OperationalError as e:
            self._close_dirs()
            if "full" in str(e):
                raise DiskFull(f"no space to open the index in {self.root}: free some space") from e
            raise
        except BaseException:
            self._close_dirs()
            raise
        self._lock = threading.Lock()
        self._locks: dict[str, int] = {}

    def _close_dirs(self) -> None:
        for handle in self._dirs.values():
            handle.close()
        self._dirs.clear()
        if getattr(self, "_root", None) is not None:
            self._root.close()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            for fd in self._locks.values():
                os.close(fd)
            self._locks.clear()
            self._close_dirs()

    def _exec(self, sql: str, args=()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as e:
                if "full" in str(e):
                    raise DiskFull(f"the index in {self.root} cannot grow: the disk is full; "
                                   "free some space and pull again") from e
                raise

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

    def _lock_fd(self, ref: ModelRef) -> int:
        return self._dirs["locks"].open_file(lock_name(ref), os.O_RDWR | os.O_CREAT, 0o600, writing=False)

    def in_use(self, ref: ModelRef) -> bool:
        """True while any process pulls ``ref`` (exclusive lock) or uses it (``use``, shared lock)."""
        try:
            fd = self._lock_fd(ref)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the probe's lock, if it got one

    def use(self, ref: ModelRef) -> int:
        """Take a shared "in use" lock on ``ref`` (a served download, a running job); returns
        the fd to pass to ``release``. Eviction never removes a model in use."""
        return hold_in_use(self.root, ref)

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)

    def lock(self, ref: ModelRef) -> None:
        """Take the per-revision pull lock (held until ``unlock`` or process exit)."""
        fd = self._lock_fd(ref)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(f"another shoal process is pulling or using {ref} (a pull, a running job, a "
                              "download through the gateway); wait for it to finish (or stop it) and try again") from None
        with self._lock:
            self._locks[str(ref)] = fd

    def unlock(self, ref: ModelRef) -> None:
        with self._lock:
            fd = self._locks.pop(str(ref), None)
        if fd is not None:
            os.close(fd)

    # ----------------------------------------------------------------- models

    def begin(self, ref: ModelRef, directory: Path, chunk_size: int, files: list[tuple[str, int, bytes]]) -> None:
        """Record a pull of ``ref`` into ``directory``; reset what no longer fits the plan.

        Refuses a directory that is, contains or lies inside another model's: two models
        in one folder would overwrite each other's files (and removing one the other)."""
        key = str(ref)
        self.check_dir_free(ref, directory)
        rows = self._exec("SELECT dir, chunk_size FROM models WHERE key=?", (key,))
        if rows and (rows[0][0] != str(directory) or rows[0][1] != chunk_size):
            # A different target or chunking: earlier chunk rows do not describe this pull.
            self._exec("DELETE FROM chunks WHERE model_key=?", (key,))
            self._exec("DELETE FROM files WHERE model_key=?", (key,))
        wanted = {p: (s, h) for p, s, h in files}
        for path, size, sha in self._exec("SELECT path, size, sha256 FROM files WHERE model_key=?", (key,)):
            if wanted.get(path) != (size, sha):
                self._exec("DELETE FROM files WHERE model_key=? AND path=?", (key, path))
                self._exec("DELETE FROM chunks WHERE model_key=? AND path=?", (key, path))
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "INSERT INTO models(key, model_id, revision, dir, chunk_size, total_size, state, updated)"
                    " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET dir=excluded.dir,"
                    " chunk_size=excluded.chunk_size, total_size=excluded.total_size,"
                    " state='pulling', manifest_id=NULL, updated=excluded.updated",
                    (key, ref.model_id, ref.revision, str(directory), chunk_size,
                     sum(s for _, s, _ in files), "pulling", time.time()))
                self._db.executemany(
                    "INSERT OR IGNORE INTO files(model_key, path, size, sha256) VALUES (?,?,?,?)",
                    [(key, p, s, h) for p, s, h in files])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def check_dir_free(self, ref: ModelRef, directory: Path) -> None:
        """Refuse ``directory`` if another model's folder is it, contains it or lies in it."""
        key = str(ref)
        for other, other_dir in self._exec("SELECT key, dir FROM models WHERE key != ?", (key,)):
            if overlaps(Path(other_dir), directory):
                raise UnsafePath(f"{directory} overlaps the folder of {other} ({other_dir}); each model needs a "
                                 "folder of its own: choose another --to")

    def open_file(self, ref: ModelRef, model_dir: SafeDir, path: str, size: int, sha256: bytes,
                  chunk_size: int, expected: tuple[bytes, ...] | None) -> PartialFile | None:
        """The ``PartialFile`` of ``path`` in ``model_dir``, or None if the file is already
        complete on disk. ``expected``: trusted chunk hashes; claimed chunks that disagree
        are dropped.
        """
        key = str(ref)
        done = self._exec("SELECT complete FROM files WHERE model_key=? AND path=?", (key, path))
        if done and done[0][0] and _complete_on_disk(model_dir, path, size):
            return None
        have = {idx: h for idx, h in self._exec(
            "SELECT idx, hash FROM chunks WHERE model_key=? AND path=?", (key, path))}
        if expected is not None:
            bad = [i for i, h in have.items() if i >= len(expected) or expected[i] != h]
            if bad:
                self._forget_chunks(key, path, bad)
                for i in bad:
                    del have[i]
        pf = PartialFile(self, key, model_dir, path, size, sha256, chunk_size, have)
        if done and done[0][0]:
            # The index says complete but the file is gone or resized: fetch it again.
            self._exec("UPDATE files SET complete=0 WHERE model_key=? AND path=?", (key, path))
            self._forget_chunks(key, path, list(have))
            pf.have.clear()
        pf.open()
        return pf

    def _keep_manifest(self, manifest: Manifest) -> str:
        mid = manifest.id
        manifests = self._dirs["manifests"]
        if manifests.is_own_file(f"{mid}.shoal"):
            return mid
        try:
            manifests.write_atomic(f"{mid}.shoal", manifest.encode())
        except OSError as e:
            raise _disk_error(e, manifests.path / f"{mid}.shoal") from e
        return mid

    def expect(self, ref: ModelRef, manifest: Manifest) -> None:
        """A pull of ``ref`` follows this trusted manifest: keep it and name it in the index
        now, so LAN peers can ask for the chunks verified so far (state stays 'pulling')."""
        mid = self._keep_manifest(manifest)
        self._exec("UPDATE models SET manifest_id=? WHERE key=?", (mid, str(ref)))

    def complete(self, ref: ModelRef, manifest: Manifest) -> str:
        """Mark ``ref`` complete and keep its manifest; return the manifest id."""
        mid = self._keep_manifest(manifest)
        self._exec("UPDATE models SET state='complete', manifest_id=?, updated=?, last_used=? WHERE key=?",
                   (mid, time.time(), time.time(), str(ref)))
        return mid

    def adopt(self, ref: ModelRef, directory: Path, manifest: Manifest) -> str:
        """Register files already in ``directory`` and described by ``manifest`` as a complete
        model (an adapter shoal trained, say): every chunk is claimed as verified."""
        key = str(ref)
        self.check_dir_free(ref, directory)
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO models(key, model_id, revision, dir, chunk_size, total_size, state,"
                    " updated) VALUES (?,?,?,?,?,?,?,?)",
                    (key, ref.model_id, ref.revision, str(directory), manifest.chunk_size, manifest.total_size,
                     "pulling", time.time()))
                for f in manifest.files:
                    self._db.execute("INSERT OR REPLACE INTO files(model_key, path, size, sha256, complete)"
                                     " VALUES (?,?,?,?,1)", (key, f.path, f.size, f.sha256))
                    self._db.executemany(
                        "INSERT OR REPLACE INTO chunks(model_key, path, idx, hash, source) VALUES (?,?,?,?,?)",
                        [(key, f.path, i, h, "local") for i, h in enumerate(f.chunks)])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.complete(ref, manifest)

    def chunk_map(self, ref: ModelRef) -> list[dict]:
        """Per file: path, size, complete, and the source of each chunk (None: missing)."""
        key = str(ref)
        rows = self._exec("SELECT chunk_size FROM models WHERE key=?", (key,))
        if not rows:
            raise NotFound(f"{ref} is not in the cache")
        chunk_size = rows[0][0]
        files = []
        for path, size, complete in self._exec(
                "SELECT path, size, complete FROM files WHERE model_key=? ORDER BY path", (key,)):
            sources = [None] * chunk_count(size, chunk_size)
            for idx, source in self._exec("SELECT idx, source FROM chunks WHERE model_key=? AND path=?", (key, path)):
                if idx < len(sources):
                    sources[idx] = source
            files.append({"path": path, "size": size, "complete": bool(complete), "chunks": sources})
        return files

    def touch(self, ref: ModelRef) -> None:
        """Mark ``ref`` as just used (LRU)."""
        self._exec("UPDATE models SET last_used=? WHERE key=?", (time.time(), str(ref)))

    def set_pinned(self, ref: ModelRef, pinned: bool) -> ModelInfo:
        self.find(ref)
        self._exec("UPDATE models SET pinned=? WHERE key=?", (int(pinned), str(ref)))
        return self.find(ref)

    def usage(self) -> int:
        """Bytes the store's models take: their full size once any chunk is written (space is
        reserved per file), counting only files shoal itself put there."""
        return int(self._exec("SELECT COALESCE(SUM(total_size), 0) FROM models")[0][0])

    def make_room(self, ref: ModelRef, need: int, quota: int | None, high: float, low: float) -> list[ModelInfo]:
        """Evict so ``need`` more bytes fit (``agent.eviction.make_room``)."""
        from agent.eviction import make_room
        return make_room(self, ref, need, quota, high, low)

    def gc(self, quota: int | None, low: float) -> list[ModelInfo]:
        """Evict down to the low watermark (``agent.eviction.gc``)."""
        from agent.eviction import gc
        return gc(self, quota, low)

    def size_of(self, ref: ModelRef) -> int:
        rows = self._exec("SELECT total_size FROM models WHERE key=?", (str(ref),))
        return int(rows[0][0]) if rows else 0

    def save_signature(self, manifest_id: str, envelope: bytes) -> None:
        """Keep a publisher's signature of a manifest beside it (served to peers with it)."""
        self._dirs["manifests"].write_atomic(f"{_check_id(manifest_id)}.sig", envelope)

    def signature(self, manifest_id: str) -> bytes | None:
        try:
            return self._dirs["manifests"].read_bytes(f"{_check_id(manifest_id)}.sig", limit=4096)
        except FileNotFoundError:
            return None

    def manifest_bytes(self, manifest_id: str) -> bytes:
        """The canonical encoding, as kept (what peers are sent)."""
        return self._dirs["manifests"].read_bytes(f"{_check_id(manifest_id)}.shoal", limit=MAX_MANIFEST_BYTES)

    def manifest(self, manifest_id: str) -> Manifest:
        return decode(self.manifest_bytes(manifest_id))

    def chunk_hash(self, ref: ModelRef, path: str, index: int) -> bytes | None:
        """The verified BLAKE3 of one chunk, or None: one row (LAN peers ask per chunk)."""
        rows = self._exec("SELECT hash FROM chunks WHERE model_key=? AND path=? AND idx=?", (str(ref), path, index))
        return rows[0][0] if rows else None

    def model_dir(self, ref: ModelRef) -> Path | None:
        """Where ``ref``'s files are, or None: one row, without ``find``'s byte counts."""
        rows = self._exec("SELECT dir FROM models WHERE key=?", (str(ref),))
        return Path(rows[0][0]) if rows else None

    def chunk_hashes(self, ref: ModelRef, path: str) -> dict[int, bytes]:
        return {i: h for i, h in self._exec(
            "SELECT idx, hash FROM chunks WHERE model_key=? AND path=?", (str(ref), path))}

    def held_with_sources(self, ref: ModelRef) -> dict[str, dict[int, tuple[bytes, str]]]:
        """Every verified chunk of ``ref`` with where it came from: path -> {index: (BLAKE3, source)}."""
        held: dict[str, dict[int, tuple[bytes, str]]] = {}
        for path, idx, digest, source in self._exec(
                "SELECT path, idx, hash, source FROM chunks WHERE model_key=?", (str(ref),)):
            held.setdefault(path, {})[idx] = (digest, source)
        return held

    def complete_manifests(self) -> set[tuple[str, str, str]]:
        """(model id, revision, manifest id) of every complete model: one query."""
        return {(m, r, mid) for m, r, mid in self._exec(
            "SELECT model_id, revision, manifest_id FROM models WHERE state='complete' AND manifest_id IS NOT NULL")}

    def held_chunks(self, ref: ModelRef) -> dict[str, dict[int, bytes]]:
        """Every verified chunk of ``ref``: path -> {index: BLAKE3}. One query (peers ask often)."""
        held: dict[str, dict[int, bytes]] = {}
        for path, idx, digest in self._exec("SELECT path, idx, hash FROM chunks WHERE model_key=?", (str(ref),)):
            held.setdefault(path, {})[idx] = digest
        return held

    def holding(self, *, manifest_id: str | None = None, model_id: str | None = None,
                revision: str | None = None) -> tuple[ModelRef, str] | None:
        """The revision held (complete or being pulled) under a manifest id, or by name, with
        its manifest id: one row of the models table (not the chunk counts `models()` adds),
        for LAN peers who ask every second."""
        if manifest_id is not None:
            rows = self._exec("SELECT model_id, revision, manifest_id FROM models WHERE manifest_id=? LIMIT 1",
                              (manifest_id,))
        else:
            rows = self._exec("SELECT model_id, revision, manifest_id FROM models WHERE model_id=? AND revision=?"
                              " AND manifest_id IS NOT NULL", (model_id, revision))
        return (ModelRef(rows[0][0], rows[0][1]), rows[0][2]) if rows else None

    def models(self) -> list[ModelInfo]:
        return self._infos("", ())

    def _infos(self, where: str, args: tuple) -> list[ModelInfo]:
        """Models (all, or those ``where`` selects) with the bytes verified so far."""
        counts = {(key, path): n for key, path, n in self._exec(
            "SELECT model_key, path, COUNT(*) FROM chunks" + where.replace("key", "model_key")
            + " GROUP BY model_key, path", args)}
        files: dict[str, list[tuple]] = {}
        for key, path, size, complete in self._exec(
                "SELECT model_key, path, size, complete FROM files" + where.replace("key", "model_key"), args):
            files.setdefault(key, []).append((path, size, complete))
        out = []
        rows = self._exec("SELECT key, model_id, revision, dir, total_size, state, manifest_id, chunk_size,"
                          " pinned, last_used FROM models" + where + " ORDER BY model_id, revision", args)
        for key, model_id, revision, directory, total, state, mid, chunk_size, pinned, last_used in rows:
            have = sum(size if complete else min(size, counts.get((key, path), 0) * chunk_size)
                       for path, size, complete in files.get(key, []))
            out.append(ModelInfo(model_id, revision, Path(directory), total, have, state, mid,
                                 bool(pinned), last_used))
        return out

    def find(self, ref: ModelRef) -> ModelInfo:
        found = self._infos(" WHERE key=?", (str(ref),))
        if not found:
            raise NotFound(f"{ref} is not in the cache ({self.root}); `shoal ls` lists what is, "
                           f"`shoal pull {ref}` fetches it")
        return found[0]

    def mark_damaged(self, ref: ModelRef, path: str, bad_chunks: list[int]) -> None:
        """After ``verify`` found damage: turn the file back into a partial missing ``bad_chunks``."""
        key = str(ref)
        info = self.find(ref)
        try:
            with self.open_dir(info.dir) as model, model.parent_of(path)[0] as parent:
                name = path.rpartition("/")[2]
                if parent.is_own_file(name):
                    parent.rename(name, name + PARTIAL_SUFFIX)
                elif parent.stat(name) is not None:  # a link or another user's file: never ours to keep
                    parent.unlink(name)
        except (FileNotFoundError, UnsafePath):
            pass  # the folder itself is gone: the next pull makes it again
        self._exec("UPDATE files SET complete=0 WHERE model_key=? AND path=?", (key, path))
        self._forget_chunks(key, path, bad_chunks)
        self._exec("UPDATE models SET state='pulling' WHERE key=?", (key,))

    def remove(self, ref: ModelRef) -> ModelInfo:
        """Forget ``ref`` and delete the files the index lists for it (and their partials),
        then the folders that are left empty. Nothing else is touched, no link followed."""
        info = self.find(ref)
        key = str(ref)
        paths = [p for (p,) in self._exec("SELECT path FROM files WHERE model_key=?", (key,))]
        try:
            model = self.open_dir(info.dir)
        except FileNotFoundError:
            model = None
        if model is not None:
            with model:
                delete_files(model, paths)
        for table, col in (("chunks", "model_key"), ("files", "model_key"), ("models", "key")):
            self._exec(f"DELETE FROM {table} WHERE {col}=?", (key,))
        # Then the model's own folder and, in the cache, the owner/name/ folders above it.
        remove_empty_folders(self.open_dir, info.dir, kind_folder(self.root, ref))
        return info

    # ------------------------------------------------------- used by PartialFile

    def _record_chunk(self, key: str, path: str, index: int, digest: bytes, source: str) -> None:
        self._exec("INSERT OR REPLACE INTO chunks(model_key, path, idx, hash, source) VALUES (?,?,?,?,?)",
                   (key, path, index, digest, source))

    def _forget_chunks(self, key: str, path: str, indices: list[int]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM chunks WHERE model_key=? AND path=? AND idx=?",
                                 [(key, path, i) for i in indices])

    def _mark_file_complete(self, key: str, path: str) -> None:
        self._exec("UPDATE files SET complete=1 WHERE model_key=? AND path=?", (key, path))


def _complete_on_disk(model_dir: SafeDir, path: str, size: int) -> bool:
    try:
        parent, name = model_dir.parent_of(path)
    except (FileNotFoundError, UnsafePath):
        return False
    with parent:
        return parent.is_own_file(name, size)


def _check_id(manifest_id: str) -> str:
    if not (len(manifest_id) == 64 and all(c in "0123456789abcdef" for c in manifest_id)):
        raise NotFound(f"{manifest_id!r} is not a manifest id")
    return manifest_id

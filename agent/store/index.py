"""The store's index: one SQLite database (WAL) of models, their files, verified chunks and
blobs. Every SQL statement of the store lives here; nothing here touches a model file.

Tables (schema version 2)::

    models  key (OWNER/NAME@REV), folder, chunk size, size, manifest id, state
            ('pulling' | 'complete' | 'removing'), pinned, last used
    files   per model and path: size, SHA-256, complete, linked (1: the folder's file is a
            hard link of the blob of its SHA-256; 0: not yet; -1: it cannot be, e.g. a
            ``--to`` folder on another file system)
    chunks  per model, path and index: the verified BLAKE3 and where it came from
    blobs   SHA-256 -> size of every verified file the store keeps by content, and whether
            that SHA-256 was computed over its bytes (``proven``) or only named by the trusted
            manifest whose BLAKE3 chunks proved the file

A blob's references are the files rows linked to it (``refs``): derived, never counted.

Version 1 (before content addressing) had no ``blobs`` table and no ``linked`` column;
``open`` migrates it in place (``Store`` then links the complete files into blobs).

Thread-safe (one connection behind a lock); every method blocks.
Error handling: a full disk is ``DiskFull``; a file that is not a database raises
``IndexCorrupt`` so the store can rebuild it from the files.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.errors import DiskFull, ShoalError

SCHEMA_VERSION = 2
LINKED, NOT_LINKED, UNLINKABLE = 1, 0, -1

_TABLES = """
CREATE TABLE IF NOT EXISTS models (
    key TEXT PRIMARY KEY,            -- owner/name@revision
    model_id TEXT NOT NULL,
    revision TEXT NOT NULL,
    dir TEXT NOT NULL,
    chunk_size INTEGER NOT NULL,
    total_size INTEGER NOT NULL,
    manifest_id TEXT,                -- set when complete, or from the start by a trusted plan
    state TEXT NOT NULL,             -- 'pulling' | 'complete' | 'removing'
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
    linked INTEGER NOT NULL DEFAULT 0,
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
CREATE TABLE IF NOT EXISTS blobs (
    sha256 BLOB PRIMARY KEY,
    size INTEGER NOT NULL,
    proven INTEGER NOT NULL DEFAULT 0,  -- 1: its SHA-256 was computed over its bytes
    added REAL NOT NULL
);
"""
_INDEXES = """
CREATE INDEX IF NOT EXISTS files_by_sha256 ON files(sha256);
CREATE INDEX IF NOT EXISTS chunks_by_hash ON chunks(hash);
"""


class IndexCorrupt(ShoalError):
    """The index file is not a SQLite database (or a damaged one): the store rebuilds it."""


@dataclass(frozen=True)
class ModelRow:
    key: str
    model_id: str
    revision: str
    dir: str
    chunk_size: int
    total_size: int
    manifest_id: str | None
    state: str
    pinned: bool
    last_used: float


@dataclass(frozen=True)
class FileRow:
    model_key: str
    path: str
    size: int
    sha256: bytes
    complete: bool
    linked: int


_MODEL_COLUMNS = "key, model_id, revision, dir, chunk_size, total_size, manifest_id, state, pinned, last_used"
_FILE_COLUMNS = "model_key, path, size, sha256, complete, linked"


def _model(row) -> ModelRow:
    return ModelRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], bool(row[8]), row[9])


def _file(row) -> FileRow:
    return FileRow(row[0], row[1], row[2], row[3], bool(row[4]), row[5])


class Index:
    """See module docstring. ``migrated``: the version the file had when opened (0: new)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self.migrated = self._migrate()
        except sqlite3.DatabaseError as e:
            self.close()
            if "full" in str(e):
                raise DiskFull(f"no space to open the index {self.path}: free some space") from e
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                raise
            raise IndexCorrupt(f"the index {self.path} is damaged ({e})") from e

    def _migrate(self) -> int:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            return version
        had_models = bool(self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='models'").fetchone())
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _TABLES.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            columns = {row[1]: row for row in self._db.execute("PRAGMA table_info(models)")}
            for column, ddl in (("pinned", "INTEGER NOT NULL DEFAULT 0"), ("last_used", "REAL NOT NULL DEFAULT 0")):
                if column not in columns:  # an index from before pin/LRU existed
                    self._db.execute(f"ALTER TABLE models ADD COLUMN {column} {ddl}")
            if "linked" not in {row[1] for row in self._db.execute("PRAGMA table_info(files)")}:
                self._db.execute("ALTER TABLE files ADD COLUMN linked INTEGER NOT NULL DEFAULT 0")
            for statement in _INDEXES.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return 1 if had_models else 0

    def close(self) -> None:
        with self._lock:
            if getattr(self, "_db", None) is not None:
                self._db.close()
                self._db = None

    # --------------------------------------------------------------------- plumbing

    def _exec(self, sql: str, args=()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as e:
                raise self._translate(e) from e

    def _many(self, sql: str, rows) -> None:
        with self._lock:
            try:
                self._db.executemany(sql, rows)
            except sqlite3.OperationalError as e:
                raise self._translate(e) from e

    def _translate(self, e: sqlite3.OperationalError) -> Exception:
        if "full" in str(e):
            return DiskFull(f"the index {self.path} cannot grow: the disk is full; free some space and try again")
        return e

    @contextmanager
    def transaction(self):
        """One write transaction (others wait for it); the calls inside are atomic together."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise self._translate(e) from e
            try:
                yield self
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as e:
                self._db.execute("ROLLBACK")
                raise self._translate(e) from e

    # ----------------------------------------------------------------------- models

    def model(self, key: str) -> ModelRow | None:
        rows = self._exec(f"SELECT {_MODEL_COLUMNS} FROM models WHERE key=?", (key,))
        return _model(rows[0]) if rows else None

    def models(self, state: str | None = None) -> list[ModelRow]:
        where, args = (" WHERE state=?", (state,)) if state else ("", ())
        return [_model(r) for r in self._exec(
            f"SELECT {_MODEL_COLUMNS} FROM models{where} ORDER BY model_id, revision", args)]

    def other_dirs(self, key: str) -> list[tuple[str, str]]:
        return self._exec("SELECT key, dir FROM models WHERE key != ?", (key,))

    def begin_model(self, key: str, model_id: str, revision: str, directory: str, chunk_size: int,
                    files: list[tuple[str, int, bytes]]) -> None:
        """Record a pull of ``key`` into ``directory``; drop rows that no longer fit the plan
        (another folder or chunking: every row; a file whose size or SHA-256 changed: its rows)."""
        with self.transaction():
            row = self.model(key)
            if row is not None and (row.dir != directory or row.chunk_size != chunk_size):
                self._exec("DELETE FROM chunks WHERE model_key=?", (key,))
                self._exec("DELETE FROM files WHERE model_key=?", (key,))
            wanted = {p: (s, h) for p, s, h in files}
            for path, size, sha in self._exec("SELECT path, size, sha256 FROM files WHERE model_key=?", (key,)):
                if wanted.get(path) != (size, sha):
                    self._exec("DELETE FROM files WHERE model_key=? AND path=?", (key, path))
                    self._exec("DELETE FROM chunks WHERE model_key=? AND path=?", (key, path))
            self._exec(
                "INSERT INTO models(key, model_id, revision, dir, chunk_size, total_size, state, updated)"
                " VALUES (?,?,?,?,?,?,'pulling',?) ON CONFLICT(key) DO UPDATE SET dir=excluded.dir,"
                " chunk_size=excluded.chunk_size, total_size=excluded.total_size,"
                " state='pulling', manifest_id=NULL, updated=excluded.updated",
                (key, model_id, revision, directory, chunk_size, sum(s for _, s, _ in files), time.time()))
            self._many("INSERT OR IGNORE INTO files(model_key, path, size, sha256) VALUES (?,?,?,?)",
                       [(key, p, s, h) for p, s, h in files])

    def set_manifest(self, key: str, manifest_id: str) -> None:
        self._exec("UPDATE models SET manifest_id=? WHERE key=?", (manifest_id, key))

    def set_complete(self, key: str, manifest_id: str) -> None:
        now = time.time()
        self._exec("UPDATE models SET state='complete', manifest_id=?, updated=?, last_used=? WHERE key=?",
                   (manifest_id, now, now, key))

    def set_state(self, key: str, state: str) -> None:
        self._exec("UPDATE models SET state=? WHERE key=?", (state, key))

    def touch(self, key: str) -> None:
        self._exec("UPDATE models SET last_used=? WHERE key=?", (time.time(), key))

    def set_pinned(self, key: str, pinned: bool) -> None:
        self._exec("UPDATE models SET pinned=? WHERE key=?", (int(pinned), key))

    def delete_model(self, key: str) -> None:
        """Forget ``key``: its chunks, files and row, in one transaction."""
        with self.transaction():
            for table, col in (("chunks", "model_key"), ("files", "model_key"), ("models", "key")):
                self._exec(f"DELETE FROM {table} WHERE {col}=?", (key,))

    def holding(self, *, manifest_id: str | None = None, model_id: str | None = None,
                revision: str | None = None) -> tuple[str, str, str] | None:
        """(model id, revision, manifest id) held under a manifest id, or by name."""
        if manifest_id is not None:
            rows = self._exec("SELECT model_id, revision, manifest_id FROM models WHERE manifest_id=?"
                              " AND state != 'removing' LIMIT 1", (manifest_id,))
        else:
            rows = self._exec("SELECT model_id, revision, manifest_id FROM models WHERE model_id=? AND revision=?"
                              " AND manifest_id IS NOT NULL AND state != 'removing'", (model_id, revision))
        return rows[0] if rows else None

    def complete_manifests(self) -> set[tuple[str, str, str]]:
        return {tuple(r) for r in self._exec(
            "SELECT model_id, revision, manifest_id FROM models WHERE state='complete' AND manifest_id IS NOT NULL")}

    def verified_bytes(self, key: str | None = None) -> dict[str, int]:
        """Per model (or for ``key`` alone): the bytes verified so far (complete files whole,
        the rest by chunk)."""
        where, args = (" WHERE model_key=?", (key,)) if key is not None else ("", ())
        counts = {(k, p): n for k, p, n in self._exec(
            f"SELECT model_key, path, COUNT(*) FROM chunks{where} GROUP BY model_key, path", args)}
        sizes = {k: c for k, c in self._exec("SELECT key, chunk_size FROM models")}
        have: dict[str, int] = {}
        for key, path, size, complete in self._exec(f"SELECT model_key, path, size, complete FROM files{where}",
                                                    args):
            got = size if complete else min(size, counts.get((key, path), 0) * sizes.get(key, 0))
            have[key] = have.get(key, 0) + got
        return have

    # ------------------------------------------------------------------------ files

    def files(self, key: str) -> list[FileRow]:
        return [_file(r) for r in self._exec(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE model_key=? ORDER BY path", (key,))]

    def file(self, key: str, path: str) -> FileRow | None:
        rows = self._exec(f"SELECT {_FILE_COLUMNS} FROM files WHERE model_key=? AND path=?", (key, path))
        return _file(rows[0]) if rows else None

    def files_with(self, sha256: bytes) -> list[FileRow]:
        """Every complete file of that content, in any model (the blob's users first)."""
        return [_file(r) for r in self._exec(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE sha256=? AND complete=1 ORDER BY linked DESC", (sha256,))]

    def files_pending(self, sha256: bytes) -> list[FileRow]:
        """Files of that content the index does not count as linked to its blob yet."""
        return [_file(r) for r in self._exec(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE sha256=? AND linked != 1", (sha256,))]

    def unlinked_complete(self) -> list[FileRow]:
        """Complete files not yet linked to their blob (an index from before blobs existed)."""
        return [_file(r) for r in self._exec(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE complete=1 AND linked=0")]

    def set_file(self, key: str, path: str, *, complete: bool, linked: int) -> None:
        self._exec("UPDATE files SET complete=?, linked=? WHERE model_key=? AND path=?",
                   (int(complete), linked, key, path))

    # ----------------------------------------------------------------------- chunks

    def record_chunk(self, key: str, path: str, index: int, digest: bytes, source: str) -> None:
        self._exec("INSERT OR REPLACE INTO chunks(model_key, path, idx, hash, source) VALUES (?,?,?,?,?)",
                   (key, path, index, digest, source))

    def record_chunks(self, key: str, path: str, hashes: list[bytes], source: str) -> None:
        self._many("INSERT OR REPLACE INTO chunks(model_key, path, idx, hash, source) VALUES (?,?,?,?,?)",
                   [(key, path, i, h, source) for i, h in enumerate(hashes)])

    def forget_chunks(self, key: str, path: str, indices: list[int]) -> None:
        self._many("DELETE FROM chunks WHERE model_key=? AND path=? AND idx=?", [(key, path, i) for i in indices])

    def chunk_hash(self, key: str, path: str, index: int) -> bytes | None:
        rows = self._exec("SELECT hash FROM chunks WHERE model_key=? AND path=? AND idx=?", (key, path, index))
        return rows[0][0] if rows else None

    def chunk_hashes(self, key: str, path: str) -> dict[int, bytes]:
        return dict(self._exec("SELECT idx, hash FROM chunks WHERE model_key=? AND path=?", (key, path)))

    def chunk_sources(self, key: str, path: str) -> dict[int, str]:
        return dict(self._exec("SELECT idx, source FROM chunks WHERE model_key=? AND path=?", (key, path)))

    def held(self, key: str) -> list[tuple[str, int, bytes, str]]:
        """(path, index, BLAKE3, source) of every verified chunk of ``key``: one query."""
        return self._exec("SELECT path, idx, hash, source FROM chunks WHERE model_key=?", (key,))

    def chunk_located(self, digest: bytes) -> list[tuple[str, str, int, int, str, bool]]:
        """Where a chunk of that BLAKE3 is verified: (model key, path, index, chunk size,
        folder, file complete), any model."""
        return self._exec(
            "SELECT c.model_key, c.path, c.idx, m.chunk_size, m.dir, f.complete FROM chunks c"
            " JOIN models m ON m.key = c.model_key JOIN files f ON f.model_key = c.model_key AND f.path = c.path"
            " WHERE c.hash=? AND m.state != 'removing' LIMIT 4", (digest,))

    # ------------------------------------------------------------------------ blobs

    def blob_size(self, sha256: bytes) -> int | None:
        rows = self._exec("SELECT size FROM blobs WHERE sha256=?", (sha256,))
        return rows[0][0] if rows else None

    def blob_proven(self, sha256: bytes) -> bool:
        rows = self._exec("SELECT proven FROM blobs WHERE sha256=?", (sha256,))
        return bool(rows and rows[0][0])

    def add_blob(self, sha256: bytes, size: int, proven: bool) -> None:
        self._exec("INSERT INTO blobs(sha256, size, proven, added) VALUES (?,?,?,?) ON CONFLICT(sha256)"
                   " DO UPDATE SET proven=MAX(proven, excluded.proven)", (sha256, size, int(proven), time.time()))

    def blob_chunks(self, sha256: bytes, chunk_size: int) -> tuple[bytes, ...] | None:
        """The BLAKE3 chunk list of that blob at ``chunk_size``, as a model linking it
        verified it, or None when no such model is held."""
        for key, path, size in self._exec(
                "SELECT f.model_key, f.path, f.size FROM files f JOIN models m ON m.key = f.model_key"
                " WHERE f.sha256=? AND f.linked=1 AND f.complete=1 AND m.chunk_size=? LIMIT 4",
                (sha256, chunk_size)):
            hashes = self.chunk_hashes(key, path)
            count = -(-size // chunk_size)
            if len(hashes) == count and all(i in hashes for i in range(count)):
                return tuple(hashes[i] for i in range(count))
        return None

    def set_unlinkable(self, sha256: bytes) -> None:
        """Files of that content that must not share a blob (it was not what its name said)."""
        self._exec("UPDATE files SET linked=-1 WHERE sha256=? AND linked=1", (sha256,))

    def unlink_files(self, sha256: bytes) -> None:
        """The blob of ``sha256`` is gone: its files keep their bytes, not linked to it any more."""
        self._exec("UPDATE files SET linked=0 WHERE sha256=? AND linked=1", (sha256,))

    def delete_blob(self, sha256: bytes) -> None:
        self._exec("DELETE FROM blobs WHERE sha256=?", (sha256,))

    def blobs(self) -> dict[bytes, int]:
        return dict(self._exec("SELECT sha256, size FROM blobs"))

    def refs(self, sha256: bytes) -> int:
        """Files linked to the blob of ``sha256``: the blob goes when this reaches 0."""
        return self._exec("SELECT COUNT(*) FROM files WHERE sha256=? AND linked=1", (sha256,))[0][0]

    def unreferenced_blobs(self) -> list[bytes]:
        return [s for (s,) in self._exec(
            "SELECT sha256 FROM blobs b WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.sha256=b.sha256"
            " AND f.linked=1)")]

    def model_blobs(self) -> dict[str, set[bytes]]:
        """Per model: the blobs its folder links (what removing it could free)."""
        out: dict[str, set[bytes]] = {}
        for key, sha in self._exec("SELECT model_key, sha256 FROM files WHERE linked=1"):
            out.setdefault(key, set()).add(sha)
        return out

    def own_bytes(self) -> dict[str, int]:
        """Per model: bytes of its files that are no blob's (partials, copies that cannot link)."""
        return dict(self._exec("SELECT model_key, SUM(size) FROM files WHERE linked != 1 GROUP BY model_key"))

    def usage(self) -> int:
        """Bytes on disk, each counted once: every blob, plus files that are no blob's."""
        blobs = self._exec("SELECT COALESCE(SUM(size), 0) FROM blobs")[0][0]
        own = self._exec("SELECT COALESCE(SUM(size), 0) FROM files WHERE linked != 1")[0][0]
        return int(blobs + own)

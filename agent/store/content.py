"""Content addressing: which files the cache holds by content, and every move that links,
finishes, releases or repairs a blob (``agent.store.blobs``) with the index in step.

**When a held file may stand in for a planned one.** A blob is keyed by a SHA-256. It is
*proven* when that SHA-256 was computed over its bytes (a pull proven by the origin's
listing, an import, ``verify``); otherwise the SHA-256 is only what the trusted manifest
whose BLAKE3 chunks proved the file said it was. So a plan may link a blob when:

- the plan is a trusted manifest and the blob's BLAKE3 chunk list (as the index has it
  for a model of the same chunk size, or computed now) equals the plan's: same bytes;
- the plan is a listing (the origin's SHA-256) and the blob is proven, or its SHA-256,
  computed now, matches (it is proven from then on).
Anything else is fetched; a size that disagrees with the blob of the same SHA-256 is a
listing that lies, and is refused. Reuse never widens trust: a manifest cannot make the
cache hand its bytes to a pull that asked for another file.

**Order of every move** (what makes a kill at any moment safe, ``tests/test_crash.py``):
- finish: the ``.partial`` is synced; linked into ``blobs/``; renamed into place; the
  folders synced; then the index says complete and linked. A file found between these
  steps is the blob of its SHA-256 (same inode), which only a proven file can be: it is
  recorded complete when next opened.
- link a held blob into a folder: under the blob lock, a temporary link renamed into
  place, then the file's chunk rows and row, so a blob is never removed between.
- release (a model removed or evicted): its rows go first; then, under the blob lock,
  each blob no file links any more.
Bytes are never lost by a kill: at worst a blob no model links, which the sweep removes.

Blocking, like the rest of the store.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

from agent import crashpoints
from agent.errors import ManifestError, UnsafePath, disk_error
from agent.hashing import HASH_BLOCK, blake3_hash
from agent.manifest import FileEntry, chunk_count, chunk_span
from agent.safefs import SafeDir
from agent.store.blobs import Blobs, Unlinkable, same_file
from agent.store.folders import open_fd
from agent.store.index import LINKED, NOT_LINKED, UNLINKABLE, Index
from agent.store.partial import PartialFile

log = logging.getLogger("shoal.store")

CACHE_SOURCE = "cache"  # the source named for bytes a pull took from the cache itself


@dataclass(frozen=True)
class Held:
    """A blob a plan's file may link: its chunk hashes at the plan's chunk size."""

    sha256: bytes
    size: int
    chunks: tuple[bytes, ...]
    proven: bool


def hash_fd(fd: int, size: int, chunk_size: int, *, sha256: bool) -> tuple[tuple[bytes, ...], bytes | None]:
    """BLAKE3 per chunk (and the SHA-256 when asked) of an open file, in one read."""
    sha = hashlib.sha256() if sha256 else None
    chunks = []
    for index in range(chunk_count(size, chunk_size)):
        offset, length = chunk_span(size, chunk_size, index)
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise OSError(f"short read at {offset}")
        chunks.append(blake3_hash(data, parallel=True))
        if sha is not None:
            for start in range(0, length, HASH_BLOCK):
                sha.update(data[start:start + HASH_BLOCK])
    return tuple(chunks), (sha.digest() if sha is not None else None)


_libc = None


def sync_files(files: list[PartialFile]) -> None:
    """Make a batch of written files durable: one ``fsync``, or one ``syncfs`` for many
    (4,000 small files paid ~2.7 ms for each fsync of a file and of its folder)."""
    global _libc
    if len(files) == 1:
        files[0].sync()
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if getattr(_libc, "syncfs", None) is not None and _libc.syncfs(files[0].fd) == 0:
        return
    for pf in files:  # no syncfs here: each on its own
        pf.sync()


class Content:
    """See module docstring. ``open_dir(path)``: a model folder's handle (the store's)."""

    def __init__(self, index: Index, blobs: Blobs, open_dir: Callable[..., SafeDir]):
        self.index, self.blobs, self.open_dir = index, blobs, open_dir

    # -------------------------------------------------------------------- deciding

    def find(self, entry: FileEntry, chunk_size: int, trusted: bool,
             hashed: tuple[bytes, ...] | None = None) -> tuple[Held | None, str | None]:
        """A held blob that may stand in for ``entry`` (see module docstring), and a line for
        the person when one is held but may not; blocking (it may hash the blob).
        ``hashed``: its chunks at ``chunk_size`` as just computed from its bytes (an import)."""
        st = self.blobs.stat(entry.sha256)
        if st is None:
            return None, None
        if st.st_size != entry.size:
            raise ManifestError(
                f"the plan says {entry.path} (SHA-256 {entry.sha256.hex()[:16]}...) is {entry.size} bytes, but the "
                f"file this cache holds with that SHA-256 is {st.st_size}: the listing or manifest is wrong. "
                "Nothing was fetched; report it to whoever published it")
        proven = self.index.blob_proven(entry.sha256)
        known = hashed if hashed is not None else self.index.blob_chunks(entry.sha256, chunk_size)
        if trusted and entry.chunks is not None and known is not None:
            if known == tuple(entry.chunks):
                return Held(entry.sha256, entry.size, known, proven), None
            return None, (f"{entry.path}: the cached file with its SHA-256 has other chunk hashes than the "
                          "manifest; fetching it instead")
        if not trusted and proven and known is not None:
            return Held(entry.sha256, entry.size, known, True), None
        # Hash the blob now: its chunks at this chunk size, and its SHA-256 if a listing
        # needs it proven.
        need_sha = not trusted and not proven
        try:
            fd = self.blobs.open(entry.sha256)
        except (FileNotFoundError, UnsafePath):
            return None, None
        try:
            chunks, sha = hash_fd(fd, entry.size, chunk_size, sha256=need_sha)
        finally:
            os.close(fd)
        if need_sha:
            if sha != entry.sha256:
                self._disown(entry.sha256)
                return None, (f"{entry.path}: the cached file said to have its SHA-256 does not (it came with "
                              "a manifest that named it wrongly); it is no longer shared, fetching it instead")
            self.index.add_blob(entry.sha256, entry.size, True)
            proven = True
        if trusted and entry.chunks is not None and chunks != tuple(entry.chunks):
            return None, (f"{entry.path}: the cached file with its SHA-256 has other chunk hashes than the "
                          "manifest; fetching it instead")
        return Held(entry.sha256, entry.size, chunks, proven), None

    def _disown(self, sha256: bytes) -> None:
        """A blob that is not what its name says: no longer shared (its folders keep their files)."""
        with self.blobs.lock():
            log.warning("blob %s does not hash to its name: no longer shared", sha256.hex())
            self.index.set_unlinkable(sha256)
            self.index.delete_blob(sha256)
            self.blobs.remove(sha256)

    # --------------------------------------------------------------------- linking

    def link(self, key: str, model_dir: SafeDir, items: list[tuple[str, Held]]) -> int:
        """Put each held blob at its path of the model folder and record it complete (chunk
        rows included): one sync per folder and one transaction for all. A folder the blobs
        cannot be linked into (another file system) gets copies. The bytes that cost no
        fetch (a blob removed meanwhile is left out: it is fetched instead)."""
        placed: list[tuple[str, Held, int]] = []
        parents: dict[str, SafeDir] = {}
        with self.blobs.lock():
            try:
                for path, held in items:
                    head, _, name = path.rpartition("/")
                    if head not in parents:
                        parents[head] = model_dir.parent_of(path, create=True)[0]
                    parent = parents[head]
                    try:
                        try:
                            self.blobs.link_into(held.sha256, parent, name)
                            linked = LINKED
                        except Unlinkable:
                            self.blobs.copy_into(held.sha256, parent, name)
                            linked = UNLINKABLE
                    except FileNotFoundError:
                        continue  # removed since it was found
                    parent.unlink(name + ".partial", missing_ok=True)
                    placed.append((path, held, linked))
                    crashpoints.reached("link:placed")
                for parent in parents.values():
                    parent.fsync()
            except OSError as e:
                raise disk_error(e, model_dir.path) from e
            finally:
                for parent in parents.values():
                    parent.close()
            with self.index.transaction():
                for path, held, linked in placed:
                    self.index.forget_chunks(key, path, list(self.index.chunk_hashes(key, path)))
                    self.index.record_chunks(key, path, list(held.chunks), CACHE_SOURCE)
                    self.index.set_file(key, path, complete=True, linked=linked)
                    if linked == LINKED:
                        self.index.add_blob(held.sha256, held.size, held.proven)
            crashpoints.reached("link:recorded")
        return sum(held.size for _, held, _ in placed)

    def reuse_chunks(self, pf: PartialFile, expected: tuple[bytes, ...]) -> int:
        """Copy into ``pf`` the missing chunks the cache holds elsewhere (another file, model
        or revision, verified there), each re-hashed as it is read; the bytes copied."""
        copied = 0
        for index in pf.missing:
            digest = expected[index]
            for key, path, idx, chunk_size, folder, complete in self.index.chunk_located(digest):
                if (key, path) == (pf.model_key, pf.rel):
                    continue
                data = self._read_chunk(folder, path, complete, idx, chunk_size)
                if data is not None and len(data) == chunk_span(pf.size, pf.chunk_size, index)[1] \
                        and blake3_hash(data) == digest:
                    pf.write_chunk(index, memoryview(data), digest, CACHE_SOURCE)
                    copied += len(data)
                    break
        return copied

    def _read_chunk(self, folder: str, path: str, complete: bool, idx: int, chunk_size: int) -> bytes | None:
        try:
            fd = open_fd(self.open_dir, folder, path, partial_ok=not complete)
        except (FileNotFoundError, UnsafePath, NotADirectoryError):
            return None
        try:
            size = os.fstat(fd).st_size
            offset = idx * chunk_size
            return os.pread(fd, min(chunk_size, max(0, size - offset)), offset) if offset < size else None
        finally:
            os.close(fd)

    def held_by_content(self, manifest) -> dict[str, set[int]]:
        """Which chunks of ``manifest`` the cache holds verified under any model, by BLAKE3."""
        have: dict[str, set[int]] = {}
        for f in manifest.files:
            got = {i for i, digest in enumerate(f.chunks) if self.index.chunk_located(digest)}
            if got:
                have[f.path] = got
        return have

    def open_chunk(self, digest: bytes, length: int) -> tuple[int, int] | None:
        """(an open fd, offset) of a verified chunk of that BLAKE3 and length, wherever the
        cache holds it; the caller closes the fd."""
        for _, path, idx, chunk_size, folder, complete in self.index.chunk_located(digest):
            try:
                fd = open_fd(self.open_dir, folder, path, partial_ok=not complete)
            except (FileNotFoundError, UnsafePath, NotADirectoryError):
                continue
            offset = idx * chunk_size
            if os.fstat(fd).st_size >= offset + length:
                return fd, offset
            os.close(fd)
        return None

    # ------------------------------------------------------------------- finishing

    def finish(self, files: list[PartialFile]) -> None:
        """Make proven files durable, link them into the blobs, rename them into place and
        record them complete: one sync and one transaction for the whole batch."""
        if not files:
            return
        sync_files(files)
        crashpoints.reached("finish:synced")
        done: list[tuple[PartialFile, int]] = []
        with self.blobs.lock():
            parents: dict[str, SafeDir] = {}
            try:
                for pf in files:
                    head = pf.rel.rpartition("/")[0]
                    if head not in parents:
                        parents[head] = pf.model_dir.parent_of(pf.rel)[0]
                    done.append((pf, self._into_place(pf, parents[head])))
                for parent in parents.values():
                    parent.fsync()
                self.blobs.fsync()
            except OSError as e:
                raise disk_error(e, files[0].final_path) from e
            finally:
                for parent in parents.values():
                    parent.close()
            with self.index.transaction():
                for pf, linked in done:
                    if pf.record_source is not None:  # a one-chunk file's claim (PartialFile.write_chunk)
                        self.index.record_chunks(pf.model_key, pf.rel, [pf.have[0]], pf.record_source)
                    self.index.set_file(pf.model_key, pf.rel, complete=True, linked=linked)
                    if linked == LINKED:
                        self.index.add_blob(pf.sha256, pf.size, pf.sha256_checked)
            crashpoints.reached("finish:recorded")
        for pf in files:
            pf.close()

    def _into_place(self, pf: PartialFile, parent: SafeDir) -> int:
        name = pf.rel.rpartition("/")[2]
        try:
            adopted = self.blobs.adopt(parent, pf.partial_name, pf.sha256)
        except Unlinkable:
            parent.rename(pf.partial_name, name)
            return UNLINKABLE
        if adopted:
            crashpoints.reached("finish:adopted")
            parent.rename(pf.partial_name, name)
            crashpoints.reached("finish:renamed")
            return LINKED
        # Another file is that blob already (fetched meanwhile under another model): keep one
        # copy, when the two are provably the same bytes.
        same = (pf.sha256_checked and self.index.blob_proven(pf.sha256)) or \
            self.index.blob_chunks(pf.sha256, pf.chunk_size) == tuple(pf.have[i] for i in range(pf.count))
        if same:
            self.blobs.link_into(pf.sha256, parent, name)
            parent.unlink(pf.partial_name, missing_ok=True)
            return LINKED
        parent.rename(pf.partial_name, name)
        return UNLINKABLE

    def recover(self, key: str, parent: SafeDir, name: str, entry: FileEntry, chunk_size: int,
                trusted: bool) -> bool:
        """A file a kill caught between its link into the blobs and its record: when the
        folder's file (or its ``.partial``) is the blob of its SHA-256, record it complete
        and say True."""
        partial = parent.stat(name + ".partial")
        if self.blobs.is_blob(entry.sha256, partial):
            parent.rename(name + ".partial", name)
        if not self.blobs.is_blob(entry.sha256, parent.stat(name)):
            return False
        held, _ = self.find(entry, chunk_size, trusted)
        if held is None:
            return False
        with self.blobs.lock(), self.index.transaction():
            self.index.record_chunks(key, entry.path, list(held.chunks), CACHE_SOURCE)
            self.index.set_file(key, entry.path, complete=True, linked=LINKED)
            self.index.add_blob(entry.sha256, entry.size, held.proven)
        return True

    # ------------------------------------------------------------- releasing, upkeep

    def release(self, shas: set[bytes]) -> int:
        """Remove the blobs of ``shas`` that no file links any more; the bytes freed."""
        freed = 0
        with self.blobs.lock():
            for sha in shas:
                if self.index.refs(sha) == 0:
                    size = self.index.blob_size(sha) or 0
                    self.index.delete_blob(sha)
                    crashpoints.reached("remove:blob-forgotten")
                    self.blobs.remove(sha)
                    freed += size
        return freed

    def sweep(self) -> dict[str, int]:
        """Bring the blobs and their rows in line after a kill: a row whose blob is gone is
        dropped (its folders keep their bytes and are linked again); a blob no folder and no
        row links is removed."""
        dropped = removed = recorded = 0
        with self.blobs.lock():
            stale = self.blobs.clear_stale()
            rows, on_disk = self.index.blobs(), set(self.blobs.names())
            for sha in set(rows) - on_disk:
                self.index.unlink_files(sha)
                self.index.delete_blob(sha)
                dropped += 1
            for sha in on_disk:
                if self.blobs.links(sha) > 1 and (sha not in rows or self.index.refs(sha) == 0):
                    recorded += self._record_pending(sha)
                if self.index.refs(sha) == 0 and self.blobs.links(sha) <= 1:
                    self.index.delete_blob(sha)
                    self.blobs.remove(sha)
                    removed += 1
        return {"rows_dropped": dropped, "blobs_removed": removed, "stale_removed": stale, "recorded": recorded}

    def _record_pending(self, sha256: bytes) -> int:
        """A blob some folder links but the index does not count: a kill between a file's
        link and its record (``finish``, ``link``). Such a file was proven (only proven
        files become blobs): record it complete (a ``.partial`` still by that name is
        renamed into place first)."""
        found = 0
        for row in self.index.files_pending(sha256):
            model = self.index.model(row.model_key)
            if model is None:
                continue
            try:
                with self.open_dir(model.dir) as folder, folder.parent_of(row.path)[0] as parent:
                    name = row.path.rpartition("/")[2]
                    if self.blobs.is_blob(sha256, parent.stat(name + ".partial")):
                        parent.rename(name + ".partial", name)
                    if not self.blobs.is_blob(sha256, parent.stat(name)):
                        continue
            except (FileNotFoundError, UnsafePath, NotADirectoryError):
                continue
            # A finished file has every chunk recorded; a linked one (``link``) records them
            # with the file: hash them here when a kill came first.
            rows = self.index.chunk_hashes(row.model_key, row.path)
            count = chunk_count(row.size, model.chunk_size)
            if len(rows) != count:
                fd = self.blobs.open(sha256)
                try:
                    chunks, _ = hash_fd(fd, row.size, model.chunk_size, sha256=False)
                finally:
                    os.close(fd)
            with self.index.transaction():
                if len(rows) != count:
                    self.index.record_chunks(row.model_key, row.path, list(chunks), CACHE_SOURCE)
                self.index.set_file(row.model_key, row.path, complete=True, linked=LINKED)
                self.index.add_blob(sha256, row.size, False)
            found += 1
        return found

    def link_unlinked(self) -> int:
        """Make every complete file not yet linked a blob (or a link of the blob of its
        content): an index migrated from before blobs, or a blob that was lost. Files of
        the same SHA-256 become one copy only when their bytes are provably the same."""
        count = 0
        for row in self.index.unlinked_complete():
            model = self.index.model(row.model_key)
            if model is None:
                continue
            try:
                with self.open_dir(model.dir) as folder:
                    parent, name = folder.parent_of(row.path)
                    with parent:
                        st = parent.stat(name)
                        if st is None or st.st_size != row.size:
                            continue
                        linked = self._link_existing(parent, name, row, model.chunk_size, st)
            except (FileNotFoundError, UnsafePath, NotADirectoryError):
                continue
            self.index.set_file(row.model_key, row.path, complete=True, linked=linked)
            crashpoints.reached("migrate:linked")
            count += linked == LINKED
        return count

    def _link_existing(self, parent: SafeDir, name: str, row, chunk_size: int, st: os.stat_result) -> int:
        with self.blobs.lock():
            try:
                if self.blobs.adopt(parent, name, row.sha256):
                    self.index.add_blob(row.sha256, row.size, False)
                    return LINKED
            except Unlinkable:
                return UNLINKABLE
            blob = self.blobs.stat(row.sha256)
            if same_file(blob, st):
                return LINKED
            ours = self.index.chunk_hashes(row.model_key, row.path)
            theirs = self.index.blob_chunks(row.sha256, chunk_size)
            count = chunk_count(row.size, chunk_size)
            if blob is not None and blob.st_size == row.size and theirs is not None and \
                    tuple(ours.get(i) for i in range(count)) == theirs:
                self.blobs.link_into(row.sha256, parent, name)  # one copy of the two
                return LINKED
            return UNLINKABLE

    def damaged(self, key: str, path: str, sha256: bytes) -> list[str]:
        """``verify`` found the bytes of ``path`` damaged. When they are a shared blob, the
        blob goes and every other model linking it loses its file (their next pull links
        the repaired one: it is fetched once); this model's file stays, unlinked, for its
        good chunks. Returns the other models."""
        others = [f for f in self.index.files_with(sha256) if f.linked == LINKED and f.model_key != key]
        with self.blobs.lock():
            self.index.delete_blob(sha256)
            self.blobs.remove(sha256)
            for other in others:
                model = self.index.model(other.model_key)
                try:
                    with self.open_dir(model.dir) as folder, folder.parent_of(other.path)[0] as parent:
                        parent.unlink(other.path.rpartition("/")[2], missing_ok=True)
                except (FileNotFoundError, UnsafePath, NotADirectoryError):
                    pass
                with self.index.transaction():
                    self.index.set_file(other.model_key, other.path, complete=False, linked=NOT_LINKED)
                    self.index.forget_chunks(other.model_key, other.path,
                                             list(self.index.chunk_hashes(other.model_key, other.path)))
                    self.index.set_state(other.model_key, "pulling")
            self.index.unlink_files(sha256)
        return [o.model_key for o in others]

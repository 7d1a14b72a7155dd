"""One file being filled chunk by chunk: its ``.partial`` and the running SHA-256.

The file is ``rel`` below an open model-directory handle (``agent.safefs.SafeDir``), written
as ``rel.partial`` at chunk offsets. Every verified chunk is recorded through the
``ChunkLog`` it was given (the store's index) only after its bytes are in the file, which
is what makes the store's invariant hold (see ``agent.store``). Finishing a proven file
(sync, link into the blobs, rename, record) is the store's (``agent.store.content``): this
module knows no index, no blob and no store.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import threading
from pathlib import Path
from typing import Protocol

from agent import crashpoints
from agent.errors import disk_error as _disk_error
from agent.hashing import blake3_hash
from agent.manifest import PARTIAL_SUFFIX, chunk_count, chunk_span
from agent.safefs import SafeDir


class ChunkLog(Protocol):
    """Where a partial file records what it verified (the store's index, for one model)."""

    key: str  # the model's key (OWNER/NAME@REV)

    def record(self, path: str, index: int, digest: bytes, source: str) -> None: ...

    def forget(self, path: str, indices: list[int]) -> None: ...


class PartialFile:
    """One file being filled chunk by chunk. Thread-safe.

    ``model_dir`` is the open handle of the model directory (owned by the pull); the file is
    ``rel`` below it, written as ``rel.partial`` and renamed into place when proven.
    Keeps a running SHA-256 over the contiguous verified prefix ("frontier"), so the
    origin check of a finished file costs only what was not hashed during the transfer.
    """

    def __init__(self, log: ChunkLog, model_dir: SafeDir, rel: str, size: int,
                 sha256: bytes, chunk_size: int, have: dict[int, bytes]):
        self.log, self.model_key = log, log.key
        self.model_dir, self.rel = model_dir, rel
        self.size, self.sha256, self.chunk_size = size, sha256, chunk_size
        self.count = chunk_count(size, chunk_size)
        self.have = dict(have)  # index -> blake3 of verified chunks
        self._lock = threading.Lock()
        self._digest_lock = threading.Lock()
        self._sha = hashlib.sha256()
        self._sha_next = 0  # first chunk index not yet in _sha
        self._fd: int | None = None
        self._reserved = False
        # The running SHA-256 costs a re-read of every chunk: only a file that will be proven
        # by the origin's SHA-256 (a listing plan, or always_sha256) keeps it.
        self.track_sha256 = True
        self.sha256_checked = False  # its SHA-256 was computed over its bytes and matched
        # A one-chunk file's claim may wait for its finish: only where nobody reads the claims
        # while the pull runs (LAN peers are served the chunks the index claims, mid-pull, only
        # of a trusted manifest's pull: the pull says so).
        self.defer_claim = False
        self.record_source: str | None = None  # the deferred claim's source, recorded at the finish

    @property
    def final_path(self) -> Path:
        """Where the file will be (for messages: made when asked, not for each of 2,000 files)."""
        return self.model_dir.path / self.rel

    @property
    def partial_name(self) -> str:
        return self.rel.rpartition("/")[2] + PARTIAL_SUFFIX

    # -- opening

    def open(self, parent: SafeDir | None = None, existed: bool | None = None) -> None:
        """Create (sparse) or reopen the ``.partial`` file; re-verify claimed chunks.
        ``parent``: the open folder that holds it, when the caller has it (not closed here);
        ``existed``: whether the caller saw the ``.partial`` there already.

        Space is reserved when the first chunk is written, so a full disk shows up on
        the file that does not fit, and files already finished are unaffected.
        """
        try:
            own = parent is None
            if own:
                parent, _ = self.model_dir.parent_of(self.rel, create=True)
            try:
                if existed is None:
                    existed = parent.stat(self.partial_name) is not None
                fd = parent.open_file(self.partial_name, os.O_RDWR | os.O_CREAT, 0o644)
            finally:
                if own:
                    parent.close()
        except OSError as e:
            raise _disk_error(e, self.final_path.with_name(self.partial_name)) from e
        self._fd = fd
        try:
            # A new file of one chunk gets its size from that chunk's one write; any other
            # is sized now (its chunks land anywhere in it).
            if (existed or self.count > 1) and os.fstat(fd).st_size != self.size:
                os.ftruncate(fd, self.size)
        except OSError as e:
            self.close()
            raise _disk_error(e, self.final_path.with_name(self.partial_name)) from e
        if existed and self.have:
            self._recheck_claimed()
        elif self.have:  # the claimed chunks were in a .partial that is gone: none are here
            lost, self.have = sorted(self.have), {}
            self.log.forget(self.rel, lost)

    def _recheck_claimed(self) -> None:
        lost = []
        for index, digest in sorted(self.have.items()):
            offset, length = chunk_span(self.size, self.chunk_size, index)
            if blake3_hash(os.pread(self._fd, length, offset)) != digest:
                lost.append(index)
        if lost:
            for index in lost:
                del self.have[index]
            self.log.forget(self.rel, lost)

    # -- writing

    @property
    def missing(self) -> list[int]:
        with self._lock:
            return [i for i in range(self.count) if i not in self.have]

    @property
    def complete(self) -> bool:
        with self._lock:
            return len(self.have) == self.count

    def write_chunk(self, index: int, data: memoryview, digest: bytes, source: str) -> None:
        """Write verified bytes of chunk ``index`` and record them in the index."""
        offset, length = chunk_span(self.size, self.chunk_size, index)
        if len(data) != length:
            raise ValueError(f"chunk {index} of {self.rel} is {length} bytes, got {len(data)}")
        view = memoryview(data)
        self._reserve()
        try:
            written = 0
            while written < length:
                written += os.pwrite(self._fd, view[written:], offset + written)
        except OSError as e:
            raise _disk_error(e, self.final_path) from e
        crashpoints.reached("chunk:written")
        # Only now, with the bytes in the file, may the index claim the chunk. A file of one
        # chunk may leave the claim to its finish (``defer_claim``), in the batch's one
        # transaction (a transaction per small file was a tenth of a pull of many): a kill
        # before it loses one chunk's fetch, never a claim of bytes that are not there.
        if self.count == 1 and self.defer_claim:
            self.record_source = source
        else:
            self.log.record(self.rel, index, digest, source)
        with self._lock:
            self.have[index] = digest
        if self.track_sha256:
            self._advance_sha(index, view)

    def _reserve(self) -> None:
        with self._lock:
            if self._reserved or self.count == 1:  # one chunk: its one write reserves it, or fails
                return
            try:
                os.posix_fallocate(self._fd, 0, self.size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _disk_error(e, self.final_path) from e
                # EOPNOTSUPP/EINVAL: this filesystem cannot preallocate; sparse it is.
            self._reserved = True

    def forget(self, indices: list[int]) -> None:
        with self._lock:
            for i in indices:
                self.have.pop(i, None)
            self._sha, self._sha_next = hashlib.sha256(), 0
        self.log.forget(self.rel, indices)

    def _advance_sha(self, written: int | None = None, data: memoryview | None = None) -> None:
        # Whoever holds the digest lock hashes every contiguous chunk it can see; a thread
        # that cannot get the lock leaves its chunk to the holder, which re-checks before
        # it leaves, so no chunk is skipped. The chunk just written (``written``) is hashed
        # from its buffer, not read back from the file.
        while True:
            if not self._digest_lock.acquire(blocking=False):
                return
            try:
                while True:
                    with self._lock:
                        ready = self._sha_next in self.have
                    if not ready:
                        break
                    if self._sha_next == written and data is not None:
                        self._sha.update(data)
                    else:
                        self._hash_written(self._sha_next)
                    self._sha_next += 1
            finally:
                self._digest_lock.release()
            with self._lock:
                if self._sha_next not in self.have:
                    return

    def _hash_written(self, index: int) -> None:
        """Feed a chunk already in the file to the SHA-256, read through a mapping of the file.

        Why not ``pread``: a chunk-sized ``bytes`` per read went to glibc's heap (its mmap
        threshold rises to the largest block freed), where it stayed resident until a trim;
        the long-running agent's RSS rose and fell by a chunk (benchmarks/soak.py). A mapping
        of the page cache holds no anonymous memory, and costs less CPU than the copy
        (MAP_POPULATE: one call maps it all, measured at 0.10 against 0.22 CPU-s per GiB)."""
        offset, length = chunk_span(self.size, self.chunk_size, index)
        # (A chunk's offset is a multiple of its power-of-two size, 16 KiB at least: page-aligned,
        # as a mapping needs. A file cut short under us would make the mapped read a SIGBUS.)
        if length and os.fstat(self._fd).st_size >= offset + length:
            try:
                mapped = mmap.mmap(self._fd, length, offset=offset, prot=mmap.PROT_READ,
                                   flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            except OSError:  # a file system that cannot map files: read it instead
                pass
            else:
                with mapped:
                    self._sha.update(mapped)
                return
        self._sha.update(os.pread(self._fd, length, offset))

    @property
    def sha256_pending(self) -> int:
        """Bytes the SHA-256 has still to read before it can be compared (0: only the compare)."""
        with self._lock:
            start = self._sha_next
        if start >= self.count:
            return 0
        return self.size - chunk_span(self.size, self.chunk_size, start)[0]

    def sha256_matches(self) -> bool:
        """Finish the running SHA-256 (reading what is left) and compare with the origin's."""
        with self._digest_lock:
            while self._sha_next < self.count:
                self._hash_written(self._sha_next)
                self._sha_next += 1
            # A blob made of this file is then proven by its SHA-256 (agent.store.content).
            self.sha256_checked = self._sha.digest() == self.sha256
            return self.sha256_checked

    # -- finishing (the store's, agent.store.content)

    @property
    def fd(self) -> int | None:
        return self._fd

    def sync(self) -> None:
        """Make the written bytes durable (before the file is renamed into place)."""
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise _disk_error(e, self.final_path) from e

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

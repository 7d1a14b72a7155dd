"""Content hashes: BLAKE3 per chunk (multi-threaded only for very large buffers), SHA-256 per file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import blake3

HASH_BLOCK = 8 * 1024 * 1024  # SHA-256 is fed in blocks this size (hashlib drops the GIL on large ones)


THREADED_FROM = 64 * 1024 * 1024  # a pull's chunks below this hash on one thread (~1 ms per 4 MiB)


def blake3_hash(data, *, parallel: bool = False) -> bytes:
    """BLAKE3 of ``data``. ``parallel``: use blake3's thread pool (a person's one-off
    ``verify`` or manifest build on an otherwise idle machine). A pull's chunks hash on the
    calling thread unless very large: on a busy machine (a classroom, a training job) the
    pool's threads compete for the cores, and their time is not the calling thread's (the
    CPU ledger saw "hash 0.0")."""
    threads = blake3.blake3.AUTO if parallel or len(data) >= THREADED_FROM else 1
    return blake3.blake3(data, max_threads=threads).digest()


def hash_file(path: Path, chunk_size: int) -> tuple[list[bytes], bytes]:
    """BLAKE3 per chunk and SHA-256 of a whole file, in one read (blocking)."""
    sha = hashlib.sha256()
    chunks = []
    with open(path, "rb", buffering=0) as f:
        while True:
            data = f.read(chunk_size)
            if not data:
                break
            chunks.append(blake3_hash(data, parallel=True))
            sha.update(data)
    return chunks, sha.digest()

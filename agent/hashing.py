"""Content hashes: BLAKE3 per chunk (multi-threaded for large buffers), SHA-256 per file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import blake3

HASH_BLOCK = 8 * 1024 * 1024  # SHA-256 is fed in blocks this size (hashlib drops the GIL on large ones)


def blake3_hash(data) -> bytes:
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()


def hash_file(path: Path, chunk_size: int) -> tuple[list[bytes], bytes]:
    """BLAKE3 per chunk and SHA-256 of a whole file, in one read (blocking)."""
    sha = hashlib.sha256()
    chunks = []
    with open(path, "rb", buffering=0) as f:
        while True:
            data = f.read(chunk_size)
            if not data:
                break
            chunks.append(blake3_hash(data))
            sha.update(data)
    return chunks, sha.digest()

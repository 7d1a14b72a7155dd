"""agent.store.partial: a file filled chunk by chunk in any order is proven by its SHA-256
(the chunks written ahead of the running hash are read back through a mapping of the file)."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from agent.hashing import blake3_hash
from agent.manifest import chunk_count, chunk_span
from agent.safefs import SafeDir
from agent.store.partial import PartialFile

CHUNK = 64 * 1024


class _Log:
    key = "owner/model@rev"

    def __init__(self):
        self.recorded: list[int] = []

    def record(self, path, index, digest, source):
        self.recorded.append(index)

    def forget(self, path, indices):
        pass


def _fill(tmp_path, data: bytes, order: list[int], sha256: bytes) -> PartialFile:
    folder = SafeDir.open(tmp_path / "model", create=True)
    pf = PartialFile(_Log(), folder, "weights.bin", len(data), sha256, CHUNK, {})
    pf.open()
    for index in order:
        offset, length = chunk_span(len(data), CHUNK, index)
        piece = data[offset:offset + length]
        pf.write_chunk(index, memoryview(piece), blake3_hash(piece), "test")
    return pf


@pytest.mark.parametrize("size", [5 * CHUNK, 5 * CHUNK + 123, CHUNK // 3])
@pytest.mark.parametrize("order", ["forward", "backward", "shuffled"])
def test_a_file_filled_in_any_order_matches_its_sha256(tmp_path, size, order):
    data = random.Random(size).randbytes(size)
    indices = list(range(chunk_count(size, CHUNK)))
    if order == "backward":
        indices.reverse()
    elif order == "shuffled":
        random.Random(7).shuffle(indices)
    pf = _fill(tmp_path, data, indices, hashlib.sha256(data).digest())
    try:
        assert pf.complete and pf.sha256_matches()
        with open(tmp_path / "model" / pf.partial_name, "rb") as f:
            assert f.read() == data
    finally:
        pf.close()


def test_a_file_whose_bytes_differ_from_the_origins_sha256_is_not_proven(tmp_path):
    data = random.Random(1).randbytes(4 * CHUNK + 9)
    wrong = hashlib.sha256(data[:-1] + bytes([data[-1] ^ 1])).digest()
    pf = _fill(tmp_path, data, [3, 1, 4, 0, 2], wrong)
    try:
        assert pf.complete and not pf.sha256_matches() and not pf.sha256_checked
    finally:
        pf.close()
    assert os.path.exists(tmp_path / "model" / "weights.bin.partial")


def test_a_file_system_that_cannot_map_files_is_read_instead(tmp_path, monkeypatch):
    import mmap

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")  # ENODEV: what mmap says where a file system cannot map
    monkeypatch.setattr(mmap, "mmap", refuse)
    data = random.Random(2).randbytes(3 * CHUNK + 5)
    pf = _fill(tmp_path, data, [2, 0, 3, 1], hashlib.sha256(data).digest())
    try:
        assert pf.sha256_matches()
    finally:
        pf.close()

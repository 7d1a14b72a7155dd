"""``shoal verify``: re-hash a cached model and report (and un-claim) any damage.

Every chunk is re-hashed with BLAKE3 against the model's manifest and every file with
SHA-256 against the origin's. A damaged file goes back to ``.partial`` with its bad
chunks dropped from the index, so the next ``shoal pull`` fetches only those chunks.
When the damaged bytes were a file other models share (one blob), they lose it too and
link the repaired one on their next pull (``agent.store.content``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from agent.config import Settings
from agent.errors import NotFound, UnsafePath
from agent.manifest import ModelRef, chunk_span
from agent.progress import human_bytes
from agent.hashing import HASH_BLOCK, blake3_hash
from agent.store import Store
from agent.store.folders import open_model_file


@dataclass
class VerifyReport:
    ref: ModelRef
    files: int = 0
    bytes: int = 0
    damaged: dict[str, str] = field(default_factory=dict)  # path -> what is wrong
    shared: dict[str, list[str]] = field(default_factory=dict)  # path -> other models that linked the damaged bytes

    def lines(self) -> list[str]:
        out = [f"{self.ref}: checked {self.files} files, {human_bytes(self.bytes)}"]
        for path, why in sorted(self.damaged.items()):
            out.append(f"  DAMAGED {path}: {why}")
            if self.shared.get(path):
                out.append(f"    the same bytes were {', '.join(self.shared[path])}'s too: they take the repaired "
                           "file on their next pull (fetched once)")
        out.append("  all files match their manifest and SHA-256" if not self.damaged else
                   f"  {len(self.damaged)} damaged file(s)")
        return out


def verify_model(ref: ModelRef, settings: Settings) -> VerifyReport:
    store = Store(settings.cache_dir)
    try:
        info = store.find(ref)
        if info.state != "complete" or not info.manifest_id:
            raise NotFound(f"{ref} is not complete yet ({human_bytes(info.have_bytes)} of "
                           f"{human_bytes(info.total_size)}); run `shoal pull {ref}` to finish it first")
        store.lock(ref)
        manifest = store.manifest(info.manifest_id)
        report = VerifyReport(ref)
        for entry in manifest.files:
            report.files += 1
            try:
                fd = open_model_file(store, info.dir, entry.path)
            except (FileNotFoundError, UnsafePath) as e:
                report.damaged[entry.path] = "missing" if isinstance(e, FileNotFoundError) else str(e)
                store.mark_damaged(ref, entry.path, list(range(len(entry.chunks))))
                continue
            size = os.fstat(fd).st_size
            if size != entry.size:
                os.close(fd)
                report.damaged[entry.path] = f"size {size}, expected {entry.size}"
                store.mark_damaged(ref, entry.path, list(range(len(entry.chunks))))
                continue
            bad, sha = [], hashlib.sha256()
            with open(fd, "rb", buffering=0, closefd=True):
                for index, expected in enumerate(entry.chunks):
                    offset, length = chunk_span(entry.size, manifest.chunk_size, index)
                    data = os.pread(fd, length, offset)
                    for start in range(0, len(data), HASH_BLOCK):
                        sha.update(data[start:start + HASH_BLOCK])
                    if blake3_hash(data, parallel=True) != expected:
                        bad.append(index)
            report.bytes += entry.size
            if bad or sha.digest() != entry.sha256:
                what = f"{len(bad)} bad chunk(s) {bad[:8]}" if bad else "SHA-256 mismatch"
                report.damaged[entry.path] = what
                report.shared[entry.path] = store.mark_damaged(ref, entry.path, bad or list(range(len(entry.chunks))))
        return report
    finally:
        store.close()

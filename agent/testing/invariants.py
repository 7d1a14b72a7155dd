"""The store's invariants, checked the slow way (every byte re-hashed), for the crash
campaign (``benchmarks/crash.py``) and the tests: what must hold after a kill at any
moment, once the cache is opened again as a restarted agent opens it.

- every chunk the index calls verified hashes right, where the index says it is;
- every file the index calls complete is there, of its size and SHA-256, and is the
  blob of its SHA-256 when the index says it is linked;
- every blob has its row, its size, and (proven) its SHA-256; every row its blob;
- no model folder names missing bytes: a complete model has every file;
- no ``.partial`` or other file in a model folder that the index does not own;
- no model is left half-removed;
- the quota's count equals the disk: distinct inodes' bytes, plus what incomplete files
  reserve before their ``.partial`` exists.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from agent.hashing import blake3_hash
from agent.manifest import PARTIAL_SUFFIX, chunk_span


def _sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.digest()


def check_store(cache: str | os.PathLike) -> list[str]:
    """Violations of the invariants (module docstring) in the cache at ``cache``; [] when none."""
    from agent.store import Store
    cache = Path(cache)
    problems: list[str] = []
    store = Store(cache)  # as a restarted agent: migrations, unfinished removals done
    try:
        store.sweep()
        index = store.index
        owned: set[Path] = set()
        inodes: dict[tuple[int, int], int] = {}
        reserved = 0
        blobs_dir = cache / "blobs"
        for model in index.models():
            if model.state == "removing":
                problems.append(f"{model.key}: still half-removed after a restart")
            folder = Path(model.dir)
            files = index.files(model.key)
            if model.state == "complete" and not all(f.complete for f in files):
                problems.append(f"{model.key}: complete, but {[f.path for f in files if not f.complete]} are not")
            for f in files:
                final, partial = folder / f.path, folder / (f.path + PARTIAL_SUFFIX)
                where = final if f.complete else partial
                owned.update((final, partial))
                if f.complete:
                    if not final.is_file():
                        problems.append(f"{model.key}: {f.path} is complete in the index, missing on disk")
                        continue
                    if final.stat().st_size != f.size:
                        problems.append(f"{model.key}: {f.path} is {final.stat().st_size} bytes, not {f.size}")
                    elif _sha256(final) != f.sha256:
                        problems.append(f"{model.key}: {f.path} does not hash to its SHA-256")
                    if f.linked == 1:
                        blob = blobs_dir / f.sha256.hex()
                        if not blob.exists() or os.stat(blob).st_ino != final.stat().st_ino:
                            problems.append(f"{model.key}: {f.path} is linked in the index but not its blob")
                for idx, digest in index.chunk_hashes(model.key, f.path).items():
                    if not where.is_file():
                        problems.append(f"{model.key}: chunk {idx} of {f.path} claimed, but {where.name} is gone")
                        break
                    try:
                        offset, length = chunk_span(f.size, model.chunk_size, idx)
                    except IndexError:
                        problems.append(f"{model.key}: chunk {idx} of {f.path} is outside the file")
                        continue
                    with open(where, "rb") as fh:
                        fh.seek(offset)
                        if blake3_hash(fh.read(length)) != digest:
                            problems.append(f"{model.key}: chunk {idx} of {f.path} is verified in the index, "
                                            "its bytes do not hash right")
                if where.is_file():
                    st = where.stat()
                    if f.linked != 1:
                        # The quota reserves a partial in full from the start; a new file of one
                        # chunk is sized by that chunk's one write (PartialFile.open), so until
                        # then it holds fewer bytes than it reserves.
                        inodes[(st.st_dev, st.st_ino)] = st.st_size if f.complete else max(st.st_size, f.size)
                elif f.linked != 1:
                    reserved += f.size
        rows = index.blobs()
        for sha, size in rows.items():
            blob = blobs_dir / sha.hex()
            if not blob.is_file():
                problems.append(f"blob {sha.hex()[:16]} has a row, no file")
                continue
            st = blob.stat()
            inodes[(st.st_dev, st.st_ino)] = st.st_size
            if st.st_size != size:
                problems.append(f"blob {sha.hex()[:16]} is {st.st_size} bytes, its row says {size}")
            elif index.blob_proven(sha) and _sha256(blob) != sha:
                problems.append(f"blob {sha.hex()[:16]} is proven, but does not hash to its name")
        for blob in blobs_dir.iterdir():
            named = len(blob.name) == 64 and all(c in "0123456789abcdef" for c in blob.name)
            if not named or bytes.fromhex(blob.name) not in rows:
                problems.append(f"blobs/{blob.name} has no row")
        for kind in ("models", "datasets"):
            for path in (cache / kind).rglob("*"):
                if path.is_file() and path not in owned:
                    problems.append(f"{path.relative_to(cache)} is in a model folder, and no model owns it")
        if list((cache / "tmp").iterdir()):
            problems.append(f"tmp/ holds {sorted(p.name for p in (cache / 'tmp').iterdir())} after the sweep")
        on_disk = sum(inodes.values())
        if store.usage() != on_disk + reserved:
            problems.append(f"the quota counts {store.usage()} bytes; the disk holds {on_disk} and incomplete "
                            f"files reserve {reserved} more")
    finally:
        store.close()
    return problems

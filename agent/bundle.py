"""Offline bundles: what a USB stick carries to a room with no network to the teacher.

``shoal bundle export MODEL... DIR`` (the teacher) writes, for each complete revision:
its manifest, the teacher's signature of it (made here if missing: the bundle carries
only what its maker vouches for), and its files; and the room's assignment record when
there is one. ``shoal bundle import DIR`` (each machine) checks everything before a byte
goes into the cache: the manifest's id, the signature (by a key this machine trusts: the
room's teacher), and every chunk of every file against the signed manifest's BLAKE3. A
bundle that fails is refused as a whole for that revision, naming the file and the chunk.
Then each revision is pulled with the bundle as its only offer (``protocol.Answer``,
``where="bundle"``) and the bundle's folder to adopt from, asking no origin: the files
become the cache's blobs (``agent.adopt``), pinned when the record assigns them, and the
machine serves them to the room like any cache entry.

Layout::

    DIR/shoal-bundle.json             {"version": 1, "items": [{"ref", "kind", "manifest_id", "size"}],
                                       "assignment": ENVELOPE hex or null}
    DIR/manifests/{manifest id}.shoal   the manifest, canonical msgpack
    DIR/manifests/{manifest id}.sig     its signature envelope
    DIR/files/{model id}/{revision}/{path}

Blocking (call in a worker thread). Files are copied a block at a time (a stick is
another file system: no links).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from agent.errors import IntegrityError, ManifestError, NotFound, ShoalError, UnsafePath, UsageError
from agent.hashing import blake3_hash
from agent.manifest import Manifest, ModelRef, check_relpath, chunk_count, chunk_span
from agent.manifest import decode as decode_manifest

INDEX = "shoal-bundle.json"
VERSION = 1
MAX_INDEX = 1024 * 1024
MAX_ITEMS = 256
BLOCK = 8 * 1024 * 1024


class BundleRefused(IntegrityError):
    """A bundle (or one revision of it) that does not check out: damaged, tampered with,
    or signed by a key this machine does not trust."""


@dataclass(frozen=True)
class BundleItem:
    ref: ModelRef
    kind: str
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    folder: Path  # the revision's files in the bundle

    def offer(self):
        """The bundle as a pull's offer (``protocol.Answer``): every chunk held."""
        from agent.swarm.protocol import Answer
        return Answer(self.manifest, self.manifest_bytes, self.signature,
                      {f.path: set(range(chunk_count(f.size, self.manifest.chunk_size))) for f in self.manifest.files},
                      False, peer="bundle", where="bundle")


def export_bundle(store, identity, refs: list[tuple[ModelRef, str]], dest: Path,
                  assignment: bytes | None = None) -> dict:
    """Write ``refs`` ((ref, kind): complete cache entries) to ``dest`` (see module docstring)."""
    dest.mkdir(parents=True, exist_ok=True)
    if (dest / INDEX).exists():
        raise UsageError(f"{dest} holds a bundle already: export into an empty folder")
    (dest / "manifests").mkdir(exist_ok=True)
    items, total = [], 0
    for ref, kind in refs:
        info = store.find(ref)
        if info.state != "complete" or not info.manifest_id:
            raise NotFound(f"{ref} is not complete in the cache: pull it first")
        body = store.manifest_bytes(info.manifest_id)
        signature = store.signature(info.manifest_id)
        if signature is None:  # the maker vouches for what it carries
            signature = identity.sign_manifest(info.manifest_id)
            store.save_signature(info.manifest_id, signature)
        (dest / "manifests" / f"{info.manifest_id}.shoal").write_bytes(body)
        (dest / "manifests" / f"{info.manifest_id}.sig").write_bytes(signature)
        manifest = decode_manifest(body)
        for f in manifest.files:
            target = dest / "files" / ref.model_id / ref.revision / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            from agent.store.folders import open_model_file
            fd = open_model_file(store, info.dir, f.path)
            with os.fdopen(fd, "rb") as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, BLOCK)
                out.flush()
                os.fsync(out.fileno())
            total += f.size
        items.append({"ref": str(ref), "kind": kind, "manifest_id": info.manifest_id, "size": info.total_size})
    index = {"version": VERSION, "items": items, "assignment": assignment.hex() if assignment else None}
    tmp = dest / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, dest / INDEX)  # written last: a half-written bundle has no index
    return {"dir": str(dest), "items": items, "bytes": total, "assignment": assignment is not None}


def read_index(src: Path) -> dict:
    try:
        with open(src / INDEX, "rb") as f:
            raw = f.read(MAX_INDEX + 1)
    except FileNotFoundError:
        raise UsageError(f"{src} is not a shoal bundle (no {INDEX}): `shoal bundle export` makes one") from None
    if len(raw) > MAX_INDEX:
        raise BundleRefused(f"{src / INDEX} is larger than {MAX_INDEX} bytes")
    try:
        index = json.loads(raw)
        if index.get("version") != VERSION or not isinstance(index.get("items"), list) \
                or len(index["items"]) > MAX_ITEMS:
            raise ValueError("not a version 1 index")
    except (ValueError, AttributeError) as e:
        raise BundleRefused(f"{src / INDEX} is damaged: {e}") from None
    return index


def check_bundle(src: Path, trust) -> tuple[list[BundleItem], bytes | None]:
    """Every revision of the bundle at ``src``, checked (see module docstring), and its
    assignment envelope; ``BundleRefused`` naming the first thing that fails."""
    index = read_index(src)
    items = []
    for raw in index["items"]:
        try:
            ref, kind, manifest_id = ModelRef.parse(raw["ref"]), raw["kind"], raw["manifest_id"]
            if kind not in ("model", "dataset", "adapter") or not isinstance(manifest_id, str) \
                    or len(manifest_id) != 64 or any(c not in "0123456789abcdef" for c in manifest_id):
                raise ValueError(f"bad item {raw!r}")
        except (KeyError, TypeError, ValueError, ShoalError) as e:
            raise BundleRefused(f"{src / INDEX} names a revision wrongly: {e}") from None
        items.append(_check_item(src, ref, kind, manifest_id, trust))
    assignment = index.get("assignment")
    try:
        return items, bytes.fromhex(assignment) if assignment else None
    except (TypeError, ValueError):
        raise BundleRefused(f"{src / INDEX}: the assignment record is not hex") from None


def _check_item(src: Path, ref: ModelRef, kind: str, manifest_id: str, trust) -> BundleItem:
    what = f"bundle {src}: {ref}"
    try:
        body = (src / "manifests" / f"{manifest_id}.shoal").read_bytes()
        signature = (src / "manifests" / f"{manifest_id}.sig").read_bytes()
    except FileNotFoundError as e:
        raise BundleRefused(f"{what}: {Path(e.filename).name} is missing") from None
    try:
        manifest = decode_manifest(body)
    except ManifestError as e:
        raise BundleRefused(f"{what}: its manifest is damaged ({e})") from None
    if manifest.id != manifest_id or manifest.model_id != ref.model_id or manifest.revision != ref.revision:
        raise BundleRefused(f"{what}: the manifest in the bundle is not the one its index names (changed?)")
    try:
        trust.check(manifest_id, signature)
    except ShoalError as e:
        raise BundleRefused(f"{what}: {e}") from None
    folder = src / "files" / ref.model_id / ref.revision
    for f in manifest.files:
        check_relpath(f.path)
        path = folder / f.path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise BundleRefused(f"{what}: {f.path} is missing from the bundle") from None
        except OSError as e:
            raise BundleRefused(f"{what}: {f.path} cannot be read ({e.strerror}; a link?)") from None
        try:
            if os.fstat(fd).st_size != f.size:
                raise BundleRefused(f"{what}: {f.path} is {os.fstat(fd).st_size} bytes, the signed manifest says "
                                    f"{f.size}; the bundle is damaged or was tampered with; nothing of {ref} was "
                                    "imported")
            for i, expected in enumerate(f.chunks):
                offset, length = chunk_span(f.size, manifest.chunk_size, i)
                data = os.pread(fd, length, offset)
                if len(data) != length or blake3_hash(data) != expected:
                    raise BundleRefused(f"{what}: {f.path} chunk {i} (bytes {offset}-{offset + length - 1}) does "
                                        "not match the signed manifest; the bundle is damaged or was tampered with; "
                                        f"nothing of {ref} was imported")
        finally:
            os.close(fd)
    if not folder.is_dir() or folder.is_symlink():
        raise UnsafePath(f"{what}: {folder} is not a folder")
    return BundleItem(ref, kind, manifest, body, signature, folder)

"""Opening a cache's index: migrating an older one, rebuilding a missing or damaged one
from what the cache's files prove (``rebuild``), finishing removals a kill interrupted.

Every manifest the cache kept (``manifests/``: complete pulls, and trusted plans of pulls
under way) names a model revision and its default folder; each file there (or its
``.partial``) is re-hashed chunk by chunk against the manifest, and only what matches is
recorded. A model whose every file matches is complete again. What cannot be known is
said: models pulled into ``--to`` folders outside the cache are no longer listed.
Blocking; called by ``Store`` while it holds the cache's open lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from typing import TYPE_CHECKING

from agent.errors import ManifestError, UnsafePath
from agent.hashing import blake3_hash
from agent.manifest import PARTIAL_SUFFIX, ModelRef, chunk_span, decode
from agent.store.content import Content
from agent.store.index import LINKED, NOT_LINKED, Index, IndexCorrupt

if TYPE_CHECKING:
    from agent.store.store import Store

log = logging.getLogger("shoal.store")
INDEX_FILES = ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm")


def open_index(store: "Store") -> tuple[Index, Content, dict | None]:
    """The store's index and content, opened under the cache's open lock (so two processes
    starting at once do not both migrate): a damaged index is kept aside and rebuilt, a
    missing one with content on disk is rebuilt, a schema-1 one migrated (its files linked
    into blobs); then interrupted removals are finished. The third value says what a
    rebuild found (None: none was needed)."""
    root, locks = store.root_dir, store._dirs["locks"]
    lock_fd = locks.open_file("open.lock", os.O_RDWR | os.O_CREAT, 0o600, writing=False)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        damaged = None
        try:
            store.index = Index(store.root / "index.sqlite")
        except IndexCorrupt as e:
            damaged = str(e)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for name in INDEX_FILES:
                if root.stat(name) is not None:
                    root.rename(name, f"{name}.damaged-{stamp}")
            store.index = Index(store.root / "index.sqlite")
        store.content = Content(store.index, store.blobs, store.open_dir)
        rebuilt = None
        has_content = bool(os.listdir(store._dirs["manifests"].fd)) or bool(store.blobs.names())
        if damaged is not None or (store.index.migrated == 0 and has_content):
            rebuilt = rebuild(store, why=damaged or "the index was missing")
            log.warning("%s", rebuilt["message"])
        elif store.index.migrated == 1:
            linked = store.content.link_unlinked()
            log.info("the cache index was migrated to content addressing: %d files linked into blobs", linked)
        else:
            store.content.link_unlinked()
        for row in store.index.models("removing"):
            store.finish_removal(row)
        return store.index, store.content, rebuilt
    finally:
        os.close(lock_fd)


def rebuild(store: "Store", *, why: str) -> dict:
    manifests = store._dirs["manifests"]
    found = []
    for name in os.listdir(manifests.fd):
        if not name.endswith(".shoal") or len(name) != 70:
            continue
        try:
            manifest = decode(manifests.read_bytes(name))
        except (ManifestError, UnsafePath, OSError):
            continue
        st = manifests.stat(name)
        found.append((st.st_mtime if st else 0, manifest))
    complete = partly = hashed = 0
    seen: set[str] = set()
    for _, manifest in sorted(found, key=lambda pair: -pair[0]):  # the newest manifest of a revision wins
        ref = ModelRef(manifest.model_id, manifest.revision)
        if str(ref) in seen:
            continue
        folder = store.default_dir(ref)
        try:
            model = store.open_dir(folder)
        except (FileNotFoundError, UnsafePath, NotADirectoryError):
            continue
        seen.add(str(ref))
        key = str(ref)
        store.index.begin_model(key, ref.model_id, ref.revision, str(folder), manifest.chunk_size,
                                [(f.path, f.size, f.sha256) for f in manifest.files])
        whole = True
        with model:
            for entry in manifest.files:
                good = _verified_chunks(store, model, entry, manifest.chunk_size)
                hashed += 1
                if good is None:
                    whole = False
                    continue
                name, indices = good
                for index in indices:
                    store.index.record_chunk(key, entry.path, index, entry.chunks[index], "local")
                if name == entry.path.rpartition("/")[2] and len(indices) == len(entry.chunks):
                    parent = model.parent_of(entry.path)[0]
                    with parent:
                        linked = LINKED if store.blobs.is_blob(entry.sha256, parent.stat(name)) else NOT_LINKED
                    store.index.set_file(key, entry.path, complete=True, linked=linked)
                    if linked == LINKED:
                        store.index.add_blob(entry.sha256, entry.size, False)
                else:
                    whole = False
        if whole:
            store.index.set_complete(key, manifest.id)
            complete += 1
        else:
            store.index.set_manifest(key, manifest.id)
            partly += 1
    unknown, dropped = _unknown_folders(store, seen)
    for sha in store.blobs.names():  # a blob is a proven file: its row comes back as is
        st = store.blobs.stat(sha)
        if st is not None:
            store.index.add_blob(sha, st.st_size, False)
    swept = store.content.sweep()
    store.content.link_unlinked()
    return {"why": why, "complete": complete, "partial": partly, "files_hashed": hashed,
            "unknown_folders": unknown, "unverifiable_removed": dropped, **swept,
            "message": (f"the cache index was damaged or missing ({why}): rebuilt from the files it could verify: "
                        f"{complete} model(s) complete, {partly} partly held, {hashed} file(s) re-hashed"
                        + (f", {unknown} folder(s) no kept manifest describes kept by their files' blobs, "
                           f"{dropped} file(s) nothing could verify removed" if unknown or dropped else "")
                        + "; models pulled into --to folders outside the cache are no longer listed (pull them "
                        "again)")}


def _unknown_folders(store: "Store", seen: set[str]) -> tuple[int, int]:
    """Model folders no kept manifest describes (a pull from a listing, cut short): their
    files that are blobs (proven) are recorded, by the folder's name, as a model partly held
    (the next pull links them); ``.partial`` files and other files nothing can verify
    without the manifest are removed. (folders, files removed)."""
    from agent.errors import ShoalError
    from agent.manifest import default_chunk_size
    from agent.store.content import hash_fd
    from agent.store.folders import delete_files, remove_empty_folders
    by_inode = {}
    for sha in store.blobs.names():
        st = store.blobs.stat(sha)
        if st is not None:
            by_inode[(st.st_dev, st.st_ino)] = (sha, st.st_size)
    folders = dropped = 0
    for kind, prefix in (("models", ""), ("datasets", "datasets/")):
        base = store.root / kind
        for folder in sorted(p for p in base.glob("*/*/*") if p.is_dir() and not p.is_symlink()):
            owner, name, revision = folder.relative_to(base).parts
            try:
                ref = ModelRef.parse(f"{prefix}{owner}/{name}@{revision}")
            except ShoalError:
                continue
            if str(ref) in seen or store.index.model(str(ref)) is not None:
                continue
            kept, doomed = [], []
            for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
                rel = path.relative_to(folder).as_posix()
                st = os.lstat(path)
                blob = by_inode.get((st.st_dev, st.st_ino)) if not path.is_symlink() else None
                (kept if blob is not None and not rel.endswith(PARTIAL_SUFFIX) else doomed).append((rel, blob))
            with store.open_dir(folder) as model:
                delete_files(model, [rel for rel, _ in doomed], partials=False)
            dropped += len(doomed)
            folders += 1
            if not kept:
                remove_empty_folders(store.open_dir, folder, base)
                continue
            chunk_size = default_chunk_size(sum(size for _, (_, size) in kept))
            key = str(ref)
            store.index.begin_model(key, ref.model_id, ref.revision, str(folder), chunk_size,
                                    [(rel, size, sha) for rel, (sha, size) in kept])
            for rel, (sha, size) in kept:
                fd = store.blobs.open(sha)
                try:
                    chunks, _ = hash_fd(fd, size, chunk_size, sha256=False)
                finally:
                    os.close(fd)
                store.index.record_chunks(key, rel, list(chunks), "local")
                store.index.set_file(key, rel, complete=True, linked=LINKED)
                store.index.add_blob(sha, size, False)
    return folders, dropped


def _verified_chunks(store, model, entry, chunk_size: int) -> tuple[str, list[int]] | None:
    """(the name the bytes are under, the chunk indices whose BLAKE3 matches) for one file."""
    try:
        parent, name = model.parent_of(entry.path)
    except (FileNotFoundError, UnsafePath, NotADirectoryError):
        return None
    with parent:
        for candidate in (name, name + PARTIAL_SUFFIX):
            try:
                fd = parent.open_file(candidate, os.O_RDONLY)
            except (FileNotFoundError, UnsafePath):
                continue
            try:
                if os.fstat(fd).st_size != entry.size:
                    continue
                good = []
                for index, digest in enumerate(entry.chunks):
                    offset, length = chunk_span(entry.size, chunk_size, index)
                    if blake3_hash(os.pread(fd, length, offset), parallel=True) == digest:
                        good.append(index)
                return candidate, good
            finally:
                os.close(fd)
    return None

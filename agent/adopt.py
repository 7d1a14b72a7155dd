"""``shoal import DIR --as OWNER/NAME``: adopt what a lab already downloaded (a
``huggingface_hub`` or ``modelscope`` cache snapshot, or any copy) instead of fetching it.

Each file the plan names is looked for at the same path below ``DIR`` (symbolic links
followed, as a hub cache's snapshot folders are links into its blobs); a regular file of
the planned size is hashed (SHA-256 and the BLAKE3 chunks, one read, files in parallel)
and kept only when it matches the plan: the origin's SHA-256, and every chunk of a
trusted manifest. A match becomes a blob of the cache (``agent.store.blobs``): hard-linked
when it is this user's file on the cache's file system, moved with ``--move``, copied
otherwise; never trusted unhashed. The pull that follows links the blobs into the model
folder and fetches only what did not match (``agent.pull``).

Blocking (call it in a worker thread). Error handling: a file that cannot be read or does
not match is reported, not fatal: it is fetched.
"""

from __future__ import annotations

import errno
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from agent import crashpoints
from agent.errors import UnsafePath, UsageError
from agent.manifest import FileEntry
from agent.store.blobs import blob_name
from agent.store.content import hash_fd

HASH_THREADS = max(1, min(4, os.cpu_count() or 1))  # hashlib drops the GIL: files hash in parallel


@dataclass
class Adopted:
    """What an import found: files kept (by path), and why the others were not."""

    kept: dict[str, int] = field(default_factory=dict)  # path -> bytes
    chunks: dict[str, tuple[bytes, ...]] = field(default_factory=dict)  # path -> its BLAKE3 chunks, as hashed
    refused: dict[str, str] = field(default_factory=dict)  # path -> why (then fetched)
    how: dict[str, str] = field(default_factory=dict)  # path -> "linked" | "moved" | "copied"

    @property
    def bytes(self) -> int:
        return sum(self.kept.values())


def check_source(directory: Path) -> Path:
    source = Path(os.path.realpath(directory))
    if not source.is_dir():
        raise UsageError(f"{directory} is not a folder to import from")
    return source


def adopt(store, entries: tuple[FileEntry, ...], chunk_size: int, trusted: bool, source: Path,
          move: bool = False) -> Adopted:
    """Hash the files of ``source`` the plan names and make the matching ones blobs; see
    module docstring. Files the cache holds already (as blobs) are left alone."""
    found = Adopted()
    wanted = []
    for entry in entries:
        if store.blobs.holds(entry.sha256, entry.size):
            continue  # held already: the pull links it
        candidate = source / entry.path
        try:
            real = Path(os.path.realpath(candidate))
            st = os.stat(real)
        except OSError:
            found.refused[entry.path] = "not in the folder"
            continue
        if not stat.S_ISREG(st.st_mode):
            found.refused[entry.path] = "not a regular file"
        elif st.st_size != entry.size:
            found.refused[entry.path] = f"{st.st_size} bytes, the origin lists {entry.size}"
        else:
            wanted.append((entry, real))

    blob_dev = os.fstat(store.blobs.dir.fd).st_dev

    def check(item):
        entry, real = item
        st = os.stat(real)
        # This user's file on the cache's file system becomes the blob itself (hashed first);
        # any other (another file system, another user's: the agent serves only its own)
        # is copied into a temporary blob and hashed in the same read.
        linkable = st.st_uid == os.geteuid() and st.st_dev == blob_dev
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if linkable:
                chunks, sha = hash_fd(fd, entry.size, chunk_size, sha256=True)
                tmp = None
            else:
                tmp, chunks, sha = _copy_hashing(store, fd, entry, chunk_size)
        finally:
            os.close(fd)
        why = None
        if sha != entry.sha256:
            why = "its SHA-256 is not the origin's"
        elif trusted and entry.chunks is not None and chunks != tuple(entry.chunks):
            why = "its chunks do not match the manifest"
        if why is not None and tmp is not None:
            store.blobs.tmp.unlink(tmp, missing_ok=True)
        return entry, real, tmp, why, chunks

    with ThreadPoolExecutor(HASH_THREADS) as pool:
        for entry, real, tmp, why, chunks in pool.map(check, wanted):
            if why is not None:
                found.refused[entry.path] = why
                continue
            try:
                found.how[entry.path] = _into_blobs(store, entry, real, tmp, move)
                found.kept[entry.path] = entry.size
                found.chunks[entry.path] = chunks
            except (OSError, UnsafePath) as e:
                found.refused[entry.path] = f"could not be kept ({e})"
    return found


def _copy_hashing(store, src: int, entry: FileEntry, chunk_size: int) -> tuple[str, tuple[bytes, ...], bytes]:
    """Copy ``src`` to a temporary name in the blob folder, hashing what is written."""
    import hashlib
    from agent.hashing import blake3_hash
    from agent.manifest import chunk_count, chunk_span
    tmp = store.blobs.tmp_name("import")
    dst = store.blobs.tmp.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sha, chunks = hashlib.sha256(), []
    try:
        for index in range(chunk_count(entry.size, chunk_size)):
            offset, length = chunk_span(entry.size, chunk_size, index)
            data = os.pread(src, length, offset)
            if len(data) != length:
                raise OSError(errno.EIO, "the file shrank while it was read")
            chunks.append(blake3_hash(data))
            sha.update(data)
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view):]
        os.fsync(dst)
    except BaseException:
        os.close(dst)
        store.blobs.tmp.unlink(tmp, missing_ok=True)
        raise
    os.close(dst)
    return tmp, tuple(chunks), sha.digest()


def _into_blobs(store, entry: FileEntry, real: Path, tmp: str | None, move: bool) -> str:
    """Make the hashed, matching file (``real`` itself, or its copy ``tmp``) the blob of
    ``entry.sha256``; how it got there."""
    blobs = store.blobs
    name = blob_name(entry.sha256)
    with blobs.lock():
        if blobs.holds(entry.sha256, entry.size):
            if tmp is not None:
                blobs.tmp.unlink(tmp, missing_ok=True)
            return "linked"
        # The row first: a kill before the file leaves a row without a blob, which the sweep
        # drops; a blob without a row would be held by the folder's link (the source file).
        store.index.add_blob(entry.sha256, entry.size, True)
        if tmp is not None:
            os.rename(tmp, name, src_dir_fd=blobs.tmp.fd, dst_dir_fd=blobs.dir.fd)
            how = "copied"
        elif move:
            os.rename(real, name, dst_dir_fd=blobs.dir.fd)
            how = "moved"
        else:
            os.link(real, name, dst_dir_fd=blobs.dir.fd, follow_symlinks=False)
            how = "linked"
        crashpoints.reached("import:placed")
        blobs.fsync()
        return how

"""Verified files kept by content: ``CACHE/blobs/{sha256 hex}``, hard-linked into model folders.

A model folder's file and its blob are one inode, so a folder never names missing bytes
(the kernel counts the links) and a file two models share is on disk once. A blob is
made only by linking a file the store has proven (``Content.finish``), so a folder file
that *is* the blob of its SHA-256 (same inode) is proven: that is what lets a pull killed
between linking and recording finish without re-reading anything.

Nothing here knows the index; ``agent.store.content`` decides when to link and remove.
Every operation is relative to the blob folder's handle and follows no link
(``agent.safefs``). Where the file system cannot link (another file system, a
``--to`` folder elsewhere) ``Unlinkable`` says so and the caller copies instead.

Resource handling: ``close`` closes the folder handle; safe twice. ``lock`` serialises
the link-or-remove decisions of every process of this cache (an ``flock``), so a blob
is never removed while another pull links it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from contextlib import contextmanager

from agent.errors import ShoalError, UnsafePath
from agent.safefs import SafeDir

COPY_BLOCK = 8 * 1024 * 1024


class Unlinkable(ShoalError):
    """This file system cannot hard-link here (another file system, too many links)."""


def blob_name(sha256: bytes) -> str:
    return sha256.hex()


class Blobs:
    """See module docstring. ``root``: the cache folder's handle (not taken over)."""

    def __init__(self, root: SafeDir):
        self.dir = root.subdir("blobs", create=True)
        # Names being made (a link about to be renamed into a folder, an import's copy)
        # live here, each tagged with its process id: a kill leaves them where the sweep
        # finds them (``clear_stale``), never in a model folder or among the blobs.
        self.tmp = root.subdir("tmp", create=True)
        with root.subdir("locks", create=True) as locks:
            self._lock_fd = locks.open_file("blobs.lock", os.O_RDWR | os.O_CREAT, 0o600, writing=False)
        self._thread_lock = threading.RLock()
        self._depth = 0

    def close(self) -> None:
        self.dir.close()
        self.tmp.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    @contextmanager
    def lock(self):
        """Exclusive, across the processes of this cache and the threads of this one (reentrant)."""
        with self._thread_lock:
            if self._depth == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------- reading

    def stat(self, sha256: bytes) -> os.stat_result | None:
        st = self.dir.stat(blob_name(sha256))
        return st if st is not None and stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() else None

    def holds(self, sha256: bytes, size: int) -> bool:
        st = self.stat(sha256)
        return st is not None and st.st_size == size

    def is_blob(self, sha256: bytes, st: os.stat_result | None) -> bool:
        """Whether ``st`` (a folder file's lstat) is the blob of ``sha256``: the same inode."""
        blob = self.stat(sha256)
        return blob is not None and st is not None and (blob.st_dev, blob.st_ino) == (st.st_dev, st.st_ino)

    def open(self, sha256: bytes) -> int:
        """A read-only fd of the blob (``FileNotFoundError`` when there is none)."""
        return self.dir.open_file(blob_name(sha256), os.O_RDONLY)

    def names(self) -> list[bytes]:
        """Every blob on disk (the sweep's list); temporary names are left out."""
        out = []
        for name in os.listdir(self.dir.fd):
            if len(name) == 64:
                try:
                    out.append(bytes.fromhex(name))
                except ValueError:
                    continue
        return out

    def links(self, sha256: bytes) -> int:
        st = self.stat(sha256)
        return st.st_nlink if st is not None else 0

    # ------------------------------------------------------------------- writing

    def adopt(self, folder: SafeDir, name: str, sha256: bytes) -> bool:
        """Make ``folder/name`` (a proven file of ours) the blob of ``sha256``: True. False
        when another inode is that blob already (the caller links that one instead).
        ``Unlinkable`` when this file system cannot link it."""
        try:
            os.link(name, blob_name(sha256), src_dir_fd=folder.fd, dst_dir_fd=self.dir.fd, follow_symlinks=False)
            return True
        except FileExistsError:
            return self.is_blob(sha256, folder.stat(name))
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EOPNOTSUPP):
                raise Unlinkable(f"cannot link {folder.path / name} into {self.dir.path}: {e.strerror}") from e
            raise

    def link_into(self, sha256: bytes, folder: SafeDir, name: str) -> None:
        """Put the blob at ``folder/name`` (replacing what is there; never through a link).
        ``Unlinkable`` when this file system cannot link it; ``FileNotFoundError`` when the
        blob is gone."""
        if self.stat(sha256) is None:
            raise FileNotFoundError(f"no blob {blob_name(sha256)}")
        if self.is_blob(sha256, folder.stat(name)):
            return  # there already (a kill came before its record)
        tmp = self.tmp_name("link")
        try:
            os.link(blob_name(sha256), tmp, src_dir_fd=self.dir.fd, dst_dir_fd=self.tmp.fd, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.EMLINK, errno.EPERM, errno.EOPNOTSUPP):
                raise Unlinkable(f"cannot link a blob into {folder.path}: {e.strerror}") from e
            raise
        try:
            os.rename(tmp, name, src_dir_fd=self.tmp.fd, dst_dir_fd=folder.fd)
            # A rename onto another link of the same file does nothing, and leaves ``tmp``.
            self.tmp.unlink(tmp, missing_ok=True)
        except OSError as e:
            self.tmp.unlink(tmp, missing_ok=True)
            if e.errno == errno.EXDEV:
                raise Unlinkable(f"{folder.path} is on another file system than the cache") from e
            raise
        except BaseException:
            self.tmp.unlink(tmp, missing_ok=True)
            raise

    @staticmethod
    def tmp_name(purpose: str) -> str:
        return f"{os.getpid()}.{threading.get_ident()}.{purpose}"

    def clear_stale(self) -> int:
        """Remove the temporary names of processes that are gone (killed mid-move)."""
        removed = 0
        for name in os.listdir(self.tmp.fd):
            pid = name.partition(".")[0]
            if pid.isdigit() and not _alive(int(pid)):
                self.tmp.unlink(name, missing_ok=True)
                removed += 1
        return removed

    def copy_into(self, sha256: bytes, folder: SafeDir, name: str) -> None:
        """Copy the blob's bytes to ``folder/name`` (a folder the blob cannot be linked into):
        written under a temporary name, synced, then renamed into place."""
        tmp = f".{name}.{os.getpid()}.copy"
        src = self.open(sha256)
        try:
            folder.unlink(tmp, missing_ok=True)
            dst = folder.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                size, offset = os.fstat(src).st_size, 0
                while offset < size:
                    n = os.copy_file_range(src, dst, min(COPY_BLOCK, size - offset), offset, offset)
                    if n <= 0:
                        raise OSError(errno.EIO, "short copy")
                    offset += n
                os.fsync(dst)
            finally:
                os.close(dst)
            folder.rename(tmp, name)
        except BaseException:
            folder.unlink(tmp, missing_ok=True)
            raise
        finally:
            os.close(src)

    def remove(self, sha256: bytes) -> None:
        self.dir.unlink(blob_name(sha256), missing_ok=True)

    def fsync(self) -> None:
        self.dir.fsync()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def same_file(a: os.stat_result | None, b: os.stat_result | None) -> bool:
    return a is not None and b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def check_regular(folder: SafeDir, name: str) -> os.stat_result:
    """The lstat of ``folder/name``, a regular file of ours; ``UnsafePath`` else."""
    st = folder.stat(name)
    if st is None:
        raise FileNotFoundError(str(folder.path / name))
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        raise UnsafePath(f"{folder.path / name} is not a regular file of this user; remove it and try again")
    return st

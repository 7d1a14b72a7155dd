"""Files the agent touches, opened relative to directory handles and never through a link.

Every file the agent creates, writes, renames, serves or removes lies under a directory it
opened itself: the cache, or the folder a pull was told to fill (``--to``). Paths below
that directory are walked one component at a time with ``O_NOFOLLOW | O_DIRECTORY``
(``openat``-style, through ``dir_fd``), so a symbolic link planted anywhere below it
(``seed.bin.partial -> CACHE/identity.key``, a model folder swapped for a link to another
model) makes the operation fail with ``UnsafePath`` instead of following the link.

What the agent writes or serves must also be *its own*: every folder and file below a
root, and the root itself, must belong to the user the agent runs as, and a file it
writes must have one link (a hard link to another file would write through to it). A
file another user planted in a shared folder is refused, never written into or served.

Resource handling: a ``SafeDir`` holds one directory fd; ``close()`` is safe twice, and
it is a context manager. Everything here blocks: call it from a worker thread in async code.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from agent.errors import UnsafePath

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a planted FIFO cannot hang us


def _owner_problem(st: os.stat_result, where: str) -> str | None:
    uid = os.geteuid()
    if st.st_uid != uid:
        return (f"{where} belongs to uid {st.st_uid}, not to uid {uid} that shoal runs as; shoal writes "
                "and serves only what it owns. Remove it, or choose a folder of your own")
    return None


def _refuse_link(e: OSError, where: str) -> None:
    if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        raise UnsafePath(f"{where} is a symbolic link or not a directory; shoal never follows links "
                         "where it writes or serves files. Remove the link and try again") from None


class SafeDir:
    """An open directory; every operation is relative to it and follows no link."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, Path(path)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = False, mode: int = 0o755) -> "SafeDir":
        """Open the absolute folder ``path`` (its existing part resolved once, as the caller
        named it), then walk it from ``/`` without following links; ``create`` makes the
        missing folders. The folder itself must belong to this process's user."""
        real = Path(os.path.realpath(os.path.abspath(path)))
        parts = real.parts[1:]
        fd = os.open("/", _DIR_FLAGS)
        if not parts:
            try:
                _check_dir_owner(fd, "/")
            except BaseException:
                os.close(fd)
                raise
        walked = Path("/")
        for i, part in enumerate(parts):  # each step takes over (and closes) the fd before it
            walked = walked / part
            fd = _step(fd, part, walked, create=create, mode=mode, check_owner=i == len(parts) - 1)
        return cls(fd, real)

    def subdir(self, rel: str, *, create: bool = False, mode: int = 0o755) -> "SafeDir":
        """The folder ``rel`` (a checked relative path) below this one, walked without links."""
        parts = _parts(rel)
        fd = os.dup(self.fd)
        path = self.path
        for part in parts:  # each step takes over (and closes) the fd before it
            path = path / part
            fd = _step(fd, part, path, create=create, mode=mode, check_owner=True)
        return SafeDir(fd, path)

    def parent_of(self, rel: str, *, create: bool = False) -> tuple["SafeDir", str]:
        """(the folder holding ``rel``, its last component)."""
        head, _, name = rel.rpartition("/")
        return (self.subdir(head, create=create) if head else SafeDir(os.dup(self.fd), self.path)), name

    # ------------------------------------------------------------------- files

    def open_file(self, name: str, flags: int, mode: int = 0o644, *, writing: bool | None = None) -> int:
        """An fd of the regular file ``name`` here (no link followed); refused when it is not
        a regular file of ours, or (when ``writing``) has other hard links."""
        where = str(self.path / name)
        writing = bool(flags & (os.O_WRONLY | os.O_RDWR)) if writing is None else writing
        try:
            fd = os.open(name, flags | _FILE_FLAGS, mode, dir_fd=self.fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePath(f"{where} is a symbolic link; shoal never follows links where it writes or "
                                 "serves files. Remove it and try again") from None
            raise
        try:
            st = os.fstat(fd)
            problem = None
            if not stat.S_ISREG(st.st_mode):
                problem = f"{where} is not a regular file; remove it and try again"
            else:
                problem = _owner_problem(st, where)
                if problem is None and writing and st.st_nlink > 1:
                    problem = (f"{where} has {st.st_nlink} hard links; writing it would change another "
                               "file too. Remove it and try again")
            if problem:
                raise UnsafePath(problem)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_bytes(self, name: str, limit: int | None = None) -> bytes:
        fd = self.open_file(name, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if limit is not None and size > limit:
                raise UnsafePath(f"{self.path / name} is {size} bytes, more than the {limit} allowed")
            chunks, got = [], 0
            while True:
                data = os.read(fd, 1 << 20)
                if not data:
                    return b"".join(chunks)
                got += len(data)
                if limit is not None and got > limit:
                    raise UnsafePath(f"{self.path / name} grew past {limit} bytes while being read")
                chunks.append(data)
        finally:
            os.close(fd)

    def write_atomic(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Write ``data`` to a fresh temporary file, fsync it and rename it over ``name``."""
        tmp = f".{name}.{os.getpid()}.tmp"
        self.unlink(tmp, missing_ok=True)
        fd = self.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.rename(tmp, name)

    def stat(self, name: str) -> os.stat_result | None:
        """``lstat`` of ``name`` here, or None when it does not exist."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def is_own_file(self, name: str, size: int | None = None) -> bool:
        """A regular file of ours (of ``size`` bytes, if given), not a link."""
        st = self.stat(name)
        return (st is not None and stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
                and (size is None or st.st_size == size))

    def rename(self, src: str, dst: str) -> None:
        """Rename within this folder (a link at ``dst`` is replaced, never followed)."""
        os.rename(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def unlink(self, name: str, *, missing_ok: bool = False) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmdir_if_empty(self, name: str) -> bool:
        try:
            os.rmdir(name, dir_fd=self.fd)
            return True
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.ENOTDIR):
                return False
            raise

    def fsync(self) -> None:
        os.fsync(self.fd)

    # ----------------------------------------------------------------- lifetime

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "SafeDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parts(rel: str) -> list[str]:
    parts = [p for p in rel.split("/") if p]
    for part in parts:
        if part in (".", ".."):
            raise UnsafePath(f"path {rel!r} has a {part!r} component")
    return parts


def _check_dir_owner(fd: int, where: str) -> None:
    problem = _owner_problem(os.fstat(fd), where)
    if problem:
        raise UnsafePath(problem)


def _step(dir_fd: int, name: str, where: Path, *, create: bool, mode: int, check_owner: bool) -> int:
    """Open folder ``name`` below ``dir_fd`` (making it if asked). ``dir_fd`` is closed
    whatever happens: the caller must not close it again."""
    try:
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(name, mode, dir_fd=dir_fd)
            except FileExistsError:
                pass  # made meanwhile by someone else; what it is gets checked below
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        _refuse_link(e, str(where))
        raise
    finally:
        os.close(dir_fd)
    if check_owner:
        try:
            _check_dir_owner(fd, str(where))
        except BaseException:
            os.close(fd)
            raise
    return fd


def overlaps(a: Path, b: Path) -> bool:
    """Whether one folder is, or lies inside, the other (both resolved)."""
    a, b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return a == b or a in b.parents or b in a.parents

"""Per-revision lock files (``CACHE/locks/``): a pull holds its model's exclusively, a job,
a chat or a served download shares it, so eviction never removes a model in use and two
pulls of one revision never run at once. ``flock`` locks: the kernel drops them with the
process, so a kill leaves none behind.

Resource handling: ``close`` releases every lock this object holds; safe twice.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from agent.errors import StoreLocked
from agent.manifest import ModelRef
from agent.safefs import SafeDir
from agent.store.folders import hold_in_use, lock_name


class ModelLocks:
    def __init__(self, root: Path, locks: SafeDir):
        self.root, self._dir = root, locks
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}

    def _lock_fd(self, ref: ModelRef) -> int:
        return self._dir.open_file(lock_name(ref), os.O_RDWR | os.O_CREAT, 0o600, writing=False)

    def in_use(self, ref: ModelRef) -> bool:
        """True while any process pulls ``ref`` (exclusive lock) or uses it (``use``, shared lock)."""
        try:
            fd = self._lock_fd(ref)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the probe's lock, if it got one

    def use(self, ref: ModelRef) -> int:
        """Take a shared "in use" lock on ``ref`` (a served download, a running job); returns
        the fd to close when done. Eviction never removes a model in use."""
        return hold_in_use(self.root, ref)

    def lock(self, ref: ModelRef) -> None:
        """Take the per-revision pull lock (held until ``unlock`` or process exit)."""
        fd = self._lock_fd(ref)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(f"another shoal process is pulling or using {ref} (a pull, a running job, a "
                              "download through the gateway); wait for it to finish (or stop it) and try again") from None
        with self._lock:
            self._held[str(ref)] = fd

    def unlock(self, ref: ModelRef) -> None:
        with self._lock:
            fd = self._held.pop(str(ref), None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            for fd in self._held.values():
                os.close(fd)
            self._held.clear()

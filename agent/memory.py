"""A long-running agent's resident memory kept to what it uses (glibc's allocator only).

Why: every thread that allocates gets a malloc arena of its own (up to eight per core), and
an arena keeps the memory freed in it. The agent's worker threads come and go (the thread
cache of trio, the data server's senders), so its resident size rose in steps as new
threads filled new arenas: a 60-minute soak showed seven thread arenas of 4-5 MB each beside
a 19 MB main heap, and RSS steps of 1-4 MB that never came back (benchmarks/soak.py).

- ``limit_arenas``: at most ``ARENAS`` arenas (as ``MALLOC_ARENA_MAX`` would; called before
  the agent starts threads), so freed memory is reused rather than stranded;
- ``trim_forever``: ``malloc_trim(0)`` every ``TRIM_EVERY`` seconds, which hands the free
  pages of every arena back to the system.

Elsewhere (musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import trio

log = logging.getLogger("shoal.memory")

ARENAS = 2
TRIM_EVERY = 60.0
M_ARENA_MAX = -8  # glibc's malloc.h

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc = libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas; True when it took."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_ARENA_MAX, arenas) == 1)


def trim() -> bool:
    """Give the free pages of every arena back to the system; True when some were."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))


async def trim_forever(every: float = TRIM_EVERY) -> None:
    if _glibc() is None:
        return
    while True:
        await trio.sleep(every)
        await trio.to_thread.run_sync(trim)

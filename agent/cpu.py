"""Where an agent's CPU goes: the control plane against the data plane, and its peak memory.

- **control plane**: the trio event-loop thread (the process's main thread): libp2p (Noise,
  Yamux, multistream), the swarm's asks and answers, the picker, the control API, the
  gateway. Read from ``/proc/self/task/<pid>/stat``.
- **data plane**: the threads that move and check chunk bytes, measured in those threads
  with ``time.thread_time`` around each part: ``recv`` (a source filling the buffer),
  ``hash`` (BLAKE3), ``write`` (``pwrite`` and the index row), ``send`` (serving a peer).
- **other**: the rest of the process (discovery threads, idle worker threads, start-up).

``LEDGER.account(part)`` is a context manager; ``snapshot()`` is what ``shoal status`` shows.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

PARTS = ("recv", "hash", "write", "send")


class CpuLedger:
    def __init__(self):
        self._lock = threading.Lock()
        self._seconds = dict.fromkeys(PARTS, 0.0)

    @contextmanager
    def account(self, part: str):
        started = time.thread_time()
        try:
            yield
        finally:
            spent = time.thread_time() - started
            with self._lock:
                self._seconds[part] += spent

    def add(self, **spent: float) -> None:
        """Add CPU seconds measured by the caller (``time.thread_time`` differences) to parts:
        the hot path's way, one lock for several parts and no context manager per part."""
        with self._lock:
            for part, seconds in spent.items():
                self._seconds[part] += seconds

    def seconds(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)


LEDGER = CpuLedger()


def _ticks(path: str) -> float:
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def peak_rss() -> int:
    """The process's peak resident memory in bytes (VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def snapshot() -> dict:
    """CPU seconds so far: total, control plane, data plane (by part), other; peak RSS."""
    total = sum(os.times()[:2])
    control = _ticks(f"/proc/self/task/{os.getpid()}/stat")
    data = LEDGER.seconds()
    return {"total_s": round(total, 3), "control_s": round(control, 3),
            "data_s": round(sum(data.values()), 3), "data_by_part_s": {k: round(v, 3) for k, v in data.items()},
            "other_s": round(max(0.0, total - control - sum(data.values())), 3), "peak_rss_bytes": peak_rss()}


def process_started() -> float:
    """When this process started (seconds since the epoch), from the kernel's record."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return time.time()

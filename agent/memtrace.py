"""Where an agent's memory grows, for long runs (benchmarks/soak.py --tracemalloc).

With ``SHOAL_TRACEMALLOC=FILE`` the agent traces its Python allocations (``tracemalloc``,
``FRAMES`` frames each; ``PYTHONTRACEMALLOC`` starts it with the interpreter) and, every ``EVERY`` seconds after a baseline taken at ``WARMUP``,
rewrites FILE with the total traced and the allocation sites that grew most since the
baseline. A debugging aid, off by default: tracing slows the agent and costs memory of
its own. Growth outside Python's allocator (SQLite's page cache, the C libraries) does not
show here; the soak's RSS samples show it.
"""

from __future__ import annotations

import logging
import os
import time
import tracemalloc

import trio

log = logging.getLogger("shoal.memtrace")

FRAMES = 6
WARMUP = 120.0
EVERY = 60.0
TOP = 30


def requested() -> str | None:
    return os.environ.get("SHOAL_TRACEMALLOC") or None


def _snapshot() -> tracemalloc.Snapshot:
    return tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])


def _report(baseline: tracemalloc.Snapshot, started: float) -> str:
    now = _snapshot()
    current, peak = tracemalloc.get_traced_memory()
    lines = [f"after {time.monotonic() - started:.0f} s: traced {current / 1e6:.2f} MB (peak {peak / 1e6:.2f} MB)",
             f"growth since the baseline at {WARMUP:.0f} s, by allocation site:"]
    for stat in now.compare_to(baseline, "traceback")[:TOP]:
        if stat.size_diff <= 0:
            break
        lines.append(f"{stat.size_diff / 1e3:+10.1f} kB {stat.count_diff:+7d} blocks")
        lines.extend(f"      {frame.filename}:{frame.lineno}" for frame in stat.traceback)
    return "\n".join(lines) + "\n"


def _write_report(path: str, baseline: tracemalloc.Snapshot, started: float) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(_report(baseline, started))
    os.replace(tmp, path)


async def follow(path: str) -> None:
    """Rewrite ``path`` with the growth report every ``EVERY`` seconds, forever."""
    if not tracemalloc.is_tracing():
        tracemalloc.start(FRAMES)
    started = time.monotonic()
    await trio.sleep(WARMUP)
    # Snapshots and the file are a worker thread's: a snapshot of a large heap takes a while.
    baseline = await trio.to_thread.run_sync(_snapshot)
    log.info("tracing memory: growth reports in %s", path)
    while True:
        await trio.sleep(EVERY)
        await trio.to_thread.run_sync(_write_report, path, baseline, started)

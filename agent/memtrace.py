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


def _report(baseline: tracemalloc.Snapshot, started: float) -> str:
    now = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    current, peak = tracemalloc.get_traced_memory()
    lines = [f"after {time.monotonic() - started:.0f} s: traced {current / 1e6:.2f} MB (peak {peak / 1e6:.2f} MB)",
             f"growth since the baseline at {WARMUP:.0f} s, by allocation site:"]
    for stat in now.compare_to(baseline, "traceback")[:TOP]:
        if stat.size_diff <= 0:
            break
        lines.append(f"{stat.size_diff / 1e3:+10.1f} kB {stat.count_diff:+7d} blocks")
        lines.extend(f"      {frame.filename}:{frame.lineno}" for frame in stat.traceback)
    return "\n".join(lines) + "\n"


async def follow(path: str) -> None:
    """Rewrite ``path`` with the growth report every ``EVERY`` seconds, forever."""
    if not tracemalloc.is_tracing():
        tracemalloc.start(FRAMES)
    started = time.monotonic()
    await trio.sleep(WARMUP)
    baseline = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    log.info("tracing memory: growth reports in %s", path)
    while True:
        await trio.sleep(EVERY)
        text = await trio.to_thread.run_sync(_report, baseline, started)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

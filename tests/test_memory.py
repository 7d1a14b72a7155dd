"""agent.memory: what glibc's allocator keeps after threads free their memory is handed back
(the long-running agent's resident size follows what it uses; benchmarks/soak.py)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

PROBE = r"""
import threading
from agent import memory

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

assert memory.limit_arenas()
kept = []
held = threading.Barrier(8)
def churn():  # 48 MB in blocks malloc keeps in its arenas (below its mmap threshold), freed, each
    blocks = []  # with a small long-lived object after it: free pages in the middle of the heap,
    for _ in range(96):  # which malloc does not give back by itself (as a server's heap ends up)
        blocks.append(bytearray(64 * 1024))
        kept.append(bytearray(600))
    held.wait(30)  # all eight hold theirs at once: 48 MB in use together, then all freed
    blocks.clear()
threads = [threading.Thread(target=churn) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
before = rss_mb()
trimmed = memory.trim()
print(before, rss_mb(), trimmed)
"""


def _run() -> tuple[float, float, bool]:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=True).stdout.split()
    return float(out[0]), float(out[1]), out[2] == "True"


def test_freed_memory_goes_back_to_the_system_after_a_trim():
    before, after, trimmed = _run()
    assert trimmed and after < before - 24, (before, after)

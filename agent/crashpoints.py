"""Named moments in the store's moves where a kill tells the most, for the crash campaign
(``benchmarks/crash.py``, ``tests/test_crash.py``). Off unless the environment asks, so
each costs one test of a module constant:

- ``SHOAL_CRASH_AT=NAME[:N]`` kills this process with SIGKILL the Nth time (default 1st)
  it reaches ``NAME``: a kill at exactly that moment, as a power cut or an OOM kill would;
- ``SHOAL_CRASH_LOG=FILE`` appends each point reached to ``FILE`` (what a campaign covered).
"""

from __future__ import annotations

import os
import signal
import threading

_AT = os.environ.get("SHOAL_CRASH_AT") or None
_LOG = os.environ.get("SHOAL_CRASH_LOG") or None
ACTIVE = bool(_AT or _LOG)
_name, _, _count = (_AT or "").rpartition(":")  # point names have colons of their own
if not _count.isdigit():
    _name, _count = _AT or "", "1"
_target = int(_count)
_seen = 0
_lock = threading.Lock()


def reached(name: str) -> None:
    """This process is at ``name`` (see module docstring)."""
    if not ACTIVE:
        return
    global _seen
    with _lock:
        if _LOG:
            with open(_LOG, "a") as log:
                log.write(name + "\n")
        if name == _name:
            _seen += 1
            if _seen == _target:
                os.kill(os.getpid(), signal.SIGKILL)

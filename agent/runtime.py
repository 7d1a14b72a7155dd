"""Running trio work from a blocking command: SIGTERM stops it as Ctrl-C does; the
long-running agent's memory settings."""

from __future__ import annotations

import os
import signal

from agent.errors import Terminated, single_error


def run_until_signal(async_fn):
    """``trio.run(async_fn)``, where SIGTERM cancels the work as Ctrl-C does: chunks being
    written finish (worker threads are not abandoned), verified chunks are kept."""
    import trio  # only in-process work needs it: a command the agent serves starts faster without

    async def main():
        outcome = {}
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    async def stop_on_signal():
                        async for _ in signals:
                            nursery.cancel_scope.cancel()
                            return
                    nursery.start_soon(stop_on_signal)
                    outcome["value"] = await async_fn()
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                raise single_error(group) from None
        if "value" not in outcome:
            raise Terminated("terminated by SIGTERM; verified chunks are kept, run the same command to resume")
        return outcome["value"]
    return trio.run(main)


M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX does) before threads start. The agent
    runs many short-lived worker threads (chunk reads and writes, uploads); by default
    each may get an arena of its own, and their free but unreturned memory adds tens of
    MB to a 30-peer agent's resident size for no speed the benchmark can see. False where
    this is not glibc."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False  # the person chose
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False

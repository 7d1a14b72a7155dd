"""Running trio work from a blocking command: SIGTERM stops it as Ctrl-C does."""

from __future__ import annotations

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


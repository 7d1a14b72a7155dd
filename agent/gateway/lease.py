"""The gateway's hold on one pull: which files and chunks of it are proven yet.

A tool's GET of a file that is not cached starts (or joins) the pull of the whole revision
through the pull coordinator and is answered as soon as its bytes are proven
(``agent.gateway.serve``). A ``PullLease`` is that hold: it follows the pull's events and
keeps what the waiting requests ask about, the files finished and, under a trusted
manifest, the chunks verified (each against the manifest's BLAKE3, so each is proven the
moment it lands).

Lifetime: one lease per revision at a time, run in the gateway's nursery. It lets go of
the pull (which stops when nobody else follows it, keeping what it verified) once no
request uses it: at once when the only client hung up before it got a byte, else after
``LINGER`` seconds, so a tool that asks for a revision's files one by one (transformers
reads ``config.json``, then the weights, then the tokenizer) finds the pull still running.

Events can be dropped (a follower's channel is bounded, ``agent.pulls``), so a waiter
never trusts them alone: it re-reads the store every ``POLL`` seconds.
"""

from __future__ import annotations

import logging
import time

import trio

from agent.errors import NotFound, ShoalError
from agent.manifest import ModelRef
from agent.pull import PlanReady
from agent.scheduler import ChunkFetched, FileDone

log = logging.getLogger("shoal.gateway")

LINGER = 30.0  # seconds a pull is held after its last request was served
POLL = 1.0  # seconds between re-reads of the store while waiting (events may be dropped)


class PullLease:
    """See module docstring. ``users`` is how many requests use it now."""

    def __init__(self, ref: ModelRef, pulls, uid: int):
        self.ref, self._pulls, self._uid = ref, pulls, uid
        self.scope = trio.CancelScope()
        self.plan: PlanReady | None = None
        self.finished: set[str] = set()  # files the pull finished (proven, in their folder)
        self.verified: dict[str, set[int]] = {}  # trusted plan: chunks verified, by file
        self.ended = False
        self.completed = False  # the pull ended with the whole revision in the cache
        self.error: ShoalError | None = None
        self.users = 0
        self.served = False  # some request got bytes through it
        self.active = None  # the pull (agent.pulls.ActivePull), once started or joined
        self._idle_since = time.monotonic()
        self._changed = trio.Event()

    # ------------------------------------------------------------------ the pull

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start or join the pull and follow it until it ends or the lease expires."""
        with self.scope:
            active = self.active = self._pulls.start(self.ref, None)
            log.info("gateway: uid %d %s the pull of %s", self._uid, "joined" if active.holders else "started",
                     self.ref)
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expire)
                try:
                    await self._pulls.follow(active, self._on_event)
                    self.completed = True
                except ShoalError as e:
                    self.error = e
                nursery.cancel_scope.cancel()
        self.ended = True
        self._poke()

    async def _on_event(self, event) -> None:
        if isinstance(event, PlanReady):
            self.plan = event
        elif isinstance(event, FileDone):
            self.finished.add(event.path)
        elif isinstance(event, ChunkFetched) and self.trusted:
            self.verified.setdefault(event.path, set()).add(event.index)
        else:
            return
        self._poke()

    async def _expire(self) -> None:
        while True:
            await trio.sleep(POLL)
            if self.users == 0 and time.monotonic() - self._idle_since >= (LINGER if self.served else 0):
                self.scope.cancel()
                return

    # ------------------------------------------------------------------ the users

    def acquire(self) -> None:
        self.users += 1

    def release(self, *, gone: bool = False) -> None:
        """A request is done with the lease; ``gone``: its client hung up unserved."""
        self.users -= 1
        if self.users > 0:
            return
        self._idle_since = time.monotonic()
        if gone and not self.served and not self.ended:
            log.info("gateway: uid %d went away while %s was pulled; let go of it", self._uid, self.ref)
            self.scope.cancel()

    def want(self, path: str, index: int, wanted: bool = True) -> None:
        """A reader waits for chunk ``index`` of ``path`` (or no more): the pull takes it first."""
        if self.active is not None:
            (self.active.wanted.add if wanted else self.active.wanted.discard)((path, index))

    @property
    def trusted(self) -> bool:
        return self.plan is not None and self.plan.plan.trusted

    def expected(self, path: str) -> tuple[bytes, ...] | None:
        """The trusted manifest's chunk hashes of ``path`` (None before the plan, or under
        an origin's listing)."""
        if not self.trusted:
            return None
        entry = next((f for f in self.plan.plan.files if f.path == path), None)
        return entry.chunks if entry is not None else None

    def change(self) -> trio.Event:
        """The event set at the next change: take it *before* looking at the state."""
        return self._changed

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_change(self, event: trio.Event) -> bool:
        """Until ``event`` (from ``change``) is set (True), or ``POLL`` seconds (False: the
        caller re-reads the store); raises the pull's error once it ended without success."""
        changed = False
        with trio.move_on_after(POLL):
            await event.wait()
            changed = True
        if self.ended and not self.completed:
            raise self.error or NotFound(f"the pull of {self.ref} stopped before the file was proven")
        return changed

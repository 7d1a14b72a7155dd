"""The agent's pulls: one per model at a time, shared by everyone who asks for it.

``PullCoordinator.start`` returns the running pull of a model or starts one; callers
``follow`` it (events and outcome) and let go of it when they leave. A pull is cancelled
by ``cancel`` or when its last follower goes away. Events travel as the typed events of
``agent.pull`` (``PlanReady``, ``ChunkFetched``, ...); each follower turns them into its
own form (the control API sends ``event_to_wire``'s dicts, the gateway drops them).

Resource handling: pulls run in the nursery given to ``run``; each follower has a
bounded channel (``SUBSCRIBER_BUFFER``): a slow follower loses progress ticks, never the
outcome, and never slows the pull.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import trio

from agent.config import Settings
from agent.errors import Cancelled, NotFound, ShoalError, StoreLocked
from agent.manifest import ModelRef, is_manifest_id
from agent.pull import ChunkFetched, PlanReady, pull, result_to_wire
from agent.picking import Gate
from agent.ratelimit import TokenBucket
from agent.swarm.trust import TrustPolicy

log = logging.getLogger("shoal.agent")

SUBSCRIBER_BUFFER = 512  # events queued per follower before progress events are dropped


@dataclass
class ActivePull:
    """A pull the agent runs; any number of followers take its events."""

    ref: ModelRef
    directory: Path | None
    fresh: bool = False  # from upstream, not the mirror (agent.pull)
    offline: bool = False  # no origin asked (agent.pull)
    adopt_from: Path | None = None  # a folder being imported (agent.adopt)
    move: bool = False
    background: bool = False  # a room assignment's: a person's pull goes first (agent.assign.keeper)
    offers: tuple = ()  # manifests offered besides the peers' (a bundle's: agent.bundle)
    gate: Gate = field(default_factory=Gate)  # closed: the pull starts no new chunk (paused for a person's pull)
    wanted: set = field(default_factory=set)  # (path, index) the gateway's readers wait for: fetched first
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    subscribers: set = field(default_factory=set)
    holders: int = 0
    plan: PlanReady | None = None
    fetched: int = 0
    by_source: dict = field(default_factory=dict)
    result: dict | None = None  # result_to_wire's form
    error: ShoalError | None = None
    cancelled_by: str | None = None

    def emit(self, event) -> None:
        if isinstance(event, PlanReady):
            self.plan = event
        elif isinstance(event, ChunkFetched):
            self.fetched += event.nbytes
            self.by_source[event.source] = self.by_source.get(event.source, 0) + event.nbytes
        for channel in list(self.subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                pass  # a slow follower loses progress ticks, never the outcome (kept on the pull)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.subscribers.discard(channel)

    def snapshot(self) -> dict:
        total = self.plan.plan.total_size if self.plan else 0
        done = (self.plan.already if self.plan else 0) + self.fetched
        return {"model": str(self.ref), "done_bytes": min(done, total), "total_bytes": total,
                "clients": self.holders, "by_source": dict(self.by_source), "background": self.background}


class PullCoordinator:
    """See module docstring. ``observe`` sees every event and ``completed`` every pull that
    ends well (the metrics); ``swarm`` returns the LAN swarm when one runs, for a pull to
    ask first."""

    def __init__(self, settings: Settings, *, sources: list, rate: TokenBucket, trust: TrustPolicy,
                 observe: Callable[[object], None] = lambda event: None,
                 completed: Callable[[], None] = lambda: None,
                 swarm: Callable[[], object | None] = lambda: None):
        self.settings, self.sources, self.rate, self.trust = settings, sources, rate, trust
        self._observe, self._completed, self._swarm = observe, completed, swarm
        self.pulls: dict[str, ActivePull] = {}
        self._nursery: trio.Nursery | None = None
        # Set (and replaced) whenever a person's pull starts or ends: a room assignment's
        # background pull steps aside at once, not at its next look (agent.assign.keeper).
        self.people_changed = trio.Event()

    def _people_changed(self) -> None:
        self.people_changed.set()
        self.people_changed = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Host the pulls until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def __contains__(self, key: str) -> bool:
        return key in self.pulls

    def __iter__(self):
        return iter(list(self.pulls))

    def __len__(self) -> int:
        return len(self.pulls)

    def get(self, ref: ModelRef) -> ActivePull | None:
        return self.pulls.get(str(ref))

    def snapshot(self) -> list[dict]:
        return [p.snapshot() for p in self.pulls.values()]

    def start(self, ref: ModelRef, directory: Path | None, *, fresh: bool = False,
              offline: bool = False, adopt_from: Path | None = None, move: bool = False,
              background: bool = False, offers: tuple = ()) -> ActivePull:
        """The running pull of ``ref``, or a new one (``fresh``: from upstream, not the
        mirror; ``offline``: from no origin; a running pull is joined as it is; ``background``:
        nobody waits for it, a room assignment's). Follow it (``follow``) to hold it."""
        key = str(ref)
        active = self.pulls.get(key)
        if active is not None:
            if not background:
                if active.background:
                    self._people_changed()
                active.background = False  # a person joined it: it is theirs now
                active.gate.open()
            if directory is not None and active.directory is not None and directory != active.directory:
                raise StoreLocked(f"{ref} is being pulled into {active.directory} already; "
                                  "wait for it, or cancel it with `shoal cancel`")
            return active
        active = ActivePull(ref, directory, fresh, offline, adopt_from=adopt_from, move=move, background=background,
                            offers=tuple(offers))
        self.pulls[key] = active
        self._nursery.start_soon(self._run, active)
        if not background:
            self._people_changed()
        return active

    async def room_plan(self, ref: ModelRef):
        """What ``ref`` is made of as a trusted LAN peer's manifest says (``plan.Plan``), or
        None (no swarm, nobody holds it, or no offer this agent may trust): the gateway's
        listing of a model or dataset not cached yet, in an offline room."""
        swarm = self._swarm()
        if swarm is None:
            return None
        from agent.plan import plan_from_offers
        answers, _ = await swarm.asks.offers(ref)
        return plan_from_offers(ref, answers, self.trust)[0] if answers else None

    async def _run(self, active: ActivePull) -> None:
        key = str(active.ref)
        try:
            with active.scope:
                def emit(event) -> None:
                    self._observe(event)
                    active.emit(event)
                session, swarm, offers_s = None, self._swarm(), 0.0
                if swarm is not None:
                    asked = time.monotonic()
                    session = swarm.session(active.ref, await swarm.asks.offers(active.ref))
                    offers_s = round(time.monotonic() - asked, 3)
                    log.info("pull %s: %d offers in %.2f s", key, len(session.offers), offers_s)
                trust = self.trust
                if is_manifest_id(active.ref.revision):  # MODEL@<manifest-id>: the person vouches for it
                    trust = TrustPolicy(trust.publishers, frozenset({active.ref.revision}))
                settings = self.settings.with_(offline=True) if active.offline else self.settings
                result = await pull(active.ref, settings, to=active.directory, emit=emit,
                                    sources=self.sources, rate=self.rate, swarm=session, trust=trust,
                                    fresh=active.fresh, adopt_from=active.adopt_from, move=active.move,
                                    offers=active.offers, gate=active.gate, wanted=active.wanted)
                result.timings["offers_s"] = offers_s  # before the pull's own clock starts
                active.result = result_to_wire(result)
                self._completed()
            if active.scope.cancelled_caught:
                active.error = Cancelled(f"the pull of {active.ref} was cancelled "
                                         f"({active.cancelled_by or 'no client left'}); verified "
                                         "chunks are kept, pull again to resume")
        except ShoalError as e:
            active.error = e
        except Exception as e:  # a bug must not take the agent down with it
            log.exception("pull of %s failed", key)
            active.error = ShoalError(f"internal error in the pull of {key}: {type(e).__name__}: {e}")
        finally:
            self.pulls.pop(key, None)
            if not active.background:
                self._people_changed()
            active.done.set()
            for channel in list(active.subscribers):
                channel.close()
            log.info("pull %s finished: %s", key, "ok" if active.result else active.error)

    def _release(self, active: ActivePull) -> None:
        active.holders -= 1
        if active.holders <= 0 and not active.done.is_set():
            active.cancelled_by = "its last client went away"
            active.scope.cancel()

    async def follow(self, active: ActivePull, on_event: Callable[[object], Awaitable[None]]) -> dict:
        """Hold ``active`` until it ends, passing its events to ``on_event``; its result
        (``result_to_wire``'s form) or its error."""
        send, recv = trio.open_memory_channel(SUBSCRIBER_BUFFER)
        active.holders += 1
        try:
            if active.plan is not None:  # a late joiner sees the plan with progress so far
                await on_event(PlanReady(active.plan.plan, active.plan.directory,
                                         active.plan.already + active.fetched))
            active.subscribers.add(send)
            if active.done.is_set():  # it ended before we subscribed
                send.close()
            async with recv:
                async for event in recv:
                    await on_event(event)
            await active.done.wait()
        finally:
            active.subscribers.discard(send)
            self._release(active)
        if active.error is not None:
            raise active.error
        return active.result

    async def cancel(self, ref: ModelRef) -> None:
        """Stop the pull of ``ref`` (verified chunks are kept); returns once it has ended."""
        active = self.pulls.get(str(ref))
        if active is None:
            raise NotFound(f"no pull of {ref} is running")
        active.cancelled_by = "cancelled on request"
        active.scope.cancel()
        await active.done.wait()

"""A pull's live view of the swarm, and the order it fetches chunks in.

``LanView`` holds, for one manifest, what each swarm peer holds (refreshed about every
second while the pull runs: the HAVE updates), whether the peer is itself pulling it,
and what this pull learned about the peer (in flight, stalled, lying, bytes received).
It is shared between the trio task that refreshes it and the worker threads that fetch
through ``LanPeerSource``, hence the lock.

``SwarmPicker`` is the scheduler's chunk order when peers are around:

1. a chunk some peer holds, **rarest first** (fewest holders; random among equals), so
   copies spread before the peer that has them leaves;
2. else a chunk this agent is *responsible* for: among the agents pulling the same
   manifest now (this one and every peer that says it is pulling and is making
   progress), each chunk has one owner by rendezvous hashing of (peer id, chunk). Owners
   fetch their chunks from the origin and everyone else takes them from the owner, so
   a class starting at once pulls about one copy through the outside link;
3. else wait for a HAVE update (other owners' chunks are on their way);
4. **endgame**: once nothing is left to start, a chunk that has been in flight for
   ``ENDGAME_AFTER`` seconds and that some peer holds is fetched a second time from another
   peer; the first copy to verify is written and the other fetch is cancelled.
A peer that stops making progress for ``STALL_AFTER`` seconds stops owning chunks, and
the others take its share, from the origin if need be.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import trio

from agent.manifest import Manifest
from agent.scheduler import ENDGAME
from agent.store import blake3_hash

STALL_AFTER = 10.0  # a pulling peer without a new chunk for this long stops owning chunks
STALLED_REST = 30.0  # a peer that timed out on a chunk is not asked again for this long
PER_PEER = 3  # requests in flight to one peer from this pull (its upload slots are shared)
# Chunks this agent fetches from the origin at once while other agents pull the same model
# (or may be about to: peers are connected and the pull is young). The outside link is the
# class's bottleneck: fewer chunks in flight each finish sooner, so peers can trade them
# sooner, and a chunk two agents both started before they saw each other costs less.
ORIGIN_SLOTS = 2
GRACE = 3.0
ENDGAME_AFTER = 2.0


@dataclass
class PeerView:
    peer: str
    data: tuple[str, int]
    ticket: bytes
    have: dict[str, set[int]]
    pulling: bool
    held: int = 0
    first_seen: float = 0.0
    progressed: float = 0.0
    in_flight: int = 0
    stalled_until: float = 0.0
    banned: str | None = None
    bytes_down: int = 0
    missing: set[tuple[str, int]] = field(default_factory=set)  # asked, it said it lacks them
    tls: bytes | None = None  # the peer's data server certificate (SHA-256), when it encrypts


class LanView:
    def __init__(self, manifest: Manifest, self_id: str):
        self.manifest = manifest
        self.self_id = self_id
        self.peers: dict[str, PeerView] = {}
        self._lock = threading.Lock()
        self._changed = trio.Event() if _in_trio() else None
        self._owner_cache: dict[tuple[str, ...], dict] = {}
        # Holder counts per chunk, rebuilt lazily after a change: the picker asks for every
        # pending chunk on every pick, so a scan of all peers per question would not do.
        self._counts: dict[tuple[str, int], int] | None = None
        self._counts_until = float("inf")  # when a put-aside peer becomes usable again

    # ------------------------------------------------------------ updates (trio side)

    def update(self, peer: str, answer) -> None:
        """A fresh answer from ``peer`` about this manifest."""
        now = time.monotonic()
        held = sum(len(v) for v in answer.have.values())
        with self._lock:
            view = self.peers.get(peer)
            if view is None:
                view = self.peers[peer] = PeerView(peer, answer.data, answer.ticket, answer.have, answer.pulling,
                                                   held, now, now, tls=answer.tls)
            else:
                if held > view.held:
                    view.progressed = now
                view.data, view.ticket, view.have, view.pulling, view.held, view.tls = (
                    answer.data, answer.ticket, answer.have, answer.pulling, held, answer.tls)
                view.missing = {(p, i) for p, i in view.missing if i not in answer.have.get(p, ())}
            self._counts = None
        self._notify()

    def forget(self, peer: str) -> None:
        """The peer is gone (or no longer holds the manifest)."""
        with self._lock:
            gone = self.peers.pop(peer, None)
            self._counts = None
        if gone is not None:
            self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = trio.Event()

    async def wait_changed(self, timeout: float) -> None:
        event = self._changed
        if event is None:
            await trio.sleep(timeout)
            return
        with trio.move_on_after(timeout):
            await event.wait()

    # -------------------------------------------------------------------- queries

    def _usable(self, view: PeerView, now: float) -> bool:
        return view.banned is None and view.stalled_until <= now

    def holders(self, path: str, index: int) -> int:
        """How many usable peers hold a chunk."""
        return self.holder_counts().get((path, index), 0)

    def holder_counts(self) -> dict[tuple[str, int], int]:
        """(path, index) -> how many usable peers hold it (chunks nobody holds are absent).
        Read-only for the caller: rebuilt, not changed, when peers change."""
        now = time.monotonic()
        with self._lock:
            if self._counts is None or now >= self._counts_until:
                self._rebuild_counts(now)
            return self._counts

    def _rebuild_counts(self, now: float) -> None:
        counts: dict[tuple[str, int], int] = {}
        for v in self.peers.values():
            if not self._usable(v, now):
                continue
            for path, held in v.have.items():
                for index in held:
                    if (path, index) not in v.missing:
                        counts[(path, index)] = counts.get((path, index), 0) + 1
        self._counts = counts
        self._counts_until = min((v.stalled_until for v in self.peers.values() if v.stalled_until > now),
                                 default=float("inf"))

    def pullers(self) -> tuple[str, ...]:
        """This agent and every peer pulling the manifest that is making progress."""
        now = time.monotonic()
        with self._lock:
            others = [v.peer for v in self.peers.values() if v.pulling and v.banned is None
                      and now - max(v.progressed, v.first_seen) < STALL_AFTER]
        return tuple(sorted([self.self_id, *others]))

    def owner(self, path: str, index: int, pullers: tuple[str, ...]) -> str:
        if len(pullers) == 1:
            return pullers[0]
        cache = self._owner_cache.get(pullers)
        if cache is None:
            self._owner_cache = {pullers: {}}
            cache = self._owner_cache[pullers]
        key = (path, index)
        owner = cache.get(key)
        if owner is None:
            chunk = f"{self.manifest.id}|{path}|{index}".encode()
            owner = cache[key] = max(pullers, key=lambda p: blake3_hash(p.encode() + b"|" + chunk))
        return owner

    # ------------------------------------------------------ fetching (thread side)

    def take_holder(self, path: str, index: int, exclude: set[str]) -> PeerView | None:
        """The least busy usable holder of a chunk (counted in flight until ``give_back``)."""
        now = time.monotonic()
        with self._lock:
            candidates = [v for v in self.peers.values() if self._usable(v, now) and v.peer not in exclude
                          and index in v.have.get(path, ()) and (path, index) not in v.missing]
            if not candidates:
                return None
            random.shuffle(candidates)
            best = min(candidates, key=lambda v: v.in_flight)
            best.in_flight += 1
            return best

    def give_back(self, view: PeerView, nbytes: int = 0) -> None:
        with self._lock:
            view.in_flight -= 1
            view.bytes_down += nbytes

    def lacks(self, view: PeerView, path: str, index: int) -> None:
        with self._lock:
            view.missing.add((path, index))
            self._counts = None

    def stalled(self, view: PeerView) -> None:
        with self._lock:
            view.stalled_until = time.monotonic() + STALLED_REST
            self._counts = None

    def ban(self, view: PeerView, reason: str) -> None:
        with self._lock:
            view.banned = reason
            self._counts = None

    def busy(self, view: PeerView) -> bool:
        return view.in_flight >= PER_PEER

    def summary(self) -> dict[str, dict]:
        with self._lock:
            return {v.peer: {"bytes_down": v.bytes_down, "banned": v.banned} for v in self.peers.values()}


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
        return True
    except RuntimeError:
        return False


class SwarmPicker:
    """The scheduler's chunk order with a ``LanView`` (see module docstring)."""

    def __init__(self, view: LanView, jobs: list, connected: Callable[[], int] = lambda: 0):
        self.view = view
        shuffled = list(jobs)
        random.shuffle(shuffled)  # agents that start together do not walk the files in the same order
        self.pending = {(task.file.rel, index): (task, index) for task, index in shuffled}
        self.connected = connected
        self.started = time.monotonic()
        self.origin_in_flight: set[tuple[str, int]] = set()
        # key -> [job, when it started, fetches running, duplicated yet]
        self.in_flight: dict[tuple[str, int], list] = {}
        self.duplicates = 0

    def _origin_slots(self, pullers: tuple[str, ...]) -> int | None:
        if len(pullers) > 1 or (time.monotonic() - self.started < GRACE and (self.view.peers or self.connected())):
            return ORIGIN_SLOTS
        return None  # alone: as many as the scheduler runs

    def _choose(self):
        view = self.view
        pullers = view.pullers()
        slots = self._origin_slots(pullers)
        origin_ok = slots is None or len(self.origin_in_flight) < slots
        rarest, rarest_count, mine = None, None, None
        counts = view.holder_counts()
        for key in self.pending:
            count = counts.get(key, 0)
            if count:
                if rarest_count is None or count < rarest_count:
                    rarest, rarest_count = key, count
                    if count == 1:
                        break
            elif origin_ok and mine is None and view.owner(key[0], key[1], pullers) == view.self_id:
                mine = key
        if rarest is None and mine is not None:
            self.origin_in_flight.add(mine)
        return rarest or mine

    def _endgame(self):
        now = time.monotonic()
        for key, entry in self.in_flight.items():
            job, since, _, duplicated = entry
            if not duplicated and now - since > ENDGAME_AFTER and key not in self.origin_in_flight \
                    and self.view.holders(*key):
                entry[2] += 1
                entry[3] = True
                self.duplicates += 1
                return (*job, ENDGAME)
        return None

    async def take(self):
        while True:
            if self.pending:
                key = self._choose()
                if key is not None:
                    job = self.pending.pop(key)
                    self.in_flight[key] = [job, time.monotonic(), 1, False]
                    return job
            else:
                duplicate = self._endgame()
                if duplicate is not None:
                    return duplicate
                if all(entry[3] for entry in self.in_flight.values()):
                    return None  # nothing left to start or to duplicate
            await self.view.wait_changed(0.5)

    def done(self, job) -> None:
        task, index = job[0], job[1]
        key = (task.file.rel, index)
        self.origin_in_flight.discard(key)
        entry = self.in_flight.get(key)
        if entry is not None:
            entry[2] -= 1
            if entry[2] <= 0:
                del self.in_flight[key]

"""The scheduler's chunk order when LAN peers are around (a ``agent.scheduler.Picker``).

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
"""

from __future__ import annotations

import random
import time
from typing import Callable

from agent.scheduler import Job
from agent.swarm.view import LanView

# Chunks this agent fetches from the origin at once while other agents pull the same model
# (or may be about to: peers are connected and the pull is young). The outside link is the
# class's bottleneck: fewer chunks in flight each finish sooner, so peers can trade them
# sooner, and a chunk two agents both started before they saw each other costs less.
ORIGIN_SLOTS = 2
GRACE = 3.0
ENDGAME_AFTER = 2.0


class SwarmPicker:
    """The scheduler's chunk order with a ``LanView`` (see module docstring)."""

    def __init__(self, view: LanView, jobs: list, connected: Callable[[], int] = lambda: 0):
        self.view = view
        shuffled = list(jobs)
        random.shuffle(shuffled)  # agents that start together do not walk the files in the same order
        self.pending = {job.key: job for job in shuffled}
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
                return Job(job.task, job.index, duplicate=True)
        return None

    async def take(self) -> Job | None:
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

    def done(self, job: Job) -> None:
        key = job.key
        self.origin_in_flight.discard(key)
        entry = self.in_flight.get(key)
        if entry is not None:
            entry[2] -= 1
            if entry[2] <= 0:
                del self.in_flight[key]

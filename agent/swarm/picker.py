"""The scheduler's chunk order when LAN peers are around (an ``agent.scheduler.Picker``);
the room's origin policy is ``agent.swarm.origin``'s.

On a campus (peers in other places: ``agent.swarm.location``) "the LAN" below means our own
room; how a chunk enters a room from another is ``agent.swarm.entries``'s, and the
origin's windows per room the origin policy's (``agent.swarm.origin``). With every peer in
one place this is the one-room policy below.

1. **From the LAN**: a chunk some live peer holds, rarest first (fewest holders; random
   among equals), so copies spread before the peer that has them leaves.
2. **From the origin** and **never twice for slowness** (3.): the room's origin policy,
   ``agent.swarm.origin`` (mixed in here: ``OriginPolicy``); on a campus, a chunk held
   only in other rooms enters ours by ``agent.swarm.entries`` (``EntryPolicy``).
4. **Alone** (no live peer pulls or holds the manifest): every chunk in file order, as many
   at once as the scheduler runs, no claim needed.
5. **Endgame**: once nothing is left to start, a chunk whose bytes have been coming from a
   peer for over ``ENDGAME_AFTER`` seconds (a slow transfer, not one waiting for a free
   upload slot) that another live peer holds is fetched a second time from it
   (LAN only); the first copy to verify is written, the other fetch is cancelled.
"""

from __future__ import annotations

import logging
import random
import time

import trio

from agent.picking import ORIGINS, PEERS, Job
from agent.swarm.board import Board
from agent.swarm.entries import ENTRY_STEP, EntryPolicy
from agent.swarm.origin import CLAIM_SETTLE, FROM_ORIGIN, IN_ROOM, INTO_ROOM, OriginPolicy
from agent.swarm.view import LanView

ENDGAME_AFTER = 4.0  # a LAN chunk sending this long at the end is fetched again from another holder
log = logging.getLogger("shoal.swarm")

WAIT = 0.25  # the longest a worker waits for news before looking again


class SwarmPicker(EntryPolicy, OriginPolicy):
    def __init__(self, view: LanView, board: Board, jobs: list[Job], *, origin_streams: int = 4,
                 entry_streams: int | None = None, workers: int | None = None, clock=time.monotonic,
                 wanted: set | None = None):
        self.view, self.board = view, board
        # (path, index) of chunks a tool is reading through the gateway right now: taken
        # first from the LAN, whatever their rarity (agent.gateway streams files in order).
        self.wanted = wanted if wanted is not None else set()
        self.origin_streams = origin_streams
        # Chunks entering our room from other rooms at once (claimed, like the origin's).
        # Each crosses two room links and comes from a holder that also serves its own room
        # and others, so one entry gets a fraction of our room's link: four times the origin's
        # streams kept it busy (30 rooms x 10 in the simulator: 1.66x the bound with 4,
        # 1.44x with 16).
        self.entry_streams = entry_streams or 4 * origin_streams
        # LAN fetches take at most all workers but one while the room still needs the origin:
        # a chunk that becomes this agent's to fetch from the origin then starts at once,
        # instead of when one of its LAN fetches ends (seconds in a busy room), with the
        # outside link short of a stream meanwhile.
        self.lan_limit = workers - 1 if workers and workers > 1 else None
        self.clock = clock
        ordinals = board.ordinals
        self.pending: dict[int, Job] = {ordinals.of(*job.key): job for job in jobs}
        self._order = sorted(self.pending)  # the room's common origin order
        self._lan_order = list(self.pending)
        random.shuffle(self._lan_order)  # agents that start together spread their LAN asks
        self.in_flight: dict[int, list] = {}  # ordinal -> [job, since, fetches, duplicated, how (IN_ROOM...)]
        self.settling: dict[int, float] = {}  # my claims not yet acted on -> when claimed
        # Chunks held only in other rooms, unclaimed in ours -> when this agent's turn to
        # claim one comes; its claims made in a turn -> when (``agent.swarm.entries``).
        self._entry_due: dict[int, float] = {}
        self._entry_settling: dict[int, float] = {}
        self.started = clock()
        self._pullers: tuple[str, ...] = ()
        self._places_for: tuple[tuple[str, ...], int] = ((), 1)  # (pullers, how many places they are in)
        self._pullers_since = self.started
        self._puller_sets = 0  # how many different puller lists this pull has seen
        self._fresh: bool | None = None  # whether no peer held any of it when we first looked
        self.duplicates = 0  # endgame jobs handed out
        self._told = float("-inf")  # when the debug log last said why the origin window waits
        self._taking = trio.Lock()  # held by the one worker looking for a job (``take``)

    # --------------------------------------------------------------------- choosing

    def _from_lan(self, holders: dict[int, int]) -> int | None:
        """The pending chunk held by the fewest peers of our room (rarest first) that a
        free peer of our room holds (``holders``: the room's counts)."""
        free = self.view.free_holders(local=True)
        if not free or not holders:
            return None
        held = self.view.held_by(free)
        for key in list(self.wanted):
            ordinal = self.board.ordinals.find(*key)
            if ordinal is not None and ordinal in self.pending and ordinal in held:
                return ordinal
        best, best_count = None, None
        for ordinal in self._lan_order:
            count = holders.get(ordinal)
            if count and (best_count is None or count < best_count) and ordinal in held and ordinal in self.pending:
                best, best_count = ordinal, count
                if count == 1:
                    break
        return best

    def _endgame(self) -> Job | None:
        now = self.clock()
        for ordinal, entry in self.in_flight.items():
            job, _, _, duplicated, how = entry
            if duplicated or how != IN_ROOM:
                continue
            # Slow is a transfer crawling for ENDGAME_AFTER since its bytes began to come, not
            # a fetch that waits for a holder's free slot: in a busy room's last seconds most
            # fetches wait, and a second copy of each only added to the queue (129 copies in
            # one 30-room, 30 in a quicker one).
            sending = self.view.transferring_since(ordinal)
            if sending is not None and now - sending > ENDGAME_AFTER and self.view.local_holder_counts().get(ordinal):
                entry[2] += 1
                entry[3] = True
                self.duplicates += 1
                return Job(job.task, job.index, duplicate=True)
        return None

    def _start(self, ordinal: int, how: str | None) -> Job:
        from_origin = how == FROM_ORIGIN
        if from_origin and log.isEnabledFor(logging.DEBUG):  # a chunk this agent pays the outside link for: why ours
            uncounted = sorted(self.view.describe(p) for p in set(self.view.peers) - set(self._pullers))
            log.debug("origin chunk %d: %d pullers, %d unknown, %d idle, %.2f s into the pull; peers in view "
                      "not counted: %s", ordinal, len(self._pullers), len(self.view.unknown), len(self.view.idle),
                      self.clock() - self.started, ",".join(uncounted[:4]) or "none")
        queued = self.pending.pop(ordinal)
        self._entry_due.pop(ordinal, None)
        job = Job(queued.task, queued.index, route=ORIGINS if from_origin else PEERS)
        self.in_flight[ordinal] = [job, self.clock(), 1, False, how]
        return job

    def _lan_full(self, holders: dict[int, int]) -> bool:
        """Whether the worker left must wait for a claimed chunk (from the origin, or into
        our room) rather than take one from a peer of our room."""
        if self.lan_limit is None:
            return False
        lan = sum(entry[2] for entry in self.in_flight.values() if entry[4] == IN_ROOM)
        return lan >= self.lan_limit and any(not holders.get(ordinal) for ordinal in self.pending)

    def pick_now(self) -> Job | None:
        """The next job, if there is one to start now (None: wait for news, or ``finished``)."""
        if self.pending:
            holders, local = self.view.holder_counts(), self.view.local_holder_counts()
            ordinal = None if self._lan_full(local) else self._from_lan(local)
            if ordinal is not None:
                return self._start(ordinal, IN_ROOM)
            ordinal = self._into_room(holders, local)
            if ordinal is not None:
                return self._start(ordinal, INTO_ROOM)
            ordinal = self._from_origin(holders)
            if ordinal is not None:
                return self._start(ordinal, FROM_ORIGIN)
            return None
        return self._endgame()

    @property
    def finished(self) -> bool:
        """Nothing left to start or to duplicate."""
        return not self.pending and all(entry[3] for entry in self.in_flight.values())

    async def take(self) -> Job | None:
        # One worker at a time looks and waits for news; the others queue on the lock
        # (first come, first served). A change in the room then costs one look, plus one
        # per job it makes startable, instead of a look by every idle worker: with 30
        # peers pushing HAVE frames that was the largest part of an agent's CPU.
        async with self._taking:
            while True:
                job = self.pick_now()
                if job is not None:
                    return job
                if self.finished:
                    return None
                await self.view.wait_changed(self._patience())

    def _patience(self) -> float:
        """How long a worker waits for news before looking again: until the next claim
        settles (``agent.swarm.origin``) or an entry turn comes (``agent.swarm.entries``),
        at most ``WAIT``."""
        wait = CLAIM_SETTLE if self.settling else WAIT
        if self._entry_due or self._entry_settling:
            # Turns still to come only: one that came while the room's entries were all taken
            # waits for news (a claim ending), not for a timer that would spin.
            now = self.clock()
            settle = (since + ENTRY_STEP for since in self._entry_settling.values())
            turns = [t for t in (*self._entry_due.values(), *settle) if t > now]
            if turns:
                wait = min(wait, max(0.005, min(turns) - now))
        return wait

    def done(self, job: Job) -> None:
        ordinal = self.board.ordinals.of(*job.key)
        entry = self.in_flight.get(ordinal)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] > 0:
            return
        del self.in_flight[ordinal]
        # A slot of ours came free (an origin stream, a request to a peer): the worker
        # waiting in ``take`` looks again now, not at its next timeout.
        self.view.nudge()
        if ordinal in self.board.have:
            return
        if entry[4] != IN_ROOM:
            self.board.unclaim(ordinal)  # the claimed fetch failed: the room may take it over
        # Not written: its peers failed it. It is ours to hand out again: to another holder,
        # or, once no live peer holds or claims it, to its owner for the origin.
        self.pending[ordinal] = Job(job.task, job.index)

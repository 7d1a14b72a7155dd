"""A campus of agents on a virtual clock: the real swarm policy over modelled links.

Each simulated agent has the real ``agent.swarm.board.Board``, ``agent.swarm.view.LanView``
and ``agent.swarm.picker.SwarmPicker``; what the network does is modelled here:

- **Links**: each machine's port (``machine_mbit`` up and down), each room's uplink to the
  campus router (``room_mbit`` each way) and the campus's outside link (``outside_mbit``,
  where every origin byte comes in). A chunk is a flow of ``chunk_size`` bytes along its
  path (in the room: holder up, our down; between rooms: holder up, its room up, our room
  down, our down; from the origin: outside, our room down, our down). Rates are shared
  max-min fairly (progressive filling), recomputed whenever flows start or end; the clock
  moves event to event.
- **HAVE streams**: ``delivery_s`` after a board changes (the push latency) its changes
  reach every agent that follows it, as one delta frame, leaving out the chunks the
  subscriber holds but for those from the origin (as ``agent.swarm.publisher`` does); a
  heartbeat every ``BEAT_S`` otherwise. Each agent follows the peers the real session
  follows (``agent.swarm.location.neighbours``: its whole room, ``per_place`` in each
  other room, among those that pull); ``frames`` counts what each agent received.
- **A class starting**: pulls may start within ``stagger_s`` of each other (an agent whose
  pull has not started answers "idle"), and each agent's first answer from each other may
  take up to ``answer_s``.
- **Upload slots**: a holder sends at most ``upload_slots`` chunks at once; a request past
  that is answered BUSY, as the data server does, and asked again after ``BUSY_WAIT``.

Used by ``tests/test_campus.py`` (hypothesis over random campuses) and
``benchmarks/campus.py`` (e.g. 10 rooms x 30). Nothing here sleeps or opens a socket.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from types import SimpleNamespace

from agent.manifest import FileEntry, Manifest
from agent.picking import ORIGINS, Job
from agent.swarm import location as locality
from agent.swarm.board import Board
from agent.swarm.picker import SwarmPicker
from agent.swarm.protocol import Contact
from agent.swarm.source import BUSY_WAIT
from agent.swarm.view import LanView
from agent.swarm.wire import BEAT, DELTA, SNAP, Message

BEAT_S = 2.0
MIB = 1 << 20
ORIGIN = "origin"


@dataclass
class Topology:
    rooms: list[int]  # machines in each room
    machine_mbit: float = 1000.0
    room_mbit: float = 1000.0
    outside_mbit: float = 1000.0
    chunk_size: int = 4 * MIB
    chunks: int = 64
    locations: bool = True  # agents say where they are (False: a campus without the setting)

    @property
    def size(self) -> int:
        return self.chunk_size * self.chunks

    def bound(self) -> dict[str, float]:
        """Lower bounds on the time until every machine holds the model (seconds): the
        outside link carries it once; each machine downloads it; the campus's upload
        capacity (the outside link's and every machine's) carries N copies; a room's
        machines download n copies with their room's downlink and their own uploads."""
        bits = self.size * 8
        mbit = 1e6
        n = sum(self.rooms)
        bounds = {
            "outside link": bits / (self.outside_mbit * mbit),
            "machine download": bits / (self.machine_mbit * mbit),
            "campus upload": n * bits / ((self.outside_mbit + n * self.machine_mbit) * mbit),
        }
        if len(self.rooms) > 1:
            biggest = max(self.rooms)
            bounds["room download"] = max(bits / (self.room_mbit * mbit),
                                          biggest * bits / ((self.room_mbit + biggest * self.machine_mbit) * mbit))
        return bounds


def make_manifest(topology: Topology) -> Manifest:
    chunks = topology.chunks
    files = [chunks // 2, chunks - chunks // 2]
    return Manifest("campus/model", "main", topology.chunk_size, tuple(
        FileEntry(f"part-{i}.safetensors", n * topology.chunk_size, bytes([i]) * 32,
                  tuple(bytes([i, j % 256, j // 256]) * 8 for j in range(n)))
        for i, n in enumerate(files) if n))


@dataclass(eq=False)
class Flow:
    agent: "Agent"
    ordinal: int
    job: Job
    links: tuple[str, ...]
    source: str  # a peer's name, or ORIGIN
    holder: object = None  # the view's PeerView, given back at the end
    token: float | None = None  # the view's transfer clock
    left: float = 0.0
    rate: float = 0.0
    kind: str = "lan"  # "lan", "between rooms" or "origin"


@dataclass(eq=False)
class Agent:
    name: str
    room: int
    board: Board
    view: LanView
    picker: SwarmPicker | None = None
    flows: list[Flow] = field(default_factory=list)
    waiting: list[Job] = field(default_factory=list)  # LAN jobs whose holders were all busy
    uploads: int = 0
    retry_at: float = 0.0  # when the jobs waiting for a busy holder ask again
    start_at: float = 0.0  # when its pull starts
    frames: int = 0
    done_at: float | None = None
    follows: set[str] = field(default_factory=set)  # the peers it follows (their HAVE streams)
    asked: set[str] = field(default_factory=set)  # every peer it has asked (followed at some point)


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Campus:
    def __init__(self, topology: Topology, *, seed: int = 1, concurrency: int = 8, origin_streams: int = 4,
                 upload_slots: int = 4, dt: float = 0.02, delivery_s: float = 0.02, stagger_s: float = 0.0,
                 answer_s: float = 0.0, per_place: int | None = locality.PER_PLACE):
        random.seed(seed)
        self.topology = topology
        self.clock = Clock()
        self.manifest = make_manifest(topology)
        self.dt, self.delivery_s = dt, delivery_s
        # Pulls start within ``stagger_s`` of each other (a class pressing Enter); until its
        # pull starts an agent answers "idle", as the real session sees it.
        self.stagger_s = stagger_s
        # How long each agent waits for each other's first answer (``answer_s``: up to this,
        # at random), as offers and HAVE streams open one by one in a real room.
        self.answer_s = answer_s
        self._answer_at: dict[tuple[str, str], float] = {}
        # Peers each agent follows in each other room (None: every one, as before locations
        # bounded it).
        self.per_place = per_place
        self._followers: dict[str, list[Agent]] = {}
        self._idle_seen: set[str] | None = None
        self.concurrency, self.upload_slots = concurrency, upload_slots
        self.capacity: dict[str, float] = {"outside": topology.outside_mbit * 1e6 / 8}
        self.agents: list[Agent] = []
        for r, count in enumerate(topology.rooms):
            self.capacity[f"room{r}.up"] = self.capacity[f"room{r}.down"] = topology.room_mbit * 1e6 / 8
            for i in range(count):
                name = f"r{r:02d}-a{i:02d}"
                location = ("campus", f"room-{r:02d}") if topology.locations else None
                self.capacity[f"{name}.up"] = self.capacity[f"{name}.down"] = topology.machine_mbit * 1e6 / 8
                board = Board(self.manifest, pulling=True)
                view = LanView(self.manifest, name, clock=self.clock, location=location)
                self.agents.append(Agent(name, r, board, view))
        self.by_name = {a.name: a for a in self.agents}
        self.link_bytes: dict[str, float] = dict.fromkeys(self.capacity, 0.0)
        self.flows: list[Flow] = []
        self._rates_stale = True
        # Agents to look for work at this instant, in the order they were touched (a set of
        # agents would iterate by memory address: each run a different order of picks, and
        # of draws from the seeded random, so the same campus gave figures 0.05x apart).
        self._touched: dict[Agent, None] = {}
        self._seqs: dict[str, int] = {}  # agent -> the board seq last delivered
        self._beat_at = 0.0
        self._origin_streams = origin_streams
        self.origin_fetches: dict[int, int] = {}
        self.origin_done = 0.0  # when the last chunk from the origin arrived
        self.entries: dict[tuple[int, int], int] = {}  # (room, ordinal) -> times it crossed into the room

    # ------------------------------------------------------------------ set-up

    def start(self) -> None:
        """Every agent learns every other's contact (its hello); each pull starts at its
        agent's ``start_at`` (all at once without ``stagger_s``)."""
        self._contacts = {a.name: Contact(("10.0.0.1", 1), b"k" * 48, None, (), a.view.location) for a in self.agents}
        for agent in self.agents:
            agent.start_at = self.clock.now + (random.uniform(0, self.stagger_s) if self.stagger_s else 0.0)
            agent.board.set_pulling(False)
            # Connected, not heard from yet: those it follows answer (and say where they are)
            # with their first frame; until then the picker presumes they pull (``ROOM_WAIT``).
            agent.follows = agent.asked = self._neighbours(agent, set())
            agent.view.set_unknown(set(agent.follows))
            for other in self.agents:
                if other is not agent and self.answer_s:
                    self._answer_at[(agent.name, other.name)] = self.clock.now + random.uniform(0, self.answer_s)
            self._seqs[agent.name] = -1
        self._index_followers()
        self._begin_due()

    def _neighbours(self, agent: Agent, idle: set[str]) -> set[str]:
        """Whom ``agent`` follows, as the real session chooses (its hello told it every
        other agent's place)."""
        places = {o.name: o.view.location for o in self.agents if o is not agent}
        if self.per_place is None:
            return set(places)
        return locality.neighbours(agent.name, agent.view.location, places, idle, self.per_place)

    def _refollow(self, idle: set[str]) -> None:
        """Pulls started (fewer idle agents): each agent's choice among the other rooms'
        pullers is made again; a peer no longer chosen is forgotten (its stream closed)."""
        for agent in self.agents:
            follows = self._neighbours(agent, idle)
            for gone in agent.follows - follows:
                agent.view.forget(gone)
            agent.follows = follows
            agent.asked = agent.asked | follows
        self._index_followers()

    def _index_followers(self) -> None:
        self._followers = {a.name: [] for a in self.agents}
        for agent in self.agents:
            for name in agent.follows:
                self._followers[name].append(agent)

    def _begin_due(self) -> None:
        for agent in self.agents:
            if agent.picker is None and agent.start_at <= self.clock.now + 1e-9:
                agent.board.set_pulling(True)
                tasks = {f.path: SimpleNamespace(file=SimpleNamespace(rel=f.path)) for f in self.manifest.files}
                jobs = [Job(tasks[f.path], i) for f in self.manifest.files for i in range(len(f.chunks))]
                agent.picker = SwarmPicker(agent.view, agent.board, jobs, origin_streams=self._origin_streams,
                                           workers=self.concurrency, clock=self.clock)
                self._seqs[agent.name] = -1  # its first frame to everyone: a snapshot
                self._touched[agent] = None

    # ------------------------------------------------------------------ the loop

    def run(self, limit_s: float = 3600.0) -> float:
        """Until every agent holds the model; the virtual seconds it took. Event by event:
        the clock moves to the next flow's end, the next delivery of HAVE frames (news
        travels ``delivery_s`` after it happens) or at most ``dt`` (the pickers' timers)."""
        self.start()
        began = self.began = self.clock.now
        next_delivery = next_look = began
        while any(a.done_at is None for a in self.agents):
            now = self.clock.now
            if now - began > limit_s:
                raise AssertionError(f"the campus did not finish in {limit_s} virtual seconds: "
                                     f"{sum(a.done_at is None for a in self.agents)} agents short")
            self._begin_due()
            # An agent looks for work when news reaches it, when a fetch of its own ends, when
            # a holder that was busy may be free (``BUSY_WAIT``), and every ``dt`` (its timers).
            if now >= next_delivery - 1e-9:
                self._deliver()
                next_delivery = float("inf")
                self._touched.update(dict.fromkeys(self.agents))
            if now >= next_look - 1e-9:
                self._touched.update(dict.fromkeys(self.agents))
                next_look = now + self.dt
            for agent in self.agents:
                if agent.waiting and agent.retry_at <= now + 1e-9:
                    self._touched[agent] = None
            for agent in self._touched:
                if agent.done_at is None and agent.picker is not None:
                    self._pick(agent)
            self._touched.clear()
            if self._rates_stale:
                self._share()
            if next_delivery == float("inf") and (self._news() or now - self._beat_at >= BEAT_S):
                next_delivery = now + self.delivery_s
            retry = min((a.retry_at for a in self.agents if a.waiting), default=float("inf"))
            due = min((a.start_at for a in self.agents if a.picker is None), default=float("inf"))
            step = min([next_look - now, next_delivery - now, retry - now, due - now]
                       + [f.left / f.rate for f in self.flows if f.rate > 0])
            self._advance(max(step, 1e-6))
            self.clock.now = now + max(step, 1e-6)
            self._complete()
        return max(a.done_at for a in self.agents) - began

    def _news(self) -> bool:
        return any(a.board.seq != self._seqs[a.name] for a in self.agents)

    def _deliver(self) -> None:
        beat = self.clock.now - self._beat_at >= BEAT_S
        if beat:
            self._beat_at = self.clock.now
        # Agents whose pull has not started answer "idle": the others list them so (the
        # picker counts them among the pullers for a moment) and follow them once they pull.
        idle = {a.name for a in self.agents if a.picker is None}
        if idle != self._idle_seen:
            self._idle_seen = idle
            self._refollow(idle)
        for agent in self.agents:
            agent.view.set_idle(idle & agent.asked - {agent.name})
            agent.view.set_unknown(agent.view.unknown & agent.follows - idle)  # "idle" is an answer
        for source in self.agents:
            if source.name in idle:
                continue
            seq = source.board.seq
            last = self._seqs[source.name]
            if seq == last and not beat:
                continue
            if last < 0:
                s, have, origin, claims, pulling = source.board.snapshot()
                message = Message(SNAP, s + 1, frozenset(have), frozenset(origin), frozenset(claims), frozenset(),
                                  pulling)
            elif seq == last:
                message = Message(BEAT, seq + 1)
            else:
                c = source.board.changes_since(last)
                message = Message(DELTA, c.seq + 1, c.have, c.origin, c.claim, c.unclaim, c.pulling)
            self._seqs[source.name] = seq
            for agent in self._followers[source.name]:
                if source.name not in agent.view.peers:  # not followed yet: its answer comes first
                    if self.clock.now < self._answer_at.get((agent.name, source.name), 0.0):
                        continue
                    agent.view.offered(source.name, SimpleNamespace(have={}, pulling=True),
                                       self._contacts[source.name])
                    agent.view.set_unknown(agent.view.unknown - {source.name})
                    if message.kind != SNAP:
                        s, have, origin, claims, pulling = source.board.snapshot()
                        agent.view.apply(source.name, Message(SNAP, message.seq, frozenset(have), frozenset(origin),
                                                              frozenset(claims), frozenset(), pulling))
                        agent.frames += 1
                        continue
                if message.kind == DELTA and message.have & agent.board.have:
                    # As the publisher does: chunks the subscriber holds are left out of its
                    # deltas, but for those fetched from the origin.
                    message_for = Message(DELTA, message.seq, (message.have - agent.board.have) | message.origin,
                                          message.origin, message.claim, message.unclaim, message.pulling)
                    agent.view.apply(source.name, message_for)
                else:
                    agent.view.apply(source.name, message)
                agent.frames += 1

    def _advance(self, seconds: float) -> None:
        for flow in self.flows:
            moved = min(flow.left, flow.rate * seconds)
            flow.left -= moved
            for link in flow.links:
                self.link_bytes[link] += moved

    def _complete(self) -> None:
        for flow in [f for f in self.flows if f.left <= 1e-3]:
            if flow in self.flows:  # (not cut short by a rival copy that finished with it)
                self._finish(flow)

    def _finish(self, flow: Flow) -> None:
        agent, ordinal = flow.agent, flow.ordinal
        rivals = [f for f in agent.flows if f.ordinal == ordinal]
        for f in rivals:  # the first copy to arrive is written; the others are cut short
            self._end(f)
        agent.board.add_have(ordinal, flow.source == ORIGIN)
        if flow.source == ORIGIN:
            self.origin_fetches[ordinal] = self.origin_fetches.get(ordinal, 0) + 1
            self.origin_done = self.clock.now
        elif flow.kind == "between rooms":
            key = (agent.room, ordinal)
            self.entries[key] = self.entries.get(key, 0) + 1
        for f in rivals:
            agent.picker.done(f.job)
        self._touched[agent] = None
        if len(agent.board.have) == agent.board.total and agent.done_at is None:
            agent.done_at = self.clock.now

    def _end(self, flow: Flow) -> None:
        self.flows.remove(flow)
        flow.agent.flows.remove(flow)
        if flow.holder is not None:
            flow.agent.view.give_back(flow.holder)
            flow.agent.view.transfer_ended(flow.ordinal, flow.token)
            self.by_name[flow.source].uploads -= 1
        self._rates_stale = True

    def _pick(self, agent: Agent) -> None:
        if agent.waiting and agent.retry_at <= self.clock.now + 1e-9:
            waiting, agent.waiting = agent.waiting, []
            for job in waiting:
                self._start(agent, job)
        while len(agent.flows) + len(agent.waiting) < self.concurrency:
            job = agent.picker.pick_now()
            if job is None:
                return
            self._start(agent, job)

    def _start(self, agent: Agent, job: Job) -> None:
        ordinal = agent.board.ordinals.of(*job.key)
        me = agent.name
        if job.route == ORIGINS:
            links = ("outside", f"room{agent.room}.down", f"{me}.down")
            self._add(Flow(agent, ordinal, job, links, ORIGIN, kind="origin"))
            return
        fetching = {f.source for f in agent.flows if f.ordinal == ordinal}
        busy: set[str] = set()
        while True:
            holder = agent.view.take_holder(ordinal, fetching, busy)
            if holder is None:
                if busy:  # every holder was busy: ask again in a moment, as the LAN source does
                    if not agent.waiting:
                        agent.retry_at = self.clock.now + BUSY_WAIT
                    agent.waiting.append(job)
                else:
                    agent.picker.done(job)  # nobody holds it any more: back to the picker
                return
            source = self.by_name[holder.peer]
            if source.uploads >= self.upload_slots:
                agent.view.said_busy(holder)
                agent.view.give_back(holder)
                busy.add(holder.peer)
                continue
            break
        source.uploads += 1
        if source.room == agent.room:
            links, kind = (f"{source.name}.up", f"{me}.down"), "lan"
        else:
            links = (f"{source.name}.up", f"room{source.room}.up", f"room{agent.room}.down", f"{me}.down")
            kind = "between rooms"
        token = agent.view.transfer_started(ordinal)
        self._add(Flow(agent, ordinal, job, links, source.name, holder, token, kind=kind))

    def _add(self, flow: Flow) -> None:
        flow.left = float(self.topology.chunk_size)
        self.flows.append(flow)
        flow.agent.flows.append(flow)
        self._rates_stale = True

    def _share(self) -> None:
        """Max-min fair rates (progressive filling): the link with the smallest fair share
        fixes the rate of every flow through it; the others' shares are recomputed; again.
        A heap of shares, stale entries skipped (a share only grows as flows are fixed)."""
        crossing: dict[str, list[Flow]] = {}
        for flow in self.flows:
            flow.rate = -1.0
            for link in flow.links:
                crossing.setdefault(link, []).append(flow)
        left = {link: self.capacity[link] for link in crossing}
        count = {link: len(flows) for link, flows in crossing.items()}
        heap = [(left[link] / count[link], link) for link in crossing]
        heapq.heapify(heap)
        while heap:
            share, link = heapq.heappop(heap)
            if count[link] == 0:
                continue
            current = left[link] / count[link]
            if current > share * (1 + 1e-9) + 1e-9:
                heapq.heappush(heap, (current, link))  # flows fixed elsewhere left it more
                continue
            for flow in crossing[link]:
                if flow.rate >= 0:
                    continue
                flow.rate = current
                for other in flow.links:
                    left[other] -= current
                    count[other] -= 1
        self._rates_stale = False

    # ------------------------------------------------------------------ figures

    def report(self, took: float) -> dict:
        size = self.topology.size
        bound = self.topology.bound()
        rooms = len(self.topology.rooms)
        return {
            "agents": len(self.agents),
            "rooms": rooms,
            "completion_s": took,
            "bound_s": max(bound.values()),
            "bound_parts": bound,
            "ratio": took / max(bound.values()),
            "outside_F": self.link_bytes["outside"] / size,
            "origin_done_s": self.origin_done - self.began,
            "room_in_F_max": max(self.link_bytes[f"room{r}.down"] for r in range(rooms)) / size,
            "room_out_F_max": max(self.link_bytes[f"room{r}.up"] for r in range(rooms)) / size,
            "origin_twice": sum(1 for n in self.origin_fetches.values() if n > 1),
            "entered_twice": sum(1 for n in self.entries.values() if n > 1),
            "frames_per_agent": sum(a.frames for a in self.agents) / len(self.agents),
        }

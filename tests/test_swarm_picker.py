"""The room's chunk policy (``agent.swarm.picker``), on a virtual clock: whole rooms of
pickers, their boards delivered to each other as the HAVE stream would, no network and no
sleeping. What a user of a classroom would check: the outside link carries each chunk
once, never more than ``origin_streams`` at a time across the room, a stopped member's
chunks move on only once it is silent past the liveness bound, a late joiner takes
everything from the LAN, and a slow peer's chunk is duplicated from another peer, never
from the origin."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.manifest import FileEntry, Manifest
from agent.picking import ORIGINS, PEERS, Job
from agent.swarm import origin as origin_policy, picker as picker_module
from agent.swarm.board import Board
from agent.swarm.membership import Contact
from agent.swarm.picker import ENDGAME_AFTER, SwarmPicker
from agent.swarm.view import LIVENESS, LanView
from agent.swarm.wire import Message

TICK = 0.05


def manifest(chunks: int = 60) -> Manifest:
    per_file = [chunks // 3, chunks // 3, chunks - 2 * (chunks // 3)]
    return Manifest("lab/m", "master", 1 << 16, tuple(
        FileEntry(f"f{i}", n * (1 << 16), b"\0" * 32, tuple(bytes([i, j % 256, j // 256]) * 8 for j in range(n)))
        for i, n in enumerate(per_file)))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Member:
    """One agent of the simulated room: its board, its view of the others, its picker."""

    def __init__(self, name: str, m: Manifest, clock: Clock, *, streams: int, have=(), pulling=True):
        self.name, self.clock = name, clock
        self.board = Board(m, have=have, pulling=pulling)
        self.view = LanView(m, name, clock=clock)
        self.picker: SwarmPicker | None = None
        self.running: dict[int, list[tuple]] = {}  # ordinal -> fetches (job, ends, from, holder, transfer token)
        self.stopped = False
        self.streams = streams
        self.origin_fetches: list[int] = []

    def start(self, m: Manifest, concurrency: int = 4) -> None:
        task_of = {f.path: SimpleNamespace(file=SimpleNamespace(rel=f.path)) for f in m.files}
        jobs = [Job(task_of[f.path], i) for f in m.files for i in range(len(f.chunks))
                if self.board.ordinals.of(f.path, i) not in self.board.have]
        self.picker = SwarmPicker(self.view, self.board, jobs, origin_streams=self.streams, workers=concurrency,
                                  clock=self.clock)
        self.concurrency = concurrency


class Room:
    def __init__(self, size: int, *, chunks: int = 60, streams: int = 4, origin_s: float = 1.0,
                 lan_s: float = 0.1, seed: int = 7):
        random.seed(seed)
        self.clock = Clock()
        self.manifest = manifest(chunks)
        self.origin_s, self.lan_s = origin_s, lan_s
        self.members = [Member(f"peer-{i:02d}", self.manifest, self.clock, streams=streams) for i in range(size)]
        self.origin_concurrency = self.peak = 0
        self.slow: dict[str, float] = {}  # member -> how long its uploads take
        self.deliver_every = 0.0  # how stale boards get between deliveries (a loaded machine's lag)
        self._delivered = float("-inf")

    def add(self, member: Member) -> Member:
        self.members.append(member)
        return member

    def deliver(self) -> None:
        """Each live member's board reaches every other member's view (a snapshot frame);
        a member that neither pulls nor holds anything answers "idle" instead, as its data
        port does (the session then lists it in ``view.idle``)."""
        idle = {m.name for m in self.members if not m.stopped and m.picker is None
                and not m.board.pulling and not m.board.have}
        for member in self.members:
            for name in idle & set(member.view.peers):
                member.view.forget(name)
            member.view.set_idle(idle - {member.name})
        for source in self.members:
            if source.stopped or source.name in idle:
                continue
            seq, have, origin, claims, pulling = source.board.snapshot()
            message = Message("snap", seq, frozenset(have), frozenset(origin), frozenset(claims), frozenset(), pulling)
            for member in self.members:
                if member is source or member.stopped:  # a stopped process reads nothing either
                    continue
                if source.name not in member.view.peers:
                    answer = SimpleNamespace(have={}, pulling=pulling)
                    contact = Contact(("127.0.0.1", 1), b"k" * 32, None)
                    member.view.offered(source.name, answer, contact)
                member.view.apply(source.name, message)

    def step(self) -> None:
        if self.clock.now - self._delivered >= self.deliver_every:
            self.deliver()
            self._delivered = self.clock.now
        for member in self.members:
            if member.stopped or member.picker is None:
                continue
            for ordinal, fetches in list(member.running.items()):
                first = min(fetches, key=lambda f: f[1])
                if self.clock.now < first[1]:
                    continue
                # The first copy to verify is written; any other fetch of it is cancelled.
                del member.running[ordinal]
                from_origin = first[2] == "origin"
                self.origin_concurrency -= sum(1 for f in fetches if f[2] == "origin")
                member.board.add_have(ordinal, from_origin)
                for job, _, _, holder, sending in fetches:
                    if holder is not None:
                        member.view.give_back(holder)
                        member.view.transfer_ended(ordinal, sending)
                    member.picker.done(job)
            while sum(len(f) for f in member.running.values()) < member.concurrency:
                job = member.picker.pick_now()
                if job is None:
                    break
                ordinal = member.board.ordinals.of(*job.key)
                assert ordinal not in member.board.have
                if job.route == ORIGINS:
                    assert ordinal not in member.running
                    member.origin_fetches.append(ordinal)
                    self.origin_concurrency += 1
                    member.running[ordinal] = [(job, self.clock.now + self.origin_s, "origin", None, None)]
                    continue
                assert job.route == PEERS and not job.duplicate or ordinal in member.running
                busy = {f[2] for f in member.running.get(ordinal, ())}
                holder = member.view.take_holder(ordinal, busy)
                assert holder is not None, "the picker chose a LAN chunk nobody usable holds"
                took = self.slow.get(holder.peer, self.lan_s)
                sending = member.view.transfer_started(ordinal)  # a holder answers at once here (as the source tells)
                member.running.setdefault(ordinal, []).append((job, self.clock.now + took, holder.peer, holder, sending))
        self.peak = max(self.peak, self.origin_concurrency)
        self.clock.now += TICK

    def run(self, members=None, limit_s: float = 600.0) -> float:
        members = members or self.members
        started = self.clock.now
        while not all(len(m.board.have) == m.board.total for m in members if not m.stopped):
            assert self.clock.now - started < limit_s, "the room never finished"
            self.step()
        return self.clock.now - started

    def run_staggered(self, starts: dict[str, float], after_step=lambda elapsed: None,
                      limit_s: float = 600.0) -> None:
        """Run the room with each member's pull starting at ``starts[name]`` (until then it
        answers "idle", as a switched-on machine does); ``after_step(seconds in)``."""
        for member in self.members:
            member.board.set_pulling(False)
        started = self.clock.now
        while not all(m.picker is not None and len(m.board.have) == m.board.total for m in self.members):
            assert self.clock.now - started < limit_s, "the room never finished"
            for member in self.members:
                if member.picker is None and self.clock.now >= starts[member.name]:
                    member.board.set_pulling(True)
                    member.start(self.manifest)
            self.step()
            after_step(self.clock.now - started)

    def origin_fetches(self) -> list[int]:
        return [o for m in self.members for o in m.origin_fetches]


@pytest.mark.parametrize("size", [2, 8, 30])
def test_a_room_that_starts_together_fetches_each_chunk_from_the_origin_once(size):
    room = Room(size, chunks=90, streams=4)
    for member in room.members:
        member.start(room.manifest)
    took = room.run()
    fetched = room.origin_fetches()
    assert sorted(fetched) == list(range(90)), "some chunk came from the origin twice or never"
    assert room.peak <= 4, f"{room.peak} origin fetches at once across the room, cap 4"
    # The link was kept busy: 90 chunks of 1 s each, 4 at a time, is 22.5 s at best.
    assert took < 22.5 * 1.25, took


def test_an_owner_busy_with_lan_fetches_starts_its_origin_chunk_at_once():
    """A loaded room: LAN copies take seconds, so every member's workers could all be on
    LAN fetches when an origin chunk becomes its to fetch. One worker stays for the origin,
    so the outside link stays busy: the origin phase ends as it would with fast LAN copies
    (90 chunks of 1 s, 4 at a time: 22.5 s at best), not seconds per chunk later."""
    room = Room(30, chunks=90, streams=4, lan_s=3.0)
    for member in room.members:
        member.start(room.manifest, concurrency=8)
    started, origin_done = room.clock.now, None
    while not all(len(m.board.have) == m.board.total for m in room.members):
        assert room.clock.now - started < 600, "the room never finished"
        room.step()
        if origin_done is None and len(room.origin_fetches()) == 90 and room.origin_concurrency == 0:
            origin_done = room.clock.now - started
    assert sorted(room.origin_fetches()) == list(range(90)), "some chunk came from the origin twice or never"
    assert origin_done < 22.5 * 1.25, f"the origin's chunks took {origin_done:.1f} s to come in"


def test_a_room_whose_pulls_start_over_two_seconds_still_fetches_each_chunk_once():
    """The students do not press Enter at the same instant: a peer whose pull starts a
    second after ours answers "idle" first. The owners of the origin's chunks must not
    change under the room as they start, even when news of a claim takes longer to arrive
    than a claim settles (a busy machine)."""
    room = Room(30, chunks=90, streams=4)
    room.deliver_every = 2 * origin_policy.CLAIM_SETTLE
    starts = {m.name: room.clock.now + random.uniform(0.0, 2.0) for m in room.members}
    room.run_staggered(starts)
    assert sorted(room.origin_fetches()) == list(range(90)), "some chunk came from the origin twice or never"
    # While the window's owners have not started, a member that sees no stream in the room
    # takes one chunk of its own out of turn; those that start before any claim can reach
    # them (here: within two deliveries of the first start) may each do so once at a time.
    first = min(starts.values())
    blind = sum(1 for at in starts.values() if at <= first + 2 * room.deliver_every)
    assert room.peak <= 4 + blind, (room.peak, blind)


def test_the_outside_link_is_busy_from_the_first_pull_whoever_owns_the_first_chunks():
    """Pulls that start over three seconds: the first one to start fetches from the origin
    at once (a chunk of its own, out of turn), not when the owners of the room's first
    chunks start theirs; still each chunk once, and at most the cap at a time once claims
    reach everyone."""
    room = Room(30, chunks=90, streams=4)
    starts = {m.name: room.clock.now + 0.1 * i for i, m in enumerate(room.members)}  # one every 0.1 s
    first_fetch = None

    def note_first_fetch(elapsed: float) -> None:
        nonlocal first_fetch
        if first_fetch is None and room.origin_concurrency:
            first_fetch = elapsed
    room.run_staggered(starts, after_step=note_first_fetch)
    assert first_fetch is not None and first_fetch <= 2 * TICK, f"the first origin fetch began {first_fetch} s in"
    assert sorted(room.origin_fetches()) == list(range(90)), "some chunk came from the origin twice or never"
    assert room.peak <= 4, room.peak


def test_origin_streams_cap_holds_across_the_room_whatever_it_is():
    for streams in (1, 2, 6):
        room = Room(12, chunks=40, streams=streams)
        for member in room.members:
            member.start(room.manifest)
        room.run()
        assert room.peak <= streams
        assert sorted(room.origin_fetches()) == list(range(40))


def test_a_stopped_member_keeps_its_claims_until_it_is_silent_past_liveness():
    room = Room(6, chunks=60, streams=4, origin_s=2.0)
    for member in room.members:
        member.start(room.manifest)

    def fetching_from_origin(m: Member) -> set[int]:
        return {o for o, fetches in m.running.items() if any(f[2] == "origin" for f in fetches)}

    while not any(fetching_from_origin(m) for m in room.members[1:]):
        room.step()
    victim = next(m for m in room.members[1:] if fetching_from_origin(m))
    claimed = fetching_from_origin(victim)
    held = set(victim.board.have)
    victim.stopped = True
    stopped_at = room.clock.now
    # While it is merely silent (< LIVENESS), nobody else fetches what it claimed.
    while room.clock.now - stopped_at < LIVENESS - 1:
        room.step()
        others = {o for m in room.members if m is not victim for o in m.origin_fetches}
        assert not claimed & others, "a silent peer's claim was fetched again before the liveness bound"
    room.run()
    others = [o for m in room.members if m is not victim for o in m.origin_fetches]
    assert len(others) == len(set(others)), "the live members fetched a chunk from the origin twice"
    assert claimed <= set(others), "the stopped member's claims never moved on"
    # Beyond its claims, only chunks it alone held when it stopped were fetched again.
    again = set(others) & set(victim.origin_fetches)
    assert again <= claimed | held, again


def test_a_late_joiner_takes_everything_from_the_lan():
    room = Room(4, chunks=40)
    for member in room.members:
        member.start(room.manifest)
    room.run()
    late = room.add(Member("peer-late", room.manifest, room.clock, streams=4))
    room.deliver()
    late.start(room.manifest)
    room.run([late])
    assert late.origin_fetches == []
    assert len(late.board.have) == 40


def test_a_member_alone_fetches_in_file_order_at_full_concurrency_without_waiting():
    room = Room(1, chunks=12)
    member = room.members[0]
    member.start(room.manifest, concurrency=4)
    room.step()
    assert sorted(member.running) == [0, 1, 2, 3]  # on the first tick: no settle, no cap
    room.run()
    assert member.origin_fetches == list(range(12))


def test_a_member_alone_among_idle_machines_loses_at_most_the_idle_grace():
    room = Room(11, chunks=40)
    for member in room.members[1:]:
        member.board.set_pulling(False)  # switched on, not pulling: they answer "idle"
    member = room.members[0]
    member.start(room.manifest, concurrency=4)
    took = room.run([member])
    assert sorted(member.origin_fetches) == list(range(40))
    # Alone it takes 40 chunks / 4 at a time x 1 s = 10 s; the idle machines' shares wait
    # out the grace (they might have been about to pull), nothing longer.
    assert took <= 10 + origin_policy.IDLE_GRACE + 1.0, took


def test_a_chunk_stuck_at_a_slow_peer_is_duplicated_from_another_peer_never_the_origin(monkeypatch):
    monkeypatch.setattr(picker_module, "ENDGAME_AFTER", ENDGAME_AFTER)
    full = set(range(20))
    room = Room(0, chunks=20)
    fast = room.add(Member("peer-fast", room.manifest, room.clock, streams=4, have=full, pulling=False))
    slow = room.add(Member("peer-slow", room.manifest, room.clock, streams=4, have=full, pulling=False))
    room.slow["peer-slow"] = 60.0
    puller = room.add(Member("peer-pull", room.manifest, room.clock, streams=4))
    room.deliver()
    puller.start(room.manifest, concurrency=4)
    took = room.run([puller])
    assert puller.origin_fetches == []
    assert puller.picker.duplicates >= 1
    assert took < 30, "a 60 s upload held the pull up: the endgame did not duplicate it"
    assert fast.board.total == slow.board.total == 20


def test_the_endgame_copies_a_slow_transfer_not_a_fetch_waiting_for_a_free_slot():
    """A busy room's last seconds: a fetch whose holders' upload slots are all taken waits
    (BUSY answers) however long; a second copy of it would only queue too. The endgame
    copies a chunk once its bytes have been coming for ``ENDGAME_AFTER``, and not before."""
    full = set(range(4))
    room = Room(0, chunks=4)
    for name in ("peer-a", "peer-b"):
        room.add(Member(name, room.manifest, room.clock, streams=4, have=full, pulling=False))
    puller = room.add(Member("peer-pull", room.manifest, room.clock, streams=4))
    puller.board.add_have(0, False)
    puller.board.add_have(1, False)
    puller.board.add_have(2, False)  # the last chunk is all it still needs
    room.deliver()
    puller.start(room.manifest, concurrency=4)
    job = puller.picker.pick_now()
    assert job is not None and job.route == PEERS
    ordinal = puller.board.ordinals.of(*job.key)
    room.clock.now += 3 * ENDGAME_AFTER  # told BUSY all along: nothing sent yet
    room.deliver()
    assert puller.picker.pick_now() is None, "a fetch waiting for a free slot was copied"
    sending = puller.view.transfer_started(ordinal)  # a slot came free: bytes are coming
    room.clock.now += ENDGAME_AFTER / 2
    room.deliver()
    assert puller.picker.pick_now() is None, "a transfer under way for less than the bound was copied"
    room.clock.now += ENDGAME_AFTER
    room.deliver()
    copy = puller.picker.pick_now()
    assert copy is not None and copy.duplicate and copy.key == job.key
    puller.view.transfer_ended(ordinal, sending)
    assert puller.view.transferring_since(ordinal) is None


def test_a_member_paused_itself_does_not_take_the_room_for_gone_when_it_resumes():
    """SIGSTOP, a suspended laptop, a starved process: when it runs again, its peers' last
    frames are older than the liveness bound, yet they are not gone: it was away, not them."""
    room = Room(6, chunks=60, origin_s=1.0)
    for member in room.members:
        member.start(room.manifest)
    for _ in range(40):
        room.step()
    paused = room.members[3]
    paused.stopped = True
    while room.clock.now - 1000.0 < 2 + 15:
        room.step()
    paused.stopped = False
    # Its first look after the pause, before any peer's frame has arrived:
    pullers, _, alone = paused.view.room(count_unknown=False)
    assert not alone and len(pullers) == 6
    assert paused.view.holder_counts(), "every peer looked gone after our own pause"
    job = paused.picker.pick_now()
    if job is not None and job.route == ORIGINS:
        held = {o for m in room.members for o in m.board.have}
        assert paused.board.ordinals.of(*job.key) not in held, "fetched from the origin what peers hold"


@settings(max_examples=300, deadline=None)
@example([(0, 1, 0, 1)] + [(9, 0, 0, 3)] * 4 + [(4, 1, 0, 0)])  # silent past liveness, then a heartbeat
@example([(0, 1, 0, 1), (3, 1, 4, 1), (10, 1, 5, 0), (3, 1, 5, 1)])  # it said it lacks a chunk, then has it
@example([(0, 1, 0, 1), (3, 1, 4, 1), (11, 1, 4, 0)] + [(9, 0, 0, 3), (4, 1, 0, 0)] * 12)  # its stall runs out
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 5), st.integers(0, 59), st.integers(0, 40)),
                min_size=1, max_size=60))
def test_the_views_kept_room_and_counts_are_always_the_ones_it_would_work_out_afresh(ops):
    """``LanView.room``, ``holder_counts`` and the usable peers behind ``free_holders`` are
    kept between changes (the picker asks on every look; a delta updates the counts in
    place): whatever frames, answers, silences, stalls and clock jumps come, the kept
    answers equal fresh ones."""
    clock = Clock()
    m = manifest(60)
    view = LanView(m, "peer-me", clock=clock)
    contact = Contact(("127.0.0.1", 1), b"k" * 32, None)
    seqs: dict[str, int] = {}
    names = [f"peer-{i}" for i in range(6)]
    for op, who, ordinal, amount in ops:
        peer = names[who % 3]  # few peers, so that one falls silent and speaks again
        if op == 0:
            view.offered(peer, SimpleNamespace(have={}, pulling=bool(amount % 2)), contact)
        elif op == 1:
            view.following(peer, contact)
        elif op in (2, 3, 4):  # a frame: delta (a claim, a have, an unclaim) or a heartbeat
            seqs[peer] = seqs.get(peer, 0) + 1
            kind = "beat" if op == 4 else "delta"
            claim = frozenset({ordinal}) if op == 2 else frozenset()
            have = frozenset({ordinal}) if op == 3 and amount % 2 else frozenset()
            unclaim = frozenset({ordinal}) if op == 3 and not amount % 2 else frozenset()
            view.apply(peer, Message(kind, seqs[peer], have, frozenset(), claim, unclaim,
                                     bool(amount % 3) if kind == "delta" else None))
        elif op == 5:
            view.set_unknown(set(names[:who]))
        elif op == 6:
            view.set_idle(set(names[who:who + 2]))
        elif op == 7:
            view.unsubscribed(peer, silent=bool(amount % 2))
        elif op == 8:
            view.forget(peer)
        elif op in (10, 11) and peer in view.peers:  # it said it lacks a chunk; it stalled on one
            view.lacks(view.peers[peer], ordinal) if op == 10 else view.stalled(view.peers[peer])
        else:
            # Steps under the pause rule (peers fall silent one by one), now and then one over it.
            clock.now += 10.0 if amount > 36 else 2.0 + (amount % 4) / 4
        every = ((True, False), (False, False), (False, True), (True, True))
        kept = [view.room(*flags) for flags in every]
        view._rooms.clear()
        assert kept == [view.room(*flags) for flags in every], f"after op {op}: the kept room is stale"
        counts = dict(view.holder_counts())  # kept, and updated in place by deltas
        free = {v.peer for v in view.free_holders()}  # from the kept usable peers
        view._counts = None
        assert counts == view.holder_counts(), f"after op {op}: the kept holder counts are stale"
        assert free == {v.peer for v in view.free_holders()}, f"after op {op}: the kept usable peers are stale"

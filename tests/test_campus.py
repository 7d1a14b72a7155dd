"""Locality (``agent.swarm.location``): where an agent is, how peers say it, and the campus
rule on a virtual clock (``agent.testing.campus``: the real board, view and picker over
modelled links). What a campus's admin would check: the outside link carries each chunk
once, each room's link about once, and a campus without locations pays several times."""

from __future__ import annotations

from types import SimpleNamespace

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import load_settings
from agent.errors import ConfigError, PeerBroken
from agent.hashing import blake3_hash
from agent.manifest import FileEntry, Manifest
from agent.swarm import location as locality
from agent.swarm.protocol import Contact, encode_contact, parse_contact
from agent.swarm.view import LanView
from agent.swarm.wire import Message
from agent.testing.campus import Campus, Topology

KEY = b"k" * 48


def test_a_location_is_parsed_and_a_bad_one_is_refused_by_name(tmp_path):
    assert locality.parse("campus|building-2|room-204") == ("campus", "building-2", "room-204")
    assert locality.parse("10.0.3.0/24") == ("10.0.3.0/24",)
    for bad in ("", "a||b", "|a", "room 204", "x" * 65, "|".join("a" * 9)):
        with pytest.raises(locality.LocationError, match="widest first"):
            locality.parse(bad)
    with pytest.raises(ConfigError, match="SHOAL_SWARM_LOCATION.*campus\\|building-2"):
        load_settings({"SHOAL_CONFIG": str(tmp_path / "none.toml"), "SHOAL_SWARM_LOCATION": "a||b"})
    (tmp_path / "config.toml").write_text('[swarm]\nlocation = "campus|b2|room-204"\n')
    assert load_settings({"SHOAL_CONFIG": str(tmp_path / "config.toml")}).swarm_location == "campus|b2|room-204"


def test_without_a_setting_an_agent_is_placed_in_its_subnet():
    import ipaddress
    import socket
    import psutil
    here = locality.default_location()
    assert len(here) == 1
    if here != locality.UNPLACED:  # an IPv4 network, e.g. 10.0.3.0/24, that one of this machine's addresses is in
        network = ipaddress.IPv4Network(here[0])
        mine = [ipaddress.IPv4Address(a.address) for addrs in psutil.net_if_addrs().values() for a in addrs
                if a.family == socket.AF_INET and not a.address.startswith("127.")]
        assert any(address in network for address in mine) and network.prefixlen < 32


def test_nearness_counts_shared_leading_segments_and_an_unsaid_place_is_beside_us():
    a, b, c = ("campus", "b1", "r1"), ("campus", "b1", "r2"), ("campus", "b2", "r1")
    assert locality.nearness(a, a) == 3 and locality.nearness(a, b) == 2 and locality.nearness(a, c) == 1
    assert locality.nearness(a, ("elsewhere",)) == 0
    assert locality.same_place(a, None) and not locality.same_place(a, b)


def test_the_owner_is_plain_rendezvous_in_one_room_and_a_room_first_on_a_campus():
    chunk = b"manifest|7"
    pullers = [f"peer-{i}" for i in range(12)]
    # One place: the rule every agent followed before locations (a room of old and new agents agrees).
    plain = max(pullers, key=lambda p: blake3_hash(p.encode() + b"|" + chunk))
    assert locality.owner(chunk, pullers, lambda p: ("room",), share_of=None) == plain
    # A campus: the room is chosen first (the one whose share the chunk is in), then the
    # owner among that room's pullers only.
    room_of = {p: ("campus", f"r{i % 3}") for i, p in enumerate(pullers)}
    chosen = ("campus", "r1")
    owner = locality.owner(chunk, pullers, room_of.__getitem__, lambda places: chosen)
    assert room_of[owner] == chosen
    assert owner == max((p for p in pullers if room_of[p] == chosen), key=lambda p: blake3_hash(p.encode() + b"|" + chunk))
    # An agent of another room that knows only some of that room's pullers still agrees it is
    # not its own chunk: only the owner's room mates, who know each other, pick the owner.
    partial = [p for p in pullers if room_of[p] != chosen] + [owner]
    assert room_of[locality.owner(chunk, partial, room_of.__getitem__, lambda places: chosen)] == chosen


def test_each_place_fetches_an_even_share_of_the_chunks_from_outside():
    places = (("campus", "r0"), ("campus", "r1"), ("campus", "r2"))
    shares = locality.spread("manifest", 64, places)
    assert len(shares) == 64 and sorted(shares.count(p) for p in places) == [21, 21, 22]
    assert locality.spread("manifest", 64, tuple(reversed(places))) == shares  # whoever lists them
    assert locality.spread("other", 64, places) != shares  # another manifest, another spread
    # The owner of a chunk is in the place whose share it is in.
    pullers = [f"peer-{i}" for i in range(9)]
    room_of = {p: places[i % 3] for i, p in enumerate(pullers)}
    for ordinal in range(64):
        chosen = locality.owner(f"manifest|{ordinal}".encode(), pullers, room_of.__getitem__,
                                lambda ps: locality.spread("manifest", 64, ps)[ordinal])
        assert room_of[chosen] == shares[ordinal]


def test_a_hello_answer_says_where_the_peer_is_and_a_malformed_place_is_a_broken_peer():
    contact = parse_contact(encode_contact(("10.0.0.5", 7100), KEY, None, [], ("campus", "r1")))
    assert contact.location == ("campus", "r1")
    assert parse_contact(encode_contact(("10.0.0.5", 7100), KEY, None)).location is None  # an older agent
    for bad in ("campus|r1", ["a", 3], ["a" * 65], ["ok"] * 9, [""]):
        data = msgpack.packb({"data": ["10.0.0.5", 7100], "key": KEY, "tls": None, "loc": bad}, use_bin_type=True)
        with pytest.raises(PeerBroken, match="malformed hello answer"):
            parse_contact(data)


def _manifest(chunks: int = 6) -> Manifest:
    return Manifest("lab/m", "main", 1 << 16, (FileEntry("f", chunks << 16, b"\0" * 32,
                                                         tuple(bytes([j]) * 24 for j in range(chunks))),))


def test_the_view_counts_a_rooms_holders_apart_and_never_crosses_rooms_for_a_busy_holder():
    here, there = ("campus", "r1"), ("campus", "r2")
    view = LanView(_manifest(), "me", location=here)
    for name, where, have in (("mate", here, {0, 1}), ("far-1", there, {0, 1, 2}), ("far-2", there, {2, 3})):
        view.offered(name, SimpleNamespace(have={}, pulling=True), Contact(("10.0.0.9", 1), KEY, None, (), where))
        view.apply(name, Message("snap", 1, frozenset(have), frozenset(), frozenset(), frozenset(), True))
    assert view.remote == {"far-1", "far-2"} and view.is_local("mate") and not view.is_local("far-1")
    assert view.holder_counts() == {0: 2, 1: 2, 2: 2, 3: 1}
    assert view.local_holder_counts() == {0: 1, 1: 1}
    assert {v.peer for v in view.free_holders(local=True)} == {"mate"}
    # Held in our room: from there only; while our room's holder is busy, we wait for it.
    assert view.take_holder(0, set()).peer == "mate"
    assert view.take_holder(0, set(), busy={"mate"}) is None
    # A holder in our room that failed it: the next nearest, in the room that has it.
    assert view.take_holder(1, {"mate"}).peer == "far-1"
    # Held only elsewhere: the least busy holder of the nearest room.
    assert view.take_holder(2, set()).peer in ("far-1", "far-2")


def _run(topology: Topology, seed: int, **timing) -> tuple[Campus, dict]:
    campus = Campus(topology, seed=seed, **timing)
    took = campus.run(limit_s=600)
    return campus, campus.report(took)


@settings(max_examples=20, deadline=None)
@given(rooms=st.lists(st.integers(1, 5), min_size=1, max_size=4), chunks=st.integers(4, 24),
       machine=st.sampled_from([100, 1000]), room=st.sampled_from([100, 1000]),
       outside=st.sampled_from([50, 500]), seed=st.integers(0, 1000),
       stagger=st.sampled_from([0.0, 1.0]), answers=st.sampled_from([0.0, 0.5]))
def test_a_campus_takes_each_chunk_from_the_origin_once_and_into_each_room_once(rooms, chunks, machine, room,
                                                                              outside, seed, stagger, answers):
    """Pulls that start within a second of each other, peers whose first answers trickle in,
    deltas that leave out what the subscriber holds (as the publisher does): every agent
    finishes (a chunk brought into a room once left its claim standing in the other rooms'
    views, and the origin's window stalled on it for ever)."""
    topology = Topology(rooms=rooms, machine_mbit=machine, room_mbit=room, outside_mbit=outside,
                        chunk_size=1 << 20, chunks=chunks)
    campus, report = _run(topology, seed, stagger_s=stagger, answer_s=answers)
    assert all(len(a.board.have) == chunks for a in campus.agents)
    assert sorted(campus.origin_fetches) == list(range(chunks))
    if not stagger and not answers:  # a campus that starts together agrees on every owner
        assert report["origin_twice"] == 0 and report["outside_F"] == pytest.approx(1.0)
        assert report["entered_twice"] == 0, "a chunk crossed into one room twice"
        assert report["room_in_F_max"] <= 1.0 + 1e-6
    # Staggered, what is asserted is that every agent finishes (the stall above). How often a
    # chunk is paid twice then is measured, not bounded here: in these tiny campuses the first
    # agent may finish before its peers' first answers arrive.
    assert report["completion_s"] >= report["bound_s"] * 0.999  # nothing beats the bound


def test_without_locations_a_campus_pays_its_room_links_several_times():
    """The contrast: the same campus, its agents not saying where they are (every peer beside
    every other, as before): the outside link still carries the model once, but chunks cross
    into rooms once per student who happens to ask a far holder."""
    placed = _run(Topology(rooms=[4, 4, 4], room_mbit=200, outside_mbit=100, chunks=32), seed=3)[1]
    unplaced = _run(Topology(rooms=[4, 4, 4], room_mbit=200, outside_mbit=100, chunks=32, locations=False), seed=3)[1]
    assert placed["outside_F"] == pytest.approx(1.0) and unplaced["outside_F"] == pytest.approx(1.0)
    assert placed["room_in_F_max"] <= 1.0 + 1e-6 < 2.0 < unplaced["room_in_F_max"]
    assert placed["completion_s"] < unplaced["completion_s"]


def test_a_pull_follows_its_whole_room_and_two_of_each_other_place():
    """Bounded neighbour sets: an agent on a campus of 300 follows its room and a few of
    each other room, not 299 peers; the agents of a room choose different ones."""
    from collections import Counter
    here = ("campus", "r00")
    places = {f"r{r:02d}-{i:02d}": ("campus", f"r{r:02d}") for r in range(10) for i in range(30)}
    places["new"] = None  # its hello has not come yet: beside us until it says where it is
    me = "r00-00"
    chosen = locality.neighbours(me, here, {p: w for p, w in places.items() if p != me})
    assert {p for p in chosen if p.startswith("r00-")} == {f"r00-{i:02d}" for i in range(1, 30)}
    assert "new" in chosen
    per_room = Counter(p[:3] for p in chosen if not p.startswith("r00-") and p != "new")
    assert per_room == {f"r{r:02d}": locality.PER_PLACE for r in range(1, 10)}
    assert len(chosen) == 29 + 1 + 2 * 9
    # A peer that said it neither pulls nor holds the model is passed over for the next of
    # its place (and ranked again once it starts); one of our room is followed all the same.
    first = {p for p in chosen if p.startswith("r01-")}
    again = locality.neighbours(me, here, {p: w for p, w in places.items() if p != me}, idle=first | {"r00-05"})
    assert len({p for p in again if p.startswith("r01-")} - first) == 2 and "r00-05" in again
    # Between them, room 0's agents follow every agent of room 1, none by many more than the
    # two each that an even share would be.
    followers = Counter(p for i in range(30) for p in locality.neighbours(
        f"r00-{i:02d}", here, {q: w for q, w in places.items() if q != f"r00-{i:02d}"}) if p.startswith("r01-"))
    assert len(followers) >= 25 and max(followers.values()) <= 7, followers


def test_a_campus_that_follows_few_peers_per_room_still_pays_each_link_once():
    """The simulator follows as the session does: each agent its room and two per other
    room (its HAVE frames a fraction of following everyone), and the campus still takes
    each chunk from the origin once and into each room once."""
    topology = Topology(rooms=[6, 6, 6], room_mbit=200, outside_mbit=100, chunks=32)
    bounded, report = _run(topology, seed=5)
    assert all(len(a.follows) == 5 + 2 * 2 for a in bounded.agents)
    everyone = _run(topology, seed=5, per_place=None)[1]
    assert report["origin_twice"] == 0 and report["outside_F"] == pytest.approx(1.0)
    assert report["entered_twice"] == 0 and report["room_in_F_max"] <= 1.0 + 1e-6
    assert report["frames_per_agent"] < 0.75 * everyone["frames_per_agent"]
    assert report["completion_s"] < 1.3 * everyone["completion_s"]


def test_a_claimed_chunk_from_another_room_ends_its_claim_even_for_subscribers_that_hold_it():
    """The publisher leaves a chunk out of a subscriber's deltas when the subscriber holds it
    already; a claim on it (a chunk brought into our room) must still end there."""
    from agent.swarm.board import Board
    from agent.swarm.wire import PeerState
    board, theirs = Board(_manifest(), pulling=True), PeerState()
    board.claim(2)
    c = board.changes_since(0)
    theirs.apply(Message("delta", 1, c.have, c.origin, c.claim, c.unclaim, c.pulling))
    assert theirs.claims == {2}
    seq = c.seq
    board.add_have(2, from_origin=False)
    c = board.changes_since(seq)
    assert 2 in c.unclaim
    # What the subscriber that holds chunk 2 is sent: the copy left out, the claim's end kept.
    theirs.apply(Message("delta", 2, c.have - {2}, c.origin, c.claim, c.unclaim, c.pulling))
    assert theirs.claims == set()


@pytest.mark.parametrize("rival_claims", [False, True])
def test_a_chunk_its_owner_has_not_seen_enters_the_room_in_the_next_ranks_turn(rival_claims):
    """The owner of a chunk's entry into our room may not follow a holder in the other room
    yet: the agent ranked next that sees one claims it in its turn (``ENTRY_STEP`` per
    rank), lets the claim settle, and fetches it; if the owner claims it meanwhile, the
    owner has it and this agent lets it go (the chunk crosses into the room once)."""
    from agent.picking import PEERS, Job
    from agent.swarm import entries
    from agent.swarm.board import Board
    from agent.swarm.picker import SwarmPicker

    manifest = _manifest(chunks=1)
    chunk = f"{manifest.id}|0".encode()
    mates = [f"mate-{i}" for i in range(64)]
    # Two roommates, one ranked before us for the chunk, one after: we are second.
    first = next(m for m in mates if locality.score(m, chunk) > locality.score("me", chunk))
    last = next(m for m in mates if locality.score(m, chunk) < locality.score("me", chunk))
    here, there = ("campus", "r1"), ("campus", "r2")
    now = [100.0]
    view = LanView(manifest, "me", clock=lambda: now[0], location=here)
    for name, where, have in ((first, here, set()), (last, here, set()), ("far", there, {0})):
        view.offered(name, SimpleNamespace(have={}, pulling=True), Contact(("10.0.0.9", 1), KEY, None, (), where))
        view.apply(name, Message("snap", 1, frozenset(have), frozenset(), frozenset(), frozenset(), True))
    board = Board(manifest, pulling=True)
    task = SimpleNamespace(file=SimpleNamespace(rel="f"))
    picker = SwarmPicker(view, board, [Job(task, 0)], clock=lambda: now[0])
    assert view.rank(0, tuple(sorted(("me", first, last)))) == 1

    assert picker.pick_now() is None and 0 not in board.claims  # the owner's turn
    now[0] += entries.ENTRY_STEP
    assert picker.pick_now() is None and 0 in board.claims  # ours: claimed, settling
    if rival_claims:  # the owner's claim, made meanwhile, reaches us
        view.apply(first, Message("delta", 2, frozenset(), frozenset(), frozenset({0}), frozenset(), True))
    now[0] += entries.ENTRY_STEP
    job = picker.pick_now()
    if rival_claims:
        assert job is None and 0 not in board.claims
    else:
        assert job is not None and job.route == PEERS and 0 in board.claims
        assert view.take_holder(0, set()).peer == "far"

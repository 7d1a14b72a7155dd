"""The pushed HAVE stream (``agent.swarm.wire``) and the board behind it
(``agent.swarm.board``): hostile bytes, oversized, out-of-order and duplicate deltas, and
a subscriber that falls behind."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from agent.errors import PeerBroken
from agent.manifest import FileEntry, Manifest
from agent.swarm.board import MAX_LOG, Board, Boards
from agent.swarm.wire import (MAX_FRAME, MAX_LIST, Ordinals, PeerState, decode, encode_beat, encode_delta,
                              encode_snapshot, frame_length)

TOTAL = 37


def manifest(counts=(3, 30, 4)) -> Manifest:
    return Manifest("lab/m", "master", 1 << 16, tuple(
        FileEntry(f"f{i}", n * (1 << 16), b"\0" * 32, tuple(bytes([i, j]) * 16 for j in range(n)))
        for i, n in enumerate(counts)))


def body(encoded: bytes) -> bytes:
    assert frame_length(encoded[:4]) == len(encoded) - 4
    return encoded[4:]


def test_ordinals_number_every_chunk_once_in_manifest_order():
    ordinals = Ordinals(manifest())
    keys = [(f.path, i) for f in manifest().files for i in range(len(f.chunks))]
    assert ordinals.total == len(keys) == TOTAL
    assert [ordinals.of(*k) for k in keys] == list(range(TOTAL))
    assert [ordinals.key(o) for o in range(TOTAL)] == keys


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_fail_only_as_a_broken_peer(data):
    try:
        decode(data, TOTAL)
    except PeerBroken:
        pass


values = st.recursive(st.none() | st.booleans() | st.integers(-5, 2 ** 40) | st.binary(max_size=8) | st.text(max_size=6),
                      lambda inner: st.lists(inner, max_size=6), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["t", "seq", "have", "origin", "claims", "claim", "unclaim", "pulling"]),
                       values | st.sampled_from(["snap", "delta", "beat"]), max_size=8))
def test_malformed_maps_fail_only_as_a_broken_peer(payload):
    try:
        message = decode(msgpack.packb(payload, use_bin_type=True), TOTAL)
    except PeerBroken:
        return
    for chunk_set in (message.have, message.origin, message.claim, message.unclaim):
        assert all(0 <= o < TOTAL for o in chunk_set)


def test_oversized_frames_and_lists_are_refused():
    with pytest.raises(PeerBroken, match="exceeds"):
        frame_length((MAX_FRAME + 1).to_bytes(4, "big"))
    too_many = msgpack.packb({"t": "delta", "seq": 1, "have": list(range(MAX_LIST + 1))})
    with pytest.raises(PeerBroken):
        decode(too_many, MAX_LIST + 10)
    with pytest.raises(PeerBroken, match="outside"):
        decode(body(encode_delta(1, have=[TOTAL])), TOTAL)
    with pytest.raises(PeerBroken, match="bitmap"):
        decode(body(encode_snapshot(1, [1], [], [], True, TOTAL + 8)), TOTAL)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sets(st.integers(0, TOTAL - 1), max_size=6), st.sets(st.integers(0, TOTAL - 1), max_size=3),
                          st.sets(st.integers(0, TOTAL - 1), max_size=3)), min_size=1, max_size=12),
       st.randoms(use_true_random=False))
def test_duplicate_and_out_of_order_deltas_change_nothing(steps, rnd):
    frames = [decode(body(encode_snapshot(1, [], [], [], True, TOTAL)), TOTAL)]
    for n, (have, claim, unclaim) in enumerate(steps, start=2):
        frames.append(decode(body(encode_delta(n, have=have, origin=set(list(have)[:1]), claim=claim,
                                               unclaim=unclaim)), TOTAL))
    in_order = PeerState()
    for message in frames:
        assert in_order.apply(message)
    replayed = PeerState()
    for message in frames:
        replayed.apply(message)
        replayed.apply(message)  # a duplicate: ignored
    shuffled = list(frames[1:])
    rnd.shuffle(shuffled)
    for message in shuffled[: len(shuffled) // 2]:  # stale ones (seq below the last applied) are ignored
        replayed.apply(message)
    assert (replayed.have, replayed.origin, replayed.claims, replayed.pulling) == \
        (in_order.have, in_order.origin, in_order.claims, in_order.pulling)
    assert not in_order.claims & in_order.have and in_order.origin <= in_order.have
    assert not in_order.apply(decode(body(encode_beat(1)), TOTAL))


def test_a_subscriber_replaying_the_board_sees_what_the_pull_did():
    board = Board(manifest())
    state, seq, frame_seq = PeerState(), 0, 0

    def catch_up():
        nonlocal seq, frame_seq
        changes = board.changes_since(seq)
        frame_seq += 1
        if changes is None:
            s, have, origin, claims, pulling = board.snapshot()
            state.apply(decode(body(encode_snapshot(frame_seq, have, origin, claims, pulling, TOTAL)), TOTAL))
            seq = s
        else:
            state.apply(decode(body(encode_delta(frame_seq, have=changes.have, origin=changes.origin,
                                                 claim=changes.claim, unclaim=changes.unclaim,
                                                 pulling=changes.pulling)), TOTAL))
            seq = changes.seq
    board.set_pulling(True)
    board.claim(3)
    board.claim(4)
    catch_up()
    assert state.claims == {3, 4} and state.pulling
    board.add_have(3, from_origin=True)  # its claim ends when it verifies
    board.unclaim(4)  # gave up on it
    board.add_have(9, from_origin=False)
    catch_up()
    assert state.have == {3, 9} and state.origin == {3} and state.claims == set()
    board.set_pulling(False)
    catch_up()
    assert not state.pulling


def test_a_subscriber_too_far_behind_gets_a_snapshot_and_a_waiter_wakes():
    board = Board(manifest((1, MAX_LOG // 1000 + 2)))
    for i in range(MAX_LOG + 10):
        board.claim(0) if i % 2 else board.unclaim(0)
    assert board.changes_since(0) is None  # the log no longer reaches back: snapshot instead
    assert board.changes_since(board.seq).have == frozenset()
    woke = []
    waiter = threading.Thread(target=lambda: woke.append(board.wait(board.seq, 5)))
    waiter.start()
    board.add_have(1, from_origin=False)
    waiter.join(5)
    assert woke == [True]
    assert board.wait(board.seq, 0.05) is False


def test_a_subscriber_and_the_pull_making_a_board_at_once_share_one():
    """Subscriptions arriving as the pull plans each ask for the board while the store
    already holds the pull's row: however the threads interleave, all of them, and the
    pull, get the same board, so what the pull records reaches every subscriber (it once
    left a peer looking idle and empty to most of a room for a whole pull)."""
    m = manifest()

    def from_store(manifest_id: str) -> Board:
        time.sleep(0.05)  # the store's queries release the GIL: others get in meanwhile
        return Board(m)
    boards = Boards(from_store)
    got: list[Board] = []
    threads = [threading.Thread(target=lambda: got.append(boards.wait_for(m.id, 1.0, lambda: True)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    pulls = boards.get(m.id) or boards.adopt(Board(m))  # what the pull's session does (Swarm.board)
    for thread in threads:
        thread.join(5)
    assert len(got) == 8 and all(board is pulls for board in got)
    pulls.set_pulling(True)
    assert all(board.pulling for board in got)

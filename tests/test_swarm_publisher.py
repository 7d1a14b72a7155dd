"""One thread pushes a board's HAVE stream to all its subscribers (``agent.swarm.publisher``),
over real sockets: every subscriber gets each change with its own frame numbering and a
heartbeat when nothing changes; a subscriber that stops reading is dropped after
``SEND_STALL`` without holding the others back; the thread ends with its last subscriber."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from agent.manifest import FileEntry, Manifest
from agent.swarm import publisher as publisher_module
from agent.swarm.board import Board
from agent.swarm.publisher import BoardPublisher
from agent.swarm.wire import FRAME_HEADER, DELTA, BEAT, decode

CHUNKS = 40


def manifest() -> Manifest:
    return Manifest("lab/m", "master", 1 << 16, (FileEntry(
        "f", CHUNKS * (1 << 16), b"\0" * 32, tuple(bytes([j]) * 32 for j in range(CHUNKS))),))


def pushers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "shoal-have-push" and t.is_alive()]


def read_frame(conn: socket.socket, timeout: float = 3.0):
    conn.settimeout(timeout)
    header = b""
    while len(header) < FRAME_HEADER.size:
        header += conn.recv(FRAME_HEADER.size - len(header))
    (length,) = FRAME_HEADER.unpack(header)
    body = b""
    while len(body) < length:
        body += conn.recv(length - len(body))
    return decode(body, CHUNKS)


@pytest.fixture
def pairs():
    made = []
    yield made
    for a, b in made:
        a.close()
        b.close()


def test_one_thread_pushes_every_change_to_every_subscriber_and_drops_a_stalled_one(pairs, monkeypatch):
    monkeypatch.setattr(publisher_module, "SEND_STALL", 0.5)
    board = Board(manifest(), pulling=True)
    pub = BoardPublisher(board)
    subs = []
    for _ in range(12):
        ours, theirs = socket.socketpair()
        pairs.append((ours, theirs))
        subs.append(pub.add(ours, board.seq))
    # A subscriber that stopped reading long ago: its socket buffers are full.
    stalled_ours, stalled_theirs = socket.socketpair()
    pairs.append((stalled_ours, stalled_theirs))
    stalled_ours.setblocking(False)
    try:
        while True:
            stalled_ours.send(b"\0" * 65536)
    except BlockingIOError:
        pass
    stalled = pub.add(stalled_ours, board.seq)
    assert len(pushers()) == 1, "one pushing thread for the board, not one per subscriber"

    started = time.monotonic()
    board.add_have(5, from_origin=False)
    board.claim(7)
    for _, theirs in pairs[:12]:
        frame = read_frame(theirs)
        assert frame.kind == DELTA and frame.seq == 2  # each connection numbers its own frames
        assert frame.have == {5} and frame.claim == {7}
    assert time.monotonic() - started < 0.5 + 1.0, "the stalled subscriber held the others back"
    assert stalled.done.wait(2.0), "a subscriber that takes no frame was never dropped"
    assert not any(sub.done.is_set() for sub in subs)

    board.add_have(9, from_origin=True)
    for _, theirs in pairs[:12]:
        frame = read_frame(theirs)
        assert frame.seq == 3 and frame.have == {9} and frame.origin == {9}

    for ours, _ in pairs[:12]:
        pub.drop(ours)
    assert all(sub.done.is_set() for sub in subs)
    deadline = time.monotonic() + 3
    while pushers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pushers(), "the pushing thread outlived its last subscriber"
    assert pub.idle


def test_a_quiet_board_sends_heartbeats_and_a_gone_subscriber_is_dropped(pairs, monkeypatch):
    monkeypatch.setattr(publisher_module, "HEARTBEAT", 0.3)
    monkeypatch.setattr(publisher_module, "WAKE", 0.1)
    board = Board(manifest())
    pub = BoardPublisher(board)
    ours, theirs = socket.socketpair()
    pairs.append((ours, theirs))
    sub = pub.add(ours, board.seq)
    assert read_frame(theirs).kind == BEAT and read_frame(theirs).kind == BEAT
    theirs.close()  # the subscriber went away: the next frame fails and drops it
    assert sub.done.wait(3.0)
    pub.close()
    late_ours, late_theirs = socket.socketpair()
    pairs.append((late_ours, late_theirs))
    assert pub.add(late_ours, board.seq).done.is_set(), "a closed publisher takes nobody"


def test_a_subscriber_is_not_told_of_chunks_it_holds_already_but_always_of_origin_ones(pairs, monkeypatch):
    """In a room each chunk verified anywhere was a frame to every member, though half of
    them held it by then (their own streams had said so). Such a chunk is left out of their
    deltas (no frame at all when nothing else changed, and a heartbeat still comes in
    time); a chunk fetched from the origin is always told (the room counts origin bytes
    paid twice from it), and so are claims."""
    monkeypatch.setattr(publisher_module, "HEARTBEAT", 0.6)
    board = Board(manifest(), pulling=True)
    held = {"peer-a": {1, 2, 3}, "peer-b": set()}
    pub = BoardPublisher(board, holdings=held.get)
    links = {}
    for peer in ("peer-a", "peer-b", None):  # None: a subscriber whose stream we do not follow
        ours, theirs = socket.socketpair()
        pairs.append((ours, theirs))
        pub.add(ours, board.seq, peer)
        links[peer] = theirs

    board.add_have(2, from_origin=False)  # peer-a holds it: nothing for peer-a
    for peer in ("peer-b", None):
        frame = read_frame(links[peer])
        assert frame.kind == DELTA and frame.have == {2}
    board.add_have(4, from_origin=False)
    board.add_have(3, from_origin=False)  # peer-a holds 3: it hears of 4 and of the claim only
    board.claim(7)

    def told(link) -> tuple[set[int], set[int], list[int]]:
        have, claim, seqs = set(), set(), []
        while 7 not in claim:
            frame = read_frame(link)
            if frame.kind == DELTA:
                have |= frame.have
                claim |= frame.claim
                seqs.append(frame.seq)
        return have, claim, seqs
    have, claim, seqs = told(links["peer-a"])
    assert have == {4} and seqs[0] == 2 and seqs == list(range(2, 2 + len(seqs))), (have, seqs)
    for peer in ("peer-b", None):
        assert told(links[peer])[0] == {3, 4}
    board.add_have(1, from_origin=True)  # from the origin: everyone hears of it
    for peer in ("peer-a", "peer-b", None):
        frame = read_frame(links[peer])
        assert frame.have == {1} and frame.origin == {1}, (peer, frame)
    # Nothing changes for a while: peer-a still hears a heartbeat in time.
    assert read_frame(links["peer-a"], timeout=2.0).kind == BEAT
    pub.close()


def test_a_peers_new_subscription_replaces_its_old_one_and_one_address_is_capped(pairs, monkeypatch):
    """The data port's subscriptions (``Subscriptions``): a peer subscribing again to the same
    manifest (its old stream dead on its side) ends the old one and takes its place; one
    address holds at most ``MAX_SUBSCRIBERS_PER_ADDRESS`` (the next is refused at once: the
    data port says BUSY); closing ends every subscription."""
    from agent.swarm.datawire import OK
    monkeypatch.setattr(publisher_module, "MAX_SUBSCRIBERS_PER_ADDRESS", 2)
    subs = publisher_module.Subscriptions()
    board = Board(manifest(), pulling=True)
    ended: dict[str, threading.Event] = {}
    results: dict[str, bool] = {}

    def subscribe(name: str, peer: str) -> socket.socket:
        ours, theirs = socket.socketpair()
        pairs.append((ours, theirs))
        ended[name] = threading.Event()

        def serve() -> None:
            results[name] = subs.serve(ours, peer, "10.0.0.9", board.manifest.id, board, lambda peer: None, 2.0)
            ended[name].set()
        threading.Thread(target=serve, daemon=True).start()
        theirs.settimeout(3)
        assert theirs.recv(1)[0] == OK  # the OK status, then its message and the snapshot
        return theirs

    first = subscribe("first", "peer-a")
    subscribe("second", "peer-b")
    assert not ended["first"].wait(0.3)  # both held
    subscribe("again", "peer-a")  # peer-a once more: its first subscription ends
    assert ended["first"].wait(3) and results["first"] is True
    first.settimeout(3)
    while first.recv(65536):  # the old stream is closed from our side
        pass
    assert not ended["again"].is_set() and not ended["second"].is_set()
    ours, theirs = socket.socketpair()
    pairs.append((ours, theirs))
    assert subs.serve(ours, "peer-c", "10.0.0.9", board.manifest.id, board, lambda peer: None, 2.0) is False
    subs.close()  # (the data port's connection thread then closes each connection)
    assert ended["again"].wait(3) and ended["second"].wait(3)

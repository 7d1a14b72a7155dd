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

"""A board's HAVE stream to every subscriber, pushed from one thread (the data port's mode
"sub", ``agent.swarm.datapath``); and the data port's subscriptions (``Subscriptions``).

Why one thread per board: in a room of 30 each board has 29 subscribers, and a thread per
subscriber meant 29 threads woken (and as many hand-overs of the interpreter lock) for
each chunk verified, to send each a few bytes. The publisher wakes once, reads the board's
changes once per distinct point its subscribers were told up to (usually one), and writes
each subscriber its frame. Frames keep each subscriber's own numbering (``agent.swarm.wire``:
the snapshot the connection's thread sent first, then deltas from what that subscriber
was last told, and a heartbeat when nothing changed for ``HEARTBEAT``).

Bounded: a subscriber gets at most ``SEND_STALL`` seconds to take a frame, else it is
dropped (its connection is closed; it subscribes again and gets a snapshot). Frames are a
few bytes, so only a reader stopped for a long time fills its socket buffers: one stalled
peer delays the others' frames by at most that, once.

Resource handling: the thread starts with the first subscriber and ends when the last one
is gone or ``close`` is called; each subscriber's ``done`` event is set when it is dropped,
so the connection's own thread (which keeps its place in the server's counts) ends too.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter

from agent.swarm import datawire, wire

HEARTBEAT = 3.0  # a subscriber hears at least this often (agent.swarm.view.LIVENESS is over 3 times it)
COALESCE = 0.05  # changes this close together go in one frame
SEND_STALL = 1.0  # the longest a subscriber may take to accept one frame
WAKE = 0.5  # the publisher looks at least this often (heartbeats, close)
MAX_SUBSCRIBERS = 256
MAX_SUBSCRIBERS_PER_ADDRESS = 16


class Subscriber:
    def __init__(self, conn: socket.socket, seq: int, frames: int, peer: str | None = None):
        self.conn, self.peer = conn, peer
        self.seq = seq  # the board's sequence number this subscriber was last told up to
        self.frames = frames  # frames sent to it so far (the wire's per-connection number)
        self.sent_at = time.monotonic()
        self.done = threading.Event()


def greet(conn: socket.socket, board) -> int:
    """Send a new subscriber its first frame, the board's snapshot (on the caller's thread,
    within the socket's own timeout); the board's sequence number it tells up to, for
    ``BoardPublisher.add``."""
    seq, have, origin, claims, pulling = board.snapshot()
    conn.sendall(wire.encode_snapshot(1, have, origin, claims, pulling, board.total))
    return seq


class BoardPublisher:
    def __init__(self, board, holdings=lambda peer: None):
        self.board = board
        # peer -> the chunks this agent knows it holds (its own HAVE stream to us), or None:
        # a chunk a subscriber already holds is left out of the deltas it is sent.
        self.holdings = holdings
        self._lock = threading.Lock()
        self._subs: dict[socket.socket, Subscriber] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def idle(self) -> bool:
        """No subscriber and no thread: the server may forget this publisher."""
        with self._lock:
            return not self._subs and self._thread is None

    def add(self, conn: socket.socket, seq: int, peer: str | None = None) -> Subscriber:
        """Push to ``conn`` (``peer``'s subscription) from now on: it was told the board up to
        ``seq`` in frame 1 (``greet``)."""
        conn.settimeout(SEND_STALL)
        sub = Subscriber(conn, seq, frames=1, peer=peer)
        with self._lock:
            if self._closed:
                sub.done.set()
                return sub
            self._subs[conn] = sub
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="shoal-have-push", daemon=True)
                self._thread.start()
        return sub

    def drop(self, conn: socket.socket) -> bool:
        """Stop pushing to ``conn`` (its thread ends); whether it was a subscriber here."""
        with self._lock:
            sub = self._subs.pop(conn, None)
        if sub is not None:
            sub.done.set()
        return sub is not None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            subs, self._subs = list(self._subs.values()), {}
        for sub in subs:
            sub.done.set()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed or not self._subs:
                    self._thread = None
                    return
                subs = list(self._subs.values())
            if self.board.wait(min(sub.seq for sub in subs), WAKE):
                time.sleep(COALESCE)  # let a burst of changes go out as one frame
            self._push(subs)

    def _push(self, subs: list[Subscriber]) -> None:
        board, now = self.board, time.monotonic()
        changes_since: dict[int, object] = {}
        snapshot = None
        for sub in subs:
            if sub.done.is_set():
                continue
            if sub.seq not in changes_since:
                changes_since[sub.seq] = board.changes_since(sub.seq)
            changes = changes_since[sub.seq]
            number = sub.frames + 1
            if changes is None:  # it fell behind the board's log: start it over from a snapshot
                snapshot = snapshot or board.snapshot()
                seq, have, origin, claims, pulling = snapshot
                data = wire.encode_snapshot(number, have, origin, claims, pulling, board.total)
            elif changes.seq == sub.seq:
                if now - sub.sent_at < HEARTBEAT:
                    continue
                seq, data = sub.seq, wire.encode_beat(number)
            else:
                seq, have = changes.seq, changes.have
                theirs = self.holdings(sub.peer) if sub.peer is not None else None
                if theirs and have:
                    # What it holds already, it needs to hear of from nobody: in a room each
                    # chunk verified anywhere was a frame to every member, and half of them
                    # had it by then. Chunks fetched from the origin are always told (the
                    # room counts origin bytes paid twice from them).
                    have = (have - theirs) | changes.origin
                    if not (have or changes.claim or changes.unclaim or changes.pulling is not None):
                        sub.seq = seq  # nothing for it: no frame (a heartbeat comes in time)
                        continue
                data = wire.encode_delta(number, have=have, origin=changes.origin, claim=changes.claim,
                                         unclaim=changes.unclaim, pulling=changes.pulling)
            try:
                sub.conn.sendall(data)
            except OSError:  # gone, reset, or stalled past SEND_STALL (socket.timeout)
                self.drop(sub.conn)
                continue
            sub.seq, sub.frames, sub.sent_at = seq, number, now


class Subscriptions:
    """Every subscription a data port serves (``agent.swarm.datapath``, mode "sub"): one
    live subscription per peer and manifest (a new one replaces the old, which is dead on
    the peer's side: it gave up on it, e.g. while this agent was stopped, and would hold a
    place here until noticed), at most ``MAX_SUBSCRIBERS`` in all and
    ``MAX_SUBSCRIBERS_PER_ADDRESS`` from one address, and one ``BoardPublisher`` per board."""

    def __init__(self):
        self._lock = threading.Lock()
        self._closed = False
        self._count: Counter = Counter()  # by address, None: in all
        self._of: dict[tuple[str, str], socket.socket] = {}
        self._conns: set[socket.socket] = set()
        self._publishers: dict[object, BoardPublisher] = {}  # by board: one pushing thread each

    def close(self) -> None:
        with self._lock:
            self._closed = True
            publishers, self._publishers = list(self._publishers.values()), {}
        for publisher in publishers:
            publisher.close()

    def _replace(self, peer: str, manifest_id: str) -> None:
        """End the peer's earlier subscription to the manifest, if any (its thread ends and
        its place frees, within a second)."""
        with self._lock:
            previous = self._of.pop((peer, manifest_id), None)
        if previous is None:
            return
        try:
            previous.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._lock:
            publishers = list(self._publishers.values())
        for publisher in publishers:
            if publisher.drop(previous):
                break
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            with self._lock:
                if previous not in self._conns:
                    break
            time.sleep(0.02)

    def serve(self, conn: socket.socket, peer: str, address: str, manifest_id: str, board, holdings,
              send_timeout: float) -> bool:
        """Take ``conn`` (past its handshake) as ``peer``'s subscription to ``board``: say OK,
        send the snapshot, then hold the connection's place (no CPU) while the board's
        publisher pushes to it, until it or we close. False, at once: over a cap (the
        caller says BUSY). ``holdings``: what the peer holds, as ``BoardPublisher`` takes it."""
        self._replace(peer, manifest_id)
        with self._lock:
            admitted = (self._count[None] < MAX_SUBSCRIBERS
                        and self._count[address] < MAX_SUBSCRIBERS_PER_ADDRESS)
            if not admitted:
                return False
            self._count[None] += 1
            self._count[address] += 1
            self._of[(peer, manifest_id)] = conn
            self._conns.add(conn)
        try:
            datawire.reply(conn, datawire.OK, b"")
            conn.settimeout(send_timeout)
            seq = greet(conn, board)
            # Added under the lock close() takes, so close() closes every publisher that
            # has a subscriber; idle ones (no subscriber, no thread) are forgotten here.
            with self._lock:
                if self._closed:
                    return True
                for gone in [b for b, p in self._publishers.items() if p.idle]:
                    del self._publishers[gone]
                publisher = self._publishers.get(board)
                if publisher is None:
                    publisher = self._publishers[board] = BoardPublisher(board, holdings=holdings)
                subscriber = publisher.add(conn, seq, peer)
            subscriber.done.wait()
            return True
        finally:
            with self._lock:
                self._count[None] -= 1
                self._count[address] -= 1
                if self._count[address] <= 0:
                    del self._count[address]
                self._conns.discard(conn)
                if self._of.get((peer, manifest_id)) is conn:
                    del self._of[(peer, manifest_id)]

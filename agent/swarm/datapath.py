"""The LAN data port: offers, HAVE streams and chunk bytes over plain TCP, chunks served
with ``os.sendfile``.

py-libp2p streams top out near 60 MB/s here with a core pinned, and each message costs
Python time in Noise and Yamux (docs/design.md), so a pull talks to its peers here: once
per pair of agents a libp2p hello (authenticated, encrypted) hands each a **key** for the
other's data port (``agent.swarm.protocol``), and everything else is plain TCP keyed by it.
Integrity comes from the hashes (the receiver verifies BLAKE3 before writing), not from the
transport.

Keys. A key (a ``Ticket``) is an id and a 32-byte secret, issued over the Noise channel to
one peer, to be used from the address its libp2p connection came from, within
``TICKET_TTL`` (hellos renew it well before) and while that connection lasts. The secret
never crosses the data connection: the server opens with a fresh nonce and the client
answers with ``HMAC(secret, nonce | mode | scope)``, where the scope is the one manifest the
connection is for, so a key seen by an eavesdropper is useless (there is nothing to see),
a handshake cannot be replayed, and a connection serves one manifest. What an eavesdropper
on the LAN *can* see is the chunk bytes of public model files and which chunks a peer asks
for, and the HAVE streams.

Wire format::

    server -> client   b"SHD2" + nonce (16 bytes)
    client -> server   hello = u16 length + msgpack [ticket id (16), mode, scope, mac (32)]
                       and, modes "offer" and "room" (scope ""): u16 length + the one request,
                       mode "content": u32 length + the manifest it asks about
    server -> client   u8 status + u64 length + message  (status 0: welcome)
    (``agent.swarm.handshake`` is this much, both sides, without I/O), then
    for "offer", "room", "content": server -> client   u32 length + the answer (``agent.swarm.protocol``)
    or, mode "get" (scope: a manifest id), any number of
    client -> server   request = u16 length + msgpack [path, chunk index]
    server -> client   u8 status + u64 length + payload  (status 0: the chunk's bytes; else a message)
    or, mode "sub" (a subscription to this agent's HAVE stream for the manifest), until either
    side closes, frames of ``agent.swarm.wire`` from server to client: a snapshot, then a
    delta when the board changes (coalesced over ``COALESCE``) or a heartbeat every
    ``HEARTBEAT`` seconds, pushed to all of a board's subscribers by one thread
    (``agent.swarm.publisher``).

Encryption (``swarm.encrypt_data``, off by default): the data server speaks TLS 1.3 with a
certificate made when the agent starts; its SHA-256 travels in the offer answer, over the
authenticated libp2p channel, and the client accepts exactly that certificate. The chunk
bytes are then sent with ``SSLSocket.sendall`` from ``pread`` blocks instead of
``sendfile`` (the README's link benchmark gives what that costs).

Only chunks the store has verified are served (from the finished file or its ``.partial``,
opened without following links), so a peer halfway through a download already serves
what it has.

Bounded: a hello must arrive within ``HANDSHAKE_TIMEOUT`` of the connection; connections
not yet through the handshake are capped per address and in all (one more is closed at
once); the key is checked before anything is served; request size, idle time, and
connections per address and in all.

Chunk requests (mode "get") and upload slots: ``agent.swarm.uploads``.
"""

from __future__ import annotations

import functools
import socket
import ssl
import struct
import threading
import time
from collections import Counter

from agent.errors import DataPathError
# The wire format and keys live in datawire, the client in dataclient; both are named here
# too, as the whole protocol is described above.
from agent.swarm import handshake
from agent.swarm.answers import PortAnswers
from agent.swarm.dataclient import DataClient
from agent.swarm.datawire import (BAD_REQUEST, BUSY, DENIED, MAGIC, MAX_OFFER, MAX_REQUEST, MISSING,
                                  MODE_CONTENT, MODE_GET, MODE_OFFER, MODE_ROOM, MODE_SUB, NONCE_LEN, OK, STATUS_NAMES,
                                  Ticket, TicketBook, decode_hello, decode_request, encode_hello, encode_request,
                                  make_tls, recv_exact, reply)
from agent.swarm.handshake import Granted, Refused
from agent.swarm.locator import ChunkLocator, StoreLocator
from agent.swarm.publisher import Subscriptions
from agent.swarm.uploads import ChunkUploads

__all__ = ["BAD_REQUEST", "BUSY", "DENIED", "MAGIC", "MAX_OFFER", "MAX_REQUEST", "MISSING", "MODE_CONTENT",
           "MODE_GET", "MODE_OFFER",
           "MODE_SUB", "NONCE_LEN", "OK", "STATUS_NAMES", "ChunkLocator", "DataClient", "DataServer", "StoreLocator",
           "Ticket", "TicketBook", "decode_hello", "decode_request", "encode_hello", "encode_request"]

IDLE_TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 5.0  # from accept to a whole hello
MAX_PENDING = 64  # connections not yet through the handshake, in all
MAX_PENDING_PER_ADDRESS = 8
MAX_PER_ADDRESS = 32  # connections from one address, in all
SUB_PLAN_WAIT = 3.0
SUB_SEND_TIMEOUT = 10.0  # an offer's answer or a subscription's snapshot not taken this long: the peer is dropped
MAX_CONTENT_ASKS = 4  # content asks answered at once (each looks up every chunk of a manifest)


# ------------------------------------------------------------------------------- server

class DataServer(ChunkUploads):
    """Serves chunks to ticket holders. Threads with blocking sockets, so ``os.sendfile``
    moves the bytes kernel-side.

    Resource handling: ``start`` binds and returns the port; ``close`` stops accepting,
    closes every connection and joins the threads; safe twice. At most ``slots`` chunks are
    sent at once; a request beyond is answered ``BUSY`` and the connection kept.
    """

    def __init__(self, locator: ChunkLocator, tickets: TicketBook, *, answers: PortAnswers | None = None,
                 host: str = "127.0.0.1", port: int = 0, slots: int = 8, idle_timeout: float = IDLE_TIMEOUT,
                 rate: int | None = None, handshake_timeout: float = HANDSHAKE_TIMEOUT, encrypt: bool = False):
        from agent.ratelimit import ThreadTokenBucket
        self.locator, self.tickets = locator, tickets
        # Offers, content and room asks, and what subscriptions need of the agent
        # (``agent.swarm.answers``); none: a bare chunk server.
        self.answers = answers or PortAnswers()
        self._content_asks = threading.BoundedSemaphore(MAX_CONTENT_ASKS)
        self.subscriptions = Subscriptions()  # HAVE streams pushed to subscribers (agent.swarm.publisher)
        # With encryption: the TLS context, and the certificate hash offers carry.
        self._tls, self.fingerprint = make_tls() if encrypt else (None, None)
        self.rate = ThreadTokenBucket(rate)  # the upload cap (SHOAL_UPLOAD_RATE), shared by all connections
        self._listener = socket.create_server((host, port), backlog=128, reuse_port=False)
        self.slots = slots  # chunks sent at once; changeable while running
        self._active = 0
        self._pending = 0
        self._pending_by: Counter = Counter()
        self._by_address: Counter = Counter()
        self._idle = idle_timeout
        self._handshake = handshake_timeout
        self._threads: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._slot_free = threading.Condition(self._lock)
        self._closed = False
        self.bytes_served = 0
        self.served_to: dict[str, int] = {}  # peer id -> bytes sent to it
        self.refused = 0  # connections closed for a cap or a bad handshake
        # What peers asked of this port (connections by mode, chunk requests answered busy):
        # the control plane's cost as `shoal status` shows it.
        self.asked = {MODE_OFFER: 0, MODE_SUB: 0, MODE_GET: 0, MODE_CONTENT: 0, MODE_ROOM: 0, "busy": 0}

    @property
    def address(self) -> tuple[str, int]:
        return self._listener.getsockname()[:2]

    def start(self) -> "DataServer":
        thread = threading.Thread(target=self._accept_loop, name="shoal-data-accept", daemon=True)
        thread.start()
        self._threads.add(thread)
        return self

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._slot_free.notify_all()
            conns = list(self._conns)
        self.subscriptions.close()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in list(self._threads):
            thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, remote = self._listener.accept()
            except OSError:
                return  # closed
            address = remote[0]
            with self._lock:
                admitted = (not self._closed and self._pending < MAX_PENDING
                            and self._pending_by[address] < MAX_PENDING_PER_ADDRESS
                            and self._by_address[address] < MAX_PER_ADDRESS)
                if admitted:
                    self._pending += 1
                    self._pending_by[address] += 1
                    self._by_address[address] += 1
                    thread = threading.Thread(target=self._serve, args=(conn, address), name="shoal-data",
                                              daemon=True)
                    self._conns.add(conn)
                    self._threads.add(thread)
                else:
                    self.refused += 1
            if not admitted:
                conn.close()  # no thread, no read: a flood costs an accept and a close
                continue
            thread.start()

    def _wrap(self, conn: socket.socket) -> ssl.SSLSocket:
        conn.settimeout(self._handshake)
        wrapped = self._tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        with self._lock:  # close() must shut the socket in use
            self._conns.discard(conn)
            self._conns.add(wrapped)
        wrapped.do_handshake()
        return wrapped

    def _handshake_peer(self, conn: socket.socket, address: str) -> Granted | None:
        """The peer, mode, scope and request of a valid hello within the handshake deadline,
        else None (after telling the client why, where there is anything to tell)."""
        deadline = time.monotonic() + self._handshake
        conn.settimeout(self._handshake)
        steps = handshake.server(lambda *hello: self.tickets.check(*hello, address))
        outcome = handshake.drive(steps, lambda n: recv_exact(conn, n, deadline), conn.sendall)
        if isinstance(outcome, Refused):
            reply(conn, outcome.status, outcome.message)
            return None
        return outcome

    def _serve(self, conn: socket.socket, address: str) -> None:
        pending = True
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                if self._tls is not None:
                    conn = self._wrap(conn)
                granted = self._handshake_peer(conn, address)
            except OSError:  # a timeout, a reset, a failed TLS handshake: no hello in time
                granted = None
            with self._lock:
                self._pending -= 1
                self._pending_by[address] -= 1
                pending = False
            if granted is None:
                with self._lock:
                    self.refused += 1
                return
            peer, mode, manifest_id, request = granted.peer, granted.mode, granted.scope, granted.request
            with self._lock:
                self.asked[mode] += 1
            if mode == MODE_OFFER:
                self._offer(conn, peer, request)
                return
            if mode == MODE_CONTENT:
                self._content(conn, peer, manifest_id, request)
                return
            if mode == MODE_ROOM:
                self._room(conn, peer, request)
                return
            if mode == MODE_SUB:
                self._subscription(conn, peer, address, manifest_id)
                return
            reply(conn, OK, b"")
            conn.settimeout(self._idle)
            self._serve_requests(conn, peer, manifest_id)
        except (OSError, socket.timeout):
            return
        finally:
            with self._lock:
                if pending:
                    self._pending -= 1
                    self._pending_by[address] -= 1
                if self._pending_by[address] <= 0:
                    self._pending_by.pop(address, None)
                self._by_address[address] -= 1
                if self._by_address[address] <= 0:
                    self._by_address.pop(address, None)
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()

    def _offer(self, conn: socket.socket, peer: str, request: bytes) -> None:
        answer = self.answers.offer(peer, request)
        reply(conn, OK, b"")
        conn.settimeout(SUB_SEND_TIMEOUT)
        conn.sendall(struct.pack(">I", len(answer)) + answer)

    def _room(self, conn: socket.socket, peer: str, request: bytes) -> None:
        room = self.answers.room
        if room is None:
            reply(conn, MISSING, b"this agent keeps no room's assignments")
            return
        try:
            answer = room(peer, request)
        except DataPathError as e:
            reply(conn, BAD_REQUEST, str(e).encode()[:200])
            return
        reply(conn, OK, b"")
        conn.settimeout(SUB_SEND_TIMEOUT)
        conn.sendall(struct.pack(">I", len(answer)) + answer)

    def _content(self, conn: socket.socket, peer: str, manifest_id: str, manifest: bytes) -> None:
        # Each ask looks up every chunk of a manifest: a few at once, the rest told busy.
        if not self._content_asks.acquire(blocking=False):
            reply(conn, BUSY, b"too many content asks at once; ask again shortly")
            return
        try:
            answer = self.answers.content(peer, manifest_id, manifest)
        finally:
            self._content_asks.release()
        if answer is None:
            reply(conn, BUSY, b"this agent answers no content asks")
            return
        reply(conn, OK, b"")
        conn.settimeout(SUB_SEND_TIMEOUT)
        conn.sendall(struct.pack(">I", len(answer)) + answer)

    def _subscription(self, conn: socket.socket, peer: str, address: str, manifest_id: str) -> None:
        """Push this agent's board for ``manifest_id`` to a subscriber until it or we close.
        Takes no upload slot (it moves a few bytes a second); capped on its own
        (``agent.swarm.publisher.Subscriptions``). While a
        pull of this agent is still planning (a room that starts at once), the subscriber
        waits up to ``SUB_PLAN_WAIT`` for the board rather than asking again and again."""
        answers = self.answers
        boards = answers.boards
        board = boards.wait_for(manifest_id, SUB_PLAN_WAIT, answers.planning) if boards is not None else None
        if board is None:
            reply(conn, MISSING, b"no such manifest here")
            return
        if board.pulling or answers.planning():  # pulling it too: its pull follows the subscriber
            answers.subscribed(peer, manifest_id)
        if not self.subscriptions.serve(conn, peer, address, manifest_id, board,
                                        functools.partial(answers.peer_holds, manifest_id), SUB_SEND_TIMEOUT):
            reply(conn, BUSY, b"too many subscriptions")

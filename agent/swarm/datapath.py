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
    server -> client   u8 status + u64 length + message  (status 0: welcome)
    then, mode "offer" (scope ""): one offer request and its answer (``agent.swarm.protocol``)
    client -> server   u16 length + request;   server -> client   u32 length + answer
    or, mode "get" (scope: a manifest id), any number of
    client -> server   request = u16 length + msgpack [path, chunk index]
    server -> client   u8 status + u64 length + payload  (status 0: the chunk's bytes; else a message)
    or, mode "sub" (a subscription to this agent's HAVE stream for the manifest), until either
    side closes, frames of ``agent.swarm.wire`` from server to client: a snapshot, then a
    delta when the board changes (coalesced over ``COALESCE``) or a heartbeat every
    ``HEARTBEAT`` seconds.

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

Upload slots are chunk *sends* at once, not connections: a request that finds them all
taken waits in line for up to ``SLOT_WAIT``, then is answered ``BUSY`` (the connection
stays usable) and the peer asks another holder. Few slots serve a room best, as BitTorrent's unchoke slots do: each copy leaves
at a good share of the uplink and its receiver can pass it on sooner.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Protocol

import msgpack

from agent.cpu import LEDGER
from agent.errors import DataPathError, NotFound, PeerBusy, PeerTimedOut, SourceUnavailable, UnsafePath
from agent.manifest import HASH_LEN, MAX_PATH_BYTES, chunk_span

MAGIC = b"SHD2"
NONCE_LEN = 16
TICKET_ID_LEN = 16
TICKET_SECRET_LEN = 32
TICKET_LEN = TICKET_ID_LEN + TICKET_SECRET_LEN  # as handed over libp2p: id then secret
MAX_REQUEST = 4 * 1024
OK, DENIED, MISSING, BAD_REQUEST, BUSY = range(5)
STATUS_NAMES = {OK: "ok", DENIED: "denied", MISSING: "missing", BAD_REQUEST: "bad request", BUSY: "busy"}
_HEADER = struct.Struct(">BQ")
MAX_TICKETS = 4096
TICKET_TTL = 3600.0
IDLE_TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 5.0  # from accept to a whole hello
MAX_PENDING = 64  # connections not yet through the handshake, in all
MAX_PENDING_PER_ADDRESS = 8
MAX_PER_ADDRESS = 32  # connections from one address, in all
RATE_SLICE = 256 * 1024
TLS_BLOCK = 1024 * 1024
MODE_OFFER, MODE_GET, MODE_SUB = "offer", "get", "sub"
MAX_OFFER = 8 * 1024 * 1024  # agent.swarm.protocol.MAX_ANSWER
SUB_PLAN_WAIT = 3.0
SLOT_WAIT = 0.3  # how long a chunk request waits for an upload slot before it is told BUSY
HEARTBEAT = 3.0  # a subscriber hears at least this often (agent.swarm.view.LIVENESS is over 3 times it)
COALESCE = 0.05  # changes this close together go in one frame
SUB_SEND_TIMEOUT = 10.0  # a subscriber that takes no frame this long is dropped
MAX_SUBSCRIBERS = 256
MAX_SUBSCRIBERS_PER_ADDRESS = 16
_DOMAIN = b"shoal-data-v2|"


# ------------------------------------------------------------------------- codec (pure)

@dataclass(frozen=True)
class Ticket:
    id: bytes
    secret: bytes

    def encode(self) -> bytes:
        return self.id + self.secret

    @classmethod
    def decode(cls, data: bytes) -> "Ticket":
        if not isinstance(data, bytes) or len(data) != TICKET_LEN:
            raise DataPathError(f"a ticket is {TICKET_LEN} bytes")
        return cls(data[:TICKET_ID_LEN], data[TICKET_ID_LEN:])


def hello_mac(secret: bytes, nonce: bytes, mode: str, scope: str) -> bytes:
    return hmac.new(secret, _DOMAIN + nonce + f"{mode}|{scope}".encode(), hashlib.sha256).digest()


def _frame(body: bytes) -> bytes:
    if len(body) > MAX_REQUEST:
        raise DataPathError(f"request of {len(body)} bytes exceeds {MAX_REQUEST}")
    return struct.pack(">H", len(body)) + body


def encode_hello(ticket: Ticket, nonce: bytes, mode: str, scope: str = "") -> bytes:
    return _frame(msgpack.packb([ticket.id, mode, scope, hello_mac(ticket.secret, nonce, mode, scope)],
                                use_bin_type=True))


def decode_hello(body: bytes) -> tuple[bytes, str, str, bytes]:
    """(ticket id, mode, scope, mac) of a hello; raises ``DataPathError``."""
    try:
        ticket_id, mode, scope, mac = msgpack.unpackb(
            body, raw=False, max_bin_len=64, max_str_len=128, max_array_len=4, max_map_len=0, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types; any is a bad hello
        raise DataPathError(f"undecodable hello ({type(e).__name__})") from e
    if (not isinstance(ticket_id, bytes) or len(ticket_id) != TICKET_ID_LEN or not isinstance(mac, bytes)
            or len(mac) != 32 or mode not in (MODE_OFFER, MODE_GET, MODE_SUB) or not isinstance(scope, str)
            or (mode == MODE_OFFER and scope != "")
            or (mode != MODE_OFFER and (len(scope) != 2 * HASH_LEN or any(c not in "0123456789abcdef"
                                                                          for c in scope)))):
        raise DataPathError("malformed hello")
    return ticket_id, mode, scope, mac


def encode_request(path: str, index: int) -> bytes:
    return _frame(msgpack.packb([path, index], use_bin_type=True))


def decode_request(body: bytes) -> tuple[str, int]:
    """Validate the msgpack body of a request (after its length)."""
    try:
        path, index = msgpack.unpackb(body, raw=False, max_bin_len=0, max_str_len=MAX_PATH_BYTES * 4,
                                      max_array_len=2, max_map_len=0, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types; any is a bad request
        raise DataPathError(f"undecodable request ({type(e).__name__})") from e
    if not isinstance(path, str) or not isinstance(index, int) or isinstance(index, bool) \
            or not 0 <= index < 1 << 32:
        raise DataPathError("malformed request")
    return path, index


# ---------------------------------------------------------------------------------- TLS

def make_tls() -> tuple[ssl.SSLContext, bytes]:
    """A server context with a fresh self-signed certificate (EC P-256), and that
    certificate's SHA-256, which peers pin (they learn it over libp2p)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal-data")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650)).sign(key, hashes.SHA256()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # load_cert_chain reads files: a private temporary one, removed at once.
    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as pem:
        os.chmod(pem.name, 0o600)
        pem.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
        pem.write(cert.public_bytes(serialization.Encoding.PEM))
        pem.flush()
        context.load_cert_chain(pem.name)
    return context, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def _client_tls() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # the certificate is pinned by its hash instead (see module docstring)
    context.verify_mode = ssl.CERT_NONE
    return context


# ------------------------------------------------------------------------------ tickets

@dataclass(frozen=True)
class _Issued:
    secret: bytes
    peer: str
    address: str | None
    expires: float


class TicketBook:
    """Keys issued over the authenticated channel, one per peer at a time. Thread-safe, bounded."""

    def __init__(self, ttl: float = TICKET_TTL, clock=time.monotonic):
        self.ttl, self._clock = ttl, clock
        self._tickets: OrderedDict[bytes, _Issued] = OrderedDict()
        self._by_peer: dict[str, list[bytes]] = {}
        self._lock = threading.Lock()

    def issue(self, peer: str, address: str | None) -> Ticket:
        """A key for ``peer`` to use this data port from ``address`` (its IP as this agent saw
        it; None: any, for tools that have no libp2p connection). The peer's older keys stay
        valid a little (a renewal may cross a connection in flight), two at most."""
        ticket = Ticket(secrets.token_bytes(TICKET_ID_LEN), secrets.token_bytes(TICKET_SECRET_LEN))
        with self._lock:
            self._tickets[ticket.id] = _Issued(ticket.secret, peer, address, self._clock() + self.ttl)
            held = self._by_peer.setdefault(peer, [])
            held.append(ticket.id)
            while len(held) > 2:
                self._tickets.pop(held.pop(0), None)
            while len(self._tickets) > MAX_TICKETS:
                old, issued = self._tickets.popitem(last=False)
                if old in self._by_peer.get(issued.peer, ()):
                    self._by_peer[issued.peer].remove(old)
        return ticket

    def revoke(self, peer: str) -> None:
        """The peer is gone (its libp2p connection closed): its keys end now."""
        with self._lock:
            for ticket_id in self._by_peer.pop(peer, []):
                self._tickets.pop(ticket_id, None)

    def check(self, ticket_id: bytes, nonce: bytes, mode: str, scope: str, mac: bytes, address: str) -> str | None:
        """The peer a valid hello comes from, or None (unknown, revoked or expired key, another
        address, a wrong MAC)."""
        with self._lock:
            issued = self._tickets.get(ticket_id)
            if issued is None:
                return None
            if issued.expires < self._clock():
                del self._tickets[ticket_id]
                return None
        if issued.address is not None and issued.address != address:
            return None
        if not hmac.compare_digest(mac, hello_mac(issued.secret, nonce, mode, scope)):
            return None
        return issued.peer


# ------------------------------------------------------------------------------ locating

class ChunkLocator(Protocol):
    def open_chunk(self, manifest_id: str, path: str, index: int) -> tuple[int, int, int] | None:
        """(an open fd, offset, length) of a *verified* chunk, or None. The caller closes the fd."""


class StoreLocator:
    """Finds verified chunks in a ``Store`` (complete files and ``.partial`` ones): one row
    looked up per request, so a removed model is gone at once."""

    MANIFESTS = 16

    def __init__(self, store):
        self.store = store
        self._manifests: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def _manifest(self, manifest_id: str):
        with self._lock:
            manifest = self._manifests.get(manifest_id)
        if manifest is None:
            manifest = self.store.manifest(manifest_id)
            with self._lock:
                self._manifests[manifest_id] = manifest
                while len(self._manifests) > self.MANIFESTS:
                    self._manifests.popitem(last=False)
        return manifest

    def open_chunk(self, manifest_id: str, path: str, index: int) -> tuple[int, int, int] | None:
        from agent.store import open_model_file
        found = self.store.holding(manifest_id=manifest_id)
        if found is None:
            return None
        ref, _ = found
        manifest = self._manifest(manifest_id)
        entry = next((f for f in manifest.files if f.path == path), None)
        if entry is None or not 0 <= index < len(entry.chunks):
            return None
        if self.store.chunk_hashes(ref, path).get(index) != entry.chunks[index]:
            return None  # not verified here (yet)
        offset, length = chunk_span(entry.size, manifest.chunk_size, index)
        try:
            fd = open_model_file(self.store, self.store.find(ref), path, partial_ok=True)
        except (FileNotFoundError, UnsafePath):
            return None
        return fd, offset, length


# ------------------------------------------------------------------------------- server

class DataServer:
    """Serves chunks to ticket holders. Threads with blocking sockets, so ``os.sendfile``
    moves the bytes kernel-side.

    Resource handling: ``start`` binds and returns the port; ``close`` stops accepting,
    closes every connection and joins the threads; safe twice. At most ``slots`` chunks are
    sent at once; a request beyond is answered ``BUSY`` and the connection kept.
    """

    def __init__(self, locator: ChunkLocator, tickets: TicketBook, *, host: str = "127.0.0.1",
                 port: int = 0, slots: int = 8, idle_timeout: float = IDLE_TIMEOUT, rate: int | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, encrypt: bool = False, boards=None, offers=None,
                 planning: Callable[[], bool] = lambda: False,
                 on_subscribed: Callable[[str, str], None] = lambda peer, manifest_id: None):
        from agent.ratelimit import ThreadTokenBucket
        self.locator, self.tickets = locator, tickets
        self.boards = boards  # agent.swarm.board.Boards: what subscribers are told
        self.offers = offers  # (peer, request bytes) -> answer bytes, for mode "offer"
        self.planning = planning  # whether a pull of this agent has not planned yet
        self.on_subscribed = on_subscribed  # (peer, manifest id): told of every subscription taken
        self._subscribers: Counter = Counter()  # by address, None: in all
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
        self.asked = {MODE_OFFER: 0, MODE_SUB: 0, MODE_GET: 0, "busy": 0}

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

    def _handshake_peer(self, conn: socket.socket, address: str) -> tuple[str, str, str, bytes | None] | None:
        """(peer, mode, scope, offer request) of a valid hello within the handshake
        deadline, else None (after telling the client why, where there is anything to tell)."""
        deadline = time.monotonic() + self._handshake
        nonce = secrets.token_bytes(NONCE_LEN)
        conn.settimeout(self._handshake)
        conn.sendall(MAGIC + nonce)
        head = _recv_exact(conn, 2, deadline)
        if head is None:
            return None
        (length,) = struct.unpack(">H", head)
        if length > MAX_REQUEST:
            _reply(conn, BAD_REQUEST, b"hello too large")
            return None
        body = _recv_exact(conn, length, deadline)
        if body is None:
            return None
        try:
            ticket_id, mode, scope, mac = decode_hello(body)
        except DataPathError as e:
            _reply(conn, BAD_REQUEST, str(e).encode())
            return None
        peer = self.tickets.check(ticket_id, nonce, mode, scope, mac, address)
        if peer is None:
            _reply(conn, DENIED, b"unknown, expired or misused key; say hello to the peer again")
            return None
        request = None
        if mode == MODE_OFFER:  # the one request comes within the same deadline
            head = _recv_exact(conn, 2, deadline)
            length = struct.unpack(">H", head)[0] if head else MAX_REQUEST + 1
            request = _recv_exact(conn, length, deadline) if length <= MAX_REQUEST else None
            if request is None:
                _reply(conn, BAD_REQUEST, b"no offer request")
                return None
        return peer, mode, scope, request

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
            peer, mode, manifest_id, request = granted
            with self._lock:
                self.asked[mode] += 1
            if mode == MODE_OFFER:
                self._offer(conn, peer, request)
                return
            if mode == MODE_SUB:
                self._subscription(conn, peer, address, manifest_id)
                return
            _reply(conn, OK, b"")
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
        answer = self.offers(peer, request) if self.offers is not None else b""
        _reply(conn, OK, b"")
        conn.settimeout(SUB_SEND_TIMEOUT)
        conn.sendall(struct.pack(">I", len(answer)) + answer)

    def _subscription(self, conn: socket.socket, peer: str, address: str, manifest_id: str) -> None:
        """Push this agent's board for ``manifest_id`` to a subscriber until it or we close.
        Takes no upload slot (it moves a few bytes a second); capped on its own. While a
        pull of this agent is still planning (a room that starts at once), the subscriber
        waits up to ``SUB_PLAN_WAIT`` for the board rather than asking again and again."""
        from agent.swarm import wire
        board = self.boards.wait_for(manifest_id, SUB_PLAN_WAIT, self.planning) if self.boards is not None else None
        if board is None:
            _reply(conn, MISSING, b"no such manifest here")
            return
        if board.pulling or self.planning():  # pulling it too: its pull follows the subscriber
            self.on_subscribed(peer, manifest_id)
        with self._lock:
            admitted = (self._subscribers[None] < MAX_SUBSCRIBERS
                        and self._subscribers[address] < MAX_SUBSCRIBERS_PER_ADDRESS)
            if admitted:
                self._subscribers[None] += 1
                self._subscribers[address] += 1
        if not admitted:
            _reply(conn, BUSY, b"too many subscriptions")
            return
        try:
            _reply(conn, OK, b"")
            conn.settimeout(SUB_SEND_TIMEOUT)
            frames = 1
            seq, have, origin, claims, pulling = board.snapshot()
            conn.sendall(wire.encode_snapshot(frames, have, origin, claims, pulling, board.total))
            while not self._closed:
                if board.wait(seq, HEARTBEAT):
                    time.sleep(COALESCE)  # let a burst of changes go out as one frame
                if self._closed:
                    return
                changes = board.changes_since(seq)
                frames += 1
                if changes is None:  # fell behind the board's log: start over from a snapshot
                    seq, have, origin, claims, pulling = board.snapshot()
                    conn.sendall(wire.encode_snapshot(frames, have, origin, claims, pulling, board.total))
                elif changes.seq == seq:
                    conn.sendall(wire.encode_beat(frames))
                else:
                    seq = changes.seq
                    conn.sendall(wire.encode_delta(frames, have=changes.have, origin=changes.origin,
                                                   claim=changes.claim, unclaim=changes.unclaim,
                                                   pulling=changes.pulling))
        finally:
            with self._lock:
                self._subscribers[None] -= 1
                self._subscribers[address] -= 1
                if self._subscribers[address] <= 0:
                    del self._subscribers[address]

    def _serve_requests(self, conn: socket.socket, peer: str, manifest_id: str) -> None:
        while True:
            head = _recv_exact(conn, 2)
            if head is None:
                return
            (length,) = struct.unpack(">H", head)
            if length > MAX_REQUEST:
                _reply(conn, BAD_REQUEST, b"request too large")
                return
            body = _recv_exact(conn, length)
            if body is None:
                return
            try:
                path, index = decode_request(body)
            except DataPathError as e:
                _reply(conn, BAD_REQUEST, str(e).encode())
                return
            where = self.locator.open_chunk(manifest_id, path, index)
            if where is None:
                _reply(conn, MISSING, b"chunk not held here")
                continue
            with self._slot_free:  # a request that finds every slot taken waits a little, in line
                slot = self._slot_free.wait_for(lambda: self._closed or self._active < self.slots, SLOT_WAIT)
                slot = slot and not self._closed
                if slot:
                    self._active += 1
            fd, offset, length = where
            try:
                if not slot:
                    with self._lock:
                        self.asked["busy"] += 1
                    _reply(conn, BUSY, b"all upload slots are taken; ask another holder")
                    continue
                with LEDGER.account("send"):
                    conn.sendall(_HEADER.pack(OK, length))
                    sent = self._send_chunk(conn, fd, offset, length)
            finally:
                os.close(fd)
                if slot:
                    with self._slot_free:
                        self._active -= 1
                        self._slot_free.notify()
            if sent != length:
                return  # the file shrank under us: drop the connection
            with self._lock:
                self.bytes_served += length
                self.served_to[peer] = self.served_to.get(peer, 0) + length

    def _send_chunk(self, conn: socket.socket, fd: int, offset: int, length: int) -> int:
        # socket.sendfile is os.sendfile plus the waiting a socket with a timeout
        # (non-blocking underneath) needs. Under an upload cap it goes in slices,
        # each paid for first.
        if self._tls is not None:
            return self._send_encrypted(conn, fd, offset, length)
        with open(fd, "rb", closefd=False) as f:
            if not self.rate.rate:
                return conn.sendfile(f, offset, length)
            sent = 0
            while sent < length:
                step = min(RATE_SLICE, length - sent)
                self.rate.take(step)
                n = conn.sendfile(f, offset + sent, step)
                if n != step:
                    break
                sent += n
            return sent


    def _send_encrypted(self, conn: ssl.SSLSocket, fd: int, offset: int, length: int) -> int:
        # No sendfile through TLS: pread blocks, each sealed by OpenSSL in one sendall.
        sent = 0
        while sent < length:
            step = min(RATE_SLICE if self.rate.rate else TLS_BLOCK, length - sent)
            self.rate.take(step)
            data = os.pread(fd, step, offset + sent)
            if not data:
                break
            conn.sendall(data)
            sent += len(data)
        return sent


def _recv_exact(conn: socket.socket, n: int, deadline: float | None = None) -> bytes | None:
    """``n`` bytes, or None if the peer closed first. With ``deadline``, the whole read must
    finish by then (a client trickling a byte at a time gains nothing)."""
    data = bytearray()
    while len(data) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("deadline passed")
            conn.settimeout(left)
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _reply(conn: socket.socket, status: int, message: bytes) -> None:
    try:
        conn.sendall(_HEADER.pack(status, len(message)) + message)
    except OSError:
        pass


# ------------------------------------------------------------------------------- client

class DataClient:
    """Blocking client with a pool of kept-alive connections per peer address and manifest.

    Connections are shared between threads (taken for one request, given back after), so a
    peer sees at most as many connections as requests in flight, never one per thread a
    thread pool happened to use (which would fill its upload slots with idle sockets).

    ``fetch`` fills ``into[:length]`` or raises: ``NotFound`` (the peer lacks the chunk),
    ``SourceUnavailable`` (refused ticket, busy, broken connection, timeout, wrong length).
    """

    MAX_IDLE_PER_PEER = 16

    def __init__(self, *, connect_timeout: float = 5.0):
        self._connect_timeout = connect_timeout
        self._idle: dict[tuple, list[socket.socket]] = {}
        self._lock = threading.Lock()

    def _take(self, address: tuple[str, int], ticket: Ticket, manifest_id: str, deadline: float,
              what: str, tls: bytes | None) -> socket.socket:
        key = (address, manifest_id, tls)
        with self._lock:
            pool = self._idle.get(key)
            if pool:
                return pool.pop()
        conn = socket.create_connection(address, timeout=self._connect_timeout)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(max(0.1, min(self._connect_timeout, deadline - time.monotonic())))
            if tls is not None:
                conn = _client_tls().wrap_socket(conn)
                seen = hashlib.sha256(conn.getpeercert(binary_form=True) or b"").digest()
                if not hmac.compare_digest(seen, tls):
                    raise SourceUnavailable(f"{what}: the peer's TLS certificate is not the one it announced "
                                            "over the swarm; someone may be in between", transient=False)
            opening = _recv_exact(conn, len(MAGIC) + NONCE_LEN)
            if opening is None or opening[:len(MAGIC)] != MAGIC:
                raise SourceUnavailable(f"{what}: not a shoal data server (or an older version)", transient=False)
            conn.sendall(encode_hello(ticket, opening[len(MAGIC):], MODE_GET, manifest_id))
            status, message = _read_status(conn)
            if status == BUSY:
                raise PeerBusy(f"{what}: busy: {message}")
            if status != OK:
                raise SourceUnavailable(f"{what}: {STATUS_NAMES.get(status, status)}: {message}", transient=False)
        except BaseException:
            conn.close()
            raise
        return conn

    def _give(self, key: tuple, conn: socket.socket) -> None:
        with self._lock:
            pool = self._idle.setdefault(key, [])
            if len(pool) < self.MAX_IDLE_PER_PEER:
                pool.append(conn)
                return
        conn.close()

    def fetch(self, address: tuple[str, int], ticket: Ticket, manifest_id: str, path: str, index: int,
              into: memoryview, length: int, deadline: float, on_connection=None, tls: bytes | None = None) -> None:
        """``on_connection(conn)``: told the socket in use, so another thread can abort the
        fetch by shutting it down (the endgame's losing copy). ``tls``: the certificate hash
        the peer announced; the connection is then encrypted and must present it."""
        what = f"peer {address[0]}:{address[1]} chunk {index} of {path}"
        key = (address, manifest_id, tls)
        conn = None
        try:
            conn = self._take(address, ticket, manifest_id, deadline, what, tls)
            if on_connection is not None:
                on_connection(conn)
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            conn.sendall(encode_request(path, index))
            header = _recv_exact(conn, _HEADER.size)
            if header is None:
                raise SourceUnavailable(f"{what}: the peer closed the connection")
            status, size = _HEADER.unpack(header)
            if status != OK:
                message = (_recv_exact(conn, min(size, 4096)) or b"").decode(errors="replace")
                if status in (MISSING, BUSY):
                    self._give(key, conn)  # the connection is still good
                    conn = None
                    if status == BUSY:
                        raise PeerBusy(f"{what}: busy: {message}")
                    raise NotFound(f"{what}: {message}")
                raise SourceUnavailable(f"{what}: {STATUS_NAMES.get(status, status)}: {message}", transient=False)
            if size != length:
                raise SourceUnavailable(f"{what}: sent {size} bytes for a {length}-byte chunk", transient=False)
            got = 0
            while got < length:
                if time.monotonic() > deadline:
                    raise PeerTimedOut(f"{what}: timed out after {got} of {length} bytes")
                n = conn.recv_into(into[got:length])
                if not n:
                    raise SourceUnavailable(f"{what}: body truncated after {got} of {length} bytes")
                got += n
            self._give(key, conn)
            conn = None
        except socket.timeout as e:
            raise PeerTimedOut(f"{what}: timed out ({e})") from e
        except OSError as e:
            raise SourceUnavailable(f"{what}: {type(e).__name__}: {e}") from e
        finally:
            if conn is not None:  # anything but a clean answer: this connection is done
                conn.close()

    def close(self) -> None:
        with self._lock:
            pools, self._idle = self._idle, {}
        for pool in pools.values():
            for conn in pool:
                conn.close()


def _read_status(conn: socket.socket) -> tuple[int, str]:
    header = _recv_exact(conn, _HEADER.size)
    if header is None:
        raise SourceUnavailable("the peer closed the connection during the handshake")
    status, size = _HEADER.unpack(header)
    message = (_recv_exact(conn, min(size, 4096)) or b"").decode(errors="replace") if size else ""
    return status, message

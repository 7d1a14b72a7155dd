"""The LAN data path: chunk bytes over plain TCP, served with ``os.sendfile``.

DESIGN.md measured py-libp2p streams at ~60 MB/s with a core pinned, so chunk bytes do not
go through libp2p: a peer asks over libp2p (authenticated) for a short-lived **ticket**,
then opens a TCP connection to the data address the peer advertised and asks for chunks
with that ticket. Integrity comes from the hashes (the receiver verifies BLAKE3 before
writing), not from the transport. This module is that data connection: the wire format,
a ticket book, a threaded server and a blocking client. (The libp2p side, discovery and
the ``LanPeerSource`` that uses this client are the LAN swarm issue's remaining work.)

Wire format, one request/response at a time on a kept-alive connection::

    request  = b"SHD1" + u16 length + msgpack [ticket(32 bytes), manifest id, path, chunk index]
    response = u8 status + u64 length + payload   (status 0: the chunk's bytes; else a message)

Only chunks the store has verified are served (from the finished file or its
``.partial``), so a peer halfway through a download already serves what it has.
Bounded: request size, connection slots (a peer over the limit gets ``BUSY``), idle time.
"""

from __future__ import annotations

import secrets
import socket
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import msgpack

from agent.errors import NotFound, ShoalError, SourceUnavailable
from agent.manifest import HASH_LEN, MAX_PATH_BYTES, PARTIAL_SUFFIX, chunk_span

MAGIC = b"SHD1"
MAX_REQUEST = 4 * 1024
TICKET_LEN = 32
OK, DENIED, MISSING, BAD_REQUEST, BUSY = range(5)
STATUS_NAMES = {OK: "ok", DENIED: "denied", MISSING: "missing", BAD_REQUEST: "bad request", BUSY: "busy"}
_HEADER = struct.Struct(">BQ")
MAX_TICKETS = 4096
IDLE_TIMEOUT = 30.0
RATE_SLICE = 256 * 1024


class DataPathError(ShoalError):
    """A malformed request or response on the data connection."""


class PeerBusy(SourceUnavailable):
    """The peer's upload slots are all taken; ask again shortly, or another peer."""


class PeerTimedOut(SourceUnavailable):
    """The peer did not deliver before the deadline (a stalled or overloaded peer)."""


# ------------------------------------------------------------------------- codec (pure)

def encode_request(ticket: bytes, manifest_id: str, path: str, index: int) -> bytes:
    body = msgpack.packb([ticket, manifest_id, path, index], use_bin_type=True)
    if len(body) > MAX_REQUEST:
        raise DataPathError(f"request of {len(body)} bytes exceeds {MAX_REQUEST}")
    return MAGIC + struct.pack(">H", len(body)) + body


def decode_request(body: bytes) -> tuple[bytes, str, str, int]:
    """Validate the msgpack body of a request (after magic and length)."""
    try:
        ticket, manifest_id, path, index = msgpack.unpackb(
            body, raw=False, max_bin_len=TICKET_LEN, max_str_len=MAX_PATH_BYTES * 4, max_array_len=4,
            max_map_len=0, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types; any is a bad request
        raise DataPathError(f"undecodable request ({type(e).__name__})") from e
    if (not isinstance(ticket, bytes) or len(ticket) != TICKET_LEN or not isinstance(manifest_id, str)
            or len(manifest_id) != 2 * HASH_LEN or not isinstance(path, str)
            or not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1 << 32):
        raise DataPathError("malformed request")
    return ticket, manifest_id, path, index


# ------------------------------------------------------------------------------ tickets

class TicketBook:
    """Short-lived tickets issued over the authenticated channel. Thread-safe, bounded."""

    def __init__(self, ttl: float = 60.0, clock=time.monotonic):
        self.ttl, self._clock = ttl, clock
        self._tickets: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self, peer: str) -> bytes:
        ticket = secrets.token_bytes(TICKET_LEN)
        with self._lock:
            self._tickets[ticket] = (peer, self._clock() + self.ttl)
            while len(self._tickets) > MAX_TICKETS:
                self._tickets.popitem(last=False)
        return ticket

    def check(self, ticket: bytes) -> str | None:
        """The peer a valid ticket was issued to, or None (unknown or expired)."""
        with self._lock:
            entry = self._tickets.get(ticket)
            if entry is None:
                return None
            if entry[1] < self._clock():
                del self._tickets[ticket]
                return None
            return entry[0]


# ------------------------------------------------------------------------------ locating

@dataclass(frozen=True)
class ChunkLocation:
    file: Path
    offset: int
    length: int


class ChunkLocator(Protocol):
    def locate(self, manifest_id: str, path: str, index: int) -> ChunkLocation | None:
        """Where a *verified* chunk lies on disk, or None."""


class StoreLocator:
    """Finds verified chunks in a ``Store`` (complete files and ``.partial`` ones)."""

    def __init__(self, store):
        self.store = store
        self._manifests: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def _model(self, manifest_id: str):
        with self._lock:
            cached = self._manifests.get(manifest_id)
        if cached is None:
            for info in self.store.models():
                if info.manifest_id == manifest_id:
                    cached = (info, self.store.manifest(manifest_id))
                    break
            else:
                return None
            with self._lock:
                self._manifests[manifest_id] = cached
        return cached

    def locate(self, manifest_id: str, path: str, index: int) -> ChunkLocation | None:
        found = self._model(manifest_id)
        if found is None:
            return None
        info, manifest = found
        entry = next((f for f in manifest.files if f.path == path), None)
        if entry is None or not 0 <= index < len(entry.chunks):
            return None
        if self.store.chunk_hashes(info.ref, path).get(index) != entry.chunks[index]:
            return None  # not verified here (yet)
        offset, length = chunk_span(entry.size, manifest.chunk_size, index)
        final = info.dir / path
        file = final if final.is_file() else final.with_name(final.name + PARTIAL_SUFFIX)
        return ChunkLocation(file, offset, length)


# ------------------------------------------------------------------------------- server

class DataServer:
    """Serves chunks to ticket holders. Threads with blocking sockets, so ``os.sendfile``
    moves the bytes kernel-side.

    Resource handling: ``start`` binds and returns the port; ``close`` stops accepting,
    closes every connection and joins the threads; safe twice. At most ``slots``
    connections are served at once; one more is answered ``BUSY`` and closed.
    """

    def __init__(self, locator: ChunkLocator, tickets: TicketBook, *, host: str = "127.0.0.1",
                 port: int = 0, slots: int = 8, idle_timeout: float = IDLE_TIMEOUT, rate: int | None = None):
        from agent.ratelimit import ThreadTokenBucket
        self.locator, self.tickets = locator, tickets
        self.rate = ThreadTokenBucket(rate)  # the upload cap (SHOAL_UPLOAD_RATE), shared by all connections
        self._listener = socket.create_server((host, port), backlog=64, reuse_port=False)
        self.slots = slots  # connections served at once; changeable while running
        self._active = 0
        self._idle = idle_timeout
        self._threads: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.bytes_served = 0
        self.served_to: dict[str, int] = {}  # peer id -> bytes sent to it

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
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                free = self._active < self.slots
                if free:
                    self._active += 1
            if not free:
                _reply(conn, BUSY, b"all upload slots are taken; try another peer")
                conn.close()
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), name="shoal-data", daemon=True)
            with self._lock:
                if self._closed:
                    conn.close()
                    self._active -= 1
                    return
                self._conns.add(conn)
                self._threads.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self._idle)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                head = _recv_exact(conn, len(MAGIC) + 2)
                if head is None:
                    return
                if head[:len(MAGIC)] != MAGIC:
                    _reply(conn, BAD_REQUEST, b"not a shoal data request")
                    return
                (length,) = struct.unpack(">H", head[len(MAGIC):])
                if length > MAX_REQUEST:
                    _reply(conn, BAD_REQUEST, b"request too large")
                    return
                body = _recv_exact(conn, length)
                if body is None:
                    return
                try:
                    ticket, manifest_id, path, index = decode_request(body)
                except DataPathError as e:
                    _reply(conn, BAD_REQUEST, str(e).encode())
                    return
                peer = self.tickets.check(ticket)
                if peer is None:
                    _reply(conn, DENIED, b"unknown or expired ticket; ask for a new one")
                    return
                where = self.locator.locate(manifest_id, path, index)
                if where is None:
                    _reply(conn, MISSING, b"chunk not held here")
                    continue
                conn.sendall(_HEADER.pack(OK, where.length))
                with open(where.file, "rb") as f:
                    # socket.sendfile is os.sendfile plus the waiting a socket with a
                    # timeout (non-blocking underneath) needs. Under an upload cap it
                    # goes in slices, each paid for first.
                    if self.rate.rate:
                        sent = 0
                        while sent < where.length:
                            step = min(RATE_SLICE, where.length - sent)
                            self.rate.take(step)
                            n = conn.sendfile(f, where.offset + sent, step)
                            if n != step:
                                break
                            sent += n
                    else:
                        sent = conn.sendfile(f, where.offset, where.length)
                if sent != where.length:
                    return  # the file shrank under us: drop the connection
                with self._lock:
                    self.bytes_served += where.length
                    self.served_to[peer] = self.served_to.get(peer, 0) + where.length
        except (OSError, socket.timeout):
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
                self._active -= 1
            conn.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
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
    """Blocking client with a pool of kept-alive connections per peer address.

    Connections are shared between threads (taken for one request, given back after), so a
    peer sees at most as many connections as requests in flight, never one per thread a
    thread pool happened to use (which would fill its upload slots with idle sockets).

    ``fetch`` fills ``into[:length]`` or raises: ``NotFound`` (the peer lacks the chunk),
    ``SourceUnavailable`` (refused ticket, busy, broken connection, timeout, wrong length).
    """

    MAX_IDLE_PER_PEER = 16

    def __init__(self, *, connect_timeout: float = 5.0):
        self._connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}
        self._lock = threading.Lock()

    def _take(self, address: tuple[str, int]) -> socket.socket:
        with self._lock:
            pool = self._idle.get(address)
            if pool:
                return pool.pop()
        conn = socket.create_connection(address, timeout=self._connect_timeout)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _give(self, address: tuple[str, int], conn: socket.socket) -> None:
        with self._lock:
            pool = self._idle.setdefault(address, [])
            if len(pool) < self.MAX_IDLE_PER_PEER:
                pool.append(conn)
                return
        conn.close()

    def fetch(self, address: tuple[str, int], ticket: bytes, manifest_id: str, path: str, index: int,
              into: memoryview, length: int, deadline: float, on_connection=None) -> None:
        """``on_connection(conn)``: told the socket in use, so another thread can abort the
        fetch by shutting it down (the endgame's losing copy)."""
        what = f"peer {address[0]}:{address[1]} chunk {index} of {path}"
        conn = None
        try:
            conn = self._take(address)
            if on_connection is not None:
                on_connection(conn)
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            conn.sendall(encode_request(ticket, manifest_id, path, index))
            header = _recv_exact(conn, _HEADER.size)
            if header is None:
                raise SourceUnavailable(f"{what}: the peer closed the connection")
            status, size = _HEADER.unpack(header)
            if status != OK:
                message = (_recv_exact(conn, min(size, 4096)) or b"").decode(errors="replace")
                if status == MISSING:
                    self._give(address, conn)  # the connection is still good
                    conn = None
                    raise NotFound(f"{what}: {message}")
                if status == BUSY:
                    raise PeerBusy(f"{what}: busy: {message}")
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
            self._give(address, conn)
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

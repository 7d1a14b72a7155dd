"""The client side of the LAN data port: a pull's chunk fetches, over connections kept
per peer and reused (``agent.swarm.datapath`` describes the protocol)."""

from __future__ import annotations

import socket
import ssl
import threading
import time

from agent.errors import NotFound, PeerBusy, PeerTimedOut, SourceUnavailable
from agent.swarm import handshake
from agent.swarm.datawire import (BUSY, MISSING, MODE_GET, OK, STATUS_NAMES, HEADER, Ticket, client_tls, recv_exact,
                                  encode_request)
from agent.swarm.handshake import NotADataPort, certificate_matches

# The socket wakes its reader once this much is queued (or the chunk's rest, if less). Small
# enough that a slow peer still shows progress well within ``idle`` (10 Mbit/s: ~0.2 s).
RECV_LOWAT = 256 * 1024


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
                conn = client_tls().wrap_socket(conn)
                if not certificate_matches(conn.getpeercert(binary_form=True), tls):
                    raise SourceUnavailable(f"{what}: the peer's TLS certificate is not the one it announced "
                                            "over the swarm; someone may be in between", transient=False)

            def read(n: int) -> bytes:
                data = recv_exact(conn, n)
                if data is None:
                    raise SourceUnavailable(f"{what}: the peer closed the connection during the handshake")
                return data
            try:
                status, message = handshake.drive(handshake.client(ticket, MODE_GET, manifest_id), read, conn.sendall)
            except NotADataPort as e:
                raise SourceUnavailable(f"{what}: {e}", transient=False) from None
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
              into: memoryview, length: int, deadline: float, on_connection=None, tls: bytes | None = None,
              idle: float | None = None, on_transfer=None) -> None:
        """``on_connection(conn)``: told the socket in use, so another thread can abort the
        fetch by shutting it down (the endgame's losing copy). ``on_transfer()``: told when
        the peer's answer says the bytes are coming (a slot was free). ``tls``: the certificate hash
        the peer announced; the connection is then encrypted and must present it. ``idle``:
        the longest wait for the next bytes (``PeerTimedOut`` past it); a transfer that keeps
        moving may take until ``deadline``, however slow the peer's link."""
        what = f"peer {address[0]}:{address[1]} chunk {index} of {path}"
        key = (address, manifest_id, tls)
        conn = None
        try:
            conn = self._take(address, ticket, manifest_id, deadline, what, tls)
            if on_connection is not None:
                on_connection(conn)
            patience = idle or float("inf")

            def wait() -> float:  # the socket's timeout: the next bytes, never past the deadline
                return max(0.1, min(patience, deadline - time.monotonic()))
            conn.settimeout(wait())
            conn.sendall(encode_request(path, index))
            header = recv_exact(conn, HEADER.size)
            if header is None:
                raise SourceUnavailable(f"{what}: the peer closed the connection")
            status, size = HEADER.unpack(header)
            if status != OK:
                message = (recv_exact(conn, min(size, 4096)) or b"").decode(errors="replace")
                if status in (MISSING, BUSY):
                    self._give(key, conn)  # the connection is still good
                    conn = None
                    if status == BUSY:
                        raise PeerBusy(f"{what}: busy: {message}")
                    raise NotFound(f"{what}: {message}")
                raise SourceUnavailable(f"{what}: {STATUS_NAMES.get(status, status)}: {message}", transient=False)
            if size != length:
                raise SourceUnavailable(f"{what}: sent {size} bytes for a {length}-byte chunk", transient=False)
            if on_transfer is not None:
                on_transfer()
            _read_body(conn, into, length, deadline, wait, what)
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


def _read_body(conn: socket.socket, into: memoryview, length: int, deadline: float, wait, what: str) -> None:
    """Fill ``into[:length]`` from ``conn``. Reads wake once ``RECV_LOWAT`` is queued (or the
    chunk's rest), not for every segment: a chunk is then a few dozen reads, not hundreds
    (CPU a busy room lacks). A peer trickling below that mark within ``wait()`` is still
    progress: what came is read, and the rest of the chunk wakes for every byte. Leaves the
    mark at one byte for the next answer's header (a BUSY is a few bytes)."""
    got, lowat, mark = 0, RECV_LOWAT, 1
    try:
        while got < length:
            if time.monotonic() > deadline:
                raise PeerTimedOut(f"{what}: timed out after {got} of {length} bytes")
            want = max(1, min(lowat, length - got))
            if want != mark:  # a syscall: only when the mark moves
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                mark = want
            timeout = wait()
            conn.settimeout(timeout)
            try:
                n = conn.recv_into(into[got:length])
            except socket.timeout:
                if lowat == 1:
                    raise
                lowat = mark = 1
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                conn.settimeout(0.0)
                try:
                    n = conn.recv_into(into[got:length])
                except (BlockingIOError, ssl.SSLWantReadError):
                    raise socket.timeout(f"no byte in {timeout:.1f} s") from None
            if not n:
                raise SourceUnavailable(f"{what}: body truncated after {got} of {length} bytes")
            got += n
    finally:
        if mark != 1:
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass  # a broken connection: closed by the caller, never reused


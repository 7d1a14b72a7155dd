"""The data port's chunk requests (mode "get", ``agent.swarm.datapath``; ``DataServer`` mixes
this in): each request names a chunk of the connection's manifest; a verified one is sent
with ``os.sendfile`` (or sealed by TLS in ``pread`` blocks when the port encrypts), under
the upload cap.

Upload slots are chunk *sends* at once, not connections: a request that finds them all taken
waits in line for up to ``SLOT_WAIT``, then is answered ``BUSY`` (the connection stays
usable) and the peer asks another holder. Few slots serve a room best, as BitTorrent's
unchoke slots do: each copy leaves at a good share of the uplink and its receiver can pass
it on sooner.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct

from agent.cpu import LEDGER
from agent.errors import DataPathError
from agent.swarm.datawire import BAD_REQUEST, BUSY, HEADER, MAX_REQUEST, MISSING, OK, decode_request, recv_exact, reply

RATE_SLICE = 256 * 1024
TLS_BLOCK = 1024 * 1024
SLOT_WAIT = 0.3  # how long a chunk request waits for an upload slot before it is told BUSY


class ChunkUploads:
    """``DataServer``'s chunk serving: it reads the server's locator, slots, lock, rate and
    counts (set up by ``DataServer.__init__``)."""

    def _serve_requests(self, conn: socket.socket, peer: str, manifest_id: str) -> None:
        while True:
            head = recv_exact(conn, 2)
            if head is None:
                return
            (length,) = struct.unpack(">H", head)
            if length > MAX_REQUEST:
                reply(conn, BAD_REQUEST, b"request too large")
                return
            body = recv_exact(conn, length)
            if body is None:
                return
            try:
                path, index = decode_request(body)
            except DataPathError as e:
                reply(conn, BAD_REQUEST, str(e).encode())
                return
            where = self.locator.open_chunk(manifest_id, path, index)
            if where is None:
                reply(conn, MISSING, b"chunk not held here")
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
                    reply(conn, BUSY, b"all upload slots are taken; ask another holder")
                    continue
                with LEDGER.account("send"):
                    conn.sendall(HEADER.pack(OK, length))
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

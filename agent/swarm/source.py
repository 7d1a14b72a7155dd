"""``LanPeerSource``: chunks from swarm peers, first in the scheduler's source order.

Each chunk goes to the least busy peer whose have-map (``LanView``, refreshed while the
pull runs) lists it, at most ``PER_PEER`` requests per peer at once. ``fetch`` names the
peer that delivered; the scheduler hashes the bytes (once) and, if they lie, hands that
name back to ``rejected``: the peer is dropped for the rest of the pull (and shown in
``shoal peers``). A peer that sends nothing on a chunk for ``LAN_TIMEOUT``, or has not
finished it by the chunk's deadline, is put aside for a while and the chunk moves to
another holder; a slow but moving transfer is let finish (the endgame may race it). A peer whose upload slots are
full is waited for briefly. A chunk no usable peer holds raises ``ChunkNotHeld`` and goes
to the mirror or the origin.
"""

from __future__ import annotations

import socket
import threading
import time

from agent.errors import NotFound, SourceUnavailable
from agent.manifest import ModelRef
from agent.errors import ChunkNotHeld, PeerBusy, PeerTimedOut
from agent.sources import ChunkRequest, ChunkSource
from agent.swarm.dataclient import DataClient
from agent.swarm.datawire import Ticket
from agent.swarm.holders import PeerView
from agent.swarm.view import LanView

# A peer that sends nothing for this long on a chunk is stalled (stopped, gone, swamped)
# and put aside; one that keeps sending, however slowly (a student on a thin link may be
# the only holder of a chunk), gets until the chunk's deadline: the endgame fetches a slow
# copy again from a faster holder, and nobody pays the origin for its slowness.
LAN_TIMEOUT = 5.0
BUSY_WAIT = 0.1


class LanPeerSource(ChunkSource):
    name = "lan"
    endgame = True  # a chunk crawling from one peer may be fetched again from another

    def __init__(self, view: LanView):
        self.view = view
        self.manifest = view.manifest
        self.client = DataClient()
        self._sockets: dict[tuple[str, int], list] = {}  # chunk -> connections fetching it now
        self._lock = threading.Lock()

    def abort(self, path: str, index: int) -> None:
        """Another fetch of this chunk won (endgame): cut ours short."""
        with self._lock:
            conns = list(self._sockets.get((path, index), ()))
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def fetch(self, ref: ModelRef, request: ChunkRequest, into: memoryview, deadline: float) -> PeerView:
        index = request.offset // self.manifest.chunk_size
        path = request.path
        ordinal = self.view.ordinals.of(path, index)
        tried: set[str] = set()  # failed this chunk (lacks it, broke, stalled)
        busy: set[str] = set()  # all its upload slots were taken just now
        problems: list[str] = []
        while True:
            peer = self.view.take_holder(ordinal, tried, busy)
            if peer is None:
                if busy and time.monotonic() + BUSY_WAIT < deadline:
                    time.sleep(BUSY_WAIT)  # every holder is sending to others: ask again in a moment
                    busy.clear()
                    continue
                if not tried and not busy:
                    raise ChunkNotHeld(f"no LAN peer holds chunk {index} of {path}")
                raise SourceUnavailable(f"LAN peers failed chunk {index} of {path}: {'; '.join(problems)[:300]}",
                                        transient=False)  # every holder was tried: no point in a retry
            got = 0
            lan_deadline = deadline
            started: list[float] = []  # this attempt's transfer clock (agent.swarm.picker's endgame)
            try:
                key, mine = (path, index), []

                def register(conn, key=key, mine=mine):
                    mine.append(conn)
                    with self._lock:
                        self._sockets.setdefault(key, []).append(conn)
                try:
                    self.client.fetch(peer.data, Ticket.decode(peer.ticket), self.manifest.id, path, index, into,
                                      request.length, lan_deadline, on_connection=register, tls=peer.tls,
                                      idle=LAN_TIMEOUT,
                                      on_transfer=lambda: started.append(self.view.transfer_started(ordinal)))
                finally:
                    with self._lock:
                        left = [c for c in self._sockets.get(key, []) if c not in mine]
                        if left:
                            self._sockets[key] = left
                        else:
                            self._sockets.pop(key, None)
                got = request.length
            except NotFound as e:
                self.view.lacks(peer, ordinal)
                tried.add(peer.peer)
                problems.append(str(e))
                continue
            except PeerBusy:
                busy.add(peer.peer)
                self.view.said_busy(peer)
                continue
            except SourceUnavailable as e:
                problems.append(str(e))
                if isinstance(e, PeerTimedOut) or time.monotonic() >= lan_deadline:
                    self.view.stalled(peer)
                    tried.add(peer.peer)
                    if time.monotonic() >= deadline:
                        raise SourceUnavailable(f"LAN peer {peer.peer[:16]} stalled on chunk {index} of {path}; "
                                                "it is put aside for a while", transient=False) from e
                    continue
                tried.add(peer.peer)
                continue
            finally:
                self.view.give_back(peer, got)
                for token in started:
                    self.view.transfer_ended(ordinal, token)
            return peer  # the scheduler hashes the bytes once, and names this peer if they lie

    def rejected(self, token: object, reason: str) -> str:
        """The peer ``token`` sent bytes that failed their hash: it is dropped for this pull."""
        self.view.ban(token, f"sent a corrupt chunk ({reason[:80]})")
        return f"LAN peer {token.peer[:16]} sent {reason}; the peer is dropped for this pull"

    def close(self) -> None:
        self.client.close()

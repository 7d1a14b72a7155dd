"""A holder as a pull sees it (``PeerView``) and the thread side of a pull's view
(``agent.swarm.view.LanView`` mixes it in): which holder a chunk is fetched from, the LAN transfers under way (the endgame's clock), and what a
fetch learned of a holder (busy for now, stalled, lacks a chunk, lied). Called from the
scheduler's worker threads through ``agent.swarm.source.LanPeerSource``, under the view's
lock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from agent.swarm import location as locality
from agent.swarm.wire import PeerState

STALLED_REST = 30.0  # a peer that timed out on a chunk is not asked again for this long
BUSY_REST = 0.5  # seconds a holder that said BUSY is not chosen for a new chunk
PER_PEER = 2  # requests in flight to one peer from this pull (its upload slots are shared)


@dataclass
class PeerView:
    """One peer as a pull sees it: how to reach its data port, what its HAVE stream says,
    and what this pull learned of it as a holder."""
    peer: str
    data: tuple[str, int]
    ticket: bytes
    tls: bytes | None = None  # the peer's data server certificate (SHA-256), when it encrypts
    state: PeerState = field(default_factory=PeerState)
    heard: float = 0.0  # when it last said anything (an answer, a frame, a heartbeat)
    subscribed: bool = False  # its HAVE stream is open
    silent: bool = False  # its stream went quiet past LIVENESS: asking again does not revive it
    in_flight: int = 0
    stalled_until: float = 0.0
    busy_until: float = 0.0  # it said all its upload slots were taken: new chunks go elsewhere meanwhile
    banned: str | None = None
    bytes_down: int = 0
    missing: set[int] = field(default_factory=set)  # asked, it said it lacks them
    nearness: int = locality.MAX_SEGMENTS  # location segments it shares with us (agent.swarm.location)
    local: bool = True  # in our room (the same location, or it said none)


class HolderChoice:
    """``LanView``'s thread side: it reads the view's peers, places and kept usable peers
    (set up by ``LanView.__init__``), and each chunk's home place (``RoomCount.home_of``)."""

    def take_holder(self, ordinal: int, exclude: set[str], busy: set[str] = frozenset()) -> PeerView | None:
        """The least busy of the nearest usable holders of a chunk (``agent.swarm.location``)
        but those in ``exclude`` (they failed it), counted in flight until ``give_back``.
        None while every nearest holder is ``busy`` (they said so just now): a chunk waits
        for a holder in its room rather than cross to another room for it."""
        now = self._now()
        with self._lock:
            self._refresh(now)
            candidates = [v for v in self._usable_peers if ordinal in v.state.have and v.peer not in exclude
                          and ordinal not in v.missing]
            if not candidates:
                return None
            nearest = max(v.nearness for v in candidates)
            candidates = [v for v in candidates if v.nearness == nearest and v.peer not in busy]
            if not candidates:
                return None
            random.shuffle(candidates)
            # Among rooms equally near, the one that fetched the chunk from outside (its share,
            # ``locality.spread``): each room then sends out about its share once per other
            # room, instead of the rooms that happened to take a chunk early sending it again.
            home = None if candidates[0].local else self.home_of(ordinal)
            best = min(candidates, key=lambda v: (home is not None and self.places.get(v.peer) != home, v.in_flight))
            best.in_flight += 1
            return best

    def transfer_started(self, ordinal: int) -> float:
        """A holder began sending ``ordinal`` (its answer came): the token for ``transfer_ended``."""
        with self._lock:
            started = self._clock()
            self._transfers.setdefault(ordinal, []).append(started)
            return started

    def transfer_ended(self, ordinal: int, token: float) -> None:
        with self._lock:
            running = self._transfers.get(ordinal)
            if running and token in running:
                running.remove(token)
                if not running:
                    del self._transfers[ordinal]

    def transferring_since(self, ordinal: int) -> float | None:
        """When the oldest transfer of ``ordinal`` under way began sending, or None (none
        is: its fetch waits for a holder's free slot, or has not begun)."""
        with self._lock:
            running = self._transfers.get(ordinal)
            return min(running) if running else None

    def give_back(self, view: PeerView, nbytes: int = 0) -> None:
        with self._lock:
            view.in_flight -= 1
            view.bytes_down += nbytes

    def lacks(self, view: PeerView, ordinal: int) -> None:
        with self._lock:
            view.missing.add(ordinal)
            self._dirty()

    def said_busy(self, view: PeerView) -> None:
        """It answered BUSY: the picker starts no new chunk that only it could give for
        ``BUSY_REST`` (a busy holder is one that many ask: like BitTorrent's choke, it
        sends its askers to other chunks and other holders)."""
        with self._lock:
            view.busy_until = self._clock() + BUSY_REST

    def stalled(self, view: PeerView) -> None:
        with self._lock:
            view.stalled_until = self._clock() + STALLED_REST
            self._dirty()

    def ban(self, view: PeerView, reason: str) -> None:
        with self._lock:
            view.banned = reason
            self._dirty()

    def busy(self, view: PeerView) -> bool:
        return view.in_flight >= PER_PEER

    def summary(self) -> dict[str, dict]:
        with self._lock:
            return {v.peer: {"bytes_down": v.bytes_down, "banned": v.banned} for v in self.peers.values()}

"""A pull's live view of the swarm: what each peer holds, claims and does, for one manifest.

``LanView`` is fed by the pull's session (``agent.swarm.membership``): a peer's offer answer
(its data address, ticket, and what it held when it answered), then the frames of its
pushed HAVE stream (``agent.swarm.wire``). A peer is **live** while it is heard from: a
subscription delivers at least a heartbeat every couple of seconds, and a peer silent for
``LIVENESS`` seconds (stopped, cut off, gone) no longer counts as holding or claiming
anything. The view also keeps what this pull learned about each peer (requests in flight,
a stall, a ban for a corrupt chunk, bytes received).

It is shared between the trio task that feeds it and the worker threads that fetch through
``LanPeerSource``, hence the lock. Chunks are named by ordinal (``wire.Ordinals``). Two
parts live beside it, mixed in: who pulls and who owns each chunk (``agent.swarm.pullers``)
and the worker threads' side, choosing holders (``agent.swarm.holders``).
"""

from __future__ import annotations

import threading
import time

import trio

from agent.manifest import Manifest
from agent.swarm import location as locality
from agent.swarm.holders import PER_PEER, HolderChoice, PeerView
from agent.swarm.pullers import RoomCount
from agent.swarm.wire import BEAT, DELTA, Message, Ordinals

LIVENESS = 10.0  # seconds without a frame after which a peer counts as gone
RESUME_GAP = 3.0  # a gap this long between two looks at the clock is a pause of this process


class LanView(RoomCount, HolderChoice):
    def __init__(self, manifest: Manifest, self_id: str, *, clock=time.monotonic,
                 location: locality.Location | None = None):
        self.manifest = manifest
        self.self_id = self_id
        # Where we are, and where each peer said it is (its hello: agent.swarm.location).
        # Peers elsewhere hold chunks a room fetches once, by its owner.
        self.location = location
        self.places: dict[str, locality.Location] = {}
        self.elsewhere: set[str] = set()  # peers whose place is not ours (followed or not)
        self.ordinals = Ordinals(manifest)
        self.peers: dict[str, PeerView] = {}
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = trio.Event() if _in_trio() else None
        self._owner_cache: dict[tuple[str, ...], dict[int, str]] = {}
        self._rank_cache: dict[tuple[str, ...], dict[int, int]] = {}  # (RoomCount.rank)
        self._spread_for: tuple | None = None  # (places, which place owns each chunk)
        # Holder counts per chunk, rebuilt lazily after a change or when a peer's liveness
        # or rest runs out: the picker asks for every pending chunk on every pick.
        self._counts: dict[int, int] | None = None
        self._local_counts: dict[int, int] | None = None  # the same, of holders in our room
        self._usable_peers: list[PeerView] = []  # kept with the counts
        self._counts_until = float("inf")
        # ``room`` likewise, by the flags it was asked with; dropped with ``_counts``.
        self._rooms: dict[tuple[bool, bool], tuple] = {}
        # ordinal -> when each of its LAN transfers now under way began sending bytes
        # (the endgame's clock: a chunk waiting for a holder's free slot is not slow)
        self._transfers: dict[int, list[float]] = {}
        self.unknown: frozenset[str] = frozenset()  # connected peers asked, not heard from yet
        self.idle: frozenset[str] = frozenset()  # connected peers that said they do not pull this (yet)
        self.created = clock()
        self._last_look = self.created
        self.resumed_at = float("-inf")
        self.settled_at: float | None = None  # when every connected peer had answered

    # ------------------------------------------------------------ updates (trio side)

    def offered(self, peer: str, answer, contact) -> None:
        """A peer's offer, and its contact (how to reach its data port): what it held then
        (until its stream says more)."""
        now = self._now()
        with self._lock:
            view = self.peers.get(peer)
            if view is None:
                view = self.peers[peer] = PeerView(peer, contact.data, contact.key, contact.tls)
            view.data, view.ticket, view.tls, view.heard = contact.data, contact.key, contact.tls, now
            self._place(peer, contact.location)
            if not view.subscribed:
                view.state.have = {self.ordinals.of(path, i) for path, held in answer.have.items() for i in held}
                view.state.pulling = answer.pulling
            self._dirty()
        self._notify()

    def following(self, peer: str, contact) -> None:
        """A peer about to be followed without an offer: what it holds comes with its stream."""
        with self._lock:
            view = self.peers.get(peer)
            if view is None:
                view = self.peers[peer] = PeerView(peer, contact.data, contact.key, contact.tls)
            view.data, view.ticket, view.tls = contact.data, contact.key, contact.tls
            self._place(peer, contact.location)
            # Its stream's first frame is due: it counts as alive meanwhile (its claims hold),
            # unless it fell silent: asking again is not hearing (a stopped peer's kernel
            # still accepts the connection), so a silent peer stays gone until it speaks.
            if not view.silent:
                view.heard = self._now()
            self._dirty()

    def apply(self, peer: str, message: Message) -> None:
        """A frame of the peer's HAVE stream."""
        with self._lock:
            view = self.peers.get(peer)
            if view is None:
                return
            now = self._clock()
            revived = not self._alive(view, now)
            view.heard = now
            view.subscribed = True
            view.silent = False
            state = view.state
            if message.kind == DELTA:  # what it changes, measured before it is applied
                new = message.have - state.have
                room_changed = bool(message.claim or message.unclaim or message.have & state.claims
                                    or (new and not state.have)
                                    or (message.pulling is not None and message.pulling != state.pulling))
            if state.apply(message) and message.kind != BEAT:
                changed = True
                if message.kind == DELTA and not revived and not view.missing and self._counts is not None \
                        and view.stalled_until <= now:
                    # The common frame (a usable peer verified a chunk or two): the kept
                    # counts take it as it is, and the kept rooms stay unless it touched
                    # what a room is made of. A room of 30 sends each agent a frame per
                    # chunk verified anywhere; rebuilding both on each was most of a pick.
                    for ordinal in new:
                        self._counts[ordinal] = self._counts.get(ordinal, 0) + 1
                    if view.local and self._local_counts is not self._counts:
                        for ordinal in new:
                            self._local_counts[ordinal] = self._local_counts.get(ordinal, 0) + 1
                    if room_changed:
                        self._rooms.clear()
                else:
                    view.missing -= state.have
                    self._dirty()
            else:
                changed = revived  # a peer gone silent speaks again: it counts again
                if revived:
                    self._dirty()
        if changed:
            self._notify()

    def place(self, peer: str, location: locality.Location | None) -> None:
        """Where a connected peer said it is (its hello), followed or not: pullers presumed
        while the room forms are owners by their place too."""
        with self._lock:
            self._place(peer, location)

    def _place(self, peer: str, location: locality.Location | None) -> None:
        """``place``, under the lock: the one place a peer's place is kept, and its view's
        nearness and room flag with it."""
        if location is not None and self.places.get(peer) != location:
            self.places[peer] = location
            if locality.same_place(self.location, location):
                self.elsewhere.discard(peer)
            else:
                self.elsewhere.add(peer)
            self._owner_cache.clear()
            self._rank_cache.clear()
            self._rooms.clear()
        view = self.peers.get(peer)
        if view is not None:
            where = self.places.get(peer)
            view.nearness = locality.nearness(self.location, where)
            local = locality.same_place(self.location, where)
            if local != view.local:
                view.local = local
                self._dirty()

    def place_of(self, peer: str) -> locality.Location | None:
        """A puller's place: what it said, else ours (it said nothing: beside us)."""
        return self.places.get(peer, self.location)

    @property
    def remote(self) -> frozenset[str]:
        """The followed peers in other places."""
        return frozenset(p for p, v in self.peers.items() if not v.local)

    def is_local(self, peer: str) -> bool:
        """Whether ``peer`` is in our room (or never said where it is)."""
        return peer not in self.elsewhere

    def set_unknown(self, peers) -> None:
        """The connected peers that have not answered yet (set by the session)."""
        peers = frozenset(peers)
        if peers != self.unknown:
            self.unknown = peers
            self._rooms.clear()
            if not peers and self.settled_at is None:
                self.settled_at = self._clock()
            self._notify()

    def set_idle(self, peers) -> None:
        """The connected peers that answered that they neither hold nor pull this manifest
        (set by the session; one that starts pulling subscribes to us and leaves the set)."""
        peers = frozenset(peers)
        if peers != self.idle:
            self.idle = peers
            self._rooms.clear()
            self._notify()

    def unsubscribed(self, peer: str, *, silent: bool = False) -> None:
        """Its HAVE stream ended: it counts as gone until it is heard from again (``silent``:
        it went quiet, and following it again does not count as hearing from it)."""
        with self._lock:
            view = self.peers.get(peer)
            if view is not None:
                view.subscribed = False
                view.silent = view.silent or silent
                view.heard = 0.0
                self._dirty()
        self._notify()

    def forget(self, peer: str) -> None:
        with self._lock:
            gone = self.peers.pop(peer, None)
            self._dirty()
        if gone is not None:
            self._notify()

    def _dirty(self) -> None:
        """What peers hold, claim or do changed: the cached counts and rooms go."""
        self._counts = self._local_counts = None
        self._rooms.clear()

    def nudge(self) -> None:
        """Wake whoever waits in ``wait_changed`` (the pull's own state changed)."""
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = trio.Event()

    async def wait_changed(self, timeout: float) -> None:
        event = self._changed
        if event is None:
            await trio.sleep(timeout)
            return
        with trio.move_on_after(timeout):
            await event.wait()

    # -------------------------------------------------------------------- queries

    def _now(self) -> float:
        """The clock, noticing when this process itself stood still (stopped, suspended,
        starved): every peer then gets a fresh ``LIVENESS`` to be heard from, so that our
        own pause does not make the room look gone (and the origin pay for it)."""
        now = self._clock()
        if now - self._last_look > RESUME_GAP:
            self.resumed_at = now
            self._dirty()
        self._last_look = now
        return now

    def tick(self) -> None:
        """Called by the session at least every second: what makes a longer gap a pause."""
        self._now()

    def _alive(self, view: PeerView, now: float) -> bool:
        return view.banned is None and view.heard > 0 and now - max(view.heard, self.resumed_at) < LIVENESS

    def alive(self, peer: str) -> bool:
        now = self._now()
        with self._lock:
            view = self.peers.get(peer)
            return view is not None and self._alive(view, now)

    def _usable(self, view: PeerView, now: float) -> bool:
        return self._alive(view, now) and view.stalled_until <= now

    def describe(self, peer: str) -> str:
        """A peer as this view sees it, for the debug log: why it does or does not count."""
        now = self._clock()
        with self._lock:
            v = self.peers.get(peer)
            if v is None:
                return f"{peer[:12]} (not in view)"
            return (f"{peer[:12]} (heard {now - v.heard:.1f} s ago, {'subscribed' if v.subscribed else 'no stream'}"
                    f"{', silent' if v.silent else ''}{', banned' if v.banned else ''}, "
                    f"{'pulling' if v.state.pulling else 'not pulling'}, holds {len(v.state.have)})")

    def holder_counts(self) -> dict[int, int]:
        """ordinal -> how many usable peers hold it (chunks nobody holds are absent).
        Read-only for the caller, and only good until the next frame: a usable peer's
        delta updates it in place; anything else rebuilds it on the next call."""
        now = self._now()
        with self._lock:
            self._refresh(now)
            return self._counts

    def local_holder_counts(self) -> dict[int, int]:
        """As ``holder_counts``, of holders in our room only (the same dict while every peer
        is in it)."""
        now = self._now()
        with self._lock:
            self._refresh(now)
            return self._local_counts

    def _refresh(self, now: float) -> None:
        """Rebuild the kept holder counts and usable peers if a change or the clock (a
        peer's liveness or rest running out) made them stale. Under the lock."""
        if self._counts is not None and now < self._counts_until:
            return
        counts: dict[int, int] = {}
        # Our room's counts are the same dict while every peer is in our room.
        local_counts: dict[int, int] = {} if any(not v.local for v in self.peers.values()) else counts
        usable: list[PeerView] = []
        until = float("inf")
        for v in self.peers.values():
            if self._alive(v, now):
                until = min(until, self._alive_until(v))
            if v.stalled_until > now:
                until = min(until, v.stalled_until)
            if not self._usable(v, now):
                continue
            usable.append(v)
            for ordinal in v.state.have:
                if ordinal not in v.missing:
                    counts[ordinal] = counts.get(ordinal, 0) + 1
                    if v.local and local_counts is not counts:
                        local_counts[ordinal] = local_counts.get(ordinal, 0) + 1
        self._counts, self._local_counts, self._usable_peers, self._counts_until = counts, local_counts, usable, until

    def free_holders(self, local: bool = False) -> list[PeerView]:
        """The usable peers with a request slot free (``PER_PEER``) that did not just say
        BUSY: the only ones a LAN chunk can start from now (``local``: in our room). From
        the kept usable peers, so that a pick costs a look at each one's slots, not at its
        liveness."""
        now = self._now()
        with self._lock:
            self._refresh(now)
            return [v for v in self._usable_peers if v.in_flight < PER_PEER and v.busy_until <= now
                    and (v.local or not local)]

    @staticmethod
    def held_by(views: list[PeerView]) -> set[int]:
        """The chunks any of ``views`` holds (as ``holds`` says), in one pass over each."""
        held: set[int] = set()
        for v in views:
            held |= v.state.have - v.missing if v.missing else v.state.have
        return held

    @staticmethod
    def holds(view: PeerView, ordinal: int) -> bool:
        return ordinal in view.state.have and ordinal not in view.missing

    def _alive_until(self, view: PeerView) -> float:
        """When a live peer counts as gone unless heard from again."""
        return max(view.heard, self.resumed_at) + LIVENESS


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
        return True
    except RuntimeError:
        return False

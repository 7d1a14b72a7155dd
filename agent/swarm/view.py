"""A pull's live view of the swarm, and the order it fetches chunks in.

``LanView`` holds, for one manifest, what each swarm peer holds (refreshed about every
second while the pull runs: the HAVE updates), whether the peer is itself pulling it,
and what this pull learned about the peer (in flight, stalled, lying, bytes received).
It is shared between the trio task that refreshes it and the worker threads that fetch
through ``LanPeerSource``, hence the lock.

The chunk order built on it is ``agent.swarm.picker.SwarmPicker``.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import trio

from agent.manifest import Manifest
from agent.hashing import blake3_hash

STALL_AFTER = 10.0  # a pulling peer without a new chunk for this long stops owning chunks
STALLED_REST = 30.0  # a peer that timed out on a chunk is not asked again for this long
PER_PEER = 3  # requests in flight to one peer from this pull (its upload slots are shared)


@dataclass
class PeerView:
    peer: str
    data: tuple[str, int]
    ticket: bytes
    have: dict[str, set[int]]
    pulling: bool
    held: int = 0
    first_seen: float = 0.0
    progressed: float = 0.0
    in_flight: int = 0
    stalled_until: float = 0.0
    banned: str | None = None
    bytes_down: int = 0
    missing: set[tuple[str, int]] = field(default_factory=set)  # asked, it said it lacks them
    tls: bytes | None = None  # the peer's data server certificate (SHA-256), when it encrypts


class LanView:
    def __init__(self, manifest: Manifest, self_id: str):
        self.manifest = manifest
        self.self_id = self_id
        self.peers: dict[str, PeerView] = {}
        self._lock = threading.Lock()
        self._changed = trio.Event() if _in_trio() else None
        self._owner_cache: dict[tuple[str, ...], dict] = {}
        # Holder counts per chunk, rebuilt lazily after a change: the picker asks for every
        # pending chunk on every pick, so a scan of all peers per question would not do.
        self._counts: dict[tuple[str, int], int] | None = None
        self._counts_until = float("inf")  # when a put-aside peer becomes usable again

    # ------------------------------------------------------------ updates (trio side)

    def update(self, peer: str, answer) -> None:
        """A fresh answer from ``peer`` about this manifest."""
        now = time.monotonic()
        held = sum(len(v) for v in answer.have.values())
        with self._lock:
            view = self.peers.get(peer)
            if view is None:
                view = self.peers[peer] = PeerView(peer, answer.data, answer.ticket, answer.have, answer.pulling,
                                                   held, now, now, tls=answer.tls)
            else:
                if held > view.held:
                    view.progressed = now
                view.data, view.ticket, view.have, view.pulling, view.held, view.tls = (
                    answer.data, answer.ticket, answer.have, answer.pulling, held, answer.tls)
                view.missing = {(p, i) for p, i in view.missing if i not in answer.have.get(p, ())}
            self._counts = None
        self._notify()

    def forget(self, peer: str) -> None:
        """The peer is gone (or no longer holds the manifest)."""
        with self._lock:
            gone = self.peers.pop(peer, None)
            self._counts = None
        if gone is not None:
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

    def _usable(self, view: PeerView, now: float) -> bool:
        return view.banned is None and view.stalled_until <= now

    def holders(self, path: str, index: int) -> int:
        """How many usable peers hold a chunk."""
        return self.holder_counts().get((path, index), 0)

    def holder_counts(self) -> dict[tuple[str, int], int]:
        """(path, index) -> how many usable peers hold it (chunks nobody holds are absent).
        Read-only for the caller: rebuilt, not changed, when peers change."""
        now = time.monotonic()
        with self._lock:
            if self._counts is None or now >= self._counts_until:
                self._rebuild_counts(now)
            return self._counts

    def _rebuild_counts(self, now: float) -> None:
        counts: dict[tuple[str, int], int] = {}
        for v in self.peers.values():
            if not self._usable(v, now):
                continue
            for path, held in v.have.items():
                for index in held:
                    if (path, index) not in v.missing:
                        counts[(path, index)] = counts.get((path, index), 0) + 1
        self._counts = counts
        self._counts_until = min((v.stalled_until for v in self.peers.values() if v.stalled_until > now),
                                 default=float("inf"))

    def pullers(self) -> tuple[str, ...]:
        """This agent and every peer pulling the manifest that is making progress."""
        now = time.monotonic()
        with self._lock:
            others = [v.peer for v in self.peers.values() if v.pulling and v.banned is None
                      and now - max(v.progressed, v.first_seen) < STALL_AFTER]
        return tuple(sorted([self.self_id, *others]))

    def owner(self, path: str, index: int, pullers: tuple[str, ...]) -> str:
        if len(pullers) == 1:
            return pullers[0]
        cache = self._owner_cache.get(pullers)
        if cache is None:
            self._owner_cache = {pullers: {}}
            cache = self._owner_cache[pullers]
        key = (path, index)
        owner = cache.get(key)
        if owner is None:
            chunk = f"{self.manifest.id}|{path}|{index}".encode()
            owner = cache[key] = max(pullers, key=lambda p: blake3_hash(p.encode() + b"|" + chunk))
        return owner

    # ------------------------------------------------------ fetching (thread side)

    def take_holder(self, path: str, index: int, exclude: set[str]) -> PeerView | None:
        """The least busy usable holder of a chunk (counted in flight until ``give_back``)."""
        now = time.monotonic()
        with self._lock:
            candidates = [v for v in self.peers.values() if self._usable(v, now) and v.peer not in exclude
                          and index in v.have.get(path, ()) and (path, index) not in v.missing]
            if not candidates:
                return None
            random.shuffle(candidates)
            best = min(candidates, key=lambda v: v.in_flight)
            best.in_flight += 1
            return best

    def give_back(self, view: PeerView, nbytes: int = 0) -> None:
        with self._lock:
            view.in_flight -= 1
            view.bytes_down += nbytes

    def lacks(self, view: PeerView, path: str, index: int) -> None:
        with self._lock:
            view.missing.add((path, index))
            self._counts = None

    def stalled(self, view: PeerView) -> None:
        with self._lock:
            view.stalled_until = time.monotonic() + STALLED_REST
            self._counts = None

    def ban(self, view: PeerView, reason: str) -> None:
        with self._lock:
            view.banned = reason
            self._counts = None

    def busy(self, view: PeerView) -> bool:
        return view.in_flight >= PER_PEER

    def summary(self) -> dict[str, dict]:
        with self._lock:
            return {v.peer: {"bytes_down": v.bytes_down, "banned": v.banned} for v in self.peers.values()}


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
        return True
    except RuntimeError:
        return False

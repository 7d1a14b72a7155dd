"""What this agent tells its subscribers about one manifest, as it changes.

A ``Board`` holds this agent's side of the HAVE stream (``agent.swarm.wire``): the chunks
it holds (and which of them came from the origin), the chunks it is fetching from the
origin right now (its *claims*), and whether it is pulling. A pull writes to it as chunks
verify and as the picker claims or gives up origin chunks; the data server's subscription
threads read from it, each at its own pace: ``wait`` until something changed (or a
heartbeat is due), then ``changes_since`` their last sequence number, coalesced into one
delta. A subscriber too far behind the bounded change log gets a fresh snapshot.

``Boards`` keeps one board per manifest: the board of a running pull, or, for a model
held complete, one made on demand from the store. Thread-safe; bounded (``MAX_LOG``
changes kept, ``MAX_BOARDS`` boards).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

from agent.manifest import Manifest
from agent.swarm.wire import Ordinals

MAX_LOG = 65536
MAX_BOARDS = 64
HAVE, ORIGIN, CLAIM, UNCLAIM, PULLING, DONE = range(6)


@dataclass(frozen=True)
class Changes:
    seq: int
    have: frozenset[int]
    origin: frozenset[int]
    claim: frozenset[int]
    unclaim: frozenset[int]
    pulling: bool | None


class Board:
    def __init__(self, manifest: Manifest, *, have=(), origin=(), pulling: bool = False):
        self.manifest = manifest
        self.ordinals = Ordinals(manifest)
        self._cond = threading.Condition()
        self._seq = 0
        self._log: deque[tuple[int, int, int]] = deque(maxlen=MAX_LOG)  # (seq, kind, ordinal)
        self.have: set[int] = set(have)
        self.origin: set[int] = set(origin) & self.have
        self.claims: set[int] = set()
        self.pulling = pulling

    @property
    def total(self) -> int:
        return self.ordinals.total

    # ------------------------------------------------------------- writers (the pull)

    def _record(self, kind: int, ordinal: int = -1) -> None:
        self._seq += 1
        self._log.append((self._seq, kind, ordinal))
        self._cond.notify_all()

    def add_have(self, ordinal: int, from_origin: bool) -> None:
        with self._cond:
            if ordinal in self.have:
                return
            self.have.add(ordinal)
            claimed = ordinal in self.claims
            self.claims.discard(ordinal)
            if from_origin:
                self.origin.add(ordinal)
            elif claimed:
                # A claimed chunk that came from another room (agent.swarm.location): its claim
                # ends in so many words. Subscribers that hold the chunk are not told of our
                # copy (agent.swarm.publisher leaves it out), so the copy alone would leave our
                # claim standing in their views for ever, counted against the origin's streams.
                self._record(UNCLAIM, ordinal)
            self._record(ORIGIN if from_origin else HAVE, ordinal)

    def claim(self, ordinal: int) -> None:
        with self._cond:
            if ordinal not in self.claims and ordinal not in self.have:
                self.claims.add(ordinal)
                self._record(CLAIM, ordinal)

    def unclaim(self, ordinal: int) -> None:
        with self._cond:
            if ordinal in self.claims:
                self.claims.discard(ordinal)
                self._record(UNCLAIM, ordinal)

    def set_pulling(self, pulling: bool) -> None:
        with self._cond:
            if pulling != self.pulling:
                self.pulling = pulling
                self._record(PULLING)

    # ------------------------------------------------------ readers (subscriptions)

    @property
    def seq(self) -> int:
        with self._cond:
            return self._seq

    def snapshot(self) -> tuple[int, set[int], set[int], set[int], bool]:
        with self._cond:
            return self._seq, set(self.have), set(self.origin), set(self.claims), self.pulling

    def wait(self, seq: int, timeout: float) -> bool:
        """Until the board moves past ``seq`` (True) or ``timeout`` passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._seq > seq, timeout)

    def changes_since(self, seq: int) -> Changes | None:
        """What changed after ``seq``, coalesced; None when the log no longer reaches back
        that far (send a snapshot instead)."""
        with self._cond:
            if seq >= self._seq:
                return Changes(self._seq, frozenset(), frozenset(), frozenset(), frozenset(), None)
            if not self._log or self._log[0][0] > seq + 1:
                return None
            have, origin, claim, unclaim, pulling = set(), set(), set(), set(), None
            # The log's sequence numbers are consecutive: read only the entries after
            # ``seq``, from the end (a board of thousands of chunks has a long log).
            log = self._log
            for position in range(len(log) - (self._seq - seq), len(log)):
                _, kind, ordinal = log[position]
                if kind in (HAVE, ORIGIN):
                    have.add(ordinal)
                    if kind == ORIGIN:
                        origin.add(ordinal)
                elif kind == CLAIM:
                    claim.add(ordinal)
                    unclaim.discard(ordinal)
                elif kind == UNCLAIM:
                    unclaim.add(ordinal)
                    claim.discard(ordinal)
                elif kind == PULLING:
                    pulling = self.pulling
            claim -= have
            return Changes(self._seq, frozenset(have), frozenset(origin), frozenset(claim),
                           frozenset(unclaim | (have & self.claims)), pulling)


class Boards:
    """Boards by manifest id: a running pull's, or one made from the store for a held model."""

    def __init__(self, from_store: Callable[[str], Board | None] = lambda manifest_id: None):
        self._from_store = from_store
        self._boards: OrderedDict[str, Board] = OrderedDict()
        self._lock = threading.Lock()
        self._added = threading.Condition(self._lock)

    def put(self, board: Board) -> None:
        with self._lock:
            self._put(board)

    def _put(self, board: Board) -> None:  # with the lock held
        self._boards[board.manifest.id] = board
        self._boards.move_to_end(board.manifest.id)
        while len(self._boards) > MAX_BOARDS:
            self._boards.popitem(last=False)
        self._added.notify_all()

    def wait_for(self, manifest_id: str, timeout: float, keep_waiting: Callable[[], bool]) -> Board | None:
        """The board for ``manifest_id``, waiting up to ``timeout`` for it to appear while
        ``keep_waiting()`` (a pull of this agent has not planned yet: it may be this one)."""
        deadline = time.monotonic() + timeout
        board = self.get(manifest_id)
        while board is None and keep_waiting():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with self._lock:
                if manifest_id not in self._boards:
                    self._added.wait(min(left, 0.5))
            board = self.get(manifest_id)
        return board

    def get(self, manifest_id: str) -> Board | None:
        with self._lock:
            board = self._boards.get(manifest_id)
        if board is None:
            board = self._from_store(manifest_id)
            if board is not None:
                board = self.adopt(board)
        return board

    def adopt(self, board: Board) -> Board:
        """``board``, kept, unless one for its manifest is kept already: then that one.
        Two threads can make a board for one manifest at once (a subscription arriving as
        the pull plans); both must end up with the same board, or a subscriber would be
        served one that never changes (the room would see that peer hold nothing, ever)."""
        with self._lock:
            kept = self._boards.get(board.manifest.id)
            if kept is not None:
                return kept
            self._put(board)
            return board

    def drop(self, manifest_id: str) -> None:
        with self._lock:
            self._boards.pop(manifest_id, None)

"""A peer's lifecycle in one pull: an explicit transition table, without I/O.

``agent.swarm.session`` drives it: its loop looks at each connected peer's state and
starts what the state calls for (an ask, a content probe), and every outcome comes back
as an event. A move outside the table is a bug and raises, as the jobs' do
(``agent.launcher.jobs``).

    new ──ask──> asking ──heard──> followed           (its HAVE stream flows)
                   │ └──not_followed──> idle          (holds none, does not pull it)
                   └──failed──> resting ──due──> new  (after RETRY[failures])
    idle ──probe──> probing ──found──> asking         (it holds some by content)
                       └──none──> idle
    idle | resting ──interest──> new                  (it asked us about the model)
    new | asking | followed | resting ──pass──> passed   (another place's peer, ranked
    passed ──chosen──> new                                after the few we follow there)
    followed ──failed──> resting

Peers answered "none here" before the pull planned start ``idle`` (``not_followed`` from
``new``). A peer that disconnects keeps its state (an idle one is not asked again when its
connection flaps); the session acts only on connected ones.
"""

from __future__ import annotations

import time

from agent.errors import ShoalError

NEW, ASKING, FOLLOWED, IDLE, PROBING, RESTING, PASSED = (
    "new", "asking", "followed", "idle", "probing", "resting", "passed")

TRANSITIONS = {
    (NEW, "ask"): ASKING,
    (NEW, "not_followed"): IDLE,
    (NEW, "pass"): PASSED,
    (ASKING, "heard"): FOLLOWED,
    (ASKING, "not_followed"): IDLE,
    (ASKING, "failed"): RESTING,
    (ASKING, "pass"): PASSED,
    (FOLLOWED, "failed"): RESTING,
    (FOLLOWED, "pass"): PASSED,
    (IDLE, "probe"): PROBING,
    (IDLE, "interest"): NEW,
    (PROBING, "found"): ASKING,
    (PROBING, "none"): IDLE,
    (RESTING, "due"): NEW,
    (RESTING, "interest"): NEW,
    (RESTING, "pass"): PASSED,
    (PASSED, "chosen"): NEW,
}
ACTIVE = frozenset({ASKING, FOLLOWED, PROBING})  # a task of the session runs for the peer
RETRY = (0.5, 1.0, 2.0, 5.0, 10.0)  # rests between attempts to follow a peer that failed


def next_state(state: str, event: str) -> str:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise ShoalError(f"a peer {state} in a pull cannot take {event!r}") from None


class PeerLifecycle:
    """Every peer's state in one pull, the rests of those that failed, and which peers the
    pull has not heard from yet (``unheard``: asked or probed, no answer so far; the picker
    presumes they pull for a while)."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._states: dict[str, str] = {}
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self.unheard: set[str] = set()
        self.content_asked: set[str] = set()  # asked once what they hold by content

    def of(self, peer: str) -> str:
        return self._states.get(peer, NEW)

    def move(self, peer: str, event: str, *, known: bool = False) -> str:
        """Take ``event`` for ``peer``: its new state. ``known``: into asking or probing with
        its offer in the view already (it is not unheard)."""
        after = next_state(self.of(peer), event)
        self._states[peer] = after
        if event == "failed":
            self._failures[peer] = failures = self._failures.get(peer, 0) + 1
            self._retry_at[peer] = self._clock() + RETRY[min(failures, len(RETRY)) - 1]
        if after not in (ASKING, PROBING):
            self.unheard.discard(peer)
        elif not known:
            self.unheard.add(peer)
        if after == PROBING:
            self.content_asked.add(peer)
        return after

    def heard(self, peer: str) -> None:
        """A frame of its HAVE stream came: an asking peer is followed now."""
        if self.of(peer) == ASKING:
            self.move(peer, "heard")

    def due(self, peer: str, now: float) -> bool:
        """Whether a resting peer's rest is over."""
        return self._retry_at.get(peer, 0.0) <= now

    def soonest(self, peers) -> float | None:
        """When the first of ``peers`` that rest may be asked again (None: none rests)."""
        return min((self._retry_at[p] for p in peers if self.of(p) == RESTING), default=None)

    def in_state(self, *states: str) -> set[str]:
        return {peer for peer, state in self._states.items() if state in states}


__all__ = ["PeerLifecycle", "TRANSITIONS", "next_state", "ACTIVE", "RETRY",
           "NEW", "ASKING", "FOLLOWED", "IDLE", "PROBING", "RESTING", "PASSED"]

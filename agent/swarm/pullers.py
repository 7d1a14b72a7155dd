"""Who pulls a manifest, as a pull's view sees its room (``agent.swarm.view.LanView`` mixes
it in): the agents pulling (presumed ones too while the room forms), the chunks live peers
claim, and the owner of each chunk among the pullers (rendezvous hashing by place, then
by peer: ``agent.swarm.location``), kept until what they depend on changes.
"""

from __future__ import annotations

from agent.swarm import location as locality

OWNER_LISTS = 4  # puller lists whose chunk owners (and our ranks) are remembered (rendezvous hashes)


class RoomCount:
    """``LanView``'s count of its room: it reads the view's peers, presumed pullers, caches
    and clock (set up by ``LanView.__init__``)."""

    def room(self, count_unknown: bool = True, count_idle: bool = False
             ) -> tuple[tuple[str, ...], dict[int, set[str]], bool]:
        """(the agents pulling this manifest: this one, every live peer that pulls and, with
        ``count_unknown``, every connected peer not heard from yet and, with ``count_idle``,
        every idle one, sorted; the chunks live peers claim -> who claims each; whether no
        live peer pulls or holds anything of it and no connected peer is counted as pulling
        for want of an answer).

        Counting every connected peer as pulling at first is what lets a room that starts
        at once split the origin's chunks from the first second: they all start out with
        the same list of pullers, so each chunk has one owner, whoever has answered what
        by then (a peer whose ``shoal pull`` starts a second after ours answers "idle"
        first, then pulls: counting it all along keeps the owners from changing under us).

        Kept until something it depends on changes (read-only for the caller): the picker
        asks on every look."""
        now = self._now()
        key = (count_unknown, count_idle)
        cached = self._rooms.get(key)
        if cached is not None and now < cached[0]:
            return cached[1]
        claims: dict[int, set[str]] = {}
        presumed = (self.unknown if count_unknown else frozenset()) | (self.idle if count_idle else frozenset())
        pullers = {self.self_id, *presumed}
        alone = not (count_unknown and self.unknown) and not (count_idle and self.idle)
        until = float("inf")  # the answer holds until a peer counted alive could fall silent
        with self._lock:
            for v in self.peers.values():
                if not self._alive(v, now):
                    continue
                until = min(until, self._alive_until(v))
                if v.state.pulling:
                    pullers.add(v.peer)
                if v.state.pulling or v.state.have:
                    alone = False
                for ordinal in v.state.claims:
                    claims.setdefault(ordinal, set()).add(v.peer)
            answer = tuple(sorted(pullers)), claims, alone
            self._rooms[key] = (until, answer)
        return answer

    def owner(self, ordinal: int, pullers: tuple[str, ...]) -> str:
        """The agent among ``pullers`` that fetches ``ordinal`` from the origin (rendezvous hashing)."""
        if len(pullers) == 1:
            return pullers[0]
        cache = _per_list(self._owner_cache, pullers)
        owner = cache.get(ordinal)
        if owner is None:
            owner = cache[ordinal] = locality.owner(self._chunk(ordinal), pullers, self.place_of,
                                                    lambda places: self._spread(places)[ordinal])
        return owner

    def rank(self, ordinal: int, pullers: tuple[str, ...]) -> int:
        """Where this agent stands among ``pullers`` (one place's) in ``ordinal``'s
        rendezvous ranking: 0 if it owns the chunk (``owner``), else how many rank first."""
        cache = _per_list(self._rank_cache, pullers)
        standing = cache.get(ordinal)
        if standing is None:
            standing = cache[ordinal] = locality.rank(self._chunk(ordinal), pullers, self.self_id)
        return standing

    def outranks(self, ordinal: int, peer: str) -> bool:
        """Whether ``peer`` ranks before this agent in ``ordinal``'s rendezvous order."""
        return locality.rank(self._chunk(ordinal), (peer,), self.self_id) > 0

    def _chunk(self, ordinal: int) -> bytes:
        """What a chunk's rendezvous scores are hashed over (``agent.swarm.location.score``)."""
        return f"{self.manifest.id}|{ordinal}".encode()

    def _spread(self, places: tuple[locality.Location, ...]) -> list[locality.Location]:
        """``locality.spread`` for these places, kept (one campus has one set of places)."""
        if self._spread_for is None or self._spread_for[0] != places:
            self._spread_for = (places, locality.spread(self.manifest.id, self.ordinals.total, places))
        return self._spread_for[1]

    def home_of(self, ordinal: int) -> locality.Location | None:
        """The place that fetches ``ordinal`` from outside, as last spread (None: not spread
        yet, one place only)."""
        return self._spread_for[1][ordinal] if self._spread_for is not None else None

    def origin_duplicates(self, mine: set[int]) -> int:
        """Of the chunks this agent fetched from the origin, how many some peer fetched from
        the origin too (as its HAVE stream says)."""
        with self._lock:
            theirs = set().union(*(v.state.origin for v in self.peers.values())) if self.peers else set()
        return len(mine & theirs)


def _per_list(caches: dict[tuple[str, ...], dict], pullers: tuple[str, ...]) -> dict:
    """The cache kept for this list of pullers. A few lists at once: the room's, and the wider
    ones a settling claim is checked against (``agent.swarm.origin``), without each evicting
    the other's hashes."""
    cache = caches.get(pullers)
    if cache is None:
        while len(caches) >= OWNER_LISTS:
            caches.pop(next(iter(caches)))
        cache = caches[pullers] = {}
    return cache

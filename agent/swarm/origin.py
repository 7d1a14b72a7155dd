"""The room's origin policy, mixed into the swarm's picker (``agent.swarm.picker.SwarmPicker``):
which chunks this agent fetches from the origin, so that the outside link carries each
chunk once per campus (and, with ``agent.swarm.entries``, each room's link about once per
room).

1. **From the origin**, a chunk nobody holds and nobody claims. The room fetches these in
   one global order (manifest ordinals), at most ``origin_streams`` at a time across the
   whole room (counted from everyone's claims): the outside link carries few chunks at
   once, each finishing soon, so peers trade them while the next ones arrive. Among the
   first free chunks in that order, each has one owner, by rendezvous hashing over the
   agents pulling (this one, every live peer that says it pulls, and, for the first
   ``ROOM_WAIT`` seconds, every connected peer not heard from yet, and for ``IDLE_GRACE``
   seconds every connected peer that answered it does not pull yet);
   only the owner fetches it, after it *claims* the chunk on its board (pushed to every
   subscriber). Agents that start together (nobody holds any of it yet) therefore start
   with one list of pullers and claims go at once. Once that list has changed (a peer
   came or went, or the first ``ROOM_WAIT`` seconds ended), two agents may disagree on the owner until every peer has
   answered and the list has held for ``STABLE_AFTER`` seconds, so a claim first settles
   for ``CLAIM_SETTLE``: if a live peer with a smaller id claimed the same chunk
   meanwhile, this agent lets it go. While every chunk of that first stretch waits for a
   peer that has not started pulling yet and no stream is under way, an agent that has
   started takes one chunk of its own from further down (one at a time), so the outside
   link is busy from the first pull on (agents that start before each other's claims reach
   them may each take one, so the cap can be passed by those few, for one chunk each).
   While any chunk still has to come from the origin, LAN fetches take all the scheduler's
   workers but one, so the owner starts its chunk when its turn comes, not when a LAN
   fetch ends.
2. **Never twice for slowness**: a chunk a live peer holds or claims is never fetched from
   the origin by anyone else, however slow that peer is. Its claim ends when the chunk
   verifies there, when the peer gives up (``unclaim``: its fetch failed), or when the peer
   is gone (its subscription closed, or silent past ``agent.swarm.view.LIVENESS``); only
   then does the chunk's ownership move on.
3. **On a campus** (peers in other places: ``agent.swarm.location``): a chunk held only in
   other rooms enters ours once, from the nearest room (``agent.swarm.entries``); a chunk
   nobody holds has one owner on the whole campus (a room's even share first, then a
   puller there), and each room keeps its own origin window over its share (an agent sees
   its whole room's claims, but only the few peers it follows in each other room:
   ``_streams``), within a campus-wide window when the places are many (``_campus_free``).
   With every peer in one place this is the one-room policy above, unchanged.
"""

from __future__ import annotations

import logging

log = logging.getLogger("shoal.swarm")

CLAIM_SETTLE = 0.5  # a claim made while the room is unsettled waits this long for a rival's news
STABLE_AFTER = 1.0  # pullers unchanged this long (and every peer answered): no settling
# Connected peers not heard from yet count as pulling (they own their share of the origin's
# chunks) for at most this long from the pull's start; after it, only those that said so.
ROOM_WAIT = 5.0
# Connected peers that answered "idle" (their pull has not started) count as pulling for
# this long from the pull's start: a class does not press Enter at one instant. A member
# really alone in a room of idle machines loses at most this long to chunks "owned" by them.
IDLE_GRACE = 3.0

# On a campus of more places than this many times ``origin_streams`` (a stream each would
# crowd the outside link), the campus keeps one window of twice ``origin_streams``
# (``OriginPolicy._campus_free``).
MANY_PLACES = 4

# How a chunk in flight is being fetched (``SwarmPicker.in_flight``): from a peer in our room,
# from the origin (claimed), or into our room from a nearer one (claimed: its room's entry).
IN_ROOM, FROM_ORIGIN, INTO_ROOM = None, "origin", "into-room"


class OriginPolicy:
    """The origin policy's part of ``SwarmPicker``: it reads the picker's view, board,
    pending chunks, claims in flight and settling claims (set up by its ``__init__``)."""

    def _room(self):
        """``LanView.room`` as the picker counts it now: peers not heard from yet for the first
        ``ROOM_WAIT`` seconds, idle ones for the first ``IDLE_GRACE``."""
        into = self.clock() - self.started
        return self.view.room(count_unknown=into < ROOM_WAIT, count_idle=into < IDLE_GRACE)

    def _from_origin(self, holders: dict[int, int]) -> int | None:
        view, now = self.view, self.clock()
        forming, grace = now - self.started < ROOM_WAIT, now - self.started < IDLE_GRACE
        pullers, claims, alone = self._room()
        # Claims of chunks nobody holds are origin streams under way; the others are chunks
        # entering a room from another (``agent.swarm.entries``). (Peers do not tell us of
        # their copies of chunks we hold: a chunk we hold is held, whatever the counts say.)
        others_claims = {o: who for o, who in claims.items() if not holders.get(o) and o not in self.board.have}
        # On a campus each room keeps its own window over its share of the chunks (the owners'
        # place: ``agent.swarm.location.spread``), counting its own room's claims: an agent
        # follows its whole room but only a few peers of each other room, so what it sees of
        # the other rooms' claims and copies is partial, and a campus-wide window made of
        # chunks other rooms had taken (unseen) left the outside link idle.
        # Of those, only a claim by a peer of the chunk's own place (its share) is an origin
        # stream; any other is the chunk entering that peer's room, its holders in rooms this
        # agent does not follow (unheld as far as it can tell). Counted in our room's window,
        # such a claim held our room's one stream shut for a second at a time at the end
        # (10 x 30 in the simulator: the outside link done at 4.90 s of a 4.29 s bound,
        # 1.40x; left out, 4.33 s and 1.37x).
        if view.elsewhere:
            streams = self._origin_streams(others_claims, pullers)
            window_claims = {o: who for o, who in streams.items() if view.is_local(view.owner(o, pullers))}
        else:
            streams = window_claims = others_claims
        if pullers != self._pullers:
            self._pullers, self._pullers_since = pullers, now
            self._puller_sets += 1
        if self._fresh is None:
            self._fresh = not holders
        # Two agents can both take a chunk only when they disagree on who pulls. While the
        # room forms every connected peer counts (agent.swarm.view.LanView.room), so in a
        # room that starts together (nobody held anything when we first looked: everyone
        # started in the last few seconds and is forming too) the list we started with is
        # everyone's: claims go at once. Joining a room under way, or after a change, they
        # go once every peer has answered and the pullers have held for a while; until
        # then they settle first.
        stable = (forming and self._fresh and self._puller_sets == 1) or (
            not view.unknown and now - self._pullers_since >= STABLE_AFTER)
        if alone:  # claimed all the same, for a peer that joins later to see
            for ordinal in self._order:
                if ordinal in self.pending and ordinal not in self.settling:
                    self.board.claim(ordinal)
                    return ordinal
            return None
        mine = [o for o, entry in self.in_flight.items() if entry[4] == FROM_ORIGIN]
        free = self._streams(pullers) - len(window_claims) - len(mine) - len(self.settling)
        # Claims that settled: go, unless a live peer claimed the same and wins it: the
        # chunk's owner among every puller either of us counts, else the smaller id.
        for ordinal, since in sorted(self.settling.items(), key=lambda kv: kv[1]):
            rivals = others_claims.get(ordinal, ())
            if ordinal not in self.pending or holders.get(ordinal) or (rivals and self._yields(ordinal, rivals, pullers)):
                del self.settling[ordinal]
                self.board.unclaim(ordinal)
                continue
            if now - since >= CLAIM_SETTLE:
                del self.settling[ordinal]
                return ordinal
        if free <= 0:
            return None
        # The window: the first ``free`` chunks in the room's order that nobody holds or
        # claims; this agent fetches those it owns. Peers counted among the pullers only
        # for want of an answer (not heard from yet, or idle for now) own their share, and
        # while every chunk of the window waits for such a peer and the outside link carries
        # nothing this agent knows of, it takes one chunk of its own from further down,
        # one at a time: the link is busy from the first pull on, not from when the owners
        # of the first few chunks start theirs. (Each chunk still has one owner, so this
        # never fetches a chunk twice; only agents that start within one claim's way to
        # each other may each take one at once.)
        presumed = (view.unknown if forming else frozenset()) | (view.idle if grace else frozenset())
        if log.isEnabledFor(logging.DEBUG) and now - self._told >= 2.0:  # why the window waits, now and then
            self._told = now
            window = list(self._origin_candidates(holders, claims))[:max(free, 0) + 2]
            log.debug("origin window: free %d (claims of unheld %s, mine %s, settling %s); next %s; "
                      "pending %d, in flight %s", free, {o: sorted(p[-6:] for p in w) for o, w in others_claims.items()},
                      mine, dict(self.settling), [(o, view.owner(o, pullers)[-6:]) for o in window],
                      len(self.pending), {o: e[4] for o, e in self.in_flight.items()})
        stalled = None  # whether every chunk of our room's window waits for a presumed owner
        campus = self._campus_free(len(streams), len(mine)) \
            if view.elsewhere and self._places(pullers) > MANY_PLACES * self.origin_streams else None
        unclaimed = self._origin_candidates(holders, claims)  # one pass: the window, then beyond it
        for ordinal in unclaimed:
            if campus is not None:
                if campus <= 0:
                    break
                campus -= 1
            owner = view.owner(ordinal, pullers)
            if not view.is_local(owner):
                continue  # another room's share: its window, not ours
            stalled = stalled is not False and owner in presumed
            if owner == view.self_id and self._claim(ordinal, stable, now):
                return ordinal
            free -= 1
            if free <= 0:
                break
        # (On a campus of many places, only while no origin stream is known anywhere and a
        # chunk of the campus's window is our room's: else 30 rooms each took one at the start.)
        if stalled and not window_claims and not mine and not self.settling and (
                campus is None or not others_claims):
            mine_further = next((o for o in unclaimed if view.owner(o, pullers) == view.self_id), None)
            if mine_further is not None and self._claim(mine_further, stable, now):
                return mine_further
        return None

    def _streams(self, pullers: tuple[str, ...]) -> int:
        """Our room's origin streams: twice ``origin_streams`` shared among the places that
        pull, at least one each. Each room keeping ``origin_streams`` of its own made the
        outside link carry rooms x 4 chunks at once, each arriving late and all together at
        the end (10 rooms x 30 in the simulator: 1.51x the bound; shared: 1.40x); a share
        of ``origin_streams`` alone left it idle between one room's chunks (4 x 20: 1.32x
        against 1.26x)."""
        if not self.view.elsewhere:
            return self.origin_streams
        return max(1, -(-2 * self.origin_streams // self._places(pullers)))

    def _places(self, pullers: tuple[str, ...]) -> int:
        """How many places ``pullers`` are in (kept for the last list asked)."""
        if self._places_for[0] != pullers:
            self._places_for = (pullers, len({self.view.place_of(p) for p in pullers}))
        return self._places_for[1]

    def _origin_streams(self, others_claims: dict[int, set[str]], pullers: tuple[str, ...]) -> dict[int, set[str]]:
        """On a campus: the claims (of chunks nobody holds) that are origin streams under way,
        those by a peer of the chunk's own place (``agent.swarm.location.spread``)."""
        view = self.view
        streams = {}
        for ordinal, who in others_claims.items():
            home = view.place_of(view.owner(ordinal, pullers))
            if any(view.place_of(peer) == home for peer in who):
                streams[ordinal] = who
        return streams

    def _campus_free(self, known: int, mine: int) -> int:
        """On a campus of many places: how many of the campus's next chunks in the common
        order (held by nobody this agent knows of) may be under way from the origin now:
        twice ``origin_streams`` on the whole campus, less the origin streams it knows of
        (its own, ``mine``, and the ``known`` claims of its room and of the peers it follows
        elsewhere: ``_origin_streams``). Without it each of 30 rooms kept a stream of its
        own: 30 chunks shared the outside link, the first arriving after 1.8 s and each batch
        all at once (30 x 10 in the simulator: 1.77x the bound; with it, 16 entries at once
        and the entry turns, 1.48x). With fewer places it costs more than it saves: chunks
        that arrived in rooms this agent does not follow look unheld and take the window's
        places (10 x 30: 1.42x with it, 1.33x without)."""
        return 2 * self.origin_streams - known - mine - len(self.settling)

    def _claim(self, ordinal: int, stable: bool, now: float) -> bool:
        """Claim ``ordinal`` on the board; whether to fetch it now (the room agrees on its
        owner), else it settles first (``CLAIM_SETTLE``)."""
        self.board.claim(ordinal)
        if not stable:
            self.settling[ordinal] = now
        return stable

    def _origin_candidates(self, holders: dict[int, int], others_claims):
        """The pending chunks, in the room's order, that nobody holds or claims."""
        for ordinal in self._order:
            if ordinal in self.pending and ordinal not in self.settling and not holders.get(ordinal) \
                    and ordinal not in others_claims:
                yield ordinal

    def _yields(self, ordinal: int, rivals, pullers: tuple[str, ...]) -> bool:
        """Whether this agent lets a rival's claim of ``ordinal`` win. Both sides decide
        alike whoever sees the other's claim: the owner by rendezvous hashing over the
        pullers both count wins; if that is neither of us, the smaller id."""
        me = self.view.self_id
        owner = self.view.owner(ordinal, tuple(sorted(set(pullers) | set(rivals))))
        if owner == me:
            return False
        if owner in rivals:
            return True
        return any(peer < me for peer in rivals)

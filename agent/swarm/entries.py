"""How a chunk held only in other rooms enters ours, on a campus (``agent.swarm.location``),
mixed into the swarm's picker (``agent.swarm.picker.SwarmPicker``) beside the origin policy
(``agent.swarm.origin``): once per room, from the nearest room that holds it, at most
``entry_streams`` chunks at a time (counted from the room's claims).

Who fetches it: the first of the room's pullers to see it held, in the chunk's rendezvous
order. Its owner claims it at once; the agent ranked k-th claims it ``k * ENTRY_STEP``
after it saw it held, if nobody of the room has claimed it by then, and lets the claim
settle one step: a rival's claim that ranks before it wins. An agent follows only a few
peers in each other room (``agent.swarm.location.neighbours``), so the owner may not see a
holder yet: at 10 x 30 in the simulator the owner saw a room's last chunks 0.1-0.5 s after
three of its roommates did. The room waits for the chunk to arrive and trades it. Two agents
that miss each other's claims cost a chunk twice on the link between rooms, never the
origin's.
"""

from __future__ import annotations

from agent.swarm.origin import INTO_ROOM

# A chunk held in another room and unclaimed in ours: the agent ranked k-th for it (by
# rendezvous hashing over our room's pullers) claims it k steps after it saw it held, and
# a claim made in a turn settles one step. A step is longer than a claim takes to reach the
# room (the publisher gathers changes for 50 ms: ``agent.swarm.publisher.COALESCE``); the
# simulator's 10 x 30 gives 1.33x the bound with 0.07 s and with 0.02 s alike.
ENTRY_STEP = 0.07


class EntryPolicy:
    """The entry rule's part of ``SwarmPicker``: it reads the picker's view, board, pending
    chunks, claims in flight, entry turns and entry claims (set up by its ``__init__``) and
    the room as the origin policy counts it (``OriginPolicy._room``)."""

    def _into_room(self, holders: dict[int, int], local: dict[int, int]) -> int | None:
        """A chunk held elsewhere on the campus and by nobody in our room that this agent
        fetches for the room now (claimed), or None: the room's next such chunks in the
        common order, at most ``entry_streams`` under way, each in its rank's turn."""
        view = self.view
        if not view.elsewhere:
            return None
        pullers, claims, _ = self._room()
        elsewhere = view.elsewhere
        room = tuple(p for p in pullers if p not in elsewhere)
        now = self.clock()

        def entering(ordinal: int) -> bool:
            claimers = claims.get(ordinal)
            return bool(claimers) and not claimers <= elsewhere

        settled = self._entry_claims(claims, local, room, now)
        if settled is not None:
            return settled
        under_way = sum(1 for o in claims if holders.get(o) and not local.get(o) and o not in self.board.have
                        and entering(o))
        free = self.entry_streams - under_way - len(self._entry_settling) \
            - sum(1 for e in self.in_flight.values() if e[4] == INTO_ROOM)
        if free <= 0:
            return None
        for ordinal in self._order:
            if ordinal not in self.pending or ordinal in self.settling or ordinal in self._entry_settling:
                continue
            if not holders.get(ordinal) or local.get(ordinal) or entering(ordinal):
                self._entry_due.pop(ordinal, None)
                continue
            rank = view.rank(ordinal, room)
            due = self._entry_due.setdefault(ordinal, now + rank * ENTRY_STEP)
            if now >= due:
                del self._entry_due[ordinal]
                self.board.claim(ordinal)
                if rank == 0:
                    return ordinal
                self._entry_settling[ordinal] = now
                return None
            free -= 1
            if free <= 0:
                break
        return None

    def _entry_claims(self, claims: dict[int, set[str]], local: dict[int, int], room: tuple[str, ...],
                      now: float) -> int | None:
        """Entry claims of ours made in a rank's turn, after ``ENTRY_STEP``: a roommate's
        claim of the same chunk that ranks before ours wins (ours is dropped), else the
        chunk is ours to fetch now."""
        if not self._entry_settling:
            return None
        for ordinal, since in list(self._entry_settling.items()):
            beaten = any(peer in room and self.view.outranks(ordinal, peer) for peer in claims.get(ordinal, ()))
            if ordinal not in self.pending or local.get(ordinal) or beaten:
                del self._entry_settling[ordinal]
                self.board.unclaim(ordinal)
                continue
            if now >= since + ENTRY_STEP:
                del self._entry_settling[ordinal]
                return ordinal
        return None

"""One pull's part in the swarm: which peers it follows, and their pushed HAVE streams.

For every connected peer the session asks once, on the peer's data port (keyed by the
contact its libp2p hello gave, ``agent.swarm.protocol``), what it holds of the manifest (an
offer). A peer that holds or pulls it is then **followed**: the session subscribes to its
HAVE stream on the same port (``agent.swarm.wire``) and feeds every frame into the pull's
``LanView``. Nothing is asked again while the stream flows, so the control traffic of a
pull grows with what changes, not with peers x time, and none of it goes through libp2p.

A peer that holds nothing yet is not asked again by the clock: when it starts pulling the
same manifest it asks this agent (every pull asks its connected peers), and this agent's
node tells the session (``interest``), which then follows it. A peer that connects while
the pull runs is asked when it appears. A stream that breaks (the peer stopped, left, or
was cut off) makes the peer count as gone at once; the session asks again after a rest.

Resource handling: ``run`` holds every subscription in its nursery; cancelling it (the
pull ended) closes them all and tells the room this agent no longer pulls.
"""

from __future__ import annotations

import logging
import time

import trio

from agent.errors import KeyRefused, NotFollowed, PeerRefused, ShoalError
from agent.swarm import location as locality, wire
from agent.swarm.asks import content_over, open_keyed
from agent.swarm.board import Board
from agent.swarm.datawire import MISSING, MODE_SUB
from agent.swarm.lifecycle import ACTIVE, ASKING, FOLLOWED, IDLE, NEW, PASSED, PROBING, RESTING, PeerLifecycle
from agent.swarm.protocol import Contact
from agent.swarm.view import LIVENESS, LanView

log = logging.getLogger("shoal.swarm")

PENDING = "pending"  # what ``Swarm.ask`` returns for such a peer
CONNECT_TIMEOUT = 5.0
# A stream's first frame may wait for the peer's plan (agent.swarm.datapath.SUB_PLAN_WAIT);
# after it, the view's liveness rule applies.
FIRST_FRAME_WAIT = 5.0
# How long the pull's first pick waits for the content asks of peers that hold none of its
# manifest by name (one round trip each on a LAN): a peer holding its files under another
# model must be in the view before the picker sends those chunks to the origin.
CONTENT_WAIT = 0.5
SEEK_WAIT = 1.0  # the room's pullers have answered by then: one of them looks files up in the DHT


class PullSession:
    """What ``pull()`` gets as its ``swarm``: the offers asked before it planned, this agent's
    peer id, ``follow`` (the HAVE streams while the pull runs) and the board it publishes."""

    def __init__(self, swarm, ref, offers: list, asked: set[str] = frozenset()):
        self.swarm, self.offers = swarm, offers
        self.ref_obj, self.ref = ref, str(ref)  # the pull's ModelRef (its interest key is str(ref))
        self.asked = set(asked)  # peers that answered before the pull planned (without an offer: none held)
        self.board: Board | None = None
        self.view: LanView | None = None  # set while it follows peers
        self._interested: set[str] = set()
        self._wake = trio.Event()

    @property
    def self_id(self) -> str:
        return self.swarm.self_id

    @property
    def location(self):
        """Where this agent is on the campus (``agent.swarm.location``)."""
        return self.swarm.location

    def connected(self) -> int:
        return len(self.swarm.node.connected())

    def board_for(self, manifest) -> Board:
        """This agent's board for ``manifest`` (made from what the store holds of it)."""
        return self.swarm.board(manifest)

    def interest(self, peer: str) -> None:
        """``peer`` asked this agent about the model being pulled: follow it too."""
        self._interested.add(peer)
        self._wake.set()

    async def follow(self, view: LanView, board: Board, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Follow peers into ``view`` until cancelled; ``task_status.started()`` as soon as
        the asks are under way (what peers answered before the plan is in the view).

        Each connected peer is, for this pull (``agent.swarm.lifecycle``, its transition
        table): *asking*, then *followed* (its HAVE stream flows: one connection, whose
        first frame says what it holds; a peer still planning the same pull holds the
        subscription until it has a board, for a few seconds at most), *idle* (it holds
        none and does not pull it: it subscribes to us when it starts, and that interest
        makes us follow it), *probing* (asked once what it holds by content), *resting*
        after a failure (asked again after ``RETRY``), or *passed* over (another place's,
        ranked after the few this pull follows there). Until every peer has been heard
        from, ``view.unknown`` names those that have not, and the picker counts them among
        the pullers for a while (``agent.swarm.origin.ROOM_WAIT``)."""
        swarm, manifest = self.swarm, view.manifest
        self.view = view
        board.set_pulling(True)
        swarm.sessions[self.ref] = swarm.sessions[manifest.id] = self
        self._interested |= swarm.take_early_interest(self.ref, manifest.id)
        known = {offer.peer: offer for offer in self.offers
                 if offer.manifest.id == manifest.id and offer.peer in swarm.contacts}
        for peer, offer in known.items():
            view.offered(peer, offer, swarm.contacts[peer])
        life = PeerLifecycle()  # each peer's state in this pull (agent.swarm.lifecycle)
        for peer in set(self.asked) - set(known):
            life.move(peer, "not_followed")  # answered "none here" before the plan
        scopes: dict[str, trio.CancelScope] = {}  # peers asked or followed -> what stops that
        began = time.monotonic()

        def tell_view() -> None:
            view.set_unknown(life.unheard)

        def heard(peer: str) -> None:
            life.heard(peer)
            tell_view()

        def end(peer: str, event: str) -> None:
            life.move(peer, event)
            tell_view()
            self._wake.set()

        async def follow_one(peer: str) -> None:
            # Ask, then follow, until the stream ends or the peer is no longer among those
            # this pull follows (another of its place ranks before it now: ``pass``).
            with trio.CancelScope() as scope:
                scopes[peer] = scope
                try:
                    event = await self._follow_one(peer, known.pop(peer, None), view, heard, life.content_asked)
                finally:
                    if scopes.get(peer) is scope:
                        del scopes[peer]
            if scope.cancelled_caught:
                view.forget(peer)
                event = "pass"
            end(peer, event)

        async def probe_content(peer: str) -> None:
            # Ask a peer that holds none of the manifest by name what it holds by content;
            # follow it (its board for the manifest exists now) when that is something.
            contact = await swarm.contact(peer)
            offer = await content_over(contact, manifest, CONNECT_TIMEOUT) if contact is not None else None
            if offer is None:
                end(peer, "none")
                return
            log.debug("%s holds %d chunks of it by content: following it", peer[:16],
                      sum(len(v) for v in offer.have.values()))
            view.offered(peer, offer, contact)
            known[peer] = offer
            life.move(peer, "found")
            tell_view()
            await follow_one(peer)

        try:
            async with trio.open_nursery() as nursery:
                if getattr(swarm.node, "dht", None) is not None:
                    nursery.start_soon(self._find_by_content, view)  # holders under other names
                started = False
                while True:
                    now = time.monotonic()
                    candidates = swarm.node.connected() - swarm.node.refused_by
                    for peer in self._interested & candidates:
                        # It asked us about the model: it pulls now (asked again, and ranked
                        # again among its place's); one asked or followed already needs nothing.
                        self._interested.discard(peer)
                        if life.of(peer) in (IDLE, RESTING):
                            life.move(peer, "interest")
                    # Whom this pull follows: its room, and a few of each other place
                    # (``agent.swarm.location.neighbours``); content asks go to the room and
                    # the first few of each place, idle or not.
                    idle = life.in_state(IDLE, PROBING)
                    chosen = swarm.neighbours(candidates, idle)
                    probed = swarm.neighbours(candidates) if idle else chosen
                    for peer in candidates:
                        state = life.of(peer)
                        if peer not in chosen:
                            if state in (ASKING, FOLLOWED) and peer in scopes:
                                log.debug("no longer following %s: others of its place rank first", peer[:16])
                                scopes[peer].cancel()  # its task ends with ``pass``
                            elif state in (NEW, RESTING):
                                life.move(peer, "pass")
                            elif state == IDLE and peer in probed and peer not in life.content_asked:
                                life.move(peer, "probe")
                                nursery.start_soon(probe_content, peer)
                            continue
                        if state == PASSED:
                            state = life.move(peer, "chosen")
                        elif state == RESTING and life.due(peer, now):
                            state = life.move(peer, "due")
                        if state == NEW:
                            life.move(peer, "ask", known=peer in view.peers)
                            nursery.start_soon(follow_one, peer)
                        elif state == IDLE and peer not in life.content_asked:
                            # It said it holds none of this by name: it may by content.
                            life.move(peer, "probe")
                            nursery.start_soon(probe_content, peer)
                    for peer in list(view.peers):
                        # A peer still followed stays: its HAVE stream is a connection of
                        # its own, and the libp2p one may flap (two dials crossing). A
                        # forgotten peer's frames would be dropped while it is followed.
                        if life.of(peer) not in ACTIVE and (peer not in candidates or peer not in chosen):
                            log.debug("forgetting %s: %s", peer[:16], "not followed" if peer in candidates
                                      else "no libp2p connection and no HAVE stream")
                            view.forget(peer)
                    life.unheard &= candidates
                    for peer in life.unheard:  # where those not heard from yet are (their hellos)
                        contact = swarm.contacts.get(peer)
                        if contact is not None:
                            view.place(peer, contact.location)
                    tell_view()
                    view.set_idle(idle & candidates)  # (a probe started above stays in it)
                    probing = life.in_state(PROBING)
                    if not started and (not probing or time.monotonic() - began > CONTENT_WAIT):
                        # The picker may start at once: peers not heard from yet count as
                        # pulling (agent.swarm.picker), and those that answered before the
                        # plan are in the view already (content asks: a moment).
                        task_status.started()
                        started = True
                    view.tick()
                    self._wake = trio.Event()
                    soonest = life.soonest(candidates)
                    soonest = now + 1.0 if soonest is None else soonest
                    with trio.move_on_after(max(0.02, min(soonest - now, 0.05 if not started else 1.0))):
                        await self._wake.wait()
        finally:
            swarm.sessions.pop(self.ref, None)
            swarm.sessions.pop(manifest.id, None)
            with trio.CancelScope(shield=True):
                board.set_pulling(False)
            for peer, summary in view.summary().items():
                info = swarm.peer_info(peer)
                info["bytes_down"] += summary["bytes_down"]
                if summary["banned"]:
                    info["dropped"] = summary["banned"]

    async def _follow_one(self, peer: str, answer, view: LanView, heard, content_asked: set[str]) -> str:
        """Follow ``peer`` (one connection: its HAVE stream, whose first frame says what it
        holds; ``answer``, an offer made before the plan, is used as it is) until the stream
        ends: the lifecycle event that ends it (``failed`` or ``not_followed``)."""
        swarm, manifest = self.swarm, view.manifest
        try:
            for attempt in range(2):
                contact = await swarm.contact(peer, fresh=attempt > 0)
                if contact is None:  # it cannot or will not say hello: rest, then try again
                    log.debug("following %s: no contact (no hello answer)", peer[:16])
                    return "failed"
                if answer is not None:
                    view.offered(peer, answer, contact)
                else:
                    view.following(peer, contact)
                try:
                    await self._subscribe(peer, contact, view, heard)
                    return "failed"  # (it returns only by raising)
                except KeyRefused:
                    continue  # our key was renewed or revoked meanwhile: hello again, once
                except NotFollowed as e:  # it holds none and does not pull it: it subscribes to us when it does
                    # ... by name. It may hold some of it by content (another repository
                    # with the same files, the revision before this one): ask once.
                    if peer not in content_asked:
                        content_asked.add(peer)
                        offer = await content_over(contact, manifest, CONNECT_TIMEOUT)
                        if offer is not None:
                            log.debug("following %s by content: %d chunks", peer[:16],
                                      sum(len(v) for v in offer.have.values()))
                            view.offered(peer, offer, contact)
                            try:
                                await self._subscribe(peer, contact, view, heard)
                                return "failed"
                            except NotFollowed:
                                pass
                    log.debug("not following %s: %s", peer[:16], e)
                    view.forget(peer)
                    return "not_followed"
            return "failed"  # our key refused twice
        except (OSError, ShoalError, trio.TooSlowError, trio.BrokenResourceError) as e:
            log.info("following %s: %s", peer[:16], e)
            view.unsubscribed(peer, silent=isinstance(e, trio.TooSlowError))
            return "failed"

    async def _find_by_content(self, view: LanView) -> None:
        """Look the pull's largest files up by content in the DHT and dial their holders,
        if this agent is the one of its room's pullers that does (``location.finder``, once
        they have answered; a puller alone always does). Each lookup walks the DHT, a
        libp2p stream to each peer it asks and one answer from each, and 24 agents in three
        rooms that each looked up the same files at the pull's start spent over half their
        control CPU on it. The finder follows what it finds; its room mates do not see
        those holders themselves, so a chunk only they hold enters the room through the
        finder when it is the chunk's owner there, and may otherwise still come from the
        origin (bytes paid twice in that rare case, never a wrong byte)."""
        manifest = view.manifest
        await trio.sleep(SEEK_WAIT)
        pullers = [p for p in view.room(count_unknown=False)[0] if view.is_local(p)]
        if locality.finder(manifest.id, pullers) != self.self_id:
            log.debug("pull %s: another puller of this room looks its files up by content", self.ref)
            return
        try:
            dialled = await self.swarm.find_by_content(manifest)
            if dialled:
                log.info("pull %s: dialled %d peers the DHT says hold its files by content", self.ref, dialled)
                self._wake.set()
        except Exception as e:  # a DHT that cannot answer leaves the room as it is
            log.debug("looking up %s's files by content: %s: %s", self.ref, type(e).__name__, e)

    async def _subscribe(self, peer: str, contact: Contact, view: LanView, heard) -> None:
        """Read the peer's HAVE stream into ``view`` until it breaks."""
        total = view.ordinals.total
        with trio.fail_after(CONNECT_TIMEOUT):
            try:
                stream, reader = await open_keyed(contact, MODE_SUB, view.manifest.id)
            except PeerRefused as e:
                if e.status == MISSING:
                    raise NotFollowed(str(e)) from e
                raise
        async with stream:
            opened, first = trio.current_time(), True
            while True:
                # One cancel scope for as long as frames keep coming (its deadline moves),
                # and every frame already received applied in one go: a room of 30 pushes
                # dozens of frames a second, and per-frame scopes and wake-ups added up.
                with trio.move_on_after(1.0) as scope:
                    while True:
                        for body in await reader.frames():
                            view.apply(peer, wire.decode(body, total))
                        heard(peer)
                        first = False
                        scope.deadline = trio.current_time() + 1.0
                if first:  # its snapshot may wait for its plan; a stopped peer sends none
                    if trio.current_time() - opened > FIRST_FRAME_WAIT:
                        raise trio.TooSlowError(f"no first HAVE frame from {peer[:16]} in {FIRST_FRAME_WAIT:.0f} s")
                    continue
                # Nothing for a second: gone only once the view says so (silent past
                # LIVENESS, with a fresh allowance after a pause of our own).
                if not view.alive(peer):
                    raise trio.TooSlowError(f"no HAVE frame from {peer[:16]} for {LIVENESS:.0f} s")

"""The asks a pull (and a room) makes of its peers on their data ports, from trio: a peer's
offer for a manifest or a model revision, the offers before a pull plans, and a room ask.

Each goes to the peer's data port with the key its hello gave (``Swarm.contact``; asked
again once if the peer renewed or revoked it); a peer that cannot answer is left out, and
what `shoal peers` shows of it is kept up to date. Bounded in time: ``OFFER_TIMEOUT`` for
the offers before a plan, ``ASK_TIMEOUT`` for one ask.
"""

from __future__ import annotations

import time

import trio

from agent.errors import KeyRefused, PeerRefused
from agent.manifest import Manifest, ModelRef, is_manifest_id
from agent.swarm.asks import offer_over, room_over
from agent.swarm.node import ASK_TIMEOUT
from agent.swarm.protocol import PeerPending, encode_request, parse_answer
from agent.swarm.session import PENDING

OFFER_TIMEOUT = 0.75  # a pull waits this long at most for its peers' first answers (the rest: asked again)
# ... and this long after the first offer: a late joiner starts on what the first answers
# say (the session follows every peer anyway), instead of waiting for the slowest one.
OFFER_SETTLE = 0.15


class Asks:
    """A swarm's asks of its peers (``Swarm.asks``)."""

    def __init__(self, swarm):
        self.swarm = swarm

    async def ask(self, peer: str, *, ref: ModelRef | None = None, manifest_id: str | None = None,
                  known: Manifest | None = None):
        """The peer's offer for a manifest (by id) or a model revision (or both), asked on its
        data port; None when it holds none or cannot answer; ``PENDING`` when it pulls the
        same but has not planned yet. What `shoal peers` shows of it is kept up to date."""
        if manifest_id is None and ref is not None and is_manifest_id(ref.revision):
            manifest_id = ref.revision
        request = encode_request(manifest_id=manifest_id, model=ref.model_id if ref else None,
                                 revision=ref.revision if ref else None, known=known is not None)
        info = self.swarm.peer_info(peer)
        for attempt in range(2):
            contact = await self.swarm.contact(peer, fresh=attempt > 0)
            if contact is None:
                return None
            started = time.monotonic()
            try:
                data = await offer_over(contact, request, ASK_TIMEOUT)
                answer = parse_answer(data, known)
                break
            except KeyRefused:
                continue  # our key was renewed or revoked meanwhile: hello again, once
            except PeerPending:
                return PENDING
            except LookupError:
                return None  # it holds none of it
            except Exception as e:  # PeerBroken, a timeout, a reset: a peer that cannot answer is left out
                info["error"] = str(e)[:200] or type(e).__name__
                return None
        else:
            return None
        info["rtt_ms"] = round((time.monotonic() - started) * 1000, 1)
        info["error"] = None
        answer.peer = peer
        m = answer.manifest
        info["holds"][f"{m.model_id}@{m.revision}"] = {
            "manifest_id": m.id, "chunks": sum(len(v) for v in answer.have.values()),
            "of": sum(len(f.chunks) for f in m.files), "pulling": answer.pulling}
        return answer

    async def room_ask(self, peer: str, request: bytes, timeout: float) -> bytes | None:
        """A room ask (``agent.assign.wire``) on the peer's data port: its answer, or None when
        it cannot answer (no key to its port, it keeps no room)."""
        for attempt in range(2):
            contact = await self.swarm.contact(peer, fresh=attempt > 0)
            if contact is None:
                return None
            try:
                return await room_over(contact, request, timeout)
            except KeyRefused:
                continue  # our key was renewed or revoked meanwhile: hello again, once
            except PeerRefused:
                return None
        return None

    async def ask_all(self, peers, timeout: float, answered: set[str], *, settle: float | None = None,
                       **kwargs) -> list:
        """Ask ``peers`` at once (for at most ``timeout``): their offers; those that gave a
        definite answer (an offer, or none held) are added to ``answered``. With ``settle``,
        stop that long after the first offer arrives: one offer is enough to plan and
        start, and the pull's session asks the rest again."""
        answers: list = []

        async def one(peer: str) -> None:
            answer = await self.ask(peer, **kwargs)
            if answer is PENDING:
                return
            if answer is not None:
                answers.append(answer)
                if settle is not None and len(answers) == 1:
                    scope.deadline = min(scope.deadline, trio.current_time() + settle)
            if answer is not None or not self.swarm.peers.get(peer, {}).get("error"):
                answered.add(peer)
        with trio.move_on_after(timeout) as scope:
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(one, peer)
        return answers

    async def offers(self, ref: ModelRef) -> tuple[list, set[str]]:
        """What peers hold of ``ref``, asked before a pull plans, and who answered (an offer,
        or none held): the connected peers first (our room, and a few in each other place:
        ``neighbours``; at most ``OFFER_TIMEOUT``); the DHT only when none has it. The
        session asks the others again."""
        connected = self.swarm.neighbours(self.swarm.node.connected() - self.swarm.node.refused_by)
        answered: set[str] = set()
        answers = await self.ask_all(connected, OFFER_TIMEOUT, answered, settle=OFFER_SETTLE, ref=ref)
        if answers or answered != connected or self.swarm.node.records.dht is None:
            return answers, answered
        found = await self.swarm.node.records.find_providers(ref)
        new = {}
        async with trio.open_nursery() as nursery:
            for peer, addrs in found.items():
                self.swarm.peer_info(peer, addrs[0] if addrs else None, "dht")
                if peer not in connected and addrs:
                    new[peer] = addrs
                    nursery.start_soon(self.swarm.dial, peer, addrs[0], "dht")
        return (await self.ask_all(set(found) - connected, ASK_TIMEOUT, answered, ref=ref) if new else []), answered

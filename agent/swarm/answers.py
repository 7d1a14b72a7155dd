"""What a swarm node's data port answers besides chunks: offers, content asks, room asks,
and what a subscription needs of the agent (its board, whether a pull still plans, who
follows whom).

``PortAnswers`` is the data port's one view of the agent (``agent.swarm.datapath`` asks it
from its threads): a new ask is a mode there and a method here, not a callback threaded
through three constructors. The base answers nothing (a bare chunk server: the link
benchmark, the data port's tests); ``StoreAnswers`` answers from the store, as a node that
pulls nothing does; ``SwarmAnswers`` is the agent's (``agent.swarm.membership.Swarm``), which
also knows what it pulls and tells its pulls who asked.
"""

from __future__ import annotations

from collections import OrderedDict

import trio

from agent.errors import PeerBroken
from agent.manifest import Manifest, decode
from agent.swarm.locator import StoreLocator
from agent.swarm.protocol import (BAD_REQUEST, NOT_HELD, PENDING, encode_answer, encode_error, encode_request,
                                  parse_request)

MANIFEST_CACHE = 32  # decoded manifests kept for offers


class PortAnswers:
    """The data port's answers when the agent gives none."""

    boards = None  # agent.swarm.board.Boards, what subscribers are told; None: no subscriptions
    room = None  # (peer, request bytes) -> answer bytes (agent.assign), once the agent keeps a room

    def offer(self, peer: str, request: bytes) -> bytes:
        """The answer to an offer request (mode "offer") from ``peer``."""
        return b""

    def content(self, peer: str, manifest_id: str, manifest: bytes) -> bytes | None:
        """The answer to a content ask (mode "content"); None: not answered here."""
        return None

    def planning(self) -> bool:
        """Whether a pull of this agent has not planned yet (a subscription waits for it)."""
        return False

    def subscribed(self, peer: str, manifest_id: str) -> None:
        """``peer`` subscribed to our board for a manifest this agent pulls too."""

    def peer_holds(self, manifest_id: str, peer: str) -> set | None:
        """What ``peer`` holds of the manifest as its own HAVE stream to us says, or None."""
        return None


class StoreAnswers(PortAnswers):
    """Offers and content asks answered from the store (called in the data port's threads)."""

    def __init__(self, store, boards=None):
        self.store, self.boards = store, boards
        self.locator = StoreLocator(store)  # where the data port finds chunks, shared with it
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()

    def pulling(self, key: str) -> bool:
        """Whether this agent pulls ``key`` (a model revision) now."""
        return False

    def interest(self, peer: str, key: str) -> None:
        """``peer`` asked about ``key`` (a model revision or manifest id) this agent pulls."""

    def subscribed(self, peer: str, manifest_id: str) -> None:
        self.interest(peer, manifest_id)

    def _manifest(self, manifest_id: str) -> tuple[Manifest, bytes]:
        data = self.store.manifest_bytes(manifest_id)
        manifest = self._manifests.get(manifest_id)
        if manifest is None:
            manifest = decode(data)
            self._manifests[manifest_id] = manifest
            while len(self._manifests) > MANIFEST_CACHE:
                self._manifests.popitem(last=False)
        return manifest, data

    def offer(self, peer: str, request: bytes) -> bytes:
        """An offer: the manifest (by id, or a model revision's) and the chunks held of it.
        Asked about a revision this agent pulls but has not planned yet: PENDING (ask again
        shortly), and the agent follows the asker."""
        try:
            asked = parse_request(request)
        except PeerBroken as e:
            return encode_error(BAD_REQUEST, str(e))
        found = None
        if asked.manifest_id is not None:
            found = self.store.holding(manifest_id=asked.manifest_id)
        if found is None and asked.model is not None:
            found = self.store.holding(model_id=asked.model, revision=asked.revision)
        if found is None:
            key = f"{asked.model}@{asked.revision}" if asked.model else None
            if key and self.pulling(key):  # pulling it too, not planned yet: ask again shortly
                self.interest(peer, key)
                return encode_error(PENDING, "pulling it too; no manifest yet")
            return encode_error(NOT_HELD, "not held here")
        ref, manifest_id = found
        manifest, manifest_bytes = self._manifest(manifest_id)
        expected = {f.path: f.chunks for f in manifest.files}
        have = {path: {i for i, h in held.items() if i < len(expected[path]) and expected[path][i] == h}
                for path, held in self.store.held_chunks(ref).items() if path in expected}
        pulling = self.pulling(str(ref))
        if pulling:
            self.interest(peer, str(ref))
        return encode_answer(manifest, None if asked.known else manifest_bytes,
                             self.store.signature(manifest_id), have, pulling)

    def content(self, peer: str, manifest_id: str, manifest: bytes) -> bytes | None:
        """A content ask (``agent.swarm.content``): what the store holds of another agent's
        manifest by content; an ordinary offer when it holds that manifest by name."""
        from agent.swarm.content import content_answer
        if self.store.holding(manifest_id=manifest_id) is not None:  # held by name after all
            return self.offer(peer, encode_request(manifest_id=manifest_id, known=True))
        return content_answer(self.store, self.boards, self.locator, manifest_id, manifest)


class SwarmAnswers(StoreAnswers):
    """The agent's answers: what its ``Swarm`` pulls, plans and follows. ``bind`` (from the
    event loop) before the data port starts: asks come on its threads, and what they tell
    the agent's pulls goes to the event loop."""

    def __init__(self, swarm):
        super().__init__(swarm.store, swarm.boards)
        self.swarm = swarm
        self._trio_token = None

    def bind(self) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()

    def pulling(self, key: str) -> bool:
        return key in self.swarm.pull_keys()

    def planning(self) -> bool:
        return self.swarm.planning()

    def interest(self, peer: str, key: str) -> None:
        if self._trio_token is None:
            return
        try:
            trio.from_thread.run_sync(self.swarm.interest, peer, key, trio_token=self._trio_token)
        except (trio.RunFinishedError, trio.Cancelled):
            pass  # the agent is stopping

    def peer_holds(self, manifest_id: str, peer: str) -> set | None:
        return self.swarm.peer_holds(manifest_id, peer)

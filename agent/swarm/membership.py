"""The agent's side of the swarm: which peers it knows and how it reaches them, what it
announces, what it asks before a pull and while one runs.

``Swarm`` runs beside the agent (``Agent.serve``): the ``SwarmNode`` (libp2p host, data
server, DHT, mDNS), a loop that keeps connections to bootstrap and discovered peers, and
one that keeps DHT provider records in line with what the store holds. For a pull it
offers ``offers(ref)`` (asked before planning) and ``track(view)`` (the HAVE updates while
the pull runs); ``pull()`` takes it as its ``swarm``.

Bounded: at most ``MAX_PEERS`` peers are tracked; asks run concurrently per round with a
time limit; discovered peers that cannot be reached are retried with backoff.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import trio

from agent.config import Settings
from agent.errors import ConfigError
from agent.manifest import ModelRef
from agent.swarm.node import ASK_TIMEOUT, SwarmNode
from agent.errors import NotInSwarm
from agent.swarm.protocol import SwarmAccess

log = logging.getLogger("shoal.swarm")

MAX_PEERS = 256
TRACK_INTERVAL = 1.0  # HAVE updates: how often a running pull re-asks each peer
FIRST_ROUND = 2.0  # a pull starts choosing chunks once its peers answered, or after this
FAILED_PEER_REST = 5.0  # a peer whose ask failed is asked again after this
KEEP_INTERVAL = 1.0
BOOTSTRAP_RETRY = 10.0
ANNOUNCE_INTERVAL = 30.0


def check_open_swarm(settings: Settings, access: SwarmAccess) -> None:
    """An agent serves an open swarm (no secret, no allowlist) on a LAN address only when
    its admin said so: anyone who can reach it could list and download what it holds."""
    import ipaddress
    try:
        loopback = ipaddress.ip_address(settings.swarm_host).is_loopback
    except ValueError:
        loopback = settings.swarm_host == "localhost"
    if access.open and not loopback and not settings.swarm_open:
        raise ConfigError(
            f"the swarm would be open to anyone who can reach {settings.swarm_host}: set a shared secret on every "
            "machine of the room (SHOAL_SWARM_SECRET=... or swarm.secret in config.toml; `shoal room create` "
            "makes one), or, if that is really what you want, swarm.open = true (SHOAL_SWARM_OPEN=1)")


class Swarm:
    def __init__(self, settings: Settings, store, pulling: Callable[[str], bool]):
        from agent.swarm.trust import Identity
        self.settings = settings
        self.store = store
        identity = Identity.load_or_create(Path(settings.cache_dir) / "identity.key")
        allow = frozenset(p.strip() for p in settings.swarm_allow.split(",") if p.strip())
        self.access = SwarmAccess(settings.swarm_secret, allow)
        check_open_swarm(settings, self.access)
        self.node = SwarmNode(store, identity.seed, access=self.access, pulling=pulling,
                              listen_host=settings.swarm_host, listen_port=settings.swarm_port,
                              slots=settings.upload_slots, upload_rate=settings.upload_rate,
                              mdns=settings.mdns, dht=settings.dht, encrypt=settings.encrypt_data)
        self.bootstrap = [a.strip() for a in settings.swarm_peers.split(",") if a.strip()]
        # peer id -> what `shoal peers` shows; "addr" is how we reach it
        self.peers: dict[str, dict] = {}
        self._next_try: dict[str, float] = {}
        self._provided: set[tuple[str, str, str]] = set()

    @property
    def self_id(self) -> str:
        return self.node.peer_id

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.node.serve)
            nursery.start_soon(self._keep_peers)
            nursery.start_soon(self._announce)
            task_status.started(self)

    # ---------------------------------------------------------------- peers

    def _peer(self, peer: str, addr: str | None = None, via: str | None = None) -> dict:
        info = self.peers.get(peer)
        if info is None:
            if len(self.peers) >= MAX_PEERS:  # forget the longest-disconnected one
                stale = min((p for p, i in self.peers.items() if not i["connected"]),
                            key=lambda p: self.peers[p].get("seen", 0), default=None)
                if stale is not None:
                    del self.peers[stale]
            info = self.peers[peer] = {"addr": addr, "via": via, "connected": False, "error": None,
                                       "rtt_ms": None, "holds": {}, "bytes_down": 0, "bytes_up": 0,
                                       "dropped": None, "seen": 0.0}
        if addr and not info.get("addr"):
            info["addr"] = addr
        if via and not info.get("via"):
            info["via"] = via
        return info

    async def _dial(self, peer: str, address: str, via: str) -> None:
        info = self._peer(peer, address, via)
        try:
            await self.node.connect(address)
            info.update(connected=True, error=None, addr=address, seen=time.time())
            self._next_try.pop(peer, None)
            await self.node.add_to_routing(peer)
        except Exception as e:  # unreachable now: try again later
            if isinstance(e, trio.TooSlowError) and not self.access.open:
                why = ("no secure handshake within the time allowed: the peer may be in another swarm "
                       "(a different SHOAL_SWARM_SECRET), not a shoal agent, or overloaded")
            else:
                why = str(e)[:200] or type(e).__name__
            info.update(connected=False, error=why)
            delay = BOOTSTRAP_RETRY if via == "bootstrap" else min(300.0, 2 * (info.get("fails", 0) + 1) * 5)
            info["fails"] = info.get("fails", 0) + 1
            self._next_try[peer] = time.monotonic() + delay

    async def _keep_peers(self) -> None:
        """Dial bootstrap peers and discovered ones; notice dropped connections."""
        while True:
            connected = self.node.connected()
            for peer in connected - set(self.peers):
                # It dialled us (its bootstrap list, mDNS, or DHT routing reached us first).
                self._peer(peer, via="inbound")
            for peer, info in self.peers.items():
                info["connected"] = peer in connected and peer not in self.node.refused_by
                if info["connected"]:
                    info["seen"] = time.time()
            targets = [(a.rsplit("/p2p/", 1)[-1], [a], "bootstrap") for a in self.bootstrap]
            targets += [(p, addrs, "mdns") for p, addrs in self.node.take_discovered().items()]
            now = time.monotonic()
            async with trio.open_nursery() as nursery:
                for peer, addrs, via in targets:
                    if peer == self.self_id or peer in connected or self._next_try.get(peer, 0) > now:
                        continue
                    if peer in self.node.refused_by:
                        continue  # it told us we are not in its swarm; do not knock again
                    address = next((a for a in addrs if "/ip4/" in a and "/127." not in a), addrs[0]) \
                        if addrs else None
                    if address:
                        nursery.start_soon(self._dial, peer, address, via)
            await trio.sleep(KEEP_INTERVAL)

    # -------------------------------------------------------------- announcing

    async def _announce(self) -> None:
        """Keep DHT provider records for every complete model; drop them on eviction."""
        if self.node.dht is None:
            return
        while True:
            models = await trio.to_thread.run_sync(self.store.models)
            held = {(m.model_id, m.revision, m.manifest_id) for m in models
                    if m.state == "complete" and m.manifest_id}
            for key in held - self._provided:
                if await self.node.provide(*key):
                    self._provided.add(key)
            for key in self._provided - held:
                self.node.unprovide(*key)
                self._provided.discard(key)
            await trio.sleep(ANNOUNCE_INTERVAL if self._provided >= held else 2.0)

    # ------------------------------------------------------------------ asking

    async def _ask(self, peer: str, **kwargs):
        info = self._peer(peer)
        started = time.monotonic()
        try:
            answer = await self.node.ask(peer, **kwargs)
        except NotInSwarm as e:
            info.update(error=f"refused us: {e}", connected=False)
            self.node.refused_by.add(peer)
            return None
        except Exception as e:  # PeerBroken, a timeout, a reset: a peer that cannot answer is left out
            info["error"] = str(e)[:200] or type(e).__name__
            return None
        info["rtt_ms"] = round((time.monotonic() - started) * 1000, 1)
        info["error"] = None
        if answer is not None:
            answer.peer = peer
            m = answer.manifest
            info["holds"][f"{m.model_id}@{m.revision}"] = {
                "manifest_id": m.id, "chunks": sum(len(v) for v in answer.have.values()),
                "of": sum(len(f.chunks) for f in m.files), "pulling": answer.pulling}
        return answer

    async def _ask_all(self, **kwargs) -> dict[str, object]:
        answers: dict[str, object] = {}

        async def one(peer: str) -> None:
            answers[peer] = await self._ask(peer, **kwargs)
        peers = [p for p in self.node.connected() if p not in self.node.refused_by]
        with trio.move_on_after(ASK_TIMEOUT + 1):
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(one, peer)
        return answers

    async def offers(self, ref: ModelRef) -> list:
        """What peers hold of ``ref``, asked before a pull plans (DHT providers dialled first)."""
        found = await self.node.find_providers(ref)
        if found:
            async with trio.open_nursery() as nursery:
                for peer, addrs in found.items():
                    self._peer(peer, addrs[0] if addrs else None, "dht")
                    if peer not in self.node.connected() and addrs:
                        nursery.start_soon(self._dial, peer, addrs[0], "dht")
        answers = await self._ask_all(ref=ref)
        return [a for a in answers.values() if a is not None]

    async def track(self, view, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep ``view`` fresh (HAVE updates) until cancelled.

        Each peer is followed by its own loop (ask, update, sleep ``TRACK_INTERVAL``), so a
        stalled peer delays only its own updates. Started once every peer connected at the
        start has answered once, or after ``FIRST_ROUND`` seconds.
        """
        following: set[str] = set()
        retry_at: dict[str, float] = {}
        first_round: set[str] = set()

        async def follow(peer: str) -> None:
            try:
                while True:
                    answer = await self._ask(peer, manifest_id=view.manifest.id, known=view.manifest)
                    first_round.discard(peer)
                    if answer is None:
                        view.forget(peer)
                        # Not holding it (yet): ask again soon; failing: give it a rest.
                        failed = self.peers.get(peer, {}).get("error")
                        retry_at[peer] = time.monotonic() + (FAILED_PEER_REST if failed else TRACK_INTERVAL)
                        return
                    view.update(peer, answer)
                    await trio.sleep(TRACK_INTERVAL)
            finally:
                following.discard(peer)

        try:
            async with trio.open_nursery() as nursery:
                first_round.update(p for p in self.node.connected() if p not in self.node.refused_by)
                started_at, started = time.monotonic(), False
                while True:
                    connected = self.node.connected()
                    now = time.monotonic()
                    for peer in connected - following - self.node.refused_by:
                        if retry_at.get(peer, 0) <= now:
                            following.add(peer)
                            nursery.start_soon(follow, peer)
                    for peer in list(view.peers):
                        if peer not in connected:
                            view.forget(peer)
                    if not started and (not first_round or now - started_at > FIRST_ROUND):
                        task_status.started()
                        started = True
                    await trio.sleep(0.05 if not started else KEEP_INTERVAL / 4)
        finally:
            for peer, summary in view.summary().items():
                info = self._peer(peer)
                info["bytes_down"] += summary["bytes_down"]
                if summary["banned"]:
                    info["dropped"] = summary["banned"]

    def snapshot(self) -> list[dict]:
        served = dict(self.node.data.served_to)
        return [{"id": p, **{k: v for k, v in i.items() if k not in ("seen", "fails")},
                 "bytes_up": served.get(p, 0)} for p, i in self.peers.items()]


class PullSession:
    """What ``pull()`` gets as its ``swarm``: the answers asked before it planned, this
    agent's peer id, and the HAVE-update loop."""

    def __init__(self, swarm: Swarm, offers: list):
        self.swarm, self.offers = swarm, offers

    @property
    def self_id(self) -> str:
        return self.swarm.self_id

    def connected(self) -> int:
        return len(self.swarm.node.connected())

    async def track(self, view, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.swarm.track(view, task_status=task_status)

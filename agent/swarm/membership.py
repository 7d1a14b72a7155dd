"""The agent's side of the swarm: which peers it knows and how it reaches them.

``Swarm`` runs beside the agent (``Agent.serve``): the ``SwarmNode`` (libp2p host, data
server, DHT, mDNS), a loop that keeps connections to bootstrap and discovered peers, and
one that keeps DHT provider records in line with what the store holds
(``agent.swarm.records``). For a pull it gives ``asks.offers(ref)`` (asked before planning:
``agent.swarm.offers``) and ``session(offers)``, the ``agent.swarm.session.PullSession`` that
follows peers while the pull runs. It keeps this agent's boards (``agent.swarm.board``):
what subscribers are told about each manifest; and what its data port answers
(``agent.swarm.answers``) reads its pulls here.

Each connected peer gets one **hello** over libp2p (and again every ``CONTACT_REFRESH``):
its answer is this agent's contact for the peer's data port, where every ask of a pull
goes. Idle, the swarm costs next to nothing: no ask is made by the clock, only a look at
the connection table once a second and, with the DHT on, a provider check every 30 s.

Bounded: at most ``MAX_PEERS`` peers are tracked; asks run concurrently with a time limit;
discovered peers that cannot be reached are retried with backoff.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import trio

from agent.config import Settings
from agent.errors import ConfigError, NotInSwarm
from agent.manifest import Manifest, ModelRef
from agent.swarm.board import Board, Boards
from agent.swarm.location import default_location, format_location, neighbours, parse as parse_location
from agent.swarm.node import SwarmNode
from agent.swarm.offers import Asks
from agent.swarm.protocol import Contact, SwarmAccess
from agent.swarm.answers import SwarmAnswers
from agent.swarm.session import PullSession
from agent.swarm.wire import Ordinals

log = logging.getLogger("shoal.swarm")

MAX_PEERS = 256
CONTACT_REFRESH = 1200.0  # a peer's key lasts an hour: say hello again well before
HELLOS_AT_ONCE = 16
HELLO_RETRY = 10.0
KEEP_INTERVAL = 1.0
BOOTSTRAP_RETRY = 10.0
CONTENT_LOOKUPS = 4  # a pull's largest files looked up by content in the DHT


def check_open_swarm(settings: Settings, access: SwarmAccess) -> None:
    """An agent serves an open swarm (no secret, no allowlist) on a LAN address only when
    its admin said so: anyone who can reach it could list and download what it holds."""
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
    def __init__(self, settings: Settings, store, pulls: Callable[[], Iterable[str]]):
        from agent.swarm.trust import Identity
        self.settings = settings
        self.store = store
        identity = Identity.load_or_create(Path(settings.cache_dir) / "identity.key")
        allow = frozenset(p.strip() for p in settings.swarm_allow.split(",") if p.strip())
        self.access = SwarmAccess(settings.swarm_secret, allow)
        check_open_swarm(settings, self.access)
        self.boards = Boards(self._board_from_store)
        self._pulls = pulls  # str(ref) of every pull of this agent
        self.sessions: dict[str, PullSession] = {}  # str(ref) and manifest id -> the pull following peers
        # str(ref) or manifest id -> peers that asked about it before its pull followed anyone
        self._early_interest: dict[str, set[str]] = {}
        # Where this agent is (agent.swarm.location): said in every hello answer.
        self.location = parse_location(settings.swarm_location) if settings.swarm_location else default_location()
        self.answers = SwarmAnswers(self)  # what our data port answers besides chunks
        self.node = SwarmNode(store, identity.seed, answers=self.answers, access=self.access,
                              listen_host=settings.swarm_host, listen_port=settings.swarm_port,
                              slots=settings.upload_slots, upload_rate=settings.upload_rate,
                              mdns=settings.mdns, dht=settings.dht, encrypt=settings.encrypt_data,
                              peer_exchange=settings.peer_exchange, location=self.location)
        self.asks = Asks(self)  # a pull's (and a room's) asks of peers on their data ports
        self.bootstrap = [a.strip() for a in settings.swarm_peers.split(",") if a.strip()]
        self.contacts: dict[str, Contact] = {}  # peer -> how to reach its data port (from its hello)
        self._contact_at: dict[str, float] = {}
        self._hellos = trio.CapacityLimiter(HELLOS_AT_ONCE)
        self._nursery: trio.Nursery | None = None
        # peer id -> what `shoal peers` shows; "addr" is how we reach it
        self.peers: dict[str, dict] = {}
        self._next_try: dict[str, float] = {}

    @property
    def self_id(self) -> str:
        return self.node.peer_id

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.answers.bind()  # before the data port starts: its threads reach our pulls through it
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.node.serve)
            nursery.start_soon(self._keep_peers)
            nursery.start_soon(self.node.records.keep_announced, self.store)
            task_status.started(self)

    # ----------------------------------------------------------------- boards

    def _board_from_store(self, manifest_id: str) -> Board | None:
        """A board for a manifest the store holds (complete, or a pull's verified part)."""
        found = self.store.holding(manifest_id=manifest_id)
        if found is None:
            return None
        ref, _ = found
        manifest = self.store.manifest(manifest_id)
        ordinals = Ordinals(manifest)
        expected = {f.path: f.chunks for f in manifest.files}
        have, origin = [], []
        for path, held in self.store.held_with_sources(ref).items():
            for index, (digest, source) in held.items():
                if path in expected and index < len(expected[path]) and expected[path][index] == digest:
                    have.append(ordinals.of(path, index))
                    if source != "lan":
                        origin.append(have[-1])
        return Board(manifest, have=have, origin=origin)

    def board(self, manifest: Manifest) -> Board:
        """This agent's board for ``manifest`` (made from the store when there is none yet)."""
        board = self.boards.get(manifest.id)
        if board is None:
            board = self.boards.adopt(Board(manifest))
        return board

    def pull_keys(self) -> set[str]:
        """``str(ref)`` of every pull of this agent."""
        return set(self._pulls())

    def planning(self) -> bool:
        """Whether a pull of this agent has not planned yet (its peers' subscriptions wait)."""
        return any(key not in self.sessions for key in list(self._pulls()))

    def interest(self, peer: str, key: str) -> None:
        """``peer`` asked about ``key`` (a model revision or a manifest id) that this agent
        pulls: its pull follows the peer, now or once it plans."""
        session = self.sessions.get(key)
        if session is not None:
            session.interest(peer)
        elif len(self._early_interest) < MAX_PEERS:
            self._early_interest.setdefault(key, set()).add(peer)

    def peer_holds(self, manifest_id: str, peer: str) -> set[int] | None:
        """What ``peer`` holds of ``manifest_id`` as its HAVE stream to our pull of it says
        (None: we do not follow it). Read by the data port's publisher thread: the set is
        only ever read whole (one C-level operation under the interpreter lock)."""
        session = self.sessions.get(manifest_id)
        view = session.view if session is not None else None
        followed = view.peers.get(peer) if view is not None else None
        return followed.state.have if followed is not None else None

    def take_early_interest(self, *keys: str) -> set[str]:
        """Peers that asked about any of ``keys`` before their pull followed anyone."""
        return set().union(*(self._early_interest.pop(key, set()) for key in keys))

    def session(self, ref: ModelRef, offers: tuple[list, set[str]]) -> PullSession:
        return PullSession(self, ref, *offers)

    # ---------------------------------------------------------------- peers

    def peer_info(self, peer: str, addr: str | None = None, via: str | None = None) -> dict:
        info = self.peers.get(peer)
        if info is None:
            if len(self.peers) >= MAX_PEERS:  # forget the longest-disconnected one
                stale = min((p for p, i in self.peers.items() if not i["connected"]),
                            key=lambda p: self.peers[p].get("seen", 0), default=None)
                if stale is not None:
                    del self.peers[stale]
            info = self.peers[peer] = {"addr": addr, "via": via, "connected": False, "error": None,
                                       "rtt_ms": None, "holds": {}, "bytes_down": 0, "bytes_up": 0,
                                       "dropped": None, "seen": 0.0, "location": None}
        if addr and not info.get("addr"):
            info["addr"] = addr
        if via and not info.get("via"):
            info["via"] = via
        return info

    async def contact(self, peer: str, *, fresh: bool = False) -> Contact | None:
        """How to reach ``peer``'s data port: from its hello (asked now if there is none yet,
        or ``fresh``), or None when it cannot or will not answer."""
        if not fresh and peer in self.contacts:
            return self.contacts[peer]
        info = self.peer_info(peer)
        async with self._hellos:
            started = time.monotonic()
            try:
                contact = await self.node.hello(peer)
            except NotInSwarm as e:
                info.update(error=f"refused us: {e}", connected=False)
                self.node.refused_by.add(peer)
                return None
            except Exception as e:  # PeerBroken, a timeout, a reset: a peer that cannot answer is left out
                info["error"] = str(e)[:200] or type(e).__name__
                self._contact_at[peer] = time.monotonic() - CONTACT_REFRESH + HELLO_RETRY
                if peer in self.node.connected():
                    # A connection that carries no hello is one the peer no longer serves
                    # (two dials that crossed, a reset under load): seen in a 30-room, where
                    # it kept a pulling peer out of some agents' views for the whole pull and
                    # made them disagree on who fetches what. Closing it (bounded) gets a
                    # fresh one within seconds.
                    log.info("no hello from %s (%s): closing its connection to dial it afresh", peer[:16],
                             info["error"])
                    await self.node.drop(peer)
                return None
        info["rtt_ms"] = round((time.monotonic() - started) * 1000, 1)
        info["error"] = None
        info["location"] = format_location(contact.location) if contact.location else None
        self.contacts[peer] = contact
        self._contact_at[peer] = time.monotonic()
        return contact

    async def dial(self, peer: str, address: str, via: str) -> None:
        info = self.peer_info(peer, address, via)
        try:
            await self.node.connect(address)
            info.update(connected=True, error=None, addr=address, seen=time.time())
            self._next_try.pop(peer, None)
            await self.node.records.add_to_routing(peer)
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
                self.peer_info(peer, via="inbound")
            for peer, info in self.peers.items():
                info["connected"] = peer in connected and peer not in self.node.refused_by
                if info["connected"]:
                    info["seen"] = time.time()
            for peer in set(self.contacts) - connected:  # gone: its key to our port ends too
                self.contacts.pop(peer, None)
                self._contact_at.pop(peer, None)
                self.node.tickets.revoke(peer)
            targets = [(a.rsplit("/p2p/", 1)[-1], [a], "bootstrap") for a in self.bootstrap]
            targets += [(p, addrs, "mdns") for p, addrs in self.node.discovery.take_discovered().items()]
            targets += [(p, addrs, "pex") for p, addrs in self.node.discovery.take_exchanged().items()]
            now = time.monotonic()
            for peer in connected - self.node.refused_by:
                if now - self._contact_at.get(peer, -CONTACT_REFRESH) >= CONTACT_REFRESH:
                    self._contact_at[peer] = now  # one hello at a time per peer
                    self._nursery.start_soon(partial(self.contact, peer, fresh=True))
            async with trio.open_nursery() as nursery:
                for peer, addrs, via in targets:
                    if peer == self.self_id or peer in connected or self._next_try.get(peer, 0) > now:
                        continue
                    if peer in self.node.refused_by:
                        continue  # it told us we are not in its swarm; do not knock again
                    address = next((a for a in addrs if "/ip4/" in a and "/127." not in a), addrs[0]) \
                        if addrs else None
                    if address:
                        nursery.start_soon(self.dial, peer, address, via)
            await trio.sleep(KEEP_INTERVAL)

    # -------------------------------------------------------------- content

    async def find_by_content(self, manifest: Manifest) -> int:
        """Dial the peers the DHT says hold the manifest's largest files by content (under
        whatever model): the pull's session then asks them what they hold. Peers dialled."""
        from agent.swarm.records import blob_key
        if self.node.records.dht is None:
            return 0
        connected = self.node.connected()
        largest = sorted(manifest.files, key=lambda f: -f.size)[:CONTENT_LOOKUPS]
        dialled = 0
        async with trio.open_nursery() as nursery:
            for entry in largest:
                for peer, addrs in (await self.node.records.find_key(blob_key(entry.sha256))).items():
                    self.peer_info(peer, addrs[0] if addrs else None, "dht")
                    if peer not in connected and addrs and peer not in self.node.refused_by:
                        connected = connected | {peer}
                        dialled += 1
                        nursery.start_soon(self.dial, peer, addrs[0], "dht")
        return dialled

    def neighbours(self, peers, idle=frozenset()) -> set[str]:
        """Of ``peers`` (connected ones), those a pull asks and follows: our whole room and a
        few of each other place (``agent.swarm.location.neighbours``; a peer whose hello has
        not come yet counts as beside us until it says where it is)."""
        places = {}
        for peer in peers:
            contact = self.contacts.get(peer)
            places[peer] = contact.location if contact is not None else None
        return neighbours(self.self_id, self.location, places, idle, self.settings.follow_per_place)

    def snapshot(self) -> list[dict]:
        served = dict(self.node.data.served_to)
        return [{"id": p, **{k: v for k, v in i.items() if k not in ("seen", "fails")},
                 "bytes_up": served.get(p, 0)} for p, i in self.peers.items()]

    def describe(self) -> dict:
        """This swarm member as ``shoal status`` shows it."""
        return {"peer_id": self.self_id, "addrs": self.node.addrs, "data": list(self.node.data.address),
                "tag": self.access.tag, "open": self.access.open, "mdns": self.settings.mdns,
                "dht": self.settings.dht, "asked": {"hello": self.node.hellos_answered, **self.node.data.asked},
                "provides_skipped": self.node.records.provides_skipped}

    def connected_count(self) -> int:
        return sum(1 for info in self.peers.values() if info["connected"])

    def holders(self, ref: ModelRef, manifest_id: str | None) -> list[dict]:
        """Peers known to hold some of ``ref`` (as of their last offer): id, address, chunks."""
        found = []
        for peer, info in list(self.peers.items()):
            for key, held in info["holds"].items():
                if held["chunks"] and (key == str(ref) or (manifest_id and held["manifest_id"] == manifest_id)):
                    found.append({"id": peer, "addr": info["addr"], "chunks": held["chunks"], "of": held["of"],
                                  "connected": info["connected"]})
                    break
        return found

    def set_upload_rate(self, rate: int | None) -> None:
        self.node.data.rate.set_rate(rate)

    def set_upload_slots(self, slots: int) -> None:
        self.node.data.slots = slots

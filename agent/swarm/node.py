"""The LAN swarm node: a libp2p host that gives swarm members a key to this agent's data
port (the hello), answers their offers there, and discovery (bootstrap list, mDNS,
Kademlia DHT provider records).

Over libp2p (authenticated, Noise, the swarm's private network) travel only hellos, one per
pair of agents and renewal, and the DHT; the wire format is ``agent.swarm.protocol``.
Offers, HAVE streams and chunk bytes go over the data port (``agent.swarm.datapath``).

Discovery:
- **bootstrap**: full multiaddrs with ``/p2p/<peer id>`` (``SHOAL_SWARM_PEERS``), dialled by
  the agent and re-dialled when the connection drops;
- **mDNS** (``SHOAL_MDNS``): py-libp2p's zeroconf service under a service name derived
  from the swarm tag, so agents of another swarm do not even see each other;
- **DHT** (``SHOAL_DHT``): py-libp2p ``KadDHT`` in server mode with a per-swarm protocol
  prefix; this agent provides a key per held model revision and per manifest id, and
  looks those keys up before a pull, so peers on routed subnets (no multicast) are found
  through any peer both know.

Resource handling: ``serve`` runs the host, the data server, the DHT and mDNS until
cancelled, and stops them all on the way out.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, OrderedDict
from typing import Callable

import trio

from agent.errors import PeerBroken
from agent.manifest import Manifest, ModelRef, decode, is_manifest_id
from agent.swarm.datapath import DataServer, StoreLocator, TicketBook
from agent.swarm.records import manifest_key, model_key, record_if_enough
from agent.swarm.protocol import (BAD_REQUEST, MAX_ADDR, MAX_PEX, MAX_REQUEST, NOT_HELD, NOT_IN_SWARM, PENDING,
                                  PROTOCOL, Contact, SwarmAccess, encode_answer, encode_contact, encode_error,
                                  encode_hello_request, encode_request, parse_contact, parse_hello_request,
                                  parse_request)

log = logging.getLogger("shoal.swarm")

ASK_TIMEOUT = 5.0
DROP_TIMEOUT = 2.0
MAX_DISCOVERED = 1024
MANIFEST_CACHE = 32
# Connections that have not finished libp2p's secure handshake: per remote address and in
# all (one more is closed at once), each given UPGRADE_TIMEOUT to finish. Members, who
# finish in milliseconds, are never kept out by a stranger's flood from another address.
MAX_PREAUTH = 64
MAX_PREAUTH_PER_ADDRESS = 8
UPGRADE_TIMEOUT = 5.0
YAMUX_RTT_INTERVAL = 600  # seconds between yamux's RTT pings on a connection (py-libp2p's own: 30)


def _keypair(seed: bytes):
    from libp2p.crypto.ed25519 import create_new_key_pair
    return create_new_key_pair(seed)


async def _read_all(stream, limit: int) -> bytes:
    from libp2p.network.stream.exceptions import StreamEOF
    data = bytearray()
    while True:
        try:
            chunk = await stream.read(65536)
        except StreamEOF:  # py-libp2p signals the end of a stream by raising
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > limit:
            raise PeerBroken(f"a swarm message exceeds {limit} bytes")


async def _close(stream) -> None:
    try:
        await stream.close()
    except Exception as e:  # libp2p raises several types for a stream the other end already reset
        log.debug("closing a swarm stream: %s", type(e).__name__)


class SwarmNode:
    """One agent's presence in the swarm. Owns the libp2p host, the data server, the DHT."""

    def __init__(self, store, seed: bytes, *, access: SwarmAccess | None = None,
                 pulling: Callable[[str], bool] = lambda ref: False, planning: Callable[[], bool] = lambda: False,
                 listen_host: str = "127.0.0.1",
                 listen_port: int = 0, data_host: str | None = None, slots: int = 16,
                 upload_rate: int | None = None, mdns: bool = False, dht: bool = False, encrypt: bool = False,
                 peer_exchange: bool = True, location: tuple[str, ...] | None = None,
                 boards=None, on_interest: Callable[[str, str], None] = lambda peer, manifest_id: None,
                 peer_holds: Callable[[str, str], set | None] = lambda manifest_id, peer: None):
        import multiaddr
        from libp2p import new_host
        from libp2p.network.config import ConnectionConfig
        from libp2p.stream_muxer.yamux import yamux
        # Yamux pings every connection each 30 s only to estimate RTT for its flow control,
        # which the hellos' few bytes never need: with 30 peers that is a Noise-encrypted
        # ping and pong every second, the bulk of an idle agent's libp2p traffic. The
        # membership loop notices dropped connections on its own.
        yamux.RTT_MEASURE_INTERVAL = max(yamux.RTT_MEASURE_INTERVAL, YAMUX_RTT_INTERVAL)
        self.store = store
        self.location = location  # said in hello answers (agent.swarm.location); None: unsaid
        self.access = access or SwarmAccess()
        self.pulling = pulling
        self.tickets = TicketBook()
        self.locator = StoreLocator(store)
        self.boards = boards
        self.data = DataServer(self.locator, self.tickets, host=data_host or listen_host, slots=slots,
                               rate=upload_rate, encrypt=encrypt, boards=boards, offers=self.offer,
                               content=self.content_offer,
                               planning=planning, on_subscribed=self._interest, peer_holds=peer_holds)
        self._trio_token = None  # for the data port's threads to reach the event loop
        self.on_interest = on_interest  # told (peer, manifest id) when a peer asks about what we pull
        # One connection per peer: py-libp2p waits ~250 ms per connect otherwise (docs/design.md).
        config = ConnectionConfig(max_connections_per_peer=1, inbound_upgrade_timeout=UPGRADE_TIMEOUT,
                                  outbound_upgrade_timeout=UPGRADE_TIMEOUT)
        self.host = new_host(key_pair=_keypair(seed), connection_config=config, psk=self.access.psk)
        self._install_admission()
        self._listen = [multiaddr.Multiaddr(f"/ip4/{listen_host}/tcp/{listen_port}")]
        self.host.set_stream_handler(PROTOCOL, self._answer)
        self._want_mdns, self._want_dht = mdns, dht
        self.dht = None
        self._mdns = None
        self.discovered: OrderedDict[str, list[str]] = OrderedDict()  # peer id -> multiaddrs (mDNS)
        # Peer exchange: where each peer we know listens (from its hello, or where we dialled
        # it), passed on in hello answers; and what other peers' answers told us.
        self.listen_addrs: OrderedDict[str, str] = OrderedDict()
        self.exchanged: OrderedDict[str, list[str]] = OrderedDict()
        self.peer_exchange = peer_exchange  # off: hello answers name nobody, and names heard are not dialled
        self._discovered_lock = threading.Lock()
        self.refused: dict[str, float] = {}  # peer id -> when we last refused it (outside the swarm)
        self.refused_by: set[str] = set()  # peers that told us we are outside their swarm
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()
        self.preauth_refused = 0  # connections closed for the pre-handshake caps
        self.hellos_answered = 0
        self.provides_skipped = 0  # provider records kept without a DHT walk (``provide_key``)

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id())

    @property
    def addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    def _install_admission(self) -> None:
        """Caps on connections still in libp2p's handshake (see ``MAX_PREAUTH``): py-libp2p
        holds an inbound slot for each until its upgrade ends, so without them idle
        connections from one address could keep members out."""
        import contextvars
        network = self.host.get_network()
        handle, upgrade = network._handle_inbound_connection, network.upgrade_inbound_raw_conn
        pending: Counter = Counter()
        current: contextvars.ContextVar = contextvars.ContextVar("shoal_preauth")

        def release(holder: dict) -> None:
            if holder["held"]:
                holder["held"] = False
                pending[holder["ip"]] -= 1
                pending[None] -= 1
                if pending[holder["ip"]] <= 0:
                    del pending[holder["ip"]]

        async def admitted(read_write_closer, maddr) -> None:
            try:
                remote = read_write_closer.get_remote_address()
            except Exception:  # a transport without addresses: counted under one name
                remote = None
            ip = remote[0] if remote else "?"
            if pending[None] >= MAX_PREAUTH or pending[ip] >= MAX_PREAUTH_PER_ADDRESS:
                self.preauth_refused += 1
                with trio.move_on_after(1):
                    await read_write_closer.close()
                return
            holder = {"ip": ip, "held": True}
            pending[ip] += 1
            pending[None] += 1
            current.set(holder)
            try:
                await handle(read_write_closer, maddr)
            finally:
                release(holder)

        async def upgraded(raw_conn, maddr):
            try:
                return await upgrade(raw_conn, maddr)
            finally:  # through the handshake (or failed it): no longer pending
                holder = current.get(None)
                if holder is not None:
                    release(holder)
        network._handle_inbound_connection = admitted
        network.upgrade_inbound_raw_conn = upgraded

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        self.data.start()
        try:
            async with self.host.run(listen_addrs=self._listen):
                if self._want_dht:
                    from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
                    from libp2p.tools.anyio_service import background_trio_service
                    # py-libp2p 0.8.1 ignores protocol_prefix and registers /ipfs/kad/1.0.0: the
                    # private network (secret) and _gate_dht (allowlist) keep the DHT to members.
                    self.dht = KadDHT(self.host, DHTMode.SERVER, protocol_prefix=f"/shoal/{self.access.tag}")
                    self._gate_dht()
                    async with background_trio_service(self.dht):
                        await self._serve_discovery(task_status)
                else:
                    await self._serve_discovery(task_status)
        finally:
            self.data.close()

    async def _serve_discovery(self, task_status) -> None:
        if self._want_mdns:
            self._start_mdns()
        try:
            task_status.started(self)
            await trio.sleep_forever()
        finally:
            if self._mdns is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(3):
                    await trio.to_thread.run_sync(self._stop_mdns, abandon_on_cancel=True)

    def _stop_mdns(self) -> None:
        mdns = self._mdns
        for step in (mdns.broadcaster.unregister, mdns.listener.stop, mdns.zeroconf.close):
            try:
                step()
            except Exception as e:  # best effort: the process is on its way out
                log.debug("mDNS shutdown: %s", e)

    def _gate_dht(self) -> None:
        """Only members in the routing table, only members' DHT streams answered (for a swarm
        with an allowlist; a secret already keeps strangers off every libp2p connection)."""
        if not self.access.allow:
            return
        from libp2p.kad_dht.common import PROTOCOL_ID
        dht, table = self.dht, self.dht.routing_table
        add_peer = table.add_peer

        async def add_member(peer, *args, **kwargs):
            peer_id = getattr(peer, "peer_id", peer)
            if not self.access.member(str(peer_id)):
                return False
            return await add_peer(peer, *args, **kwargs)

        async def handle(stream) -> None:
            if not self.access.member(str(stream.muxed_conn.peer_id)):
                self.refused[str(stream.muxed_conn.peer_id)] = time.time()
                with trio.move_on_after(1):
                    try:
                        await stream.reset()
                    except Exception as e:  # already gone (libp2p raises several types)
                        log.debug("resetting a refused peer's stream: %s", type(e).__name__)
                return
            await dht.handle_stream(stream)
        table.add_peer = add_member
        self.host.set_stream_handler(PROTOCOL_ID, handle)

    # ------------------------------------------------------------------ discovery

    def _start_mdns(self) -> None:
        from libp2p.discovery.events.peerDiscovery import peerDiscovery
        from libp2p.discovery.mdns.mdns import MDNSDiscovery
        # A DNS-SD service name is at most 15 characters: "shoal-" and 9 of the swarm tag.
        self._mdns = MDNSDiscovery(self.host.get_network(), service_type=f"_shoal-{self.access.tag[:9]}._udp.local.",
                                   host=self.host, ttl=120)
        peerDiscovery.register_peer_discovered_handler(self._on_discovered)
        # Register only: MDNSDiscovery.start() also spawns a trio *system* task for stale-entry
        # cleanup, which outlives our nursery and stops the agent from exiting.
        self._mdns.broadcaster.register()
        log.info("mDNS discovery started (swarm %s)", self.access.tag)

    def _on_discovered(self, info) -> None:
        """Called from zeroconf's thread: remember the peer for the agent to dial."""
        peer = str(info.peer_id)
        if peer == self.peer_id:
            return
        addrs = [f"{a}/p2p/{peer}" if "/p2p/" not in str(a) else str(a) for a in info.addrs]
        with self._discovered_lock:
            self.discovered[peer] = addrs
            self.discovered.move_to_end(peer)
            while len(self.discovered) > MAX_DISCOVERED:
                self.discovered.popitem(last=False)

    def take_discovered(self) -> dict[str, list[str]]:
        with self._discovered_lock:
            found = dict(self.discovered)
        return found

    # ------------------------------------------------------------- peer exchange

    def own_addrs(self) -> list[str]:
        """The addresses this host listens on, as peers dial them."""
        return [f"{a}/p2p/{self.peer_id}" for a in self.host.get_transport_addrs()][:MAX_PEX]

    @staticmethod
    def _remember(table: OrderedDict, peer: str, value) -> None:
        table[peer] = value
        table.move_to_end(peer)
        while len(table) > MAX_DISCOVERED:
            table.popitem(last=False)

    def _learn_listen_addrs(self, peer: str, addrs: tuple[str, ...], seen_from: str) -> None:
        """A peer's own word on where it listens (from its hello): kept to pass on, with an
        unspecified host (it listens everywhere) replaced by the address it came from."""
        for addr in addrs:
            if not addr.endswith(f"/p2p/{peer}"):
                continue  # an address of someone else: not its own to give
            for unspecified in ("/ip4/0.0.0.0/", "/ip6/::/"):
                if addr.startswith(unspecified) and seen_from not in ("", "unknown"):
                    family = "ip6" if ":" in seen_from else "ip4"
                    addr = f"/{family}/{seen_from}/" + addr[len(unspecified):]
            self._remember(self.listen_addrs, peer, addr)
            return

    def exchange_for(self, asker: str) -> list[str]:
        """Addresses of connected peers (other than ``asker``) to pass on in a hello answer."""
        if not self.peer_exchange:
            return []
        connected = self.connected()
        known = [a for p, a in self.listen_addrs.items() if p in connected and p != asker]
        return random.sample(known, min(MAX_PEX, len(known)))

    def take_exchanged(self) -> dict[str, list[str]]:
        """Peers that hello answers told us about (peer id -> addresses) for the agent to dial."""
        if not self.peer_exchange:
            return {}
        return {peer: list(addrs) for peer, addrs in self.exchanged.items()}

    async def provide_key(self, key: str) -> bool:
        """Publish a DHT provider record under ``key`` (hex), bounded in time; without a walk
        when enough other peers provide it already (``records.record_if_enough``)."""
        if self.dht is None:
            return False
        if record_if_enough(self.dht, self.host, key):
            self.provides_skipped += 1
            return True
        with trio.move_on_after(ASK_TIMEOUT * 2):
            return await self.dht.provide(key)
        return False

    def unprovide_key(self, key: str) -> None:
        if self.dht is None:
            return
        raw = bytes.fromhex(key)
        self.dht.provider_store.providing_keys.discard(raw)
        self.dht.provider_store.providers.get(raw, {}).pop(self.peer_id, None)

    async def find_key(self, key: str, count: int = 20) -> dict[str, list[str]]:
        """Peers the DHT says provide ``key``: id -> multiaddrs."""
        found: dict[str, list[str]] = {}
        if self.dht is None:
            return found
        with trio.move_on_after(ASK_TIMEOUT * 2):
            for info in await self.dht.find_providers(key, count=count):
                peer = str(info.peer_id)
                if peer != self.peer_id:
                    found[peer] = [f"{a}/p2p/{peer}" for a in info.addrs]
        return found

    async def provide(self, model_id: str, revision: str, manifest_id: str) -> bool:
        """Publish DHT provider records for a held model revision and its manifest."""
        ok = True
        for key in (model_key(model_id, revision), manifest_key(manifest_id)):
            ok = await self.provide_key(key) and ok
        return ok

    def unprovide(self, model_id: str, revision: str, manifest_id: str) -> None:
        """Stop announcing (on eviction): no re-publish, so remote records expire."""
        for key in (model_key(model_id, revision), manifest_key(manifest_id)):
            self.unprovide_key(key)

    async def find_providers(self, ref: ModelRef) -> dict[str, list[str]]:
        """Peers the DHT says hold ``ref`` (by manifest id when pinned): id -> multiaddrs."""
        return await self.find_key(manifest_key(ref.revision) if is_manifest_id(ref.revision)
                                   else model_key(ref.model_id, ref.revision))

    async def add_to_routing(self, peer: str) -> None:
        if self.dht is not None:
            from libp2p.peer.id import ID
            try:
                await self.dht.add_peer(ID.from_base58(peer))
            except Exception as e:  # a peer without the DHT protocol is simply not a DHT peer
                log.debug("DHT add_peer %s: %s", peer[:16], e)

    # ------------------------------------------------------------- answering

    def _manifest(self, manifest_id: str) -> tuple[Manifest, bytes]:
        data = self.store.manifest_bytes(manifest_id)
        manifest = self._manifests.get(manifest_id)
        if manifest is None:
            manifest = decode(data)
            self._manifests[manifest_id] = manifest
            while len(self._manifests) > MANIFEST_CACHE:
                self._manifests.popitem(last=False)
        return manifest, data

    def offer(self, peer: str, data: bytes) -> bytes:
        """The answer to one offer request (from the data port, in its thread) from ``peer``,
        a member holding our key. Tells the agent (``on_interest``) when the peer asks about
        a manifest this agent is pulling too: it follows the asker then."""
        try:
            request = parse_request(data)
        except PeerBroken as e:
            return encode_error(BAD_REQUEST, str(e))
        found = None
        if request.manifest_id is not None:
            found = self.store.holding(manifest_id=request.manifest_id)
        if found is None and request.model is not None:
            found = self.store.holding(model_id=request.model, revision=request.revision)
        if found is None:
            asked = f"{request.model}@{request.revision}" if request.model else None
            if asked and self.pulling(asked):  # pulling it too, not planned yet: ask again shortly
                self._interest(peer, asked)
                return encode_error(PENDING, "pulling it too; no manifest yet")
            return encode_error(NOT_HELD, "not held here")
        ref, manifest_id = found
        manifest, manifest_bytes = self._manifest(manifest_id)
        expected = {f.path: f.chunks for f in manifest.files}
        have = {path: {i for i, h in held.items() if i < len(expected[path]) and expected[path][i] == h}
                for path, held in self.store.held_chunks(ref).items() if path in expected}
        pulling = self.pulling(str(ref))
        if pulling:
            self._interest(peer, str(ref))
        return encode_answer(manifest, None if request.known else manifest_bytes,
                             self.store.signature(manifest_id), have, pulling)

    def content_offer(self, peer: str, manifest_id: str, data: bytes) -> bytes:
        """The answer to a content ask (``agent.swarm.content``), in a data-port thread."""
        from agent.swarm.content import content_answer
        if self.store.holding(manifest_id=manifest_id) is not None:  # held by name after all
            return self.offer(peer, encode_request(manifest_id=manifest_id, known=True))
        return content_answer(self.store, self.boards, self.locator, manifest_id, data)

    def _interest(self, peer: str, ref: str) -> None:
        """Tell the agent (from a data-port thread) that ``peer`` asked about ``ref`` (a model
        revision, or a manifest id), which it pulls."""
        if self._trio_token is None:
            return
        try:
            trio.from_thread.run_sync(self.on_interest, peer, ref, trio_token=self._trio_token)
        except (trio.RunFinishedError, trio.Cancelled):
            pass  # the agent is stopping

    def _contact_for(self, data: bytes, peer: str, address: str) -> tuple[bytes, bool]:
        """The answer to a hello (this agent's data port contact), and whether the asker was
        refused as an outsider."""
        try:
            proof, addrs = parse_hello_request(data)
        except PeerBroken as e:
            return encode_error(BAD_REQUEST, str(e)), False
        if not self.access.admits(peer, self.peer_id, proof):
            self.refused[peer] = time.time()
            if len(self.refused) > MAX_DISCOVERED:  # bounded: forget the oldest refusals
                for old in sorted(self.refused, key=self.refused.get)[:len(self.refused) - MAX_DISCOVERED]:
                    del self.refused[old]
            return encode_error(NOT_IN_SWARM, "this agent serves only peers of its own swarm (same SHOAL_SWARM_SECRET "
                                "and, if set, listed in SHOAL_SWARM_ALLOW)"), True
        key = self.tickets.issue(peer, address)
        self._learn_listen_addrs(peer, addrs, address)
        return encode_contact(self.data.address, key.encode(), self.data.fingerprint, self.exchange_for(peer),
                              self.location), False

    async def _answer(self, stream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        self.hellos_answered += 1
        refuse = False
        try:
            remote = stream.get_remote_address()
        except Exception:  # no address known for this stream: the key is then refused at the data port
            remote = None
        try:
            with trio.fail_after(ASK_TIMEOUT):
                request = await _read_all(stream, MAX_REQUEST)
                answer, refuse = self._contact_for(request, peer, remote[0] if remote else "unknown")
                await stream.write(answer)
        except (PeerBroken, trio.TooSlowError) as e:
            try:
                await stream.write(encode_error(BAD_REQUEST, str(e)))
            except Exception as write_error:  # the peer may be gone; nothing to tell it
                log.debug("telling %s its hello failed: %s", peer[:16], write_error)
        except Exception as e:  # a bad peer must not take the node down
            log.warning("answering %s failed: %s: %s", peer[:16], type(e).__name__, e)
        finally:
            await _close(stream)
        if refuse:  # outside the swarm: hang up the connection too
            log.warning("refused peer %s: not in this swarm", peer[:16])
            with trio.move_on_after(1):
                try:
                    await self.host.disconnect(stream.muxed_conn.peer_id)
                except Exception as e:  # already gone
                    log.debug("disconnecting %s: %s", peer[:16], e)

    # --------------------------------------------------------------- asking

    async def connect(self, address: str) -> str:
        import multiaddr
        from libp2p.peer.peerinfo import info_from_p2p_addr
        info = info_from_p2p_addr(multiaddr.Multiaddr(address))
        with trio.fail_after(ASK_TIMEOUT):
            await self.host.connect(info)
        peer = str(info.peer_id)
        if len(address) <= MAX_ADDR:
            self._remember(self.listen_addrs, peer, address)
        return peer

    def connected(self) -> set[str]:
        return {str(p) for p in self.host.get_network().connections}

    async def drop(self, peer: str) -> None:
        """Close the libp2p connection to ``peer`` (bounded): the membership loop dials it
        afresh (or it dials us), which mends a connection one side no longer serves."""
        from libp2p.peer.id import ID
        with trio.move_on_after(DROP_TIMEOUT):
            try:
                await self.host.disconnect(ID.from_base58(peer))
            except Exception as e:  # already gone
                log.debug("dropping %s: %s", peer[:16], e)

    async def hello(self, peer: str) -> Contact:
        """The peer's contact for its data port (a hello over libp2p). Raises ``PeerBroken``,
        ``NotInSwarm``, ``trio.TooSlowError``."""
        from libp2p.peer.id import ID
        with trio.fail_after(ASK_TIMEOUT):
            stream = await self.host.new_stream(ID.from_base58(peer), [PROTOCOL])
            try:
                await stream.write(encode_hello_request(self.access.proof(self.peer_id, peer), self.own_addrs()))
                await stream.close_write()  # the answerer reads to the end of the request
                data = await _read_all(stream, MAX_REQUEST)
                remote = stream.get_remote_address()
            finally:
                await _close(stream)
        contact = parse_contact(data)
        for addr in contact.peers:
            other = addr.rsplit("/p2p/", 1)[1]
            if other != self.peer_id and other != peer:
                self._remember(self.exchanged, other, [addr])
        if contact.data[0] in ("0.0.0.0", "::", "") and remote:
            # The peer listens on every interface: its data port is on the address we reached it at.
            contact = Contact((remote[0], contact.data[1]), contact.key, contact.tls, contact.peers, contact.location)
        return contact


__all__ = ["SwarmNode", "model_key", "manifest_key", "ASK_TIMEOUT"]

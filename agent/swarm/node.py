"""The LAN swarm node: a libp2p host that gives swarm members a key to this agent's data
port (the hello), the data port itself (which answers offers and asks through
``agent.swarm.answers``), and discovery (bootstrap list, mDNS, Kademlia DHT provider records).

Over libp2p (authenticated, Noise, the swarm's private network) travel only hellos, one per
pair of agents and renewal, and the DHT; the wire format is ``agent.swarm.protocol``.
Offers, HAVE streams and chunk bytes go over the data port (``agent.swarm.datapath``).

Discovery: the bootstrap list (``SHOAL_SWARM_PEERS``, dialled and re-dialled by the
membership loop), mDNS and peer exchange (``agent.swarm.discovery``), and the Kademlia DHT
(``SHOAL_DHT``: py-libp2p ``KadDHT`` in server mode; this node's provider records and
lookups are ``agent.swarm.records``), so peers on routed subnets (no multicast) are found
through any peer both know. Who the host lets in: ``agent.swarm.admission``.

Resource handling: ``serve`` runs the host, the data server, the DHT and mDNS until
cancelled, and stops them all on the way out.
"""

from __future__ import annotations

import logging
import time

import trio

from agent.errors import PeerBroken
from agent.swarm.admission import cap_handshakes, gate_dht
from agent.swarm.answers import StoreAnswers
from agent.swarm.datapath import DataServer, TicketBook
from agent.swarm.discovery import MAX_DISCOVERED, Discovery
from agent.swarm.records import Records
from agent.swarm.protocol import (BAD_REQUEST, MAX_REQUEST, NOT_IN_SWARM, PROTOCOL, Contact, SwarmAccess,
                                  encode_contact, encode_error, encode_hello_request, parse_contact,
                                  parse_hello_request)

log = logging.getLogger("shoal.swarm")

ASK_TIMEOUT = 5.0
DROP_TIMEOUT = 2.0
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

    def __init__(self, store, seed: bytes, *, answers: StoreAnswers | None = None,
                 access: SwarmAccess | None = None, listen_host: str = "127.0.0.1", listen_port: int = 0,
                 data_host: str | None = None, slots: int = 16, upload_rate: int | None = None,
                 mdns: bool = False, dht: bool = False, encrypt: bool = False, peer_exchange: bool = True,
                 location: tuple[str, ...] | None = None):
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
        self.tickets = TicketBook()
        # What the data port answers besides chunks (offers, content and room asks): the
        # agent's (agent.swarm.answers.SwarmAnswers), or the store's alone.
        self.answers = answers or StoreAnswers(store)
        self.locator = self.answers.locator
        self.data = DataServer(self.locator, self.tickets, answers=self.answers, host=data_host or listen_host,
                               slots=slots, rate=upload_rate, encrypt=encrypt)
        # One connection per peer: py-libp2p waits ~250 ms per connect otherwise (docs/design.md).
        config = ConnectionConfig(max_connections_per_peer=1, inbound_upgrade_timeout=UPGRADE_TIMEOUT,
                                  outbound_upgrade_timeout=UPGRADE_TIMEOUT)
        self.host = new_host(key_pair=_keypair(seed), connection_config=config, psk=self.access.psk)
        cap_handshakes(self.host.get_network(), self._refused_early)
        self._listen = [multiaddr.Multiaddr(f"/ip4/{listen_host}/tcp/{listen_port}")]
        self.host.set_stream_handler(PROTOCOL, self._answer)
        self._want_mdns, self._want_dht = mdns, dht
        self.records = Records(self.host)  # DHT provider records (its DHT set by ``serve``)
        self.discovery = Discovery(self.host, self.access.tag, peer_exchange=peer_exchange)
        self.refused: dict[str, float] = {}  # peer id -> when we last refused it (outside the swarm)
        self.refused_by: set[str] = set()  # peers that told us we are outside their swarm
        self.preauth_refused = 0  # connections closed for the pre-handshake caps
        self.hellos_answered = 0

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id())

    @property
    def addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    def _refused_early(self) -> None:
        self.preauth_refused += 1

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.data.start()
        try:
            async with self.host.run(listen_addrs=self._listen):
                if self._want_dht:
                    from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
                    from libp2p.tools.anyio_service import background_trio_service
                    # py-libp2p 0.8.1 ignores protocol_prefix and registers /ipfs/kad/1.0.0: the
                    # private network (secret) and gate_dht (allowlist) keep the DHT to members.
                    dht = KadDHT(self.host, DHTMode.SERVER, protocol_prefix=f"/shoal/{self.access.tag}")
                    gate_dht(dht, self.host, self.access, self.refused)
                    self.records.dht = dht
                    async with background_trio_service(dht):
                        await self._serve_discovery(task_status)
                else:
                    await self._serve_discovery(task_status)
        finally:
            self.data.close()

    async def _serve_discovery(self, task_status) -> None:
        if self._want_mdns:
            self.discovery.start_mdns()
        try:
            task_status.started(self)
            await trio.sleep_forever()
        finally:
            if self.discovery.mdns_running:
                with trio.CancelScope(shield=True), trio.move_on_after(3):
                    await trio.to_thread.run_sync(self.discovery.stop_mdns, abandon_on_cancel=True)

    # ------------------------------------------------------------- answering

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
        self.discovery.learn_listen_addrs(peer, addrs, address)
        return encode_contact(self.data.address, key.encode(), self.data.fingerprint,
                              self.discovery.exchange_for(peer, self.connected()), self.location), False

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
        self.discovery.dialled(peer, address)
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
                await stream.write(encode_hello_request(self.access.proof(self.peer_id, peer),
                                                       self.discovery.own_addrs()))
                await stream.close_write()  # the answerer reads to the end of the request
                data = await _read_all(stream, MAX_REQUEST)
                remote = stream.get_remote_address()
            finally:
                await _close(stream)
        contact = parse_contact(data)
        self.discovery.heard_of(contact.peers, peer)
        if contact.data[0] in ("0.0.0.0", "::", "") and remote:
            # The peer listens on every interface: its data port is on the address we reached it at.
            contact = Contact((remote[0], contact.data[1]), contact.key, contact.tls, contact.peers, contact.location)
        return contact


__all__ = ["SwarmNode", "ASK_TIMEOUT"]

"""How a swarm node learns of peers to dial, besides its bootstrap list and the DHT: mDNS on
the LAN, and peer exchange in hellos.

- **mDNS** (``SHOAL_MDNS``): py-libp2p's zeroconf service under a service name derived from
  the swarm tag, so agents of another swarm do not even see each other.
- **Peer exchange**: a hello says where its sender listens and its answer names up to
  ``MAX_PEX`` connected members, so a room told one address finds the rest.

Every table is bounded (``MAX_DISCOVERED``, oldest forgotten first). The membership loop
(``agent.swarm.membership``) takes what is found here and dials it.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import OrderedDict

from agent.swarm.protocol import MAX_ADDR, MAX_PEX

log = logging.getLogger("shoal.swarm")

MAX_DISCOVERED = 1024


def remember(table: OrderedDict, peer: str, value) -> None:
    """Keep ``value`` for ``peer`` in a table of at most ``MAX_DISCOVERED`` peers."""
    table[peer] = value
    table.move_to_end(peer)
    while len(table) > MAX_DISCOVERED:
        table.popitem(last=False)


class Discovery:
    """What mDNS and other peers' hello answers said of where members listen."""

    def __init__(self, host, tag: str, *, peer_exchange: bool = True):
        self.host, self.tag = host, tag
        self.peer_exchange = peer_exchange  # off: hello answers name nobody, and names heard are not dialled
        self.discovered: OrderedDict[str, list[str]] = OrderedDict()  # peer id -> multiaddrs (mDNS)
        self._discovered_lock = threading.Lock()  # mDNS answers come on zeroconf's thread
        # Where each peer we know listens (from its hello, or where we dialled it), passed on
        # in hello answers; and what other peers' answers told us.
        self.listen_addrs: OrderedDict[str, str] = OrderedDict()
        self.exchanged: OrderedDict[str, list[str]] = OrderedDict()
        self._mdns = None

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id())

    # ------------------------------------------------------------------ mDNS

    def start_mdns(self) -> None:
        from libp2p.discovery.events.peerDiscovery import peerDiscovery
        from libp2p.discovery.mdns.mdns import MDNSDiscovery
        # A DNS-SD service name is at most 15 characters: "shoal-" and 9 of the swarm tag.
        self._mdns = MDNSDiscovery(self.host.get_network(), service_type=f"_shoal-{self.tag[:9]}._udp.local.",
                                   host=self.host, ttl=120)
        peerDiscovery.register_peer_discovered_handler(self._on_discovered)
        # Register only: MDNSDiscovery.start() also spawns a trio *system* task for stale-entry
        # cleanup, which outlives our nursery and stops the agent from exiting.
        self._mdns.broadcaster.register()
        log.info("mDNS discovery started (swarm %s)", self.tag)

    @property
    def mdns_running(self) -> bool:
        return self._mdns is not None

    def stop_mdns(self) -> None:
        """Unregister and close zeroconf (blocking: run it in a thread)."""
        mdns = self._mdns
        for step in (mdns.broadcaster.unregister, mdns.listener.stop, mdns.zeroconf.close):
            try:
                step()
            except Exception as e:  # best effort: the process is on its way out
                log.debug("mDNS shutdown: %s", e)

    def _on_discovered(self, info) -> None:
        """Called from zeroconf's thread: remember the peer for the agent to dial."""
        peer = str(info.peer_id)
        if peer == self.peer_id:
            return
        addrs = [f"{a}/p2p/{peer}" if "/p2p/" not in str(a) else str(a) for a in info.addrs]
        with self._discovered_lock:
            remember(self.discovered, peer, addrs)

    def take_discovered(self) -> dict[str, list[str]]:
        with self._discovered_lock:
            found = dict(self.discovered)
        return found

    # --------------------------------------------------------- peer exchange

    def own_addrs(self) -> list[str]:
        """The addresses this host listens on, as peers dial them."""
        return [f"{a}/p2p/{self.peer_id}" for a in self.host.get_transport_addrs()][:MAX_PEX]

    def dialled(self, peer: str, address: str) -> None:
        """We reached ``peer`` at ``address``: where it listens, to pass on."""
        if len(address) <= MAX_ADDR:
            remember(self.listen_addrs, peer, address)

    def learn_listen_addrs(self, peer: str, addrs: tuple[str, ...], seen_from: str) -> None:
        """A peer's own word on where it listens (from its hello): kept to pass on, with an
        unspecified host (it listens everywhere) replaced by the address it came from."""
        for addr in addrs:
            if not addr.endswith(f"/p2p/{peer}"):
                continue  # an address of someone else: not its own to give
            for unspecified in ("/ip4/0.0.0.0/", "/ip6/::/"):
                if addr.startswith(unspecified) and seen_from not in ("", "unknown"):
                    family = "ip6" if ":" in seen_from else "ip4"
                    addr = f"/{family}/{seen_from}/" + addr[len(unspecified):]
            remember(self.listen_addrs, peer, addr)
            return

    def exchange_for(self, asker: str, connected: set[str]) -> list[str]:
        """Addresses of connected peers (other than ``asker``) to pass on in a hello answer."""
        if not self.peer_exchange:
            return []
        known = [a for p, a in self.listen_addrs.items() if p in connected and p != asker]
        return random.sample(known, min(MAX_PEX, len(known)))

    def heard_of(self, addrs, asked: str) -> None:
        """The peers a hello answer from ``asked`` named, to dial later."""
        for addr in addrs:
            other = addr.rsplit("/p2p/", 1)[1]
            if other != self.peer_id and other != asked:
                remember(self.exchanged, other, [addr])

    def take_exchanged(self) -> dict[str, list[str]]:
        """Peers that hello answers told us about (peer id -> addresses) for the agent to dial."""
        if not self.peer_exchange:
            return {}
        return {peer: list(addrs) for peer, addrs in self.exchanged.items()}

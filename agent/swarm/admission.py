"""Who a swarm node's libp2p host lets in: caps on connections still in the secure handshake,
and, for a swarm with an allowlist, the DHT kept to members.

A secret already keeps strangers off every libp2p connection (it is also the private
network key: no handshake without it); these guard what is left: a flood of connections
that never finish the handshake, and allowlisted swarms whose members share the secret
with machines they do not list.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections import Counter
from typing import Callable

import trio

log = logging.getLogger("shoal.swarm")

# Connections that have not finished libp2p's secure handshake: per remote address and in
# all (one more is closed at once), each given UPGRADE_TIMEOUT to finish. Members, who
# finish in milliseconds, are never kept out by a stranger's flood from another address.
MAX_PREAUTH = 64
MAX_PREAUTH_PER_ADDRESS = 8


def cap_handshakes(network, on_refused: Callable[[], None]) -> None:
    """Caps on ``network``'s connections still in libp2p's handshake (``MAX_PREAUTH``):
    py-libp2p holds an inbound slot for each until its upgrade ends, so without them idle
    connections from one address could keep members out. ``on_refused`` counts each one
    closed for a cap."""
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
            on_refused()
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


def gate_dht(dht, host, access, refused: dict[str, float]) -> None:
    """Only members in the routing table, only members' DHT streams answered (for a swarm
    with an allowlist); a refused peer is noted in ``refused`` (peer id -> when)."""
    if not access.allow:
        return
    from libp2p.kad_dht.common import PROTOCOL_ID
    table = dht.routing_table
    add_peer = table.add_peer

    async def add_member(peer, *args, **kwargs):
        peer_id = getattr(peer, "peer_id", peer)
        if not access.member(str(peer_id)):
            return False
        return await add_peer(peer, *args, **kwargs)

    async def handle(stream) -> None:
        if not access.member(str(stream.muxed_conn.peer_id)):
            refused[str(stream.muxed_conn.peer_id)] = time.time()
            with trio.move_on_after(1):
                try:
                    await stream.reset()
                except Exception as e:  # already gone (libp2p raises several types)
                    log.debug("resetting a refused peer's stream: %s", type(e).__name__)
            return
        await dht.handle_stream(stream)
    table.add_peer = add_member
    host.set_stream_handler(PROTOCOL_ID, handle)

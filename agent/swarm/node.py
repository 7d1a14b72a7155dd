"""The LAN swarm node: a libp2p host that tells peers what this agent holds and hands out
tickets for its data connection; and the client side that asks peers the same.

Only small control messages travel over libp2p (authenticated, Noise): one request, one
answer per stream, both bounded msgpack maps. Chunk bytes go over ``agent.swarm.datapath``.

Protocol ``/shoal/offer/1.0.0``: request ``{"model": id, "revision": rev}`` or
``{"manifest_id": hex}``; answer ``{"manifest": bytes, "signature": bytes|nil,
"have": {path: [chunk indices]}, "data": [host, port], "ticket": bytes}``, or
``{"error": text}``. The ticket is bound to the asking peer's id.

Discovery in this version: a configured bootstrap list (``SHOAL_SWARM_PEERS``, full
multiaddrs with ``/p2p/<peer id>``). mDNS and the Kademlia DHT are still to come.

Resource handling: ``serve_swarm`` runs the host and the data server until cancelled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import msgpack
import trio

from agent.errors import ShoalError
from agent.manifest import Manifest, ModelRef, decode
from agent.swarm.datapath import DataServer, StoreLocator, TicketBook

log = logging.getLogger("shoal.swarm")

PROTOCOL = "/shoal/offer/1.0.0"
MAX_MESSAGE = 8 * 1024 * 1024  # a manifest of ~100k files still fits
ASK_TIMEOUT = 5.0


class PeerBroken(ShoalError):
    """A peer answered something that is not a valid offer."""


@dataclass
class Offer:
    """What one peer holds of one manifest, and how to fetch it."""

    peer: str
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes | None
    have: dict[str, set[int]]
    data: tuple[str, int]
    ticket: bytes


def _keypair(seed: bytes):
    from libp2p.crypto.ed25519 import create_new_key_pair
    return create_new_key_pair(seed)


async def _read_all(stream, limit: int = MAX_MESSAGE) -> bytes:
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


def _pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def _unpack(data: bytes) -> dict:
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise PeerBroken(f"undecodable swarm message ({type(e).__name__})") from e
    if not isinstance(message, dict):
        raise PeerBroken("a swarm message must be a map")
    return message


class SwarmNode:
    """One agent's presence in the swarm. Owns the libp2p host and the data server."""

    def __init__(self, store, seed: bytes, *, listen_host: str = "127.0.0.1", listen_port: int = 0,
                 data_host: str = "127.0.0.1", slots: int = 8):
        import multiaddr
        from libp2p import new_host
        from libp2p.network.config import ConnectionConfig
        self.store = store
        self.tickets = TicketBook()
        self.data = DataServer(StoreLocator(store), self.tickets, host=data_host, slots=slots)
        # One connection per peer: py-libp2p waits ~250 ms per connect otherwise (DESIGN.md).
        self.host = new_host(key_pair=_keypair(seed), connection_config=ConnectionConfig(max_connections_per_peer=1))
        self._listen = [multiaddr.Multiaddr(f"/ip4/{listen_host}/tcp/{listen_port}")]
        self.host.set_stream_handler(PROTOCOL, self._answer)

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id())

    @property
    def addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.data.start()
        try:
            async with self.host.run(listen_addrs=self._listen):
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self.data.close()

    # ------------------------------------------------------------- answering

    def _offer_for(self, request: dict, peer: str) -> dict:
        models = self.store.models()
        info = None
        if isinstance(request.get("manifest_id"), str):
            info = next((m for m in models if m.manifest_id == request["manifest_id"]), None)
        elif isinstance(request.get("model"), str):
            info = next((m for m in models if m.model_id == request["model"]
                         and m.revision == request.get("revision", "master") and m.manifest_id), None)
        if info is None:
            return {"error": "not held here"}
        manifest_bytes = self.store.manifest_bytes(info.manifest_id)
        manifest = decode(manifest_bytes)
        have = {f.path: sorted(self.store.chunk_hashes(info.ref, f.path)) for f in manifest.files}
        host, port = self.data.address
        return {"manifest": manifest_bytes, "signature": self.store.signature(info.manifest_id), "have": have,
                "data": [host, port], "ticket": self.tickets.issue(peer)}

    async def _answer(self, stream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        try:
            with trio.fail_after(ASK_TIMEOUT):
                request = _unpack(await stream.read(64 * 1024))
                answer = await trio.to_thread.run_sync(self._offer_for, request, peer)
                await stream.write(_pack(answer))
        except (PeerBroken, trio.TooSlowError) as e:
            try:
                await stream.write(_pack({"error": str(e)}))
            except Exception:  # the peer may be gone; nothing to tell it
                pass
        except Exception as e:  # a bad peer must not take the node down
            log.warning("answering %s failed: %s", peer[:16], e)
        finally:
            try:
                await stream.close()
            except Exception:  # already reset by the peer
                pass

    # --------------------------------------------------------------- asking

    async def connect(self, address: str) -> str:
        import multiaddr
        from libp2p.peer.peerinfo import info_from_p2p_addr
        info = info_from_p2p_addr(multiaddr.Multiaddr(address))
        with trio.fail_after(ASK_TIMEOUT):
            await self.host.connect(info)
        return str(info.peer_id)

    async def ask(self, peer: str, ref: ModelRef) -> Offer | None:
        """The peer's offer for ``ref``, or None when it holds none. Raises ``PeerBroken``."""
        from libp2p.peer.id import ID
        with trio.fail_after(ASK_TIMEOUT):
            stream = await self.host.new_stream(ID.from_base58(peer), [PROTOCOL])
            try:
                from agent.manifest import is_manifest_id
                request = ({"manifest_id": ref.revision} if is_manifest_id(ref.revision)
                           else {"model": ref.model_id, "revision": ref.revision})
                await stream.write(_pack(request))
                answer = _unpack(await _read_all(stream))
            finally:
                try:
                    await stream.close()
                except Exception:  # the peer closed first
                    pass
        if "error" in answer:
            return None
        try:
            manifest = decode(answer["manifest"])
            have = {str(p): set(int(i) for i in idx) for p, idx in answer["have"].items()}
            data = (str(answer["data"][0]), int(answer["data"][1]))
            ticket = answer["ticket"]
            if not isinstance(ticket, bytes) or len(ticket) != 32:
                raise ValueError("ticket")
        except (KeyError, TypeError, ValueError, ShoalError) as e:
            raise PeerBroken(f"peer {peer[:16]} sent a malformed offer ({e})") from e
        return Offer(peer, manifest, answer["manifest"], answer.get("signature"), have, data, ticket)

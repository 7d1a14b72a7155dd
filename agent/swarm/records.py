"""The swarm's DHT provider records: the keys holders are found under, when a record needs
no walk of its own, and this node's records and lookups (``Records``).

Keys are hex BLAKE3 hashes: a model revision (``model_key``), a manifest (``manifest_key``)
and a file by its content (``blob_key``, for pulls of other models that share it).
"""

from __future__ import annotations

import logging

import trio

from agent.hashing import blake3_hash
from agent.manifest import ModelRef, is_manifest_id

log = logging.getLogger("shoal.swarm")

LOOKUP_TIMEOUT = 10.0  # a provide or a lookup walks the DHT at most this long
ANNOUNCE_INTERVAL = 30.0
# Files a peer may look for by content through the DHT (``blob_key``): the largest held, so
# the records stay few; small files travel with the manifest's other holders.
BLOB_ANNOUNCE_MIN = 1024 * 1024
BLOB_ANNOUNCE_MAX = 256
ENOUGH_PROVIDERS = 3  # other providers of a key kept here: ours is recorded without a walk


def model_key(model_id: str, revision: str) -> str:
    """DHT key (hex) under which holders of ``model_id@revision`` are provided."""
    return blake3_hash(f"shoal-model:{model_id}@{revision}".encode()).hex()


def manifest_key(manifest_id: str) -> str:
    return blake3_hash(f"shoal-manifest:{manifest_id}".encode()).hex()


def blob_key(sha256: bytes) -> str:
    """DHT key of the holders of a file by its content (its SHA-256), whatever model it is in."""
    return blake3_hash(b"shoal-blob:" + sha256).hex()


def record_if_enough(dht, host, key: str) -> bool:
    """When this node already keeps ``ENOUGH_PROVIDERS`` other peers' records for ``key``
    (it is among the closest to it), record itself as a provider too, without the walk
    ``dht.provide`` makes: True then. A walk is a libp2p stream to each of the closest
    peers, answered by each; a room whose agents all complete the same files would
    otherwise walk once per agent for each (measured alone in a 24-agent campus, the
    saving did not stand out of the run-to-run noise: the pull-start lookups dominated)."""
    from libp2p.kad_dht.kad_dht import _encode_key  # (how dht.provide keys it)
    from libp2p.peer.peerinfo import PeerInfo
    store = dht.provider_store
    raw = _encode_key(key)
    me = host.get_id()
    if sum(1 for p in store.get_providers(raw) if p.peer_id != me) < ENOUGH_PROVIDERS:
        return False
    store.providing_keys.add(raw)  # republished with the others' records, found by those who ask us
    store.add_provider(raw, PeerInfo(me, list(host.get_addrs())))
    return True


class Records:
    """This node's DHT provider records, and the lookups of others' (bounded in time). The
    DHT itself (py-libp2p ``KadDHT``) is set by ``SwarmNode.serve`` when it runs one; until
    then, and without one, nothing is provided and nothing found."""

    def __init__(self, host):
        self.host = host
        self.dht = None
        self.provides_skipped = 0  # provider records kept without a DHT walk (``provide_key``)
        self.provided: set[tuple[str, str, str]] = set()  # (model, revision, manifest id) provided

    async def keep_announced(self, store) -> None:
        """Keep provider records for every complete model in ``store`` and its largest files
        (by content, for pulls of other models that share them); drop them on eviction.
        Runs until cancelled (a check every ``ANNOUNCE_INTERVAL``, sooner while behind)."""
        if self.dht is None:
            return
        provided_blobs: set[str] = set()
        while True:
            held = await trio.to_thread.run_sync(store.complete_manifests)
            blobs = {blob_key(sha) for sha in await trio.to_thread.run_sync(
                store.largest_blobs, BLOB_ANNOUNCE_MIN, BLOB_ANNOUNCE_MAX)}
            for key in held - self.provided:
                if await self.provide(*key):
                    self.provided.add(key)
            for key in self.provided - held:
                self.unprovide(*key)
                self.provided.discard(key)
            for key in blobs - provided_blobs:
                if await self.provide_key(key):
                    provided_blobs.add(key)
            for key in provided_blobs - blobs:
                self.unprovide_key(key)
                provided_blobs.discard(key)
            done = self.provided >= held and provided_blobs >= blobs
            await trio.sleep(ANNOUNCE_INTERVAL if done else 2.0)

    @property
    def _me(self) -> str:
        return str(self.host.get_id())

    async def provide_key(self, key: str) -> bool:
        """Publish a DHT provider record under ``key`` (hex), bounded in time; without a walk
        when enough other peers provide it already (``record_if_enough``)."""
        if self.dht is None:
            return False
        if record_if_enough(self.dht, self.host, key):
            self.provides_skipped += 1
            return True
        with trio.move_on_after(LOOKUP_TIMEOUT):
            return await self.dht.provide(key)
        return False

    def unprovide_key(self, key: str) -> None:
        if self.dht is None:
            return
        raw = bytes.fromhex(key)
        self.dht.provider_store.providing_keys.discard(raw)
        self.dht.provider_store.providers.get(raw, {}).pop(self._me, None)

    async def find_key(self, key: str, count: int = 20) -> dict[str, list[str]]:
        """Peers the DHT says provide ``key``: id -> multiaddrs."""
        found: dict[str, list[str]] = {}
        if self.dht is None:
            return found
        me = self._me
        with trio.move_on_after(LOOKUP_TIMEOUT):
            for info in await self.dht.find_providers(key, count=count):
                peer = str(info.peer_id)
                if peer != me:
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

"""The swarm's DHT provider records: the keys holders are found under, and when a record
needs no walk of its own.

Keys are hex BLAKE3 hashes: a model revision (``model_key``), a manifest (``manifest_key``)
and a file by its content (``blob_key``, for pulls of other models that share it).
"""

from __future__ import annotations

from agent.hashing import blake3_hash

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

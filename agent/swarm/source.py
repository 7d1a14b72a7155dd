"""``LanPeerSource``: chunks from LAN peers that offered the plan's manifest.

Each chunk goes to a random peer among those whose have-map lists it (spreading load;
rarest-first among *chunks* is future work). The source verifies the bytes itself, so it
knows which peer lied: a peer that sends a chunk whose BLAKE3 does not match is banned
for the rest of the pull and shown in the pull's troubles. A chunk no (unbanned) peer
holds raises ``ChunkNotHeld`` and moves on to the mirror or the origin.
"""

from __future__ import annotations

import random
import threading

from agent.errors import IntegrityError, NotFound, SourceUnavailable
from agent.manifest import Manifest, ModelRef
from agent.sources import ChunkNotHeld, ChunkRequest, ChunkSource
from agent.store import blake3_hash
from agent.swarm.datapath import DataClient
from agent.swarm.node import Offer

PEERS_PER_CHUNK = 3


class LanPeerSource(ChunkSource):
    name = "lan"
    label = "LAN peers"

    def __init__(self, manifest: Manifest, offers: list[Offer]):
        self.manifest = manifest
        self.offers = [o for o in offers if o.manifest.id == manifest.id]
        self.entries = {f.path: f for f in manifest.files}
        self.banned: dict[str, str] = {}
        self.client = DataClient()
        self._lock = threading.Lock()

    def fetch(self, ref: ModelRef, request: ChunkRequest, into: memoryview, deadline: float) -> None:
        index = request.offset // self.manifest.chunk_size
        expected = self.entries[request.path].chunks[index]
        with self._lock:
            candidates = [o for o in self.offers if o.peer not in self.banned
                          and index in o.have.get(request.path, ())]
        if not candidates:
            raise ChunkNotHeld(f"no LAN peer holds chunk {index} of {request.path}")
        random.shuffle(candidates)
        problems = []
        for offer in candidates[:PEERS_PER_CHUNK]:
            try:
                self.client.fetch(offer.data, offer.ticket, self.manifest.id, request.path, index, into,
                                  request.length, deadline)
            except (NotFound, SourceUnavailable) as e:
                problems.append(str(e))
                continue
            if blake3_hash(into[:request.length]) != expected:
                with self._lock:
                    self.banned[offer.peer] = f"sent a corrupt chunk ({request.path} #{index})"
                raise IntegrityError(f"LAN peer {offer.peer[:16]} sent chunk {index} of {request.path} whose "
                                     "BLAKE3 does not match the manifest; the peer is dropped for this pull")
            return
        raise SourceUnavailable(f"LAN peers failed chunk {index} of {request.path}: {'; '.join(problems)[:300]}")

    def close(self) -> None:
        self.client.close()

"""What a pull will fetch: a ``Plan``, resolved from the sources (a stored manifest, else a
listing) or from LAN peers' offers (a manifest the trust policy accepts).

1. A manifest from an origin that keeps them (the OSS mirror: the mirror job built it from
   files it proved against the origin) is the plan, and it is trusted.
2. Else the first origin's listing (paths, sizes, SHA-256), after every path and size is
   validated (``agent.manifest.make_listing``); chunk hashes are learned as chunks arrive.
3. A peer's manifest becomes the plan only if signed by a trusted publisher or pinned.
Pure but for the sources' calls, which run in worker threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import trio

from agent.errors import (CredentialsRejected, ManifestError, NotFound, ShoalError, SourceUnavailable,
                          UntrustedManifest)
from agent.manifest import FileEntry, Manifest, ModelRef, build_manifest, chunk_count, decode, default_chunk_size
from agent.scheduler import SourceTrouble
from agent.sources import ChunkSource, Origin
from agent.store import Store


@dataclass(frozen=True)
class Plan:
    """What to fetch: a trusted manifest, or a listing with unknown chunk hashes."""

    ref: ModelRef
    chunk_size: int
    files: tuple[FileEntry, ...]  # chunk hashes None on a listing plan (learned as chunks arrive)
    trusted: bool
    origin: str  # where the plan came from, for people: "OSS mirror manifest", "ModelScope listing"
    revision: str | None = None  # the revision a manifest plan names (a pinned pull asks by id)
    # A trusted publisher's signature that came with a peer's manifest: kept with the model,
    # so this machine vouches for it to the next peer as the publisher's own machine does.
    signature: bytes | None = None

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def manifest(self) -> Manifest:
        """The manifest of a trusted plan (one that carries every chunk hash)."""
        assert self.trusted, "an origin plan has no chunk hashes until it is fetched"
        return Manifest(self.ref.model_id, self.revision or self.ref.revision, self.chunk_size, self.files)


async def resolve(ref: ModelRef, sources: list[ChunkSource], emit: Callable[[object], None],
                  chunk_size: int | None = None) -> Plan:
    """Find out what ``ref`` is made of (see module docstring, step 1)."""
    problems: list[str] = []
    refused: list[CredentialsRejected] = []
    not_found: list[str] = []
    origins = [s for s in sources if isinstance(s, Origin)]
    for source in (s for s in origins if s.keeps_manifests):
        try:
            data = await trio.to_thread.run_sync(source.get_manifest, ref)
            if data is None:
                not_found.append(f"{source.label} has no manifest for {ref}")
                continue
            manifest = decode(data)
            if (manifest.model_id, manifest.revision) != (ref.model_id, ref.revision):
                raise ManifestError(f"the manifest stored for {ref} describes "
                                    f"{manifest.model_id}@{manifest.revision}")
            return Plan(ref, manifest.chunk_size, manifest.files, trusted=True, origin=f"{source.label} manifest")
        except (SourceUnavailable, ManifestError) as e:
            problems.append(f"{source.label}: {e}")
            if isinstance(e, CredentialsRejected):
                refused.append(e)
            emit(SourceTrouble(source.name, f"{e}; trying the next source"))
    for source in (s for s in origins if s.lists_files):
        try:
            listing = await trio.to_thread.run_sync(source.list_files, ref)
        except NotFound as e:
            not_found.append(str(e))
            continue
        except SourceUnavailable as e:
            problems.append(f"{source.label}: {e}")
            if isinstance(e, CredentialsRejected):
                refused.append(e)
            continue
        files = tuple(FileEntry(f.path, f.size, f.sha256, None) for f in listing.files)
        return Plan(ref, chunk_size or default_chunk_size(listing.total_size), files, trusted=False,
                    origin=f"{source.label} listing")
    if refused and len(refused) == len(problems) and not not_found:
        raise CredentialsRejected("; ".join(str(e) for e in refused))
    if problems:
        raise SourceUnavailable(f"no reachable source could say what {ref} is: " + "; ".join(problems)
                                + (("; " + "; ".join(not_found)) if not_found else ""))
    raise NotFound("; ".join(not_found) or f"no source knows {ref}")


def plan_from_offers(ref: ModelRef, offers: list, trust) -> tuple[Plan | None, list[ShoalError]]:
    """A plan from the first LAN peer manifest the trust policy accepts, and the refusals."""
    refused: list[ShoalError] = []
    for offer in offers:
        manifest = offer.manifest
        if manifest.model_id != ref.model_id or ref.revision not in (manifest.revision, manifest.id):
            continue
        try:
            why = trust.check(manifest.id, offer.signature)
        except (UntrustedManifest, ManifestError) as e:
            refused.append(e)
            continue
        return Plan(ref, manifest.chunk_size, manifest.files, trusted=True,
                    origin=f"{getattr(offer, 'where', 'LAN peer')} manifest, {why}",
                    revision=manifest.revision,
                    signature=offer.signature if why.startswith("signed by") else None), refused
    return None, refused


def plan_manifest(plan: Plan, store: Store) -> Manifest:
    """The manifest of an origin plan, from the BLAKE3 of the chunks verified by SHA-256."""
    files = []
    held = store.held_chunks(plan.ref)  # one query, not one per file (2,000 small files: 2,000 queries)
    for f in plan.files:
        hashes = held.get(f.path, {})
        count = chunk_count(f.size, plan.chunk_size)
        if sorted(hashes) != list(range(count)):
            raise ShoalError(f"internal error: {f.path} is complete but the index lacks chunk hashes")
        files.append(FileEntry(f.path, f.size, f.sha256, tuple(hashes[i] for i in range(count))))
    return build_manifest(plan.ref.model_id, plan.ref.revision, plan.chunk_size, files)

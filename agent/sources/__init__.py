"""Where chunk bytes come from. One interface, ``ChunkSource``; one module per source; the
list of kinds, their labels and order in ``agent.sources.registry``.

The scheduler never knows which library is behind a source: it asks for a byte range of
a file of a model revision and gets exactly those bytes, or one of the typed errors below.
Verification (BLAKE3, SHA-256) is the scheduler's job, so a lying source is caught the
same way whichever it is.

What a source can do beyond ``fetch`` is declared here, with defaults, never probed:
- ``Origin.get_manifest`` / ``Origin.list_files`` (flagged by ``keeps_manifests`` and
  ``lists_files``): say what a revision is made of (a shoal manifest the source stores, or
  a listing with paths, sizes and the origin's digests);
- ``endgame``: whether a chunk already in flight elsewhere may be fetched a second time
  from this source near the end of a pull (LAN peers: yes; an origin: never);
- ``abort``: cut short this source's fetches of a chunk (the endgame's losing copy);
- ``rejected``: told which fetch delivered bytes that failed their hash (a LAN source
  drops that peer).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from agent.config import Settings
from agent.errors import NotFound, SourceUnavailable, UsageError
from agent.manifest import Listing, ModelRef
from agent.sources import registry

READ_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class ChunkRequest:
    """Bytes [offset, offset+length) of ``path`` (a file of ``file_size`` bytes)."""

    path: str
    offset: int
    length: int
    file_size: int


class ChunkSource(ABC):
    """A place chunk bytes can be read from.

    ``fetch`` blocks (the scheduler runs it in a worker thread) and must be thread-safe.

    Error handling: it raises
    - ``NotFound`` when this source does not have the file (no retry on this source);
    - ``ChunkNotHeld`` when it has the file but not this chunk yet (a LAN peer);
    - ``CredentialsRejected`` when the source refuses our credentials;
    - ``SourceUnavailable`` for anything else, with ``transient=True`` when a retry on the
      same source may help (timeouts, resets, truncated bodies, 5xx).
    It never returns fewer bytes than asked and never writes past ``into[:length]``. It may
    return a token naming where the bytes came from (a peer), which the scheduler hands back
    to ``rejected`` when they fail their hash.
    """

    #: the kind's name in the registry ("oss", "modelscope"): events, logs, the index
    name: str = ""
    #: may a chunk in flight elsewhere be fetched again from here near the end of a pull?
    endgame: bool = False

    @property
    def label(self) -> str:
        """What a person reads ("OSS mirror", "ModelScope")."""
        return registry.label(self.name)

    @abstractmethod
    def fetch(self, ref: ModelRef, request: ChunkRequest, into: memoryview, deadline: float) -> object:
        """Fill ``into[:request.length]`` with the requested bytes before ``deadline`` (monotonic)."""

    def abort(self, path: str, index: int) -> None:
        """Cut short this source's fetches of chunk ``index`` of ``path``. Default: none to cut."""

    def rejected(self, token: object, reason: str) -> None:
        """The bytes ``fetch`` delivered (and named ``token``) failed their hash."""

    def close(self) -> None:
        """Release connections. Safe to call twice."""


class Origin(ChunkSource):
    """A source that can also say what a revision is made of (blocking, like ``fetch``), by
    one or both of the means below; the flags say which it offers."""

    #: it keeps shoal manifests (``get_manifest``)
    keeps_manifests: bool = False
    #: it lists a revision's files with their digests (``list_files``)
    lists_files: bool = False

    def get_manifest(self, ref: ModelRef) -> bytes | None:
        """The encoded shoal manifest this source keeps for ``ref``, or None. A stored
        manifest is trusted (the mirror job proved every file before writing it)."""
        return None

    def list_files(self, ref: ModelRef) -> Listing:
        """The validated listing of ``ref`` (paths, sizes, the origin's digests); ``NotFound``
        when this source does not have it."""
        raise NotFound(f"{self.label} does not list models")


def make_sources(settings: Settings) -> list[Origin]:
    """The configured origins in fallback order (LAN peers are added per pull); none at all
    only for a swarm member (a student's machine in a room pulls from the room)."""
    sources = [kind.make(settings) for kind in registry.origins(settings)]
    if not sources and not settings.swarm:  # a room member may pull from its peers alone
        ways = "; ".join(k.how for k in registry.KINDS if k.how)
        raise UsageError(f"no source is configured: set {ways}")
    return sources


def read_exact(read_into: Callable[[memoryview], int], into: memoryview, length: int,
               deadline: float, what: str) -> None:
    """Fill ``into[:length]`` by calling ``read_into`` until done.

    Raises ``SourceUnavailable`` (transient) if the body ends early or ``deadline`` passes.
    Each call is also bounded by the socket's own read timeout.
    """
    got = 0
    while got < length:
        if time.monotonic() > deadline:
            raise SourceUnavailable(f"{what}: timed out after {got} of {length} bytes")
        n = read_into(into[got:min(length, got + READ_BLOCK)])
        if not n:
            raise SourceUnavailable(f"{what}: body truncated after {got} of {length} bytes")
        got += n


def expect_span(status: int, content_length: int | None, request: ChunkRequest, what: str) -> None:
    """Refuse a response that is not exactly the requested range (e.g. a server ignoring Range)."""
    whole = request.offset == 0 and request.length == request.file_size
    if status == 206 or (status == 200 and whole):
        if content_length is not None and content_length != request.length:
            raise SourceUnavailable(
                f"{what}: sent {content_length} bytes for a {request.length}-byte range")
        return
    if status == 200:
        raise SourceUnavailable(
            f"{what}: the server ignored the Range header and sent the whole file; "
            "this source cannot serve chunks", transient=False)
    raise SourceUnavailable(f"{what}: unexpected HTTP {status}")

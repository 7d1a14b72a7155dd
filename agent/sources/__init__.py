"""Where chunk bytes come from. One interface, ``ChunkSource``; one module per source.

The scheduler never knows which library is behind a source: it asks for a byte range of
a file of a model revision and gets exactly those bytes, or one of the typed errors below.
Verification (BLAKE3, SHA-256) is the scheduler's job, so a lying source is caught the
same way whichever it is.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from agent.errors import SourceUnavailable
from agent.manifest import ModelRef

READ_BLOCK = 1024 * 1024


class ChunkNotHeld(SourceUnavailable):
    """This source has the file but not this chunk right now (a LAN peer still pulling it).
    The scheduler moves the chunk on without counting it against the source."""

    def __init__(self, message: str):
        super().__init__(message, transient=False)


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
    - ``CredentialsRejected`` when the source refuses our credentials;
    - ``SourceUnavailable`` for anything else, with ``transient=True`` when a retry on the
      same source may help (timeouts, resets, truncated bodies, 5xx).
    It never returns fewer bytes than asked and never writes past ``into[:length]``.
    """

    #: short name used in progress events and logs ("oss", "modelscope")
    name: str = ""
    #: what a person reads ("OSS mirror", "ModelScope")
    label: str = ""

    @abstractmethod
    def fetch(self, ref: ModelRef, request: ChunkRequest, into: memoryview, deadline: float) -> None:
        """Fill ``into[:request.length]`` with the requested bytes before ``deadline`` (monotonic)."""

    def close(self) -> None:
        """Release connections. Safe to call twice."""


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

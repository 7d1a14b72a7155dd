"""The error tree, all of it. Every error a person can see says what happened and what to
do next.

Each class carries the process exit code ``shoal`` uses for it, so scripts can tell
"no such model" from "disk full" without parsing text, and a title for the TUI. The codes:

    0 done · 1 other error · 2 usage or setting (``UsageError``, ``ConfigError``,
    ``ProtocolError``) · 3 not found (``NotFound``) · 4 no reachable source
    (``SourceUnavailable``, ``ChunkFailed``, ``ChunkNotHeld``, ``PeerBroken``, ``PeerBusy``,
    ``PeerTimedOut``) · 5 integrity (``IntegrityError``, ``ManifestError``,
    ``UntrustedManifest``, ``UnsafePath``) · 6 disk full (``DiskFull``) · 7 credentials or
    membership refused (``CredentialsRejected``, ``NotInSwarm``) · 8 busy (``StoreLocked``,
    ``AgentRunning``) · 9 quota (``QuotaExceeded``) · 130 cancelled (``Cancelled``) ·
    143 terminated (``Terminated``).

Errors cross the control socket by class name (``agent.rpc``), so a client raises the
agent's own error type: ``error_class`` finds it.
"""

from __future__ import annotations


class ShoalError(Exception):
    """Base of every error shoal raises on purpose. ``exit_code`` is what the CLI exits with."""

    exit_code = 1
    title = "shoal error"


class UsageError(ShoalError):
    """The command line or a setting is wrong (a typo, a missing bucket name)."""

    exit_code = 2
    title = "Invalid usage"


class ConfigError(UsageError):
    """A setting in the environment or the config file is malformed or missing."""

    title = "Configuration error"


class NotFound(ShoalError):
    """The model, revision or file does not exist at any source that answered."""

    exit_code = 3
    title = "Not found"


class ObjectArchived(NotFound):
    """An OSS object in Archive / Cold Archive storage, not restored (readable) now: this
    source lacks the file for this pull; the next source serves it."""


class SourceUnavailable(ShoalError):
    """A source could not serve a request: network error, timeout, 5xx, truncated body.

    ``transient`` tells the scheduler whether a retry on the same source may help.
    """

    exit_code = 4
    title = "Source unavailable"

    def __init__(self, message: str, *, transient: bool = True):
        super().__init__(message)
        self.transient = transient


class CredentialsRejected(SourceUnavailable):
    """A source refused our credentials (HTTP 401/403). Retrying will not help."""

    exit_code = 7
    title = "Credentials rejected"

    def __init__(self, message: str):
        super().__init__(message, transient=False)


class IntegrityError(ShoalError):
    """Bytes did not match their BLAKE3 chunk hash or the origin's SHA-256."""

    exit_code = 5
    title = "Integrity check failed"


class ManifestError(IntegrityError):
    """A manifest or a hub listing is malformed or unsafe (``../`` paths, absurd sizes)."""

    title = "Invalid manifest"


class DiskFull(ShoalError):
    """The store ran out of space. What was verified is kept; free space and pull again."""

    exit_code = 6
    title = "Disk full"


def disk_error(e: OSError, where) -> Exception:
    """``DiskFull`` for ENOSPC/EDQUOT (what was verified is kept), else ``e`` itself."""
    import errno
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"no space left on the device holding {where}; what was verified is "
                        "kept: free some space (or `shoal rm` a model) and run the same pull again")
    return e


class QuotaExceeded(ShoalError):
    """A pull would not fit in the cache quota even after evicting what may be evicted."""

    exit_code = 9
    title = "Cache quota exceeded"


class Terminated(ShoalError):
    """The process was asked to stop (SIGTERM); in-flight chunks were finished or dropped."""

    exit_code = 143
    title = "Terminated"


class StoreLocked(ShoalError):
    """Another shoal process holds the pull of this model right now."""

    exit_code = 8
    title = "Store busy"


def single_error(group: BaseExceptionGroup) -> BaseException:
    """Public APIs raise one error, not a group: the first ShoalError, else the first leaf
    that is not a cancellation."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)
    walk(group)
    for leaf in leaves:
        if isinstance(leaf, ShoalError):
            return leaf
    for leaf in leaves:
        if type(leaf).__name__ != "Cancelled":
            return leaf
    return leaves[0]


class UnsafePath(ShoalError):
    """A file or folder shoal was to write or serve is a link, not its own, or outside
    where it may write (``agent.safefs``). Nothing was written through it."""

    exit_code = 5
    title = "Unsafe path"


class UntrustedManifest(IntegrityError):
    """A manifest nobody this agent trusts vouched for (no trusted signature, not pinned)."""

    title = "Untrusted manifest"


class ChunkFailed(SourceUnavailable):
    """Every source failed one chunk. The message lists why, per source."""

    title = "Chunk unavailable"

    def __init__(self, message: str):
        super().__init__(message, transient=False)


class ChunkNotHeld(SourceUnavailable):
    """This source has the file but not this chunk right now (a LAN peer still pulling it).
    The scheduler moves the chunk on without counting it against the source."""

    def __init__(self, message: str):
        super().__init__(message, transient=False)


class PeerBroken(SourceUnavailable):
    """A peer sent something that is not a valid swarm message or data-path frame."""

    title = "Broken peer"

    def __init__(self, message: str):
        super().__init__(message, transient=False)


class DataPathError(PeerBroken):
    """A malformed request or response on the LAN data connection."""


class PeerBusy(SourceUnavailable):
    """The peer's upload slots are all taken; ask again shortly, or another peer."""


class PeerTimedOut(SourceUnavailable):
    """The peer did not deliver before the deadline (a stalled or overloaded peer)."""


class KeyRefused(SourceUnavailable):
    """The peer's data port no longer takes our key (renewed or revoked): say hello again."""

    def __init__(self, message: str):
        super().__init__(message, transient=False)


class PeerRefused(PeerBroken):
    """The peer's data port answered a mode's opening with a refusal (``status``)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class NotFollowed(ShoalError):
    """The peer holds none of the manifest and does not pull it (yet)."""


class NotInSwarm(CredentialsRejected):
    """A peer refused us (or we refused it): not a member of the same swarm."""

    title = "Not in this swarm"


class ProtocolError(UsageError):
    """A caller on the control socket sent something that is not a valid frame or call."""

    title = "Control protocol error"


class AgentRunning(StoreLocked):
    """Another agent already serves this cache."""

    title = "Agent already running"


class AgentNeeded(ShoalError):
    """A command only the running agent can serve (status, peers, run-time config), and
    none runs for this cache."""

    title = "No agent"


class Cancelled(ShoalError):
    """The pull (or job) was cancelled: by ``shoal cancel``, Ctrl-C, or its last client
    going away. What was verified is kept."""

    exit_code = 130
    title = "Cancelled"


class RemoteError(ShoalError):
    """An error the agent reported whose class this client does not know; keeps the
    agent's exit code and title."""

    def __init__(self, title: str, message: str, exit_code: int):
        super().__init__(message)
        self.title, self.exit_code = title, exit_code


def error_class(name: str) -> type[ShoalError] | None:
    """The ``ShoalError`` subclass called ``name`` (for errors that crossed the control socket)."""
    todo = [ShoalError]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo.extend(cls.__subclasses__())
    return None

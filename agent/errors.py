"""The error tree. Every error a person can see says what happened and what to do next.

Each class carries the process exit code ``shoal`` uses for it, so scripts can tell
"no such model" from "disk full" without parsing text.
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

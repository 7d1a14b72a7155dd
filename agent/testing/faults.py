"""Fault rules for the local servers: what to break, for which requests, how many times.

A rule matches a request whose path (and query) contains ``match``. ``times`` bounds how
many requests it breaks (``None``: all). Rules are shared between threads, so every
change goes through one lock. The servers also keep a bounded request log that tests
read to count what was asked of them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

KINDS = ("status", "slow", "reset", "corrupt", "ignore_range")
MAX_LOG = 100_000


@dataclass
class Fault:
    kind: str
    match: str = ""
    status: int = 500
    delay: float = 0.0
    times: int | None = None
    code: str = ""  # error code put in the body of a "status" fault, e.g. InvalidAccessKeyId

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {KINDS}")


@dataclass
class LoggedRequest:
    method: str
    path: str
    range: str | None
    status: int
    fault: str | None = None
    at: float = field(default_factory=time.time)  # when it came in


@dataclass
class FaultPlan:
    """Thread-safe list of rules plus the request log."""

    _rules: list[Fault] = field(default_factory=list)
    _log: deque = field(default_factory=lambda: deque(maxlen=MAX_LOG))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._rules.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def take(self, target: str, *, data_request: bool) -> Fault | None:
        """The first rule matching ``target``; uses up one of its ``times``.

        Only data requests (object/file content) get body faults; every request can get
        a status or slow fault.
        """
        with self._lock:
            for rule in self._rules:
                if rule.match not in target:
                    continue
                if rule.kind not in ("status", "slow") and not data_request:
                    continue
                if rule.times is not None:
                    if rule.times <= 0:
                        continue
                    rule.times -= 1
                return Fault(**asdict(rule))
        return None

    def record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self._log.append(entry)

    def log(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def data_requests(self, match: str = "") -> list[LoggedRequest]:
        """Logged GETs with a Range header whose path contains ``match``."""
        return [e for e in self.log() if e.method == "GET" and e.range and match in e.path]

    def data_bytes(self, match: str = "") -> int:
        """Bytes asked for by those ranged GETs (``bytes=START-END``): the origin's egress."""
        total = 0
        for entry in self.data_requests(match):
            start, _, end = entry.range.partition("=")[2].partition("-")
            total += int(end) - int(start) + 1
        return total

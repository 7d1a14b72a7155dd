"""Progress arithmetic for a pull: bytes by source, speed over a sliding window, ETA. Pure."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from agent.sources import registry

SPEED_WINDOW = 3.0  # seconds of history behind the speed figure



@dataclass
class Progress:
    total: int
    already: int = 0  # bytes present before this pull started
    by_source: dict[str, int] = field(default_factory=dict)
    files_done: int = 0
    _samples: deque = field(default_factory=deque)  # (time, bytes) per chunk
    started: float | None = None
    current_source: str | None = None

    @property
    def fetched(self) -> int:
        return sum(self.by_source.values())

    @property
    def done(self) -> int:
        return min(self.total, self.already + self.fetched)

    def add(self, source: str, nbytes: int, now: float) -> None:
        if self.started is None:
            self.started = now
        self.by_source[source] = self.by_source.get(source, 0) + nbytes
        self.current_source = source
        self._samples.append((now, nbytes))
        while self._samples and self._samples[0][0] < now - SPEED_WINDOW:
            self._samples.popleft()

    def speed(self, now: float) -> float:
        """Bytes per second over the last few seconds."""
        while self._samples and self._samples[0][0] < now - SPEED_WINDOW:
            self._samples.popleft()
        if not self._samples:
            return 0.0
        span = max(0.25, min(SPEED_WINDOW, now - (self.started or now)))
        return sum(n for _, n in self._samples) / span

    def eta(self, now: float) -> float | None:
        speed = self.speed(now)
        if speed <= 0:
            return None
        return (self.total - self.done) / speed

    def split(self) -> str:
        """'OSS mirror 81% · ModelScope 19%' over the bytes fetched so far."""
        fetched = self.fetched
        if not fetched:
            return ""
        parts = sorted(self.by_source.items(), key=lambda kv: -kv[1])
        return " · ".join(f"{registry.short(k)} {100 * v / fetched:.0f}%" for k, v in parts)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_time(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60:02d}:{seconds % 60:02d}"

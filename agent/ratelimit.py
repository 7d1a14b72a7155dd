"""Token-bucket rate limits for bytes, changeable while transfers run.

``take(n)`` charges ``n`` bytes and sleeps until the bucket is back out of debt, so any
number of concurrent callers together stay at ``rate`` bytes per second over time,
whatever their request sizes. ``burst`` bounds how much unused allowance can pile up.
"""

from __future__ import annotations

import trio


class TokenBucket:
    def __init__(self, rate: int | None, *, burst: int | None = None):
        self._rate = rate
        self._burst = burst
        self._tokens = 0.0
        self._stamp: float | None = None

    @property
    def rate(self) -> int | None:
        return self._rate

    def set_rate(self, rate: int | None) -> None:
        """Change the cap (None: unlimited). Waiting callers re-plan within 0.25 s."""
        self._rate = rate
        self._tokens = min(self._tokens, 0.0)

    def _refill(self, now: float) -> None:
        if self._stamp is not None and self._rate:
            burst = self._burst if self._burst is not None else self._rate
            self._tokens = min(float(burst), self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    async def take(self, nbytes: int, *, outside: bool = False) -> None:
        """Charge ``nbytes`` (``outside`` is for ``DownloadRates``: one bucket caps every link)."""
        if not self._rate:
            return
        self._refill(trio.current_time())
        self._tokens -= nbytes
        # Sleep in short steps so a rate change (or removal) applies to sleepers too. A debt
        # worth under a millisecond is forgiven: chasing it would spin on float rounding.
        while self._rate and -self._tokens / self._rate > 0.001:
            await trio.sleep(min(0.25, -self._tokens / self._rate))
            self._refill(trio.current_time())


class DownloadRates:
    """The download caps of an agent: every byte (``total``: the LAN and the outside link),
    and on top, what comes from outside the room (``outside``: the OSS mirror and the
    origins), so a class's LAN stays fast while the school's link is spared."""

    def __init__(self, total: int | None, outside: int | None = None):
        self.total = TokenBucket(total)
        self.outside = TokenBucket(outside)

    @property
    def rate(self) -> int | None:
        return self.total.rate

    def set_rate(self, rate: int | None) -> None:
        self.total.set_rate(rate)

    async def take(self, nbytes: int, *, outside: bool = False) -> None:
        await self.total.take(nbytes)
        if outside:
            await self.outside.take(nbytes)


class ThreadTokenBucket:
    """The same cap for blocking threads (the LAN data server's sendfile loop)."""

    def __init__(self, rate: int | None):
        import threading
        import time
        self._clock = time.monotonic
        self._sleep = time.sleep
        self._rate = rate
        self._tokens = 0.0
        self._stamp = self._clock()
        self._lock = threading.Lock()

    @property
    def rate(self) -> int | None:
        return self._rate

    def set_rate(self, rate: int | None) -> None:
        with self._lock:
            self._rate = rate
            self._tokens = min(self._tokens, 0.0)

    def take(self, nbytes: int) -> None:
        with self._lock:
            if not self._rate:
                return
            now = self._clock()
            self._tokens = min(float(self._rate), self._tokens + (now - self._stamp) * self._rate) - nbytes
            self._stamp = now
        while True:
            with self._lock:
                rate = self._rate
                if not rate:
                    return
                now = self._clock()
                self._tokens = min(float(rate), self._tokens + (now - self._stamp) * rate)
                self._stamp = now
                wait = -self._tokens / rate
            if wait <= 0.001:
                return
            self._sleep(min(0.25, wait))

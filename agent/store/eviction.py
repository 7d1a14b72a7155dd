"""Which models leave the cache, and when: least recently used first, never a pinned one
or one in use (a pull, a job, a chat holds it), from the high watermark down to the low.

Pure: it takes what each model holds and returns whom to evict. Bytes are counted once:
a model frees its own bytes (partials, copies no blob holds) and the blobs no other
model links, so evicting one of two models that share a shard frees nothing of the
shard, and the blobs the pull being made room for will link are never counted as freed.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import QuotaExceeded


@dataclass(frozen=True)
class Holding:
    """What one model holds, as eviction sees it."""

    key: str
    last_used: float
    evictable: bool  # not pinned, not in use, not the model being made room for
    own_bytes: int  # bytes of its files that are no blob's
    blobs: frozenset[bytes]  # the blobs its folder links


class Ledger:
    """Bytes each eviction would free, given who links which blob (updated as it goes)."""

    def __init__(self, holdings: list[Holding], blob_sizes: dict[bytes, int], kept: frozenset[bytes] = frozenset()):
        self.sizes = blob_sizes
        self.refs: dict[bytes, int] = {}
        for holding in holdings:
            for blob in holding.blobs:
                self.refs[blob] = self.refs.get(blob, 0) + 1
        for blob in kept:  # a pull about to link these keeps them whoever leaves
            self.refs[blob] = self.refs.get(blob, 0) + 1

    def frees(self, holding: Holding) -> int:
        return holding.own_bytes + sum(self.sizes.get(b, 0) for b in holding.blobs if self.refs.get(b, 0) == 1)

    def take(self, holding: Holding) -> int:
        freed = self.frees(holding)
        for blob in holding.blobs:
            self.refs[blob] = self.refs.get(blob, 0) - 1
        return freed


def unique_bytes(holdings: list[Holding], blob_sizes: dict[bytes, int]) -> dict[str, int]:
    """Per model: what removing it alone would free (``shoal du``)."""
    ledger = Ledger(holdings, blob_sizes)
    return {h.key: ledger.frees(h) for h in holdings}


def choose(holdings: list[Holding], blob_sizes: dict[bytes, int], *, usage: int, need: int, quota: int | None,
           high: float, low: float, what: str = "the pull", kept: frozenset[bytes] = frozenset(),
           strict: bool = True) -> list[str]:
    """Keys to evict, oldest use first, so ``need`` more bytes fit: nothing while usage plus
    ``need`` stays under ``high`` x quota, else down to ``low`` x quota. Raises
    ``QuotaExceeded`` when evicting every candidate would still not make ``need`` fit
    (``strict``; otherwise as much as can go goes)."""
    if not quota or usage + need <= high * quota:
        return []
    candidates = sorted((h for h in holdings if h.evictable), key=lambda h: h.last_used)
    trial = Ledger(holdings, blob_sizes, kept)
    freeable = sum(trial.take(h) for h in candidates)
    if strict and usage - freeable + need > quota:
        raise QuotaExceeded(
            f"{what} needs {need} bytes; the cache quota is {quota} and {usage} are in use, of which "
            f"only {freeable} could be evicted (the rest is pinned or in use, or shared with a model that stays). "
            "Raise SHOAL_QUOTA, unpin a model (`shoal unpin`) or remove one (`shoal rm`)")
    ledger, chosen = Ledger(holdings, blob_sizes, kept), []
    # First the models whose leaving frees something now; then, if that was not enough,
    # those that share everything with another candidate (they free it together).
    for pass_ in (1, 2):
        for holding in candidates:
            if usage + need <= low * quota:
                return chosen
            if holding.key in chosen or (pass_ == 1 and ledger.frees(holding) == 0):
                continue
            usage -= ledger.take(holding)
            chosen.append(holding.key)
    return chosen

"""Which models leave the cache, and when: least recently used first, never a pinned one
or one in use (a pull, a job, a chat holds it), from the high watermark down to the low.
Blocking, as the store is."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.errors import QuotaExceeded
from agent.manifest import ModelRef

if TYPE_CHECKING:
    from agent.store import ModelInfo, Store


def make_room(store: "Store", ref: ModelRef, need: int, quota: int | None, high: float,
              low: float) -> list["ModelInfo"]:
    """Evict least recently used, unpinned, unused models so ``need`` more bytes fit.

    Eviction starts when usage would pass ``high`` x quota and goes down to ``low`` x
    quota. Raises ``QuotaExceeded`` (before anything is fetched) when even evicting
    every candidate would not make ``need`` fit within the quota.
    """
    if not quota:
        return []
    usage = store.usage() - store.size_of(ref)
    if usage + need <= high * quota:
        return []
    candidates = [m for m in sorted(store.models(), key=lambda m: m.last_used)
                  if not m.pinned and str(m.ref) != str(ref) and not store.in_use(m.ref)]
    freeable = sum(m.total_size for m in candidates)
    if usage - freeable + need > quota:
        raise QuotaExceeded(
            f"{ref} needs {need} bytes; the cache quota is {quota} and {usage} are in use, of which "
            f"only {freeable} could be evicted (the rest is pinned or in use). Raise SHOAL_QUOTA, "
            "unpin a model (`shoal unpin`) or remove one (`shoal rm`)")
    evicted = []
    for model in candidates:
        if usage + need <= low * quota:
            break
        store.remove(model.ref)
        usage -= model.total_size
        evicted.append(model)
    return evicted

def gc(store: "Store", quota: int | None, low: float) -> list["ModelInfo"]:
    """Evict LRU unpinned, unused models until usage is at most ``low`` x quota."""
    if not quota:
        return []
    usage, evicted = store.usage(), []
    for model in sorted(store.models(), key=lambda m: m.last_used):
        if usage <= low * quota:
            break
        if model.pinned or store.in_use(model.ref):
            continue
        store.remove(model.ref)
        usage -= model.total_size
        evicted.append(model)
    return evicted

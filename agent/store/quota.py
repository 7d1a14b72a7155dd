"""The quota, with bytes counted once: which models to evict (the rule is
``agent.store.eviction``'s, pure), carrying it out, and what each model alone takes
(``shoal du``). Blocking, as the store is."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.manifest import ModelRef
from agent.store import eviction

if TYPE_CHECKING:
    from agent.store.store import ModelInfo, Store


def holdings(store: "Store", keep: ModelRef | None) -> list[eviction.Holding]:
    """Every model as eviction sees it: evictable unless pinned, in use or ``keep``."""
    blobs, own = store.index.model_blobs(), store.index.own_bytes()
    return [eviction.Holding(row.key, row.last_used,
                             not row.pinned and (keep is None or row.key != str(keep))
                             and row.key not in store.room_keeps
                             and not store.in_use(ModelRef(row.model_id, row.revision)),
                             own.get(row.key, 0), frozenset(blobs.get(row.key, ())))
            for row in store.index.models() if row.state != "removing"]


def make_room(store: "Store", ref: ModelRef, need: int, quota: int | None, high: float, low: float,
              kept: frozenset[bytes] = frozenset()) -> list["ModelInfo"]:
    """Evict so ``need`` more bytes of ``ref`` fit (``QuotaExceeded`` before anything is
    fetched when they cannot)."""
    if not quota:
        return []
    held = holdings(store, ref)
    usage = store.usage() - next((h.own_bytes for h in held if h.key == str(ref)), 0)
    chosen = eviction.choose(held, store.index.blobs(), usage=usage, need=need, quota=quota,
                             high=high, low=low, what=str(ref), kept=kept)
    return evict(store, chosen)


def gc(store: "Store", quota: int | None, low: float) -> list["ModelInfo"]:
    """Sweep the blobs no model links, then evict down to the low watermark."""
    store.sweep()
    if not quota:
        return []
    chosen = eviction.choose(holdings(store, None), store.index.blobs(), usage=store.usage(), need=0,
                             quota=quota, high=low, low=low, what="gc", strict=False)
    return evict(store, chosen)


def evict(store: "Store", keys: list[str]) -> list["ModelInfo"]:
    evicted = []
    for key in keys:
        row = store.index.model(key)
        if row is not None:
            evicted.append(store.remove(ModelRef(row.model_id, row.revision)))
    return evicted


def unique_bytes(store: "Store") -> dict[str, int]:
    """Per model key: what removing it alone would free (its files no other model or
    revision links)."""
    return eviction.unique_bytes(holdings(store, None), store.index.blobs())

"""Prometheus metrics of the agent, served by the gateway at ``/metrics``.

Counters move with pull events (bytes by source, chunks verified and rejected); gauges
are read when scraped (cache size, quota, active pulls, LAN peers connected now), through
the callables the agent hands over: metrics see nothing else of it.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from agent.pull import ChunkFetched, ChunkRejected

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, *, cache_bytes: Callable[[], int], quota_bytes: Callable[[], int],
                 active_pulls: Callable[[], int], peers: Callable[[], int]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.bytes = Counter("shoal_bytes_fetched", "Verified bytes fetched, by source", ["source"],
                             registry=self.registry)
        self.verified = Counter("shoal_chunks_verified", "Chunks verified and written", registry=self.registry)
        self.rejected = Counter("shoal_chunks_rejected", "Chunks refused for a hash mismatch, by source",
                                ["source"], registry=self.registry)
        self.pulls_done = Counter("shoal_pulls_completed", "Pulls completed", registry=self.registry)
        cache = Gauge("shoal_cache_bytes", "Bytes held by shoal's cache", registry=self.registry)
        cache.set_function(cache_bytes)
        quota = Gauge("shoal_cache_quota_bytes", "Cache quota (0: none)", registry=self.registry)
        quota.set_function(quota_bytes)
        active = Gauge("shoal_active_pulls", "Pulls running now", registry=self.registry)
        active.set_function(active_pulls)
        connected = Gauge("shoal_peers", "LAN peers connected now", registry=self.registry)
        connected.set_function(peers)

    def observe(self, event) -> None:
        """Take one pull event (``agent.pull``'s typed events)."""
        if isinstance(event, ChunkFetched):
            self.bytes.labels(event.source).inc(event.nbytes)
            self.verified.inc()
        elif isinstance(event, ChunkRejected):
            self.rejected.labels(event.source).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

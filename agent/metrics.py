"""Prometheus metrics of the agent, served by the gateway at ``/metrics``.

Counters move with pull events (bytes by source, chunks verified and rejected); gauges
are read from the agent when scraped (cache size, quota, active pulls, peers).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, agent):
        self.registry = CollectorRegistry(auto_describe=True)
        self.bytes = Counter("shoal_bytes_fetched", "Verified bytes fetched, by source", ["source"],
                             registry=self.registry)
        self.verified = Counter("shoal_chunks_verified", "Chunks verified and written", registry=self.registry)
        self.rejected = Counter("shoal_chunks_rejected", "Chunks refused for a hash mismatch, by source",
                                ["source"], registry=self.registry)
        self.pulls_done = Counter("shoal_pulls_completed", "Pulls completed", registry=self.registry)
        cache = Gauge("shoal_cache_bytes", "Bytes held by shoal's cache", registry=self.registry)
        cache.set_function(lambda: agent.store.usage())
        quota = Gauge("shoal_cache_quota_bytes", "Cache quota (0: none)", registry=self.registry)
        quota.set_function(lambda: agent.settings.quota or 0)
        active = Gauge("shoal_active_pulls", "Pulls running now", registry=self.registry)
        active.set_function(lambda: len(agent.pulls))
        peers = Gauge("shoal_peers", "LAN peers known", registry=self.registry)
        peers.set_function(lambda: 0)

    def observe(self, event: dict) -> None:
        kind = event["type"]
        if kind == "chunk":
            self.bytes.labels(event["source"]).inc(event["nbytes"])
            self.verified.inc()
        elif kind == "rejected":
            self.rejected.labels(event["source"]).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

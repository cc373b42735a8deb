"""Prometheus metrics of the cache, with the metric names of the original warp-cache library.

Each `Metrics` owns a private `CollectorRegistry`, so several caches in one process (and tests) never
clash over the global registry.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from warpcache_cli.atomic import write_text
from warpcache_cli.errors import ConfigError

ACTIONS = ("reuse", "warp", "recompute")
PHASES = ("profiling", "tuning", "tuned", "fallback")

# Drift is a cosine distance (0 to 2) or a relative L2 norm; thresholds live around 0.01-0.2.
DRIFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.16, 0.25, 0.5, 1.0, 2.0)


class Metrics:
    """Counters, gauges and histograms of cache decisions and requests."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # prometheus_client appends `_total` to counters: these are exposed as warpcache_*_total.
        self.requests = Counter("warpcache_requests", "Requests (generations) served.", registry=r)
        self.hits = Counter("warpcache_cache_hits", "Block evaluations served from cache (reuse, warp).", registry=r)
        self.misses = Counter("warpcache_cache_misses", "Block evaluations that were computed.", registry=r)
        self.warps = Counter("warpcache_warp_operations", "Cached residuals warped by the content motion.", registry=r)
        self.recomputes = Counter("warpcache_recomputes", "Blocks recomputed.", registry=r)
        self.cache_size = Gauge("warpcache_cache_size", "Bytes of features held in the cache.", registry=r)
        self.hit_rate = Gauge("warpcache_hit_rate", "Cache hits over block evaluations so far.", registry=r)
        self.latency = Histogram("warpcache_request_latency_seconds", "Request latency.", registry=r)
        self.drift = Histogram(
            "warpcache_drift_observed",
            "Input drift of a block against its cached input.",
            buckets=DRIFT_BUCKETS,
            registry=r,
        )
        self.phase = Gauge(
            "warpcache_autoprofile_phase",
            "1 for the current auto-profiling phase of an input shape, else 0.",
            ["shape", "phase"],
            registry=r,
        )
        self._lock = threading.Lock()
        self._hit_count = 0
        self._lookups = 0

    def observe_decision(self, action: str, drift: float) -> None:
        """Count one block decision: reuse and warp are hits, recompute a miss.

        A non-finite drift (no cached input to compare with) is counted but not observed, so the
        histogram's sum stays meaningful.
        """
        if action not in ACTIONS:
            raise ValueError(f"unknown cache action {action!r}; expected one of {', '.join(ACTIONS)}")
        if action == "recompute":
            self.misses.inc()
            self.recomputes.inc()
        else:
            self.hits.inc()
            if action == "warp":
                self.warps.inc()
        if math.isfinite(drift):
            self.drift.observe(drift)
        with self._lock:
            self._lookups += 1
            self._hit_count += action != "recompute"
            self.hit_rate.set(self._hit_count / self._lookups)

    def observe_request(self, seconds: float) -> None:
        self.requests.inc()
        self.latency.observe(seconds)

    def set_cache_bytes(self, n: int) -> None:
        self.cache_size.set(n)

    def set_phase(self, shape_key: str, phase: str) -> None:
        """Mark ``phase`` as current for ``shape_key`` (1) and the other phases of that shape as not (0)."""
        if phase not in PHASES:
            raise ValueError(f"unknown auto-profile phase {phase!r}; expected one of {', '.join(PHASES)}")
        for name in PHASES:
            self.phase.labels(shape=shape_key, phase=name).set(1.0 if name == phase else 0.0)

    def exposition(self) -> str:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry).decode()

    def write(self, path: str | Path) -> None:
        """Write the exposition atomically, so a scraper reading the file (node-exporter's textfile
        collector) never sees half of it."""
        write_text(path, self.exposition())

    def serve(self, addr: str) -> WSGIServer:
        """Serve ``/metrics`` on ``"host:port"`` (empty host: all interfaces; port 0: any free port)
        from a daemon thread; call ``shutdown()`` on the returned server to stop it."""
        host, sep, port = addr.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"listen_addr = {addr!r}: expected host:port, e.g. 127.0.0.1:9100")
        server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=self.registry)
        return server

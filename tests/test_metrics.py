"""Prometheus metrics: exact names and values, atomic file output, independent instances, HTTP serving."""

from __future__ import annotations

import os
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from warpcache_cli.errors import ConfigError
from warpcache_cli.metrics import Metrics

NAMES = (
    "warpcache_requests_total",
    "warpcache_cache_hits_total",
    "warpcache_cache_misses_total",
    "warpcache_warp_operations_total",
    "warpcache_recomputes_total",
    "warpcache_cache_size",
    "warpcache_hit_rate",
    "warpcache_request_latency_seconds",
    "warpcache_drift_observed",
)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.exposition())
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def busy() -> Metrics:
    m = Metrics()
    decisions = [("reuse", 0.01), ("warp", 0.05), ("warp", 0.07), ("recompute", 0.3), ("recompute", float("inf"))]
    for action, drift in decisions:
        m.observe_decision(action, drift)
    m.observe_request(0.5)
    m.observe_request(1.5)
    m.set_cache_bytes(4096)
    return m


def test_exposition_has_every_name_and_value(busy: Metrics):
    text = busy.exposition()
    for name in NAMES:
        assert f"# TYPE {name} " in text
        assert f"\n{name}" in text
    assert value(busy, "warpcache_requests_total") == 2
    assert value(busy, "warpcache_cache_hits_total") == 3
    assert value(busy, "warpcache_cache_misses_total") == 2
    assert value(busy, "warpcache_warp_operations_total") == 2
    assert value(busy, "warpcache_recomputes_total") == 2
    assert value(busy, "warpcache_cache_size") == 4096
    assert value(busy, "warpcache_hit_rate") == pytest.approx(0.6)
    assert value(busy, "warpcache_request_latency_seconds_count") == 2
    assert value(busy, "warpcache_request_latency_seconds_sum") == pytest.approx(2.0)
    assert value(busy, "warpcache_drift_observed_count") == 4  # the infinite drift is not observed
    assert value(busy, "warpcache_drift_observed_sum") == pytest.approx(0.43)
    assert value(busy, "warpcache_drift_observed_bucket", le="0.06") == 2


def test_unknown_action_and_phase_are_rejected():
    m = Metrics()
    with pytest.raises(ValueError):
        m.observe_decision("skip", 0.0)
    with pytest.raises(ValueError):
        m.set_phase("1x21x30x52", "done")


def test_phase_gauge_marks_only_the_current_phase():
    m = Metrics()
    m.set_phase("wan:81x480x832", "profiling")
    m.set_phase("wan:81x480x832", "tuned")
    m.set_phase("wan:1x64x64", "fallback")
    got = {k[1]: v for k, v in samples(m).items() if k[0] == "warpcache_autoprofile_phase"}
    assert got[(("phase", "tuned"), ("shape", "wan:81x480x832"))] == 1
    assert got[(("phase", "profiling"), ("shape", "wan:81x480x832"))] == 0
    assert got[(("phase", "fallback"), ("shape", "wan:1x64x64"))] == 1
    assert sum(got.values()) == 2 and len(got) == 8


def test_write_is_atomic(busy: Metrics, tmp_path, monkeypatch):
    path = tmp_path / "metrics" / "warpcache.prom"
    busy.write(path)
    assert path.read_text() == busy.exposition()
    before = path.read_text()
    busy.observe_request(1.0)

    def fail(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        busy.write(path)
    assert path.read_text() == before, "a failed write must leave the old file whole"
    assert os.listdir(path.parent) == [path.name], "no temp file left behind"


def test_instances_are_independent():
    a, b = Metrics(), Metrics()
    a.observe_decision("reuse", 0.01)
    a.set_cache_bytes(10)
    assert value(a, "warpcache_cache_hits_total") == 1
    assert value(b, "warpcache_cache_hits_total") == 0
    assert value(b, "warpcache_cache_size") == 0
    assert value(b, "warpcache_hit_rate") == 0


def test_serve_exposes_the_registry(busy: Metrics):
    server = busy.serve("127.0.0.1:0")
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
        assert "warpcache_cache_hits_total 3.0" in body
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ConfigError):
        busy.serve("localhost")

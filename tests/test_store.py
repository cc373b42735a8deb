"""The LRU and the feature store: order, eviction, byte budget, expiry, invalidation, statistics, threads."""

from __future__ import annotations

import threading

import pytest
import torch

from warpcache_cli.store import LRU, FeatureKey, FeatureStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tensor_of(nbytes: int) -> torch.Tensor:
    return torch.zeros(nbytes // 4, dtype=torch.float32)


def test_lru_order_and_eviction_callback():
    evicted: list[tuple[str, int]] = []
    lru: LRU[str, int] = LRU(2, on_evict=lambda k, v: evicted.append((k, v)))
    assert not lru.set("a", 1)
    lru.set("b", 2)
    assert lru.get("a") == 1  # a is now the most recent
    assert lru.set("c", 3)  # evicts b
    assert evicted == [("b", 2)]
    assert lru.keys() == ["a", "c"]
    assert lru.peek("a") == 1 and lru.keys() == ["a", "c"]  # peek leaves the order alone
    assert "b" not in lru and "c" in lru and len(lru) == 2
    assert lru.get("b") is None and lru.get("b", 0) == 0
    assert lru.delete("a") == 1 and lru.delete("a") is None
    assert evicted == [("b", 2)]  # delete hands the value back instead of calling on_evict
    lru.set("d", 4)
    lru.purge()
    assert evicted == [("b", 2), ("c", 3), ("d", 4)] and len(lru) == 0


def test_lru_unbounded_and_invalid_capacity():
    lru: LRU[int, int] = LRU(None)
    for i in range(100):
        lru.set(i, i)
    assert len(lru) == 100 and lru.remove_oldest() == (0, 0)
    with pytest.raises(ValueError):
        LRU(0)


def test_entry_capacity_evicts_least_recently_used():
    store = FeatureStore(capacity_entries=2)
    k1, k2, k3 = (FeatureKey("r", layer, 0) for layer in range(3))
    store.put(k1, tensor_of(8))
    store.put(k2, tensor_of(8))
    assert store.get(k1) is not None
    store.put(k3, tensor_of(8))
    assert k2 not in store and k1 in store and k3 in store
    assert store.stats().evictions == 1


def test_byte_capacity_evicts_lru_and_rejects_a_too_big_tensor():
    store = FeatureStore(capacity_bytes=100)
    keys = [FeatureKey("r", layer, 0) for layer in range(4)]
    for key in keys[:3]:
        assert store.put(key, tensor_of(40)) is True
        assert store.nbytes <= 100
    assert store.nbytes == 80 and len(store) == 2  # the third put evicted the first entry
    assert keys[0] not in store
    store.get(keys[1])
    assert store.put(keys[3], tensor_of(40))
    assert keys[2] not in store and keys[1] in store  # keys[1] was used more recently than keys[2]
    assert store.put(keys[1], tensor_of(400)) is False
    assert keys[1] not in store, "a refused put must not leave the stale value behind"
    assert store.nbytes == 40 and store.stats().bytes == 40
    assert store.put(keys[0], tensor_of(100)) and len(store) == 1 and store.nbytes == 100


def test_bytes_count_dtype_and_replacement():
    store = FeatureStore()
    key = FeatureKey("r", 0, 0)
    store.put(key, torch.zeros(10, dtype=torch.bfloat16))
    assert store.nbytes == 20
    store.put(key, torch.zeros(10, dtype=torch.float32))
    assert store.nbytes == 40 and len(store) == 1


def test_ttl_expiry_with_a_fake_clock():
    clock = FakeClock()
    store = FeatureStore(ttl=10.0, clock=clock)
    key = FeatureKey("r", 0, 0)
    store.put(key, tensor_of(8), motion=0.3, drift=0.01)
    clock.now += 5
    entry = store.get(key)
    assert entry is not None and entry.motion == pytest.approx(0.3) and entry.drift == pytest.approx(0.01)
    assert entry.created == 100.0
    clock.now += 6
    assert store.get(key) is None
    assert len(store) == 0 and store.nbytes == 0
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.expirations) == (1, 1, 1)


def test_expired_entries_go_before_live_ones():
    clock = FakeClock()
    store = FeatureStore(capacity_entries=2, ttl=10.0, clock=clock)
    old, fresh, new = FeatureKey("r", 0, 0), FeatureKey("r", 1, 0), FeatureKey("r", 2, 0)
    store.put(old, tensor_of(8))
    clock.now += 8
    store.put(fresh, tensor_of(8))
    store.get(old)  # most recent, but about to expire
    clock.now += 3
    store.put(new, tensor_of(8))
    assert fresh in store and new in store and old not in store
    assert store.stats().evictions == 0


def test_an_unbounded_store_drops_expired_entries_no_lookup_asks_for():
    clock = FakeClock()
    store = FeatureStore(ttl=10.0, clock=clock)
    store.put(FeatureKey("r", 0, 0), tensor_of(8))
    clock.now += 11
    store.put(FeatureKey("r", 1, 0), tensor_of(8))
    assert len(store) == 1 and store.nbytes == 8 and store.stats().expirations == 1


def test_invalidate_and_get_prev():
    store = FeatureStore()
    for step in range(3):
        store.put(FeatureKey("a", 0, step), tensor_of(8))
        store.put(FeatureKey("b", 0, step), tensor_of(8))
    prev = store.get_prev(FeatureKey("a", 0, 2))
    assert prev is not None and prev is store.get(FeatureKey("a", 0, 1))
    assert store.get_prev(FeatureKey("a", 0, 0)) is None
    assert store.get_prev(FeatureKey("a", 1, 1)) is None
    assert store.invalidate("a") == 3
    assert store.invalidate("a") == 0
    assert len(store) == 3 and store.nbytes == 24
    assert store.delete(FeatureKey("b", 0, 0)) and not store.delete(FeatureKey("b", 0, 0))
    store.purge()
    assert len(store) == 0 and store.nbytes == 0


def test_stats_hit_rate():
    store = FeatureStore()
    assert store.stats().hit_rate == 0.0
    key = FeatureKey("r", 0, 0)
    store.put(key, tensor_of(8))
    for _ in range(3):
        store.get(key)
    store.get(FeatureKey("r", 0, 1))
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (3, 1, 1, 8)
    assert stats.hit_rate == pytest.approx(0.75)


def test_threads_keep_counts_consistent():
    store = FeatureStore(capacity_entries=50, capacity_bytes=50 * 64)
    n_threads, n_ops = 4, 300
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(n_ops):
                key = FeatureKey(f"req{t}", i % 20, i % 7)
                store.put(key, tensor_of(64))
                store.get(key)
                store.get_prev(key)
                if i % 50 == 0:
                    store.invalidate(f"req{(t + 1) % n_threads}")
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stats = store.stats()
    assert stats.hits + stats.misses == n_threads * n_ops * 2
    assert stats.entries == len(store) <= 50
    assert stats.bytes == store.nbytes == 64 * len(store)

"""The feature cache: a generic thread-safe LRU and, on top of it, the store of cached block residuals.

Hooks on different CUDA streams or a metrics server thread may touch the store concurrently, so every
operation holds a lock; eviction callbacks run after the lock is released so they may call back in.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

import torch

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """Least-recently-used map with an optional entry bound.

    ``on_evict(key, value)`` fires for entries the cache drops on its own (capacity) or in bulk
    (``purge``), that is whenever the caller does not get the value back; ``delete`` and
    ``remove_oldest`` hand the entry to the caller instead.
    """

    def __init__(self, capacity: int | None, on_evict: Callable[[K, V], None] | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"LRU capacity must be at least 1 or None (unbounded), got {capacity}")
        self.capacity = capacity
        self._on_evict = on_evict
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def set(self, key: K, value: V) -> bool:
        """Insert or replace ``key`` as most recent; returns whether an older entry was evicted."""
        evicted: list[tuple[K, V]] = []
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while self.capacity is not None and len(self._items) > self.capacity:
                evicted.append(self._items.popitem(last=False))
        self._notify(evicted)
        return bool(evicted)

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value for ``key``, marking it most recent; ``default`` when absent."""
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def peek(self, key: K, default: V | None = None) -> V | None:
        """The value for ``key`` without touching its recency."""
        with self._lock:
            return self._items.get(key, default)

    def delete(self, key: K) -> V | None:
        """Remove ``key`` and return its value (None when absent); ``on_evict`` is not called."""
        with self._lock:
            return self._items.pop(key, None)

    def remove_oldest(self) -> tuple[K, V] | None:
        """Remove and return the least-recently-used entry, or None when empty."""
        with self._lock:
            return self._items.popitem(last=False) if self._items else None

    def keys(self) -> list[K]:
        """A snapshot of the keys, least recent first."""
        with self._lock:
            return list(self._items)

    def purge(self) -> None:
        """Drop every entry, calling ``on_evict`` for each."""
        with self._lock:
            evicted = list(self._items.items())
            self._items.clear()
        self._notify(evicted)

    def _notify(self, evicted: list[tuple[K, V]]) -> None:
        if self._on_evict is not None:
            for key, value in evicted:
                self._on_evict(key, value)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items


class FeatureKey(NamedTuple):
    """Where a cached feature belongs: one request (generation and CFG branch), block and step."""

    request_id: str
    layer: int
    step: int


@dataclass(frozen=True)
class Entry:
    """A cached tensor with the motion and drift seen when it was stored; ``created`` is clock time."""

    tensor: torch.Tensor
    motion: float
    drift: float
    created: float

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.tensor)


@dataclass(frozen=True)
class StoreStats:
    """Counters since the store was made; ``hit_rate`` is hits over lookups (0.0 before any)."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    hit_rate: float
    expirations: int = 0


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class FeatureStore:
    """Thread-safe LRU of cached features, bounded by entry count and/or bytes, with optional expiry.

    Tensors are kept by reference (callers detach them first). ``ttl`` seconds after being stored an
    entry is expired: lookups treat it as a miss and it is dropped; ``ttl = 0`` never expires.
    ``clock`` is injectable so tests can move time.
    """

    def __init__(
        self,
        capacity_entries: int | None = None,
        capacity_bytes: int | None = None,
        ttl: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity_entries is not None and capacity_entries < 1:
            raise ValueError(f"capacity_entries must be at least 1 or None, got {capacity_entries}")
        if capacity_bytes is not None and capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be non-negative or None, got {capacity_bytes}")
        if ttl < 0:
            raise ValueError(f"ttl must be non-negative, got {ttl}")
        self.capacity_entries = capacity_entries
        self.capacity_bytes = capacity_bytes
        self.ttl = ttl
        self._clock = clock
        self._lru: LRU[FeatureKey, Entry] = LRU(None)
        self._lock = threading.RLock()
        self._bytes = 0
        self._swept = -float("inf")  # clock time of the last sweep of expired entries
        self._hits = self._misses = self._evictions = self._expirations = 0

    def put(self, key: FeatureKey, tensor: torch.Tensor, motion: float = 0.0, drift: float = 0.0) -> bool:
        """Store ``tensor`` under ``key``, evicting least-recently-used entries until both bounds hold.

        A tensor larger than the whole byte budget is refused (False) and any older value under
        ``key`` is dropped, so a later ``get`` cannot return a stale feature.
        """
        size = tensor_bytes(tensor)
        with self._lock:
            self._drop(key)
            if self.capacity_bytes is not None and size > self.capacity_bytes:
                return False
            self._sweep_expired()
            self._lru.set(key, Entry(tensor, float(motion), float(drift), self._clock()))
            self._bytes += size
            if self._over_budget():  # expired entries go before live ones are evicted
                self._sweep_expired(force=True)
            while self._over_budget():
                oldest = self._lru.remove_oldest()
                assert oldest is not None and oldest[0] != key, "the new entry fits alone"
                self._bytes -= oldest[1].nbytes
                self._evictions += 1
            return True

    def get(self, key: FeatureKey) -> Entry | None:
        """The entry under ``key`` (marked most recent), or None on a miss or an expired entry."""
        with self._lock:
            entry = self._lru.get(key)
            if entry is not None and self._expired(entry):
                self._drop(key)
                self._expirations += 1
                entry = None
            if entry is None:
                self._misses += 1
            else:
                self._hits += 1
            return entry

    def get_prev(self, key: FeatureKey) -> Entry | None:
        """The entry of the same request and layer one step earlier."""
        return self.get(key._replace(step=key.step - 1))

    def delete(self, key: FeatureKey) -> bool:
        """Remove ``key``; returns whether it was present. Not counted as an eviction."""
        with self._lock:
            return self._drop(key)

    def invalidate(self, request_id: str) -> int:
        """Drop every entry of ``request_id``; returns how many there were."""
        with self._lock:
            doomed = [k for k in self._lru.keys() if k.request_id == request_id]
            for key in doomed:
                self._drop(key)
            return len(doomed)

    def purge(self) -> None:
        """Drop everything (statistics are kept)."""
        with self._lock:
            self._lru.purge()
            self._bytes = 0

    def stats(self) -> StoreStats:
        with self._lock:
            lookups = self._hits + self._misses
            return StoreStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._lru),
                bytes=self._bytes,
                hit_rate=self._hits / lookups if lookups else 0.0,
                expirations=self._expirations,
            )

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: object) -> bool:
        """Whether a live entry is held under ``key``, without counting a lookup or touching recency."""
        with self._lock:
            entry = self._lru.peek(key)  # type: ignore[arg-type]
            return entry is not None and not self._expired(entry)

    def _drop(self, key: FeatureKey) -> bool:
        entry = self._lru.delete(key)
        if entry is None:
            return False
        self._bytes -= entry.nbytes
        return True

    def _expired(self, entry: Entry) -> bool:
        return self.ttl > 0 and self._clock() - entry.created > self.ttl

    def _sweep_expired(self, force: bool = False) -> None:
        """Drop expired entries: always before live ones are evicted, so the budget is spent on usable features,
        and otherwise at most once a quarter `ttl`, so an unbounded store does not hold dead tensors for long.

        Not at every put: the sweep walks every entry, which made it the hooks' largest cost (80 us a put
        with a few dozen entries, measured on the built-in model).
        """
        if self.ttl <= 0:
            return
        now = self._clock()
        if not force and now - self._swept < self.ttl / 4:
            return
        self._swept = now
        for key in self._lru.keys():
            entry = self._lru.peek(key)
            if entry is not None and self._expired(entry):
                self._drop(key)
                self._expirations += 1

    def _over_budget(self) -> bool:
        too_many = self.capacity_entries is not None and len(self._lru) > self.capacity_entries
        too_big = self.capacity_bytes is not None and self._bytes > self.capacity_bytes
        return too_many or too_big

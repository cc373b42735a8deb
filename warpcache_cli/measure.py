"""Run a model uncached and cached on the same request and measure speedup and quality."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from warpcache_cli import quality, runtime
from warpcache_cli.config import Config
from warpcache_cli.models import Request, generate


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(pipe: Any, req: Request) -> tuple[np.ndarray, float]:
    _sync()
    start = time.perf_counter()
    frames = generate(pipe, req)
    _sync()
    return frames, time.perf_counter() - start


def warm_up(pipe: Any, req: Request) -> None:
    """A short untimed run, so one-time costs (allocator, kernel selection) stay out of timings."""
    generate(pipe, Request(req.prompt, req.seed, min(req.steps, 2), req.guidance, req.frames, req.height, req.width))


@dataclass
class Measurement:
    request: Request
    uncached_seconds: float
    cached_seconds: float
    repeats: int
    quality: dict[str, float]
    stats: dict[str, Any]
    frames: np.ndarray = field(repr=False)
    reference: np.ndarray = field(repr=False)
    decision_map: np.ndarray = field(repr=False)

    @property
    def speedup(self) -> float:
        return self.uncached_seconds / self.cached_seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.request.prompt,
            "seed": self.request.seed,
            "steps": self.request.steps,
            "uncached_seconds": self.uncached_seconds,
            "cached_seconds": self.cached_seconds,
            "speedup": self.speedup,
            "repeats": self.repeats,
            **self.quality,
            "decisions": self.stats,
        }


def measure(
    pipe: Any, config: Config, req: Request, repeats: int = 1, tick: Callable[[], None] | None = None
) -> Measurement:
    """Median wall time of `repeats` uncached and cached runs, interleaved after one warm-up run.

    Interleaving keeps drift in machine load from favouring either side; the warm-up keeps
    one-time costs (allocator, kernels) out of the uncached figure.
    """
    tick = tick or (lambda: None)
    runtime.remove(pipe)
    warm_up(pipe, req)
    tick()
    plain, cached = [], []
    for _ in range(repeats):
        reference, t = timed(pipe, req)
        plain.append(t)
        tick()
        session = runtime.apply(pipe, config)
        try:
            frames, t = timed(pipe, req)
        finally:
            runtime.remove(pipe)
        cached.append(t)
        tick()
    return Measurement(
        request=req,
        uncached_seconds=statistics.median(plain),
        cached_seconds=statistics.median(cached),
        repeats=repeats,
        quality=quality.compare(frames, reference),
        stats=session.stats.to_dict(),
        frames=frames,
        reference=reference,
        decision_map=session.stats.decision_map(),
    )


def cached_psnr(pipe: Any, configs: list[Config], requests: list[Request]) -> list[list[float]]:
    """PSNR of each config's output on each request against the uncached output, untimed: for studies of
    quality alone, which do not need the repeats and warm-up that a speedup does."""
    references = [generate(pipe, r) for r in requests]
    out = []
    for config in configs:
        psnrs = []
        for req, ref in zip(requests, references):
            runtime.apply(pipe, config)
            try:
                psnrs.append(quality.psnr(generate(pipe, req), ref))
            finally:
                runtime.remove(pipe)
        out.append(psnrs)
    return out

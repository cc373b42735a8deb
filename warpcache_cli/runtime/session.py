"""Per-model runtime state: config, feature store, step tracking, per-branch block state, stats.

The hooks stay thin: they ask the session for the current step and branch, call the policy,
and report back. One session per hooked transformer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from warpcache_cli import motion
from warpcache_cli.config import Config
from warpcache_cli.metrics import Metrics
from warpcache_cli.policy import Action, calls_skipped, ceilings, reuse_limit, token_subset
from warpcache_cli.runtime.adapters import Grid
from warpcache_cli.runtime.steps import StepInfo, StepTracker
from warpcache_cli.store import FeatureStore

CALL = -1  # the layer index of a whole transformer call, for the state and cache of calls skipped whole


@dataclass
class BlockState:
    """What one block remembers for one CFG branch between steps."""

    sketch: torch.Tensor | None = None  # input token sketch at the last recompute
    frame_map: torch.Tensor | None = None  # input reduced to (B, F, H, W) on the grid, for the warp's shift estimate
    direction: torch.Tensor | None = None  # the channel direction that map was reduced on
    computed_step: int = -1
    previous_step: int = -1  # the computation before `computed_step`, for the forecast's curvature
    reuse_run: int = 0


@dataclass
class Decision:
    generation: int
    branch: str
    step: int
    layer: int
    action: Action
    drift: float


class BlockObserver(Protocol):
    """Receives every block call; the profiler records traces through this."""

    def on_block(self, session: CacheSession, layer: int, x: torch.Tensor, residual: torch.Tensor,
                 seconds: float, decision: Decision) -> None: ...


class GenerationController(Protocol):
    """Sets the session's config and observer for each generation, at its start only (auto-profiling)."""

    def on_generation(self, context: Any | None, grid: Grid | None) -> None: ...

    def detach(self) -> None: ...


@dataclass
class RuntimeStats:
    counts: Counter = field(default_factory=Counter)
    decisions: list[Decision] = field(default_factory=list)  # the current generation's, all branches
    peak_bytes: int = 0
    bytes_held: int = 0
    generations: int = 0
    phases: dict[str, str] = field(default_factory=dict)  # auto-profiling: input shape -> phase

    def add(self, d: Decision) -> None:
        self.counts[d.action] += 1
        self.decisions.append(d)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def compute_fraction(self) -> float:
        """Share of block calls that really ran; 1.0 means nothing was skipped."""
        return self.counts[Action.RECOMPUTE] / self.total if self.total else 1.0

    def decision_map(self, branch: str | None = None) -> np.ndarray:
        """(layers, steps) array of Action values for the last generation; -1 where no call was seen."""
        ds = [d for d in self.decisions if branch is None or d.branch == branch]
        if not ds:
            return np.zeros((0, 0), dtype=np.int8)
        out = np.full((max(d.layer for d in ds) + 1, max(d.step for d in ds) + 1), -1, dtype=np.int8)
        for d in ds:
            out[d.layer, d.step] = max(out[d.layer, d.step], int(d.action))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "block_calls": self.total,
            "recompute": self.counts[Action.RECOMPUTE],
            "reuse": self.counts[Action.REUSE],
            "warp": self.counts[Action.WARP],
            "compute_fraction": self.compute_fraction,
            "hit_rate": 1.0 - self.compute_fraction if self.total else 0.0,
            "bytes_held": self.bytes_held,
            "peak_bytes": self.peak_bytes,
            "generations": self.generations,
            "phases": dict(self.phases),
        }


class CacheSession:
    def __init__(self, config: Config, num_blocks: int, observer: BlockObserver | None = None) -> None:
        self.config = config
        self.num_blocks = num_blocks
        self.observer = observer
        self.controller: GenerationController | None = None
        self.store = FeatureStore(
            capacity_entries=config.cache.capacity_entries(),
            capacity_bytes=config.cache.capacity_bytes(),
            ttl=config.cache.ttl,
        )
        self.metrics = Metrics() if config.metrics.enabled else None
        self.server: Any = None  # the Prometheus HTTP server, when metrics are served on listen_addr
        self.tracker = StepTracker()
        self.stats = RuntimeStats()
        self.step: StepInfo | None = None
        self._motion: float | None = 0.0
        self.motion_source: torch.Tensor | None = None  # this step's video its motion is estimated on
        self._ceilings: tuple[list[float], list[float]] | None = None
        self.reuse_limit = config.policy.max_consecutive_reuse  # this call's (`policy.reuse_limit`)
        self.prediction: torch.Tensor | None = None  # last step's predicted clean video, for the motion estimate
        self.grid: Grid | None = None
        self.branch = "call0"
        self._blocks: dict[tuple[str, int], BlockState] = {}
        self._subsets: dict[int, torch.Tensor] = {}
        self._requests: set[str] = set()
        self._skips: tuple[Any, bool] = (None, False)  # (policy, whether it skips calls), kept for the policy in force

    def begin_call(self, timestep: float, context: Any | None, motion_source: torch.Tensor | None,
                   grid: Grid | None) -> None:
        """Called once per transformer call, before any block runs; `motion_source` is the (B, C, F, H, W)
        video this step's motion is estimated on (`content_motion`), if there is one."""
        info = self.tracker.update(timestep, context)
        self.branch = getattr(context, "name", None) or f"call{info.call}"
        if info.new_generation:
            if self.controller is not None:
                self.controller.on_generation(context, grid)  # before any block of the new generation runs
            self._new_generation()
        if info.new_step:
            self._motion, self.motion_source = None, motion_source
        self.step, self.grid = info, grid
        self._ceilings = None
        self.reuse_limit = int(reuse_limit(self.config.policy, info.position))

    @property
    def motion(self) -> float:
        """This step's content motion, estimated on first use: steps that never ask (warm-up) never pay for it."""
        if self._motion is None:
            source = self.motion_source
            self._motion = motion.content_motion(source) if source is not None else 0.0
        return self._motion

    @property
    def skips_calls(self) -> bool:
        """Whether the policy in force skips the calls its schedule does not compute (`policy.calls_skipped`)."""
        p = self.config.policy
        if self._skips[0] is not p:
            self._skips = (p, bool(calls_skipped(p)))
        return self._skips[1]

    def skip_call(self) -> None:
        """This call was skipped whole: every block was served from it, as the decision record and the blocks'
        reuse runs say."""
        for layer in range(self.num_blocks):
            self.block_state(layer).reuse_run += 1
            self.record(Decision(self.step.generation, self.branch, self.step.step, layer, Action.REUSE, np.nan))

    def ceilings(self, layer: int) -> tuple[float, float]:
        """The policy's recompute and warp ceilings of `layer` in this call, every block's computed at once on
        first use: numpy on one block's scalars costs more than the block's whole decision otherwise.

        With `motion_scale` 0 motion cannot move them, so the motion estimate is not paid for here.
        """
        if self._ceilings is None:
            p = self.config.policy
            t, w = ceilings(p, self.motion if p.motion_scale else 0.0, self.step.position, np.arange(self.num_blocks))
            self._ceilings = t.tolist(), w.tolist()
        return self._ceilings[0][layer], self._ceilings[1][layer]

    def _new_generation(self) -> None:
        for req in self._requests:
            self.store.invalidate(req)
        self._requests.clear()
        self._blocks.clear()
        self.prediction = None
        self.stats.decisions.clear()
        self.stats.generations += 1
        self.flush_metrics()

    def block_state(self, layer: int) -> BlockState:
        return self._blocks.setdefault((self.branch, layer), BlockState())

    def request_id(self, stream: int | str) -> str:
        req = f"{self.tracker.generation}/{self.branch}/{stream}"
        self._requests.add(req)
        return req

    def subset(self, n_tokens: int, device: torch.device) -> torch.Tensor:
        idx = self._subsets.get(n_tokens)
        if idx is None or idx.device != device:
            p = self.config.policy
            idx = self._subsets[n_tokens] = token_subset(n_tokens, p.token_subset, p.token_seed).to(device)
        return idx

    def record(self, decision: Decision) -> None:
        self.stats.add(decision)
        self.stats.bytes_held = self.store.nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.bytes_held)
        if self.metrics is not None:
            self.metrics.observe_decision(decision.action.name.lower(), decision.drift)
            self.metrics.set_cache_bytes(self.stats.bytes_held)

    def flush_metrics(self) -> None:
        if self.metrics is not None and self.config.metrics.path:
            self.metrics.write(self.config.metrics.path)

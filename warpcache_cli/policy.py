"""The caching decision: drift, motion-adaptive ceilings, phase schedule, reuse / warp / recompute.

This module knows nothing about models, hooks or files. The live runtime and the offline
replay both call `ceilings` and `choose` with the same numbers, so what is tuned offline is what
runs online.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

from warpcache_cli.config import PolicyConfig


class Action(IntEnum):
    RECOMPUTE = 0
    REUSE = 1
    WARP = 2


ArrayLike = float | np.ndarray
# plain int8 values for the array paths: an Enum member lookup costs microseconds, and the replay makes many
RECOMPUTE, REUSE, WARP = (np.int8(a) for a in Action)


def phase_multiplier(
    position: ArrayLike, breakpoints: tuple[float, float], multipliers: tuple[float, float]
) -> ArrayLike:
    """Three phases: `early` before the first breakpoint, a linear ramp, `late` after the second."""
    return np.interp(position, breakpoints, multipliers)


def layer_multiplier(cfg: PolicyConfig, layer: int | np.ndarray) -> ArrayLike:
    if np.ndim(layer) == 0:
        return cfg.layer_multipliers.get(int(layer), 1.0)
    get = cfg.layer_multipliers.get  # block indices are few: a look-up each beats a mask per listed block
    return np.array([get(i, 1.0) for i in np.ravel(layer).tolist()]).reshape(np.shape(layer))


def ceilings(cfg: PolicyConfig, motion: ArrayLike, position: ArrayLike, layer: int | np.ndarray
             ) -> tuple[ArrayLike, ArrayLike]:
    """Recompute ceiling T and warp ceiling W (W <= T) for blocks at steps; arrays broadcast.

    Both fall as content motion grows; the floor keeps T from collapsing to zero on fast
    content; the layer multiplier scales both for blocks the sensitivity profile singled out
    (a multiplier of 0 makes T negative: that block is never reused, whatever the drift).
    """
    decay = np.exp(-cfg.motion_scale * np.asarray(motion, dtype=np.float64))
    mult = layer_multiplier(cfg, layer)
    scale = phase_multiplier(position, cfg.phase_breakpoints, cfg.phase_multipliers) * mult
    t = np.where(mult == 0.0, -np.inf, np.maximum(cfg.min_threshold, cfg.base_threshold * decay) * scale)
    can_warp = warps(cfg, layer)
    w = np.where(can_warp, np.minimum(cfg.warp_threshold * decay * scale, t), t) if can_warp.any() else t
    return t, w


def warps(cfg: PolicyConfig, layer: int | np.ndarray) -> np.ndarray:
    """Whether blocks may be warped: a warp threshold of 0 switches warping off, `no_warp_layers` per block."""
    if cfg.warp_threshold <= 0.0:
        return np.zeros(np.shape(layer), dtype=bool)
    listed = set(cfg.no_warp_layers)
    return np.array([i not in listed for i in np.ravel(layer).tolist()]).reshape(np.shape(layer))


def drift_ceiling(metric: str) -> float:
    """The largest drift `metric` can report: `1 - cos` lies in [0, 2], so a weighted mean of it does too;
    relative L2 drift has no bound."""
    return 2.0 if metric == "cosine" else np.inf


def measures_drift(cfg: PolicyConfig, t: ArrayLike, w: ArrayLike) -> ArrayLike:
    """Whether a block's decision depends on its drift. Not when both ceilings sit at or above the largest
    drift the metric can report (a fixed schedule: the reuse limit alone decides, and what is not recomputed
    is reused as it is), so the live hooks skip measuring it: on the built-in model the measurement costs
    more than serving the reused block."""
    bound = drift_ceiling(cfg.drift_metric)
    return (np.asarray(t) < bound) | (np.asarray(w) < bound)


def choose(cfg: PolicyConfig, step: int, drift: ArrayLike, t: ArrayLike, w: ArrayLike, reuse_run: ArrayLike,
           limit: ArrayLike) -> np.ndarray:
    """Reuse when the input barely moved, warp when it moved a little, recompute otherwise.

    `drift` is +inf where no usable cache exists; `reuse_run` is how many steps in a row the
    block has already been served from cache; `limit` the step's `reuse_limit`, which callers compute
    once per step, not per block. Works on scalars (the live hooks) and on arrays of blocks (the offline
    replay) alike.
    """
    return np.where(recomputes(cfg, step, drift, t, reuse_run, limit), RECOMPUTE, served(drift, w))


def recomputes(cfg: PolicyConfig, step: int, drift: ArrayLike, t: ArrayLike, reuse_run: ArrayLike,
               limit: ArrayLike) -> np.ndarray:
    """`choose`'s first half: whether the block runs. The reuse limit bounds error accumulation
    whatever the drift says. Apart because only this half feeds back into later steps: the replay
    calls it for every step a block may run at and `served` once for the whole trajectory. `step` may be an
    array too."""
    return (np.less(step, cfg.warm_up_steps) | (drift > t)) | (reuse_run >= limit)


def reuse_limit(cfg: PolicyConfig, position: ArrayLike) -> ArrayLike:
    """How many steps in a row a block may be served before it must run: `max_consecutive_reuse`, and
    from `late_start` on the tighter `late_max_consecutive_reuse`.

    Late steps need denser computation: on the built-in model, 9 of 30 steps computed every 4th step
    give 29.4 dB, and moving the last computation from step 29 to 28 (the last step forecast, the three
    before it no longer forecast three steps ahead) gives 37.4 dB.
    """
    late = min(cfg.max_consecutive_reuse, cfg.late_max_consecutive_reuse)
    return np.where(np.asarray(position) >= cfg.late_start, late, cfg.max_consecutive_reuse)


def is_schedule(cfg: PolicyConfig) -> bool:
    """Whether the policy is a fixed schedule: no ceiling of any block, at any motion and any schedule position,
    falls below the largest drift its metric can report, so drift never decides (the hooks do not measure it)."""
    listed = sorted(cfg.layer_multipliers)
    layers = np.array([*listed, max(listed, default=-1) + 1])  # every listed block and an unlisted one
    # the phase multiplier is piecewise linear in the position: its extremes lie at 0, 1 and the breakpoints
    position = np.array([0.0, *cfg.phase_breakpoints, 1.0])
    t, w = ceilings(cfg, 1e6, position[:, None], layers)  # their lowest: motion decays them towards their floor
    return not np.any(measures_drift(cfg, t, w))


def calls_skipped(cfg: PolicyConfig) -> bool:
    """Whether the steps a schedule does not compute skip the whole transformer call (`skip_calls`): only a fixed
    schedule serves every block of a step, so only there may a call be skipped."""
    return cfg.skip_calls and is_schedule(cfg)


def schedule_steps(cfg: PolicyConfig, position: np.ndarray) -> list[int] | None:
    """The steps a fixed schedule computes, at steps with these schedule positions (a trace's `position` row, or
    `step / (steps - 1)`); None when drift can decide (a drift-driven policy).

    A policy is a fixed schedule when no ceiling of any block at any step, whatever the motion, falls below
    the largest drift its metric can report: the hooks then measure none, and warm-up and the reuse limits
    alone decide, the same for every block. The steps are found by the policy's own rule.
    """
    if not is_schedule(cfg):
        return None
    out, run = [], 0
    for s, pos in enumerate(position):
        if recomputes(cfg, s, 0.0, drift_ceiling(cfg.drift_metric), run, reuse_limit(cfg, pos)):
            out.append(s)
            run = 0
        else:
            run += 1
    return out


def served(drift: ArrayLike, w: ArrayLike) -> np.ndarray:
    """`choose`'s second half: how a block that does not run is served, as it is or warped."""
    return np.where(drift <= w, REUSE, WARP)


def decide(
    cfg: PolicyConfig,
    *,
    step: int,
    layer: int,
    drift: float,
    motion: float,
    position: float,
    reuse_run: int,
    has_cache: bool,
) -> Action:
    """One block at one step, from scratch. The live hooks compute a call's ceilings for all blocks at
    once (`CacheSession.ceilings`) and then call `choose`, the replay does the same on arrays."""
    t, w = ceilings(cfg, motion, position, layer)
    return Action(int(choose(cfg, step, drift if has_cache else np.inf, t, w, reuse_run, reuse_limit(cfg, position))))


def token_subset(n_tokens: int, k: int, seed: int) -> torch.Tensor:
    """The fixed, seeded token indices drift is measured on (same online and in traces)."""
    if k >= n_tokens:
        return torch.arange(n_tokens)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_tokens, generator=gen)[:k].sort().values


def drift(x: torch.Tensor, x_cached: torch.Tensor, metric: str = "cosine", power: float = 1.0) -> torch.Tensor:
    """Per-sample drift of `x` against the cached input, both (B, K, C) token sketches.

    cosine: saliency-weighted `sum_i w_i (1 - cos(x_i, c_i)) / sum_i w_i`, `w_i = ||c_i||^power`,
    so tokens that carry the most energy dominate; l2: `||x - c|| / ||c||`. Both come from per-token
    dot products (`drift_from_dots`), which the profiler takes for every pair of steps at once.
    """
    x, c = x.float(), x_cached.float()
    dots, sq, cached_sq = (torch.linalg.vecdot(a, b) for a, b in ((x, c), (x, x), (c, c)))
    return drift_from_dots(dots, sq, cached_sq, ((metric, power),))[0]


def drift_from_dots(dots: torch.Tensor, sq: torch.Tensor, cached_sq: torch.Tensor,
                    variants: tuple[tuple[str, float], ...]) -> torch.Tensor:
    """`drift` for several (metric, power) pairs, (len(variants), ...), from per-token dots `x_i . c_i`,
    `x_i . x_i` and `c_i . c_i`, all (..., K) float32.

    The L2 drift's `||x - c||^2 = sum_i x_i . x_i + c_i . c_i - 2 x_i . c_i` is summed in float64 from
    dots of one kernel, so identical inputs give exactly 0.
    """
    weight = cached_sq.sqrt().clamp_min(1e-12)  # the cached tokens' norms
    cos = dots / (sq.sqrt().clamp_min(1e-12) * weight) if any(m != "l2" for m, _ in variants) else None
    out = []
    for metric, power in variants:
        if metric == "l2":
            change = (sq.double() + cached_sq.double() - 2 * dots.double()).sum(dim=-1).clamp_min(0).sqrt()
            out.append((change / cached_sq.double().sum(dim=-1).sqrt().clamp_min(1e-12)).float())
        else:
            out.append(saliency_drift(cos, weight, power))
    return torch.stack(out)


def saliency_drift(cos: torch.Tensor, norm: torch.Tensor, power: float) -> torch.Tensor:
    """The cosine drift from per-token cosines and the cached tokens' norms (clamped), both (..., K)."""
    w = norm if power == 1.0 else norm.pow(power)  # pow(1) is the identity, bit for bit, and costs an op
    return ((1.0 - cos) * w).sum(dim=-1) / w.sum(dim=-1)

"""Offline replay: a trace through the policy, thousands of times a second.

The policy's own `ceilings` and `choose` (its two halves) decide, on arrays of all runs, branches, steps and
blocks at once (`Replayer.decisions`). Drift comes from the trace's look-up table: the drift of
step s's input against the input of the block's last computed step, exactly what the live
hook would measure while the run is on the reference trajectory. Speed and quality are
estimates: speed from recorded block times, quality from a model of how injected residual
error becomes output error, calibrated by live runs recorded with the trace.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from warpcache_cli.config import Config, PolicyConfig
from warpcache_cli.errors import WarpcacheError
from warpcache_cli.policy import (
    RECOMPUTE,
    REUSE,
    WARP,
    Action,
    calls_skipped,
    ceilings,
    measures_drift,
    recomputes,
    reuse_limit,
    served,
    warps,
)
from warpcache_cli.trace import Trace, drift_variant

# PSNR falls 20 dB per decade of injected error: output error grows in proportion to it. Only the
# intercept is fit to calibration runs; a free slope fit to a few single-seed runs swings from -6 to
# -16 and extrapolates badly. Without calibration runs (auto-profiling) the intercept is this one:
# the median over the built-in model's 18 calibration runs in sample_traces/ (3 prompts x 6 configs).
PSNR_SLOPE = -20.0
PRIOR_PSNR_INTERCEPT = -7.6
# what caching itself costs beyond the blocks it runs, each paid per one of these. Measuring a block's drift
# is a cost of its own, whether the block is then reused or run: drift-driven configs measure at nearly every
# call, fixed schedules never (`policy.measures_drift`), so without this term the two cannot both be priced
# (a fit that folded it into the reuse put a schedule at 1.69x that measured 2.40x)
COST_TERMS = ("generation", "reused block", "warped block", "block mapped for warping", "drift measured",
              "skipped call")


@dataclass
class QualityModel:
    """PSNR = a + b log10(E), log10(1 - SSIM) = c + d log10(E), E the accumulated injected error.

    The error of a call skipped whole is its output's forecast error, in other units than a block's (relative to
    the block's output): `call_scale` turns it into the block error that measured the same PSNR in calibration.
    """

    a: float
    b: float
    c: float
    d: float
    points: int
    residuals: tuple[float, ...] = ()  # measured - estimated PSNR of the calibration runs: the estimate's scatter
    call_scale: float = 1.0

    def psnr(self, error: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.where(error > 0, self.a + self.b * np.log10(error), np.inf)

    def ssim(self, error: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.where(error > 0, 1.0 - np.clip(10 ** (self.c + self.d * np.log10(error)), 0.0, 1.0), 1.0)


def _fit(x: np.ndarray, y: np.ndarray, slope: float) -> tuple[float, float]:
    """Least squares line; with fewer than two distinct points, a line of the prior slope through their mean."""
    if len(x) >= 2 and np.ptp(x) > 1e-9:
        b, a = np.polyfit(x, y, 1)
        return float(a), float(b)
    return float(np.mean(y) - slope * np.mean(x)), slope


class Replayer:
    """Look-up tables built once per trace, then `run(policy)` per config."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        a = trace.arrays
        self.runs, self.branches, self.steps, self.blocks = trace.shape
        self.lags = trace.lags
        self._drift = {}  # variant index -> (R, Br, S, L, G + 2)
        self._index_cache: dict[tuple[int, int], _Indices] = {}
        self._raw_drift = a["drift"]
        self.reuse_err = np.nan_to_num(np.asarray(a["reuse_err"], np.float64), nan=0.0)
        # residual Gram entries on the token subset, for forecasting; absent from older traces
        self._dots = np.nan_to_num(np.asarray(a["res_dot"], np.float64)) if "res_dot" in a else None
        self._out_sq = np.asarray(a["out_sq"], np.float64) if "out_sq" in a else None
        self._call_dots = np.asarray(a["call_dot"], np.float64) if "call_dot" in a else None
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # blocks where warping was never measured
            ratio = np.asarray(a["warp_err1"], np.float64) / np.asarray(a["reuse_err1"], np.float64)
            per_block = np.nan_to_num(np.nanmean(ratio, axis=(0, 1, 2)), nan=1.0)
        # warping is measured at some steps only: elsewhere use the block's mean ratio
        ratio = np.where(np.isfinite(ratio), ratio, per_block)
        self.warp_ratio = np.clip(ratio, 0.0, 4.0)
        plain_blocks = a.get("plain_block_seconds")
        self.block_seconds = (np.broadcast_to(np.asarray(plain_blocks, np.float64), a["block_seconds"].shape)
                              if plain_blocks is not None else np.asarray(a["block_seconds"], np.float64))
        # seconds per COST_TERMS: timed at profile time (warping) or fit to the calibration runs (the rest)
        self.costs = np.zeros(len(COST_TERMS))
        plain = trace.meta.get("plain_seconds")
        self.plain_seconds = float(plain) if plain else float(np.mean(a["run_seconds"]))
        # what a call skipped whole saves: its plain time, or failing that its time under the recorder
        self.plain_call_seconds = float(trace.meta.get("plain_call_seconds") or np.mean(a["call_seconds"]))
        t = np.asarray(a["timestep"], np.float64)
        nxt = np.concatenate([t[:, 1:], np.zeros((self.runs, 1))], axis=1)
        # an error at step s moves x by dt_s times it, and weighs with sigma_s: errors at high noise change
        # the whole trajectory, late ones less (against weighting all steps alike, sigma^2 halved the estimate's
        # error on the built-in model, 2.5 against 4.2 dB leave-one-out over 72 runs; sigma^1, tried later, ranks
        # better still: Spearman 0.896 against 0.877 at MAE 2.53 against 2.57 dB on a 20-config dump, and it
        # sees that computing the last steps densely helps, which sigma^2 weighs at almost nothing)
        sigma = np.clip(t / 1000.0, 0.0, 1.0)
        self.step_weight = np.clip((t - nxt) / 1000.0, 0.0, None) * sigma
        self.motion = np.asarray(a["motion"], np.float64)
        self.position = np.asarray(a["position"], np.float64)
        self.layers = np.arange(self.blocks)
        self.quality: QualityModel | None = None
        self.quality = self._calibrate()

    def drift_table(self, policy: PolicyConfig) -> np.ndarray:
        """(R, Br, S, L, G + 2): column g is the drift against g steps back; column G + 1 is +inf (no cache)."""
        v = drift_variant(policy.drift_metric, policy.saliency_power)
        if v not in self._drift:
            d = np.nan_to_num(np.asarray(self._raw_drift[..., v], np.float64), nan=np.inf)
            pad = np.full((*d.shape[:-1], 1), np.inf)
            self._drift[v] = np.concatenate([pad, d, pad], -1)
        return self._drift[v]

    def decisions(self, policy: PolicyConfig, runs: slice = slice(None)) -> Decisions:
        """What the live hooks would do at every run, branch, step and block.

        Whether a block runs depends on the steps before only through its last computation, so a block's
        computations form a chain: after a computation at step c the next is the first step c + g whose drift
        against step c (lag g), ceiling or reuse limit asks for one. That next step is found for every c at once,
        and the chain from step 0 (which always computes: nothing is cached) is followed by pointer doubling,
        so a replay costs a few dozen array operations whatever the model's size or the number of steps.
        """
        check_reach(policy, self.lags)  # a longer run would read past its row of the drift table
        table = self.drift_table(policy)[runs]
        r, br, steps, lyr, width = table.shape
        ix = self._indices(r, policy.max_consecutive_reuse + 1)  # no block is reused more often in a row
        position = self.position[runs][:, None, :, None]  # (R, 1, S, 1)
        t, w = ceilings(policy, self.motion[runs][:, None, :, None], position, self.layers)  # (R, 1, S, L)
        limit = reuse_limit(policy, position)
        # (R, Br, S, J, L): whether a block computed at step c runs at step c + 1 + j, after j reuses (j < J)
        ahead = ix.ahead  # (S, J), clipped to the last step; `ix.beyond` marks the steps past it
        runs_next = recomputes(policy, ahead[:, :, None], table.take(ix.ahead_drift), t[:, :, ahead],
                               ix.reuse_run, limit[:, :, ahead]) | ix.beyond
        jump = np.empty((r * br, steps + 1, lyr), dtype=np.intp)  # next computation; step S stands for "none"
        jump[:, :steps] = np.minimum(ix.step_c + runs_next.argmax(axis=3).reshape(r * br, steps, lyr), steps)
        jump[:, steps] = steps
        chain = np.zeros(jump.shape, dtype=bool)
        chain[:, 0] = True
        for _ in range(max(steps - 1, 0).bit_length()):  # after round k: the chain's first 2^(k+1) computations
            at = ix.jump_base + jump * lyr
            chain.ravel()[at[chain]] = True
            jump = jump.ravel().take(at)
        computed = chain[:, :steps].reshape(r, br, steps, lyr)
        step = ix.step_s  # (S, 1)
        before = np.empty(computed.shape, dtype=np.intp)  # the last computation before each step, -1: none
        before[:, :, 0] = -1
        before[:, :, 1:] = np.maximum.accumulate(np.where(computed, step, -1), axis=2)[:, :, :-1]
        lag = step - before  # the drift table's column; at step 0 the "no cache" one
        lag[:, :, 0] = width - 1
        seen = table.take(ix.cell_ids * width + lag)
        actions = np.where(computed, RECOMPUTE, served(seen, w))

        def earlier(at: np.ndarray) -> np.ndarray:  # the computation before the one at `at`, -1 for none
            return before.take(ix.lane_steps + np.maximum(at, 0) * lyr)  # before[..., 0, :] is -1

        p = earlier(before)
        q = earlier(p)
        # the hook measures drift unless the recompute is forced (in warm-up, with no cache, or after the reuse
        # limit's reuses in a row) or the ceilings are out of the drift's reach
        measured = (lag <= limit) & measures_drift(policy, t, w)
        measured[:, :, : policy.warm_up_steps] = False
        return Decisions(actions, seen, np.where(computed, 0, lag), np.where(computed | (p < 0), 0, before - p),
                         np.where(computed | (q < 0), 0, p - q), measured, bool(calls_skipped(policy)))

    def _indices(self, r: int, reuses: int) -> _Indices:
        """The replay's index arrays for `r` runs and reuse runs up to `reuses - 1`: they depend on shapes only."""
        if (r, reuses) not in self._index_cache:
            self._index_cache[r, reuses] = _Indices.build(r, self.branches, self.steps, self.blocks, self.lags + 2,
                                                          reuses)
        return self._index_cache[r, reuses]

    def run(self, policy: PolicyConfig, runs: slice = slice(None)) -> ReplayResult:
        dec = self.decisions(policy, runs)
        actions = dec.actions
        reused = actions != RECOMPUTE
        if dec.skips_calls:  # a schedule: every block of a step is served alike; the call's output is forecast whole
            if self._call_dots is None:
                raise WarpcacheError("policy.skip_calls needs the call outputs' dot products the trace did not "
                                     "record; re-profile with this version of warpcache")
            dots = self._call_dots[runs][:, :, :, None]
            err = self._forecast_err(policy.forecast, policy.forecast_curvature, dec.lags[..., :1], dec.gaps[..., :1],
                                     dec.gaps2[..., :1], dots, dots[..., 0])
            err = np.where(reused[..., :1], err, 0.0)
        elif policy.forecast > 0 or policy.forecast_curvature > 0:
            if self._dots is None:
                raise WarpcacheError("policy.forecast needs residual dot products the trace did not record; "
                                     "re-profile with this version of warpcache")
            err = self._forecast_err(policy.forecast, policy.forecast_curvature, dec.lags, dec.gaps, dec.gaps2,
                                     self._dots[runs], self._out_sq[runs])
        else:
            idx = np.clip(dec.lags - 1, 0, self.lags - 1)[..., None]  # lag 0 (recomputed) is masked out below
            err = np.take_along_axis(self.reuse_err[runs], idx, axis=-1)[..., 0]
        if warps(policy, self.layers).any():  # otherwise nothing is warped
            err = np.where(actions == WARP, err * self.warp_ratio[runs], err)
        err = np.where(reused, err, 0.0)
        # a step's error is its largest block error (the mean over branches), and steps along the trajectory add up.
        # On two live dumps of 20 configs x 6 unprofiled requests (benchmarks/estimate_accuracy.py --rescore), the
        # largest block beat the root of the blocks' sum of squares: MAE 2.32 against 2.53 dB (Spearman 0.931
        # against 0.896) and 1.93 against 2.52 dB (0.938 against 0.935; that dump's seed noise alone gives 1.93);
        # the sum of squares had beaten a plain sum (1.68 against 2.32 dB, 2.14 against 4.33 dB, earlier dumps)
        per_step = err.max(axis=3).mean(axis=1)  # (R, S)
        error = (per_step * self.step_weight[runs]).sum(axis=1)
        if dec.skips_calls and self.quality is not None:
            error = error * self.quality.call_scale
        counts = self.cost_counts(policy, dec)
        saved = self._saved(dec.skips_calls, actions, runs) - counts @ self.costs
        speedup = self.plain_seconds / np.maximum(self.plain_seconds - saved, 1e-9)
        drift_acc = np.where(reused, dec.seen, 0.0).sum(axis=(1, 2, 3)) / (self.branches * self.blocks)
        return ReplayResult(
            actions=actions,
            error=error,
            speedup=speedup,
            drift=drift_acc,
            psnr=self.quality.psnr(error) if self.quality else np.full(len(error), np.nan),
            ssim=self.quality.ssim(error) if self.quality else np.full(len(error), np.nan),
            cost_counts=counts,
        )

    def _forecast_err(self, weight: float, curvature: float, lags: np.ndarray, gaps: np.ndarray,
                      gaps2: np.ndarray, dots: np.ndarray, out_sq: np.ndarray) -> np.ndarray:
        """Relative error of the forecast residual against the true r_s, as the live hooks extrapolate it; `dots`
        (R, Br, S, L, J) the residuals' Gram entries, `out_sq` (R, Br, S, L) the squared norms it is relative to
        (a call skipped whole: its output's, with L = 1).

        With c = s - k, p = c - g and q = p - h the last three computations, the forecast is
        r_c + A (r_c - r_p) + B ((r_c - r_p) / g - (r_p - r_q) / h), A = weight k / g and
        B = curvature k (k + g) / (g + h): a combination of r_c, r_p and r_q, so the error's squared norm
        is a quadratic form in the recorded residual Gram entries <r_i, r_{i-j}>. A term without its
        computations (g or h = 0) is left out, as live; so is a curvature reaching further back than
        the Gram table (it is then priced as first order).
        """
        span = dots.shape[-1]
        flat = dots.reshape(-1)
        back = span * dots.shape[-2]  # a step back in `flat`
        # flat indices of <r_s, r_s>, <r_c, r_c> and <r_p, r_p>; c = s - lag and p = c - gap are never before step 0.
        # A block runs at least once in `max_consecutive_reuse + 1` steps and that is at most the trace's lags G
        # (`check_reach`), so lag + gap <= 2 G + 1 stays in the Gram table's span 2 G + 2; only the curvature's
        # third computation may lie beyond it
        s_at = np.arange(out_sq.size).reshape(out_sq.shape) * span
        c_at = s_at - lags * back
        p_at = c_at - gaps * back
        g = np.maximum(gaps, 1)
        big_a = weight * lags * (gaps > 0) / g
        wc, wp = 1.0 + big_a, -big_a
        if curvature:  # r_q's weight and terms; without curvature they are 0
            h = np.maximum(gaps2, 1)
            big_b = np.where((gaps > 0) & (gaps2 > 0) & (lags + gaps + gaps2 < span),
                             curvature * lags * (lags + gaps) / (g + h), 0.0)
            wc, wp, wq = wc + big_b / g, wp - big_b / g - big_b / h, big_b / h
        sq = (flat.take(s_at) + wc * wc * flat.take(c_at) + wp * wp * flat.take(p_at)
              - 2 * wc * flat.take(s_at + lags) - 2 * wp * flat.take(s_at + lags + gaps)
              + 2 * wc * wp * flat.take(c_at + gaps))
        if curvature:
            q_at = p_at - gaps2 * back
            far = np.minimum(lags + gaps + gaps2, span - 1), np.minimum(gaps + gaps2, span - 1)  # beyond: wq is 0
            sq += (wq * wq * flat.take(q_at) - 2 * wq * flat.take(s_at + far[0])
                   + 2 * wc * wq * flat.take(c_at + far[1]) + 2 * wp * wq * flat.take(p_at + gaps2))
        return np.sqrt(np.maximum(sq, 0.0) / np.maximum(out_sq, 1e-24))

    def _saved(self, skips_calls: bool, actions: np.ndarray, runs: slice | int) -> np.ndarray:
        """(R,) seconds the reused blocks' plain run took, or, where whole calls are skipped, the calls' (R,) (with
        their embeddings and output layers)."""
        reused = actions != RECOMPUTE
        if skips_calls:
            return reused[..., 0].sum(axis=(-1, -2)) * self.plain_call_seconds
        return (self.block_seconds[runs] * reused).sum(axis=(-1, -2, -3))

    def _calibrate(self) -> QualityModel | None:
        cal = self.trace.meta.get("calibration")
        if not cal:
            return None
        runs = cal.get("runs") or [0] * len(cal["configs"])  # older traces calibrated on run 0 only
        policies = [Config.from_dict(c).policy for c in cal["configs"]]
        results = [self.run(p, slice(r, r + 1)) for p, r in zip(policies, runs)]
        if cal.get("seconds"):
            self.costs = self._fit_costs(policies, results, runs, np.asarray(cal["seconds"], np.float64))
        errors = np.array([r.error[0] for r in results])
        psnr, ssim = np.asarray(cal["psnr"], np.float64), np.asarray(cal["ssim"], np.float64)
        ok = (errors > 0) & np.isfinite(psnr) & (ssim < 1.0)
        if not ok.any():
            return None
        calls = np.array([calls_skipped(p) for p in policies])
        has_blocks = bool((ok & ~calls).any())
        blocks = ok & ~calls if has_blocks else ok
        x = np.log10(np.where(ok, errors, 1.0))
        # the median: single runs scatter with a heavy upper tail (a run whose reuse lands where the output
        # is insensitive comes out 15-20 dB above the line), which would pull a mean up
        a, b = float(np.median(psnr[blocks] - PSNR_SLOPE * x[blocks])), PSNR_SLOPE
        # runs that skip calls whole: the factor on their error that puts them on the blocks' line (none: 1)
        skips, scale = ok & calls, 1.0
        if skips.any() and has_blocks:
            scale = 10 ** (float(np.median(psnr[skips] - (a + b * x[skips]))) / b)
        x = np.where(calls, x + np.log10(scale), x)[ok]
        c, d = _fit(x, np.log10(1.0 - ssim[ok]), 2.0)
        return QualityModel(a, b, c, d, int(ok.sum()), tuple(float(v) for v in psnr[ok] - (a + b * x)), scale)

    def cost_counts(self, policy: PolicyConfig, dec: Decisions) -> np.ndarray:
        """(R, len(COST_TERMS)): how often each cost the hooks add beyond the blocks they run is paid.

        With warping on, every block computed from the step before the first possible reuse also
        maps its input for a later warp, whether or not a warp follows.
        """
        actions = dec.actions
        r = len(actions)

        def per_run(mask: np.ndarray) -> np.ndarray:
            return np.count_nonzero(mask.reshape(r, -1), axis=1)

        can_warp = warps(policy, self.layers)
        mapped = np.zeros(r)
        if can_warp.any():
            computed = (actions == RECOMPUTE) & can_warp
            computed[:, :, : max(0, policy.warm_up_steps - 1)] = False
            mapped = per_run(computed)
        if dec.skips_calls:  # no block hook runs in a skipped call; the call's forecast is paid instead
            return np.stack([np.ones(r), np.zeros(r), np.zeros(r), mapped, per_run(dec.measured),
                             per_run(actions[..., 0] != RECOMPUTE)], axis=1)
        return np.stack([np.ones(r), per_run(actions == REUSE), per_run(actions == WARP), mapped,
                         per_run(dec.measured), np.zeros(r)], axis=1)

    def _fit_costs(self, policies: list[PolicyConfig], results: list[ReplayResult], runs: list[int],
                   measured: np.ndarray) -> np.ndarray:
        """The COST_TERMS in seconds, fit to the calibration runs' wall times (non-negative least squares)."""
        saved = np.array([float(self._saved(calls_skipped(p), r.actions[0], run))
                          for p, r, run in zip(policies, results, runs)])
        counts = np.concatenate([r.cost_counts for r in results])
        excess = measured - (self.plain_seconds - saved)
        coef = np.zeros(len(COST_TERMS))
        timed = self.trace.meta.get("warp_seconds") or {}  # measured at profile time: held, not fit
        fixed = [i for i, name in enumerate(COST_TERMS) if name in timed]
        for i in fixed:
            coef[i] = float(timed[COST_TERMS[i]])
            excess = excess - counts[:, i] * coef[i]
        active = [i for i in range(len(COST_TERMS)) if counts[:, i].any() and i not in fixed]
        while active:  # drop terms that come out negative and refit: a tiny NNLS
            sol = np.linalg.lstsq(counts[:, active], excess, rcond=None)[0]
            if (sol >= 0).all():
                coef[active] = sol
                break
            active.pop(int(np.argmin(sol)))
        return coef


@dataclass
class _Indices:
    """Index arrays of a replay of `r` runs (flat indices into the drift table and the decision arrays).

    `c` is a computation's step, `j` the reuses after it (0 .. J - 1), `s` any step."""

    ahead: np.ndarray  # (S, J): step c + 1 + j, clipped to the last
    beyond: np.ndarray  # (S, J, 1): c + 1 + j is past the last step
    reuse_run: np.ndarray  # (J, 1): j
    ahead_drift: np.ndarray  # (R, Br, S, J, L): the drift table's cell of step c + 1 + j against c
    step_c: np.ndarray  # (1, S, 1): c + 1
    jump_base: np.ndarray  # (R Br, 1, L): where a lane's (S + 1, L) block of the chain's arrays starts
    step_s: np.ndarray  # (S, 1): s
    cell_ids: np.ndarray  # (R, Br, S, L): 0, 1, 2, ... in order
    lane_steps: np.ndarray  # (R, Br, 1, L): where a lane's steps start in (R, Br, S, L) arrays

    @classmethod
    def build(cls, r: int, br: int, steps: int, lyr: int, width: int, span: int) -> _Indices:
        """`width`: the drift table's columns; `span`: J, at most `width - 1` (column j + 1: lag j + 1)."""
        ahead = np.arange(steps)[:, None] + np.arange(1, span + 1)
        clipped = np.minimum(ahead, steps - 1)
        lanes = np.arange(r * br).reshape(r, br, 1, 1, 1)
        cell = ((lanes * steps + clipped[:, :, None]) * lyr + np.arange(lyr)) * width
        return cls(clipped, (ahead >= steps)[:, :, None], np.arange(span)[:, None],
                   cell + np.arange(1, span + 1)[:, None], np.arange(1, steps + 1)[None, :, None],
                   np.arange(r * br)[:, None, None] * (steps + 1) * lyr + np.arange(lyr),
                   np.arange(steps)[:, None], np.arange(r * br * steps * lyr).reshape(r, br, steps, lyr),
                   lanes[..., 0] * steps * lyr + np.arange(lyr))


@dataclass
class Decisions:
    """A replay's decisions, each (R, Br, S, L). Lag and gaps are 0 where the block was computed; a gap is 0
    too where no earlier computation exists."""

    actions: np.ndarray  # int8 Action values
    seen: np.ndarray  # the drift the hook would measure (+inf with no cache)
    lags: np.ndarray  # steps since the last computation, c = s - lag
    gaps: np.ndarray  # between the last computation and the one before it, p = c - gap
    gaps2: np.ndarray  # between p and the computation before it
    measured: np.ndarray  # bool: whether the hook pays for measuring the drift
    skips_calls: bool  # the steps not computed skip the whole call (`policy.calls_skipped`, decided once here)


@dataclass
class ReplayResult:
    actions: np.ndarray  # (R, Br, S, L) int8 Action values
    error: np.ndarray  # (R,) accumulated injected error E
    speedup: np.ndarray  # (R,) estimated
    drift: np.ndarray  # (R,) accumulated drift of reused blocks, per block and branch
    psnr: np.ndarray  # (R,) estimated, dB; NaN without calibration
    ssim: np.ndarray  # (R,) estimated
    cost_counts: np.ndarray  # (R, len(COST_TERMS)): `Replayer.cost_counts`

    def counts(self) -> dict[str, int]:
        return {a.name.lower(): int((self.actions == a).sum()) for a in Action}

    def summary(self) -> dict[str, Any]:
        c = self.counts()
        total = sum(c.values())
        return {
            **c,
            "compute_fraction": c["recompute"] / total if total else 1.0,
            "est_speedup": float(np.mean(self.speedup)),
            "est_psnr": float(np.min(self.psnr)),
            "est_ssim": float(np.min(self.ssim)),
            "drift": float(np.max(self.drift)),
        }


def replay(trace: Trace, config: Config) -> ReplayResult:
    check_compatible(trace, config)
    return Replayer(trace).run(config.policy)


def check_compatible(trace: Trace, config: Config) -> None:
    """A config tuned for another model, or measuring drift on other tokens, cannot be judged by this trace."""
    if config.upstream and trace.model and config.upstream != trace.model:
        raise WarpcacheError(f"config is for model {config.upstream!r} but the trace records {trace.model!r}")
    p = config.policy
    k, seed = trace.meta.get("token_subset"), trace.meta.get("token_seed")
    if (k, seed) != (p.token_subset, p.token_seed):
        raise WarpcacheError(
            f"config measures drift on {p.token_subset} tokens (seed {p.token_seed}) but the trace recorded "
            f"{k} tokens (seed {seed}); set policy.token_subset/token_seed to match or re-profile with --tokens"
        )
    check_reach(p, trace.lags)


def check_reach(policy: PolicyConfig, lags: int) -> None:
    """A reuse run longer than the recorded lags needs drift the trace does not hold."""
    if policy.max_consecutive_reuse > lags:
        raise WarpcacheError(
            f"policy.max_consecutive_reuse = {policy.max_consecutive_reuse} needs drift "
            f"{policy.max_consecutive_reuse} steps back, the trace recorded {lags}; "
            f"re-profile with --lags {policy.max_consecutive_reuse}"
        )


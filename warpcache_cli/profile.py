"""Record traces: full-compute runs with an observer on every block call.

The runtime's hooks run with a never-reuse config, so the recorded trajectory is exactly the
uncached one, and drift is measured by the same code, on the same token subset, that the
live policy uses. Everything the replay needs for any config is stored as look-up tables:
drift of each step's input against each of the previous `lags` steps' inputs.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import warpcache_cli
from warpcache_cli import motion, quality, runtime
from warpcache_cli.config import Config
from warpcache_cli.errors import WarpcacheError
from warpcache_cli.measure import timed
from warpcache_cli.models import Request, generate
from warpcache_cli.policy import drift_variants
from warpcache_cli.runtime.adapters import Grid
from warpcache_cli.runtime.session import CacheSession, Decision
from warpcache_cli.trace import DRIFT_VARIANTS, Trace

DEFAULT_LAGS = 8
DEFAULT_SKETCH_TOKENS = 16
WARP_EVERY = 2


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


@dataclass
class _Past:
    """One block's last inputs and residuals for one branch: what drift and reuse error compare against."""

    sketches: deque = field(default_factory=deque)  # (x_sub, r_sub) of previous steps, newest last
    residuals: deque = field(default_factory=deque)  # r_sub of up to 2G + 1 previous steps, for the Gram table
    x: torch.Tensor | None = None  # full input and residual of the previous step
    r: torch.Tensor | None = None
    frame_map: torch.Tensor | None = None
    direction: torch.Tensor | None = None


class Recorder:
    """A `BlockObserver` that turns one full-compute generation into per-block rows."""

    def __init__(self, lags: int, sketch_tokens: int, on_step: Callable[[int], None] | None = None) -> None:
        self.lags, self.sketch_tokens, self.on_step = lags, sketch_tokens, on_step
        self.branches: list[str] = []
        self.rows: dict[tuple[int, int, int], dict[str, Any]] = {}
        self.steps: dict[int, tuple[float, float, float]] = {}
        self.call_seconds: dict[tuple[int, int], float] = {}  # (branch, step) -> wall time of the whole call
        self._past: dict[tuple[str, int], _Past] = {}
        self.token_subset = torch.zeros(0, dtype=torch.long)

    def on_call(self, session: CacheSession, seconds: float) -> None:
        """One whole transformer call (blocks plus everything around them) took `seconds`."""
        if session.step is not None and session.branch in self.branches:
            self.call_seconds[(self.branches.index(session.branch), session.step.step)] = seconds

    def close(self) -> None:
        """Drop the previous step's full tensors once the generation is over: the rows are all a trace needs."""
        self._past.clear()

    def on_block(self, session: CacheSession, layer: int, x: torch.Tensor, residual: torch.Tensor,
                 seconds: float, decision: Decision) -> None:
        step = session.step
        if session.branch not in self.branches:
            self.branches.append(session.branch)
        b = self.branches.index(session.branch)
        if step.step not in self.steps:
            self.steps[step.step] = (step.timestep, step.position, session.motion)
            if self.on_step:
                self.on_step(step.step)
        past = self._past.setdefault((session.branch, layer),
                                     _Past(deque(maxlen=self.lags), deque(maxlen=2 * self.lags + 1)))
        with torch.no_grad():
            row = self._measure(session, x, residual, past)
        row["block_seconds"] = seconds
        self.rows[(b, step.step, layer)] = row

    def _measure(self, session: CacheSession, x: torch.Tensor, r: torch.Tensor, past: _Past) -> dict[str, Any]:
        p = session.config.policy
        idx = session.subset(x.shape[1], x.device)
        self.token_subset = idx.cpu()
        xs, rs = x[:, idx], r[:, idx].float()
        out_norm = (xs.float() + rs).flatten(1).norm(dim=1).clamp_min(1e-12)
        g = self.lags
        row: dict[str, Any] = {
            "drift": np.full((g, len(DRIFT_VARIANTS)), np.nan, np.float32),
            "reuse_err": np.full(g, np.nan, np.float32),
            "x_norm": float(x.float().norm()),
            "r_norm": float(r.float().norm()),
        }
        if self.sketch_tokens:
            row["sketch_in"] = xs[:, : self.sketch_tokens].half().cpu()
            row["sketch_res"] = rs[:, : self.sketch_tokens].half().cpu()
        row["res_dot"], row["out_sq"] = self._gram_row(xs, rs, past.residuals)
        if past.sketches:
            old_x = torch.stack([s[0] for s in reversed(past.sketches)])  # (lags, B, K, C), lag 1 first
            old_r = torch.stack([s[1] for s in reversed(past.sketches)])
            n = len(past.sketches)
            # the live policy takes the largest drift over the batch; so does the table
            d = drift_variants(xs.expand_as(old_x), old_x, DRIFT_VARIANTS).amax(dim=-1)  # (M, lags)
            row["drift"][:n] = d.T.cpu().numpy()
            err = (rs - old_r).flatten(2).norm(dim=-1) / out_norm
            row["reuse_err"][:n] = err.amax(dim=-1).cpu().numpy()
        full_out = (x.float() + r.float()).flatten(1).norm(dim=1).clamp_min(1e-12)
        if past.r is not None:
            row["reuse_err1"] = float(((r.float() - past.r.float()).flatten(1).norm(dim=1) / full_out).max())
            d1 = drift_variants(x, past.x, (("cosine", p.saliency_power), ("l2", 0.0))).amax(dim=-1)
            row["drift1_cos"], row["drift1_l2"] = float(d1[0]), float(d1[1])
            if past.frame_map is not None:
                now_map, _ = motion.frame_maps(x, session.grid, past.direction)
                warped, _ = motion.warp_with_maps(past.r, past.frame_map, now_map, session.grid, session.motion)
                row["warp_err1"] = float(((r.float() - warped.float()).flatten(1).norm(dim=1) / full_out).max())
        grid = session.grid
        # warping is measured on the first branch every WARP_EVERY steps: it is the recorder's costliest part
        measure_next = session.branch == self.branches[0] and (session.step.step + 1) % WARP_EVERY == 0
        warpable = measure_next and grid is not None and grid[0] * grid[1] * grid[2] == x.shape[1]
        past.frame_map, past.direction = motion.frame_maps(x, grid) if warpable else (None, None)
        past.sketches.append((xs.detach(), rs.detach()))
        past.residuals.append(rs.detach())
        past.x, past.r = x.detach(), r.detach()
        return row


    def _gram_row(self, xs: torch.Tensor, rs: torch.Tensor, history: deque) -> tuple[np.ndarray, float]:
        """<r_s, r_{s-j}> for j = 0 .. 2G + 1 and ||x_s + r_s||^2 on the token subset, in float64.

        Any extrapolation's error is a quadratic form in these (the replay's forecast), and it is a
        small difference of large dot products, so float32 would lose it.
        """
        r = rs.double().flatten()
        dots = np.zeros(2 * self.lags + 2)
        dots[0] = float(r @ r)
        if history:
            past = torch.stack(list(reversed(history))).double().flatten(1)  # lag 1 first
            dots[1: len(history) + 1] = (past @ r).cpu().numpy()
        return dots, float((xs.double().flatten() + r).square().sum())


def _assemble(recorders: list[Recorder], references: list[np.ndarray], run_seconds: list[float],
              lags: int) -> dict[str, np.ndarray]:
    branches = recorders[0].branches
    steps = 1 + max(s for rec in recorders for s in rec.steps)
    layers = 1 + max(k[2] for rec in recorders for k in rec.rows)
    runs = len(recorders)
    for i, rec in enumerate(recorders):
        if rec.branches != branches or len(rec.steps) != steps:
            raise WarpcacheError(f"run {i} has branches {rec.branches} and {len(rec.steps)} steps; "
                                 f"run 0 has {branches} and {steps}: all runs of a trace must match")
    shape = (runs, len(branches), steps, layers)
    nan = np.float32(np.nan)
    arrays: dict[str, np.ndarray] = {
        "drift": np.full((*shape, lags, len(DRIFT_VARIANTS)), nan, np.float32),
        "reuse_err": np.full((*shape, lags), nan, np.float32),
        "res_dot": np.zeros((*shape, 2 * lags + 2), np.float64),
        "out_sq": np.zeros(shape, np.float64),
        **{k: np.full(shape, nan, np.float32) for k in
           ("reuse_err1", "warp_err1", "drift1_cos", "drift1_l2", "x_norm", "r_norm", "block_seconds")},
        "call_seconds": np.zeros(shape[:3], np.float32),
        "run_seconds": np.asarray(run_seconds, np.float32),
        "timestep": np.zeros((runs, steps), np.float32),
        "position": np.zeros((runs, steps), np.float32),
        "motion": np.zeros((runs, steps), np.float32),
        "reference": np.stack(references).astype(np.float16),
    }
    sketches: dict[str, list] = {"sketch_in": [], "sketch_res": []} if recorders[0].sketch_tokens else {}
    for r, rec in enumerate(recorders):
        for s, (t, pos, m) in rec.steps.items():
            arrays["timestep"][r, s], arrays["position"][r, s], arrays["motion"][r, s] = t, pos, m
        for (b, s), secs in rec.call_seconds.items():
            arrays["call_seconds"][r, b, s] = secs
        for (b, s, layer), row in rec.rows.items():
            for key, value in row.items():
                if key in arrays:
                    arrays[key][r, b, s, layer] = value
        for key in sketches:
            sketches[key].append(torch.stack([
                torch.stack([torch.stack([rec.rows[(b, s, layer)][key] for layer in range(layers)])
                             for s in range(steps)]) for b in range(len(branches))]))
    for key, parts in sketches.items():
        arrays[key] = torch.stack(parts).numpy()
    return arrays


def call_timer(transformer: torch.nn.Module, on_call: Callable[[float], None]) -> list[Any]:
    """Forward pre/post hooks timing each whole transformer call; returns the handles to remove."""
    start: list[float] = [0.0]

    def pre(module: torch.nn.Module, args: Any, kwargs: Any = None) -> None:
        start[0] = time.perf_counter()

    def post(module: torch.nn.Module, args: Any, output: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        on_call(time.perf_counter() - start[0])

    return [transformer.register_forward_pre_hook(pre), transformer.register_forward_hook(post)]


def build_trace(transformer: torch.nn.Module, session: CacheSession, recorders: list[Recorder],
                references: list[np.ndarray], run_seconds: list[float], **meta: Any) -> Trace:
    """One trace from recorded full-compute generations of one shape: `profile` and auto-profiling both use this.

    `session` is the one that recorded them (its recording config, grid and block count); `meta` adds to the
    metadata (model, prompts, seeds, ...).
    """
    first = recorders[0]
    arrays = _assemble(recorders, references, run_seconds, first.lags)
    arrays["token_subset"] = first.token_subset.numpy().astype(np.int64)
    policy = session.config.policy
    return Trace({
        "model_class": type(transformer).__name__,
        "model_config": _plain_config(transformer),
        "steps": int(arrays["timestep"].shape[1]),
        "grid": list(session.grid) if session.grid else None,
        "device": str(next(transformer.parameters()).device),
        "branches": first.branches,
        "num_blocks": session.num_blocks,
        "token_subset": policy.token_subset,
        "token_seed": policy.token_seed,
        "sketch_tokens": first.sketch_tokens,
        "lags": first.lags,
        "drift_variants": [list(v) for v in DRIFT_VARIANTS],
        "package_version": warpcache_cli.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **meta,
    }, arrays)


def profile(
    pipe: Any,
    requests: list[Request],
    *,
    model_id: str = "",
    tokens: int | None = None,
    token_seed: int = 0,
    sketch_tokens: int = DEFAULT_SKETCH_TOKENS,
    lags: int = DEFAULT_LAGS,
    dtype: str = "float32",
    calibrate: int = 4,
    on_progress: Callable[[int, int], None] | None = None,
) -> Trace:
    """Run each request at full compute and record a trace; `tokens` is the drift subset size.

    `calibrate` live cached runs, spread over the requests in turn, measure the quality the
    replay's estimate is calibrated to.
    """
    if not requests:
        raise WarpcacheError("nothing to profile: give at least one prompt and seed")
    shapes = {(r.steps, r.frames, r.height, r.width) for r in requests}
    if len(shapes) > 1:
        raise WarpcacheError("all requests of one trace must share steps, frames, height and width")
    base = Config.default()
    policy = base.with_policy(warm_up_steps=1000, token_subset=tokens or base.policy.token_subset,
                              token_seed=token_seed)
    transformer = runtime.find_transformer(pipe)
    recorders, refs, run_secs = [], [], []
    for i, req in enumerate(requests):
        rec = Recorder(lags, sketch_tokens, on_step=(lambda s, i=i: on_progress(i, s)) if on_progress else None)
        session = runtime.apply(pipe, policy, observer=rec)
        handles = call_timer(transformer, lambda secs, rec=rec, session=session: rec.on_call(session, secs))
        try:
            start = time.perf_counter()
            frames = generate(pipe, req)
            run_secs.append(time.perf_counter() - start)
        finally:
            for h in handles:
                h.remove()
            runtime.remove(pipe)
        rec.close()
        recorders.append(rec)
        refs.append(frames)
    plain_seconds, block_seconds, block_input = _plain_timing(pipe, transformer, requests[0])
    first = requests[0]
    trace = build_trace(
        transformer, session, recorders, refs, run_secs,
        model=model_id,
        prompts=[r.prompt for r in requests],
        seeds=[r.seed for r in requests],
        guidance=first.guidance,
        resolution={"frames": int(refs[0].shape[0]), "height": int(refs[0].shape[1]), "width": int(refs[0].shape[2])},
        request={"frames": first.frames, "height": first.height, "width": first.width},
        dtype=dtype,
        scheduler=type(getattr(pipe, "scheduler", None)).__name__,
        plain_seconds=plain_seconds,
    )
    trace.arrays["plain_block_seconds"] = block_seconds
    if session.grid is not None:
        trace.meta["warp_seconds"] = _warp_timing(block_input, session.grid)
    if calibrate:
        trace.meta["calibration"] = _calibration(pipe, requests, trace, refs, calibrate, policy)
    return trace


def _plain_timing(pipe: Any, transformer: torch.nn.Module, req: Request
                  ) -> tuple[float, np.ndarray, torch.Tensor | None]:
    """Wall time of an unhooked run, each block's mean time in it (what skipping a block really saves),
    and the last block input seen (a tensor of the right shape to time the warp on).

    Block times recorded under the profiler's hooks run slow (the measurements between blocks
    evict caches), so the replay's speed estimate uses these instead.
    """
    blocks = runtime.find_blocks(transformer)
    totals, calls, starts = np.zeros(len(blocks)), np.zeros(len(blocks)), [0.0]

    seen: list[torch.Tensor] = []

    def pre(module: torch.nn.Module, args: Any) -> None:
        if args and isinstance(args[0], torch.Tensor):
            seen[:] = [args[0]]
        starts[0] = time.perf_counter()

    def post(i: int, module: torch.nn.Module, args: Any, output: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        totals[i] += time.perf_counter() - starts[0]
        calls[i] += 1

    handles = [h for i, b in enumerate(blocks)
               for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(functools.partial(post, i)))]
    try:
        start = time.perf_counter()
        generate(pipe, req)
        seconds = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    return seconds, (totals / np.maximum(calls, 1)).astype(np.float32), seen[0] if seen else None


def _warp_timing(x: torch.Tensor | None, grid: Grid, repeats: int = 20) -> dict[str, float] | None:
    """Seconds the live hooks spend on warping, timed directly: one warp (map the input, shift the
    residual) and one map of a computed block's input kept for a later warp.

    Fitting these from whole-run timings alongside the other costs is ill-conditioned (the
    calibration's few runs vary by more than these costs), so they are measured and held fixed.
    """
    if x is None or x.dim() != 3 or x.shape[1] != grid[0] * grid[1] * grid[2]:
        return None
    with torch.no_grad():
        cached_map, direction = motion.frame_maps(x, grid)
        _sync(x)
        start = time.perf_counter()
        for _ in range(repeats):
            now_map, _ = motion.frame_maps(x, grid, direction)
            motion.warp_with_maps(x, cached_map, now_map, grid, 1.0)
        _sync(x)
        warp = (time.perf_counter() - start) / repeats
        start = time.perf_counter()
        for _ in range(repeats):
            motion.frame_maps(x, grid)
        _sync(x)
        mapped = (time.perf_counter() - start) / repeats
    return {"warped block": warp, "block mapped for warping": mapped}


def calibration_configs(trace: Trace, n: int, base: Config) -> list[Config]:
    """Configs from mild to aggressive, with thresholds at quantiles of the recorded lag-1 drift."""
    d = trace.arrays["drift"][0, :, 1:, :, 0, DRIFT_VARIANTS.index(("cosine", 1.0))]
    quantiles = np.linspace(0.3, 0.97, n)
    out = []
    for i, q in enumerate(quantiles):
        t = float(max(np.nanquantile(d, q), 1e-6))
        out.append(base.with_policy(
            drift_metric="cosine", saliency_power=1.0, base_threshold=t, min_threshold=t,
            warp_threshold=t / 2 if i % 2 else 0.0,  # 0: no warping
            forecast=0.0 if i % 2 else 1.0,  # the quality model sees plain, warped and extrapolated reuse
            motion_scale=0.0, phase_multipliers=(1.0, 1.0),
            warm_up_steps=2, max_consecutive_reuse=min(trace.lags, 2 + i),
        ))
    return out


def _calibration(pipe: Any, requests: list[Request], trace: Trace, references: list[np.ndarray], n: int,
                 base: Config) -> dict[str, Any]:
    """Live runs of a few configs, the i-th on request i mod R: the points the replay's quality model is fit to.

    Spreading them over the requests lets the fit see how much quality varies between prompts and
    seeds, not only between configs.
    """
    configs = calibration_configs(trace, n, base.with_policy(warm_up_steps=2))
    runs = [i % len(requests) for i in range(len(configs))]
    psnr, ssim, seconds = [], [], []
    for cfg, run in zip(configs, runs):
        runtime.apply(pipe, cfg)
        try:
            frames, secs = timed(pipe, requests[run])
        finally:
            runtime.remove(pipe)
        q = quality.compare(frames, references[run])
        psnr.append(q["psnr"] if np.isfinite(q["psnr"]) else None)
        ssim.append(q["ssim"])
        seconds.append(secs)
    return {"configs": [c.to_dict() for c in configs], "runs": runs, "psnr": psnr, "ssim": ssim, "seconds": seconds}


def _plain_config(module: torch.nn.Module) -> dict[str, Any]:
    cfg = getattr(module, "config", None)
    if cfg is None:
        return {}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items()
            if isinstance(v, (int, float, str, bool, list, tuple, type(None))) and not k.startswith("_")}

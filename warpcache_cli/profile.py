"""Record traces: full-compute runs with an observer on every block call.

The runtime's hooks run with a never-reuse config, so the recorded trajectory is exactly the
uncached one, and drift is measured by the same code, on the same token subset, that the
live policy uses. Everything the replay needs for any config is stored as look-up tables:
drift of each step's input against each of the previous `lags` steps' inputs.
"""

from __future__ import annotations

import functools
import time
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
from warpcache_cli.policy import saliency_drift
from warpcache_cli.runtime.adapters import Grid
from warpcache_cli.runtime.session import CacheSession, Decision
from warpcache_cli.trace import DRIFT_VARIANTS, Trace

DEFAULT_LAGS = 8
DEFAULT_SKETCH_TOKENS = 16
WARP_EVERY = 3


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


@dataclass
class _History:
    """One CFG branch's past, all blocks together: what drift, reuse error and warp error compare against.

    Sketches sit in ring buffers, the current step's in slot `steps % slots`: `lags + 1` steps of
    inputs, `2 lags + 2` of residuals (the Gram table's reach). Each is written once, by the block
    hook, and never copied; the rings fill in slot order and only filled slots are read, so they
    start uninitialised. What later steps need of a step (unit tokens, norms) is kept, not recomputed.
    """

    x: torch.Tensor  # (L, lags + 1, B, K, C) input sketches, float32
    unit: torch.Tensor  # (L, lags + 1, B, K, C) input sketch tokens scaled to unit length
    weight: torch.Tensor  # (L, lags + 1, B, K) input sketch token norms, clamped: the saliency weights
    norm: torch.Tensor  # (L, lags + 1, B) input sketch norms, clamped: the L2 drift's denominator
    r: torch.Tensor  # (L, 2 lags + 2, B, K, C) residual sketches
    r_sq: torch.Tensor  # (L, 2 lags + 2, B) their squared norms, float64 as the Gram table's differences need
    full: list[torch.Tensor | None]  # per block, the last step's full input and residual, stacked (B, 2, N, C)
    frame_map: list[torch.Tensor | None]  # per block, the last step's warp map and direction, where the
    direction: list[torch.Tensor | None]  # next step measures warping
    token_norm: torch.Tensor | None = None  # (L, B, N) the last step's full input token norms, clamped
    full_norm: torch.Tensor | None = None  # (L, B) and whole input norms, clamped
    steps: int = 0  # calls analysed

    @classmethod
    def empty(cls, blocks: int, lags: int, sketch: torch.Size, device: torch.device) -> _History:
        def ring(slots: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.empty(blocks, slots, *shape, device=device, dtype=dtype)

        g = lags + 1
        return cls(ring(g, *sketch), ring(g, *sketch), ring(g, *sketch[:-1]), ring(g, *sketch[:-2]),
                   ring(2 * g, *sketch), ring(2 * g, *sketch[:-2], dtype=torch.float64),
                   *([None] * blocks for _ in range(3)))

    def slot(self, ring: torch.Tensor, lag: int = 0) -> int:
        """Where the step `lag` steps before the current one sits in `ring`."""
        return (self.steps - lag) % ring.shape[1]


@dataclass
class _Warp:
    """A block whose warp error the call measures, once the call's shifts are estimated together."""

    layer: int
    past_map: torch.Tensor  # the previous step's map and residual
    past_r: torch.Tensor
    map: torch.Tensor  # this step's map, reduced on the previous step's direction


@dataclass
class _Call:
    """What the block hooks of one transformer call kept for the analysis once the call is over."""

    branch: int
    step: int
    grid: tuple[int, int, int] | None
    power: float  # the policy's saliency power, for the full-tensor cosine drift
    seconds: list[float] = field(default_factory=list)
    parts: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per block: reductions of its full tensors
    warps: list[_Warp] = field(default_factory=list)


class Recorder:
    """A `BlockObserver` that turns one full-compute generation into per-block rows.

    Blocks of the built-in model take milliseconds, so the count of tensor operations matters more
    than their size: the block hook only copies the token sketches into the history and reduces its
    full tensors while they are in cache (a few norms and dot products); everything else (lag
    tables, ratios, drift weighting, warp shifts) runs batched over the blocks once the transformer
    call is over (`on_call`, `close`), off the block timings.
    """

    def __init__(self, lags: int, sketch_tokens: int, on_step: Callable[[int], None] | None = None) -> None:
        self.lags, self.sketch_tokens, self.on_step = lags, sketch_tokens, on_step
        self.branches: list[str] = []
        self.rows: dict[tuple[int, int], dict[str, Any]] = {}  # (branch, step) -> arrays over blocks, (L, ...)
        self.steps: dict[int, tuple[float, float, float]] = {}
        self.call_seconds: dict[tuple[int, int], float] = {}  # (branch, step) -> wall time of the whole call
        self._history: dict[int, _History] = {}
        self._call: _Call | None = None
        self.token_subset = torch.zeros(0, dtype=torch.long)

    def on_call(self, session: CacheSession, seconds: float) -> None:
        """One whole transformer call (blocks plus everything around them) took `seconds`: analyse its blocks."""
        if session.step is not None and session.branch in self.branches:
            self.call_seconds[(self.branches.index(session.branch), session.step.step)] = seconds
        self._flush()

    def close(self) -> None:
        """Analyse the last call if `on_call` did not, then drop the history: the rows are all a trace needs."""
        self._flush()
        self._history.clear()

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
        if self._call is not None and (self._call.branch, self._call.step) != (b, step.step):
            self._flush()  # a call that ended without `on_call`
        if self._call is None:
            self._call = _Call(b, step.step, session.grid, session.config.policy.saliency_power)
        with torch.no_grad():
            self._capture(session, self._call, layer, x.detach(), residual.detach())
        self._call.seconds.append(seconds)

    def _capture(self, session: CacheSession, call: _Call, layer: int, x: torch.Tensor, r: torch.Tensor) -> None:
        """The block's part: its sketches into the history, reductions of its full tensors, its warp maps.

        Blocks of the built-in model take milliseconds, so each full-tensor pass counts: input and
        residual are stacked once (the copy the history keeps) and reduced together, and whatever is
        arithmetic on the reductions waits for `_flush`, batched over the blocks.
        """
        idx = session.subset(x.shape[1], x.device)
        h = self._history.get(call.branch)
        if h is None:
            self.token_subset = idx.cpu()
            h = self._history[call.branch] = _History.empty(
                session.num_blocks, self.lags, torch.Size((x.shape[0], len(idx), x.shape[2])), x.device)
        xr = torch.stack([x, r], dim=1).float()  # (B, 2, N, C)
        xf, rf = xr[:, 0], xr[:, 1]
        x_sketch = torch.index_select(xf, 1, idx, out=h.x[layer, h.slot(h.x)])
        r_sketch = h.r[layer, h.slot(h.r)] = rf.index_select(1, idx)
        part = {"norms": torch.linalg.vector_norm(xr.flatten(2), dim=-1),  # (B, 2): ||x||, ||r||
                "x_dot_r": torch.linalg.vecdot(xf.flatten(1), rf.flatten(1)),  # for ||x + r||
                "token_norm": torch.linalg.vector_norm(xf, dim=-1),  # (B, N)
                # x.r on the sketch, for ||x + r||^2 of the Gram table's denominator: a float32 dot while
                # both are in cache, where a float64 pass over the sketches later costs as much as a block
                "sketch_xr": torch.linalg.vecdot(x_sketch.flatten(1), r_sketch.flatten(1))}
        past = h.full[layer]
        if past is not None:
            part["token_dot"] = torch.linalg.vecdot(xf, past[:, 0])  # (B, N): per-token cosines' numerators
            part["change"] = torch.linalg.vector_norm((xr - past).flatten(2), dim=-1)  # (B, 2): L2 drift, reuse
            if h.frame_map[layer] is not None:
                now, _ = motion.frame_maps(x, call.grid, h.direction[layer])
                call.warps.append(_Warp(layer, h.frame_map[layer], past[:, 1], now))
        grid = call.grid
        # warping is measured on the first branch every WARP_EVERY steps: it is the recorder's costliest part
        measure_next = call.branch == 0 and (call.step + 1) % WARP_EVERY == 0
        warpable = measure_next and grid is not None and grid[0] * grid[1] * grid[2] == x.shape[1]
        h.frame_map[layer], h.direction[layer] = motion.frame_maps(x, grid) if warpable else (None, None)
        h.full[layer] = xr
        call.parts.append(part)

    def _flush(self) -> None:
        """The call's part, all blocks at once: full-tensor ratios, lag tables, warp errors; rows as numpy."""
        call, self._call = self._call, None
        if call is None:
            return
        h = self._history[call.branch]
        with torch.no_grad():
            parts = {key: torch.stack([p[key] for p in call.parts]) for key in call.parts[0]}
            full_norm, r_norm = parts["norms"].unbind(-1)  # (L, B)
            out_norm = (full_norm.square() + r_norm.square() + 2 * parts["x_dot_r"]).clamp_min(0).sqrt()
            out_norm = out_norm.clamp_min(1e-12)
            token_norm = parts["token_norm"].clamp_min(1e-12)
            row = {"x_norm": full_norm.norm(dim=-1), "r_norm": r_norm.norm(dim=-1),
                   **self._lag_tables(h, parts["sketch_xr"])}
            if "change" in parts:  # the largest over the batch, as everywhere in the trace
                l2, reuse = parts["change"].unbind(-1)
                cos = parts["token_dot"] / (token_norm * h.token_norm)
                row["reuse_err1"] = (reuse / out_norm).amax(dim=-1)
                row["drift1_cos"] = saliency_drift(cos, h.token_norm, call.power).amax(dim=-1)
                row["drift1_l2"] = (l2 / h.full_norm).amax(dim=-1)
            if call.warps:
                row["warp_err1"] = self._warp_errors(call, h, out_norm)
            h.token_norm, h.full_norm = token_norm, full_norm.clamp_min(1e-12)
            h.steps += 1
            self.rows[(call.branch, call.step)] = {
                "block_seconds": np.asarray(call.seconds, np.float32), **{k: v.cpu().numpy() for k, v in row.items()}}

    def _lag_tables(self, h: _History, x_dot_r: torch.Tensor) -> dict[str, torch.Tensor]:
        """The call's sketches against the previous steps', all blocks: drift and reuse error for `lags`
        steps back, the Gram table of residuals for `2 lags + 1`.

        Drift is `policy.drift_variants`'s arithmetic bit for bit, so the lag-1 drift is what the
        live policy measures on the same trajectory. Reuse error comes from the Gram table
        (||a - b||^2 = a.a + b.b - 2 a.b), so residual sketches are read once. The dots are float32: float64
        sketches cost 10% more time and moved no replayed PSNR estimate by more than 0.03 dB (120 configs).
        Each block's filled slots are compared at once (the current one too: cheaper than leaving it
        out), then put in lag order.
        """
        xs, rs = h.x[:, h.slot(h.x)], h.r[:, h.slot(h.r)]  # (L, B, K, C)
        norm = xs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        unit = torch.div(xs, norm, out=h.unit[:, h.slot(h.x)])
        h.weight[:, h.slot(h.x)] = norm[..., 0]
        h.norm[:, h.slot(h.x)] = xs.flatten(-2).norm(dim=-1).clamp_min(1e-12)
        fx, fr = (slice(0, min(h.steps + 1, ring.shape[1])) for ring in (h.x, h.r))  # rings fill in slot order
        # block by block: one block's slots stay in cache, all blocks' do not (measured 2-3x slower)
        l2, cos, dots = (torch.stack(t) for t in zip(*(
            ((h.x[i, fx] - xs[i]).flatten(-2).norm(dim=-1),  # (slots, B)
             (h.unit[i, fx] * unit[i]).sum(dim=-1),  # (slots, B, K)
             torch.stack([h.r[i, fr, b].flatten(1) @ rs[i, b].flatten() for b in range(rs.shape[1])], dim=-1))
            for i in range(len(xs)))))
        h.r_sq[:, h.slot(h.r)] = r_sq = dots[:, h.slot(h.r)]  # (L, B)
        out_sq = h.norm[:, h.slot(h.x)].double().square() + r_sq + 2 * x_dot_r.double()  # (L, B): ||x + r||^2
        g, n = self.lags, min(h.steps, self.lags)
        gram = [h.slot(h.r, j) for j in range(min(h.steps, 2 * g + 1) + 1)]
        row = {"drift": xs.new_full((len(xs), g, len(DRIFT_VARIANTS)), torch.nan),
               "reuse_err": xs.new_full((len(xs), g), torch.nan),
               "res_dot": rs.new_zeros((len(xs), 2 * g + 2)), "out_sq": out_sq.sum(dim=-1)}
        row["res_dot"][:, : len(gram)] = dots[:, gram].sum(dim=-1)  # summed over the batch
        if self.sketch_tokens:
            row["sketch_in"] = xs[:, :, : self.sketch_tokens].half().cpu()
            row["sketch_res"] = rs[:, :, : self.sketch_tokens].half().cpu()
        if n:
            d = torch.stack([l2 / h.norm[:, fx] if metric == "l2" else
                             saliency_drift(cos, h.weight[:, fx], power) for metric, power in DRIFT_VARIANTS],
                            dim=-1)  # (L, slots, B, M)
            # the live policy takes the largest drift over the batch; so does the table
            row["drift"][:, :n] = d.amax(dim=2)[:, [h.slot(h.x, lag) for lag in range(1, n + 1)]]
            back = [h.slot(h.r, lag) for lag in range(1, n + 1)]
            err_sq = (r_sq[:, None] + h.r_sq[:, back] - 2 * dots[:, back]).clamp_min(0)  # (L, n, B)
            row["reuse_err"][:, :n] = (err_sq.sqrt() / out_sq.sqrt().clamp_min(1e-12)[:, None]).amax(dim=-1)
        return row

    def _warp_errors(self, call: _Call, h: _History, out_norm: torch.Tensor) -> torch.Tensor:
        """||r - warp(r_prev)|| / ||x + r|| of the measured blocks (NaN elsewhere), shifts estimated in one batch."""
        past_maps, maps = torch.cat([w.past_map for w in call.warps]), torch.cat([w.map for w in call.warps])
        shifts = motion.estimate_shift(past_maps, maps).mean(dim=1).split(len(call.warps[0].map))  # (B, 2) each
        out = out_norm.new_full((len(out_norm),), torch.nan)
        for w, shift in zip(call.warps, shifts):
            warped, _ = motion.warp_by_shift(w.past_r, shift, call.grid, self.steps[call.step][2])
            r = h.full[w.layer][:, 1]
            out[w.layer] = ((r - warped.float()).flatten(1).norm(dim=1) / out_norm[w.layer]).max()
        return out


def _assemble(recorders: list[Recorder], references: list[np.ndarray], run_seconds: list[float],
              lags: int) -> dict[str, np.ndarray]:
    branches = recorders[0].branches
    steps = 1 + max(s for rec in recorders for s in rec.steps)
    layers = max(len(row["x_norm"]) for rec in recorders for row in rec.rows.values())
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
        for (b, s), row in rec.rows.items():
            for key, value in row.items():
                if key in arrays:
                    arrays[key][r, b, s] = value
        for key in sketches:
            sketches[key].append([[rec.rows[(b, s)][key] for s in range(steps)] for b in range(len(branches))])
    for key, parts in sketches.items():
        arrays[key] = np.asarray(parts)
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
    calibrate: int = 6,
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
    """Configs from mild to aggressive, with thresholds at quantiles of the recorded lag-1 drift, and every
    third a fixed schedule (the threshold above all recorded drift), the shape tuned configs often take.

    The schedules are what lets the speed fit tell a drift measurement from a reuse: in drift-driven
    runs nearly every call after warm-up is measured, whether it reuses or not.
    """
    d = trace.arrays["drift"][0, :, 1:, :, 0, DRIFT_VARIANTS.index(("cosine", 1.0))]
    quantiles = np.linspace(0.3, 0.97, n)
    out = []
    for i, q in enumerate(quantiles):
        if i % 3 == 2:  # every 3rd, 4th, ... step, first-order forecast, then second-order
            k = i // 3
            t, warp, forecast, curvature, reuse = float(np.nanmax(d)), 0.0, 1.0, 0.5 * (k % 2), 2 + k
        else:  # the quality model sees plain, warped and extrapolated reuse, first and second order
            t, warped = float(max(np.nanquantile(d, q), 1e-6)), i % 2 == 1
            warp, forecast, reuse = t / 2 if warped else 0.0, 0.0 if warped else 1.0, 2 + i
            curvature = 0.5 if i % 4 == 0 and i else 0.0
        out.append(base.with_policy(
            drift_metric="cosine", saliency_power=1.0, base_threshold=t, min_threshold=t,
            warp_threshold=warp, forecast=forecast, forecast_curvature=curvature,  # warp 0: no warping
            motion_scale=0.0, phase_multipliers=(1.0, 1.0),
            warm_up_steps=2, max_consecutive_reuse=min(trace.lags, reuse),
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

"""Record traces: full-compute runs with an observer on every block call.

The runtime's hooks run with a never-reuse config, so the recorded trajectory is exactly the
uncached one, and drift is measured by the same code, on the same token subset, that the
live policy uses. Everything the replay needs for any config is stored as look-up tables:
drift of each step's input against each of the previous `lags` steps' inputs.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import time
from collections.abc import Callable, Iterator
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
from warpcache_cli.policy import drift_ceiling, drift_from_dots, saliency_drift
from warpcache_cli.runtime.adapters import Grid, prediction
from warpcache_cli.runtime.session import CacheSession, Decision
from warpcache_cli.trace import DRIFT_VARIANTS, Trace

DEFAULT_LAGS = 8
DEFAULT_SKETCH_TOKENS = 16
WARP_EVERY = 3
_MOTION_BATCH = 8  # steps whose motion is estimated together, at most (their videos are kept until then)
_CHUNK_BYTES = 64 << 20  # float32 sketches the per-call reductions take at once, at most about this


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


@dataclass
class _History:
    """One CFG branch's recording, all blocks together.

    `full` holds each block's last input and residual in the model's dtype, the recorder's one full-size
    copy: the block hook compares the new tensors against it, then overwrites it in place. `inputs` holds the
    input sketches of the last `lags + 1` calls, a ring each call's new sketches are compared with (by
    `policy.drift`'s own sum of products), so only residual sketches are kept for every step. What they are
    reduced to is written straight into per-step buffers (`steps` slots, capacity doubling when full),
    which `Recorder.close` turns into the trace's tables once the generation is over, every step at once.
    """

    full: torch.Tensor  # (L, B, 2, N, C) each block's last input and residual
    inputs: torch.Tensor  # (G + 1, L, B, K, C) input sketches, call n's in place n mod (G + 1)
    buffers: dict[str, torch.Tensor]  # per step (capacity, ...); see `empty`
    steps: list[int] = field(default_factory=list)  # the step of each call recorded
    frame_map: torch.Tensor | None = None  # (L B, F, H, W) the last call's warp maps and their directions,
    direction: torch.Tensor | None = None  # where this call measures warping
    # float32 room for the products `_vecdot` sums: a block's (B, N, C), and a chunk of blocks' sketches (l, B, K, C)
    products: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls, blocks: int, x: torch.Tensor, k: int, lags: int, sketch_tokens: int) -> _History:
        b, n, c = x.shape
        dev = x.device

        def buffer(*shape: int, dtype: torch.dtype = torch.float32, device: torch.device = dev) -> torch.Tensor:
            return torch.empty(0, *shape, dtype=dtype, device=device)

        chunk = min(blocks, max(1, _CHUNK_BYTES // (b * k * c * 4)))  # blocks `Recorder._reduce_call` takes at once
        products = {"block": torch.empty(b, n, c, device=dev),
                    "ring": torch.empty(chunk, b, k, c, device=dev)}
        return cls(torch.empty(blocks, b, 2, n, c, device=dev, dtype=x.dtype),
                   torch.zeros(lags + 1, blocks, b, k, c, device=dev, dtype=x.dtype), {
                       "dots": buffer(blocks, b, 2, n),  # per-token dots of input and residual with the last step's
                       "token_norm": buffer(blocks, b, 2, n),  # token norms of input and residual
                       "x_dot_r": buffer(blocks, b),
                       "sketch_x_dot_r": buffer(blocks, b),  # input sketch . residual sketch
                       # per token, the input sketch's dots with each sketch in `inputs`, in the ring's order
                       # (its own place: its squared token norms)
                       "ring_dots": buffer(lags + 1, blocks, b, k),
                       "sketch_in": buffer(blocks, b, sketch_tokens, c, dtype=x.dtype),  # what the trace keeps
                       # residual sketches in host memory and the model's dtype
                       "sketch": buffer(blocks, b, k, c, dtype=x.dtype, device=torch.device("cpu"))},
                   products=products)

    def reserve(self, capacity: int) -> int:
        """The slot of the call starting now, making room for it: `capacity` calls at first, then twice as many."""
        n = len(self.steps)
        for name, t in self.buffers.items():
            if n == len(t):
                grown = t.new_empty((max(capacity, 2 * n), *t.shape[1:]))
                grown[:n] = t
                self.buffers[name] = grown
        return n


@dataclass
class _Call:
    """One transformer call being recorded."""

    branch: int
    step: int
    slot: int  # in the branch's per-step buffers
    grid: tuple[int, int, int] | None
    sketch: torch.Tensor  # (L, B, K, C) this call's residual sketches: its slot of the host buffer, or a device copy
    seconds: list[float] = field(default_factory=list)
    past_r: list[torch.Tensor] = field(default_factory=list)  # per block, the last call's residual, when warping


class Recorder:
    """A `BlockObserver` that turns one full-compute generation into per-block rows.

    Blocks of the built-in model take milliseconds, so the count of tensor operations and passes over
    memory matters more than arithmetic. The block hook takes what needs the last call's tensors before it
    overwrites them (per-token dots with them) and what reads the new ones whole while they are in cache
    (token norms, x . r); once the transformer call is over (`on_call`) the sketches, their comparison with
    the last `lags` steps' and the warp shifts run batched over the blocks, and the motion estimate batched
    over steps; everything else, above all the residuals' Gram table over `2 lags + 1` steps, runs once the
    generation is over (`close`), as one batched matrix product over all steps.
    """

    def __init__(self, lags: int, sketch_tokens: int, on_step: Callable[[int], None] | None = None,
                 steps: int = 32) -> None:
        """`steps`: the calls per branch to expect (the buffers grow past them, at the cost of a copy)."""
        self.lags, self.sketch_tokens, self.on_step, self.capacity = lags, sketch_tokens, on_step, steps
        self.branches: list[str] = []
        self.rows: dict[tuple[int, int], dict[str, Any]] = {}  # (branch, step) -> arrays over blocks, (L, ...)
        self.steps: dict[int, tuple[float, float, float]] = {}  # step -> timestep, position, motion
        self._motion_sources: dict[int, torch.Tensor] = {}  # step -> the video of a motion not estimated yet
        self.call_seconds: dict[tuple[int, int], float] = {}  # (branch, step) -> wall time of the whole call
        self._history: dict[int, _History] = {}
        self._call: _Call | None = None
        self.token_subset = torch.zeros(0, dtype=torch.long)
        self._subset = self.token_subset  # on the model's device
        self._power = 1.0  # the policy's saliency power, for the full-tensor cosine drift
        self._outputs: dict[int, torch.Tensor] = {}  # branch -> ring of its last calls' outputs

    def on_call(self, session: CacheSession, seconds: float, output: Any = None) -> None:
        """One whole transformer call (blocks plus everything around them) took `seconds` and returned `output`:
        analyse its blocks, and its output against the last calls'."""
        self._flush()
        if session.step is None or session.branch not in self.branches:
            return
        key = (self.branches.index(session.branch), session.step.step)
        self.call_seconds[key] = seconds
        if output is not None and key in self.rows:
            n = len(self._history[key[0]].steps) - 1  # the branch's calls before this one
            self.rows[key]["call_dot"] = self._call_dots(key[0], n, prediction(output))

    def _call_dots(self, branch: int, n: int, y: torch.Tensor) -> np.ndarray:
        """<y_s, y_{s-j}> for j = 0 .. 2G + 1 (0 before the first call) of the branch's n-th call: the Gram row the
        replay forecasts a skipped call's output from, as `res_dot` is a block's residual's. The outputs of the last
        2G + 2 calls are kept in a ring, float32 products summed in float64 (as the residual Gram)."""
        width = 2 * self.lags + 2
        y = y.detach().reshape(-1).float()
        ring = self._outputs.setdefault(branch, y.new_zeros(width, len(y)))
        ring[n % width] = y
        with torch.no_grad():
            dots = torch.mv(ring, y).double().cpu().numpy()
        lag = np.arange(width)
        return np.where(lag <= n, dots[(n - lag) % width], 0.0)

    def close(self) -> None:
        """The generation is over: turn each branch's buffers into the rows' tables, then drop them."""
        self._flush()
        self._estimate_motion()
        with torch.no_grad():
            for b, h in self._history.items():
                n = len(h.steps)
                buf = {k: v[:n] for k, v in h.buffers.items()}
                # call s's dots at lag j sit at ring place (s - j) mod (G + 1); before step 0 they are masked later
                width = len(h.inputs)  # the ring's G + 1 places
                places = (torch.arange(n)[:, None] - torch.arange(1, width)) % width  # (S, G)
                ring_dots = buf["ring_dots"].cpu()  # the tables are computed where the residual sketches are
                x_dots = ring_dots.gather(1, places[:, :, None, None, None].expand(
                    n, width - 1, *ring_dots.shape[2:])).transpose(1, 2)  # (S, L, G, B, K)
                x_sq = ring_dots[torch.arange(n), torch.arange(n) % width]  # (S, L, B, K)
                rs, x_dot_r = buf["sketch"], buf["sketch_x_dot_r"].cpu()
                # block by block: the temporaries stay small enough for the allocator to reuse, where all
                # blocks' at once are fresh memory, each page faulted in (measured 2x slower on the built-in model)
                tables = [_lag_tables(x_dots[:, i: i + 1], rs[:, i: i + 1].float(), x_sq[:, i: i + 1],
                                      x_dot_r[:, i: i + 1], self.lags)
                          for i in range(rs.shape[1])]
                columns = {key: np.concatenate([t[key] for t in tables], axis=1) for key in tables[0]}
                if self.sketch_tokens:
                    columns["sketch_in"] = buf["sketch_in"].half().cpu().numpy()
                    columns["sketch_res"] = rs[..., : self.sketch_tokens, :].half().cpu().numpy()
                columns.update(_full_tensor_tables(buf["token_norm"], buf["dots"], buf["x_dot_r"], self._power))
                for key, table in columns.items():  # (S, L, ...)
                    for s, row in zip(h.steps, table):
                        self.rows[(b, s)][key] = row
        self._history.clear()
        self._outputs.clear()

    def on_block(self, session: CacheSession, layer: int, x: torch.Tensor, residual: torch.Tensor,
                 seconds: float, decision: Decision) -> None:
        step = session.step
        if session.branch not in self.branches:
            self.branches.append(session.branch)
        b = self.branches.index(session.branch)
        if step.step not in self.steps:
            self.steps[step.step] = (step.timestep, step.position, 0.0)
            if session.motion_source is not None:  # estimated later, several steps in one batch
                self._motion_sources[step.step] = session.motion_source.clone()
                if len(self._motion_sources) == _MOTION_BATCH:
                    self._estimate_motion()
            if self.on_step:
                self.on_step(step.step)
        if self._call is not None and (self._call.branch, self._call.step) != (b, step.step):
            self._flush()  # a call that ended without `on_call`
        if self._call is None:
            if b not in self._history:
                self._subset = session.subset(x.shape[1], x.device)
                self.token_subset = self._subset.cpu()
                self._history[b] = _History.empty(session.num_blocks, x, len(self._subset), self.lags,
                                                  self.sketch_tokens)
                self._power = session.config.policy.saliency_power
            h = self._history[b]
            slot = h.reserve(self.capacity)
            host = h.buffers["sketch"][slot]
            sketch = host if host.device == x.device else torch.empty(host.shape, dtype=host.dtype, device=x.device)
            self._call = _Call(b, step.step, slot, session.grid, sketch)
        call, h = self._call, self._history[self._call.branch]
        buf = h.buffers
        # what needs the last call's tensors, before they are overwritten, and what reads all of the new ones
        # while they are in cache; the sketches at `_flush`. Pipelines run without autograd (`generate` makes
        # sure), so this needs no `no_grad` of its own (20 us a block call)
        if x.requires_grad or residual.requires_grad:  # a caller's own loop that kept autograd on
            x, residual = x.detach(), residual.detach()
        full = h.full[layer]
        xf, rf = x.float(), residual.float()
        if call.slot:
            _vecdot(xf, full[:, 0], h.products["block"], buf["dots"][call.slot, layer, :, 0])
            _vecdot(rf, full[:, 1], h.products["block"], buf["dots"][call.slot, layer, :, 1])
            if h.frame_map is not None:
                call.past_r.append(full[:, 1].clone())
        full[:, 0].copy_(x)
        full[:, 1].copy_(residual)
        torch.linalg.vector_norm(full, dim=-1, dtype=torch.float32, out=buf["token_norm"][call.slot, layer])
        for i in range(len(xf)):  # a dot per sample: vecdot of flat rows makes a product tensor, 3x slower
            torch.dot(xf[i].flatten(), rf[i].flatten(), out=buf["x_dot_r"][call.slot, layer, i])
        call.seconds.append(seconds)

    def _reduce_call(self, call: _Call, h: _History) -> None:
        """The call's sketches and their dots with the ring's, every block's at once from `full`: a third of the
        operations the block hook took for them one block at a time (blocks in chunks, so temporaries stay
        bounded; ring place by place, so the product stays in cache: 10% of the recorder's time)."""
        buf, full, slot = h.buffers, h.full, call.slot
        place = slot % len(h.inputs)
        ring_product = h.products["ring"]
        chunk = len(ring_product)
        for lo in range(0, len(full), chunk):
            hi = min(lo + chunk, len(full))
            ring = h.inputs[:, lo:hi]  # (G + 1, l, B, K, C)
            torch.index_select(full[lo:hi, :, 0], 2, self._subset, out=ring[place])
            torch.index_select(full[lo:hi, :, 1], 2, self._subset, out=call.sketch[lo:hi])
            x_sketch, r_sketch = ring[place].float(), call.sketch[lo:hi].float()  # (l, B, K, C)
            for g in range(len(ring)):  # place by place, so the product stays in cache
                _vecdot(x_sketch, ring[g], ring_product[: hi - lo], buf["ring_dots"][slot, g, lo:hi])
            torch.linalg.vecdot(x_sketch.flatten(2), r_sketch.flatten(2), out=buf["sketch_x_dot_r"][slot, lo:hi])
            buf["sketch_in"][slot, lo:hi].copy_(ring[place, :, :, : self.sketch_tokens])

    def _flush(self) -> None:
        """The call is over: its block times, sketches to host memory, warp errors and maps (batched over blocks)."""
        call, self._call = self._call, None
        if call is None:
            return
        h = self._history[call.branch]
        row: dict[str, Any] = {"block_seconds": np.asarray(call.seconds, np.float32)}
        with torch.no_grad():
            self._reduce_call(call, h)
            slot = h.buffers["sketch"][call.slot]
            if slot.data_ptr() != call.sketch.data_ptr():
                slot.copy_(call.sketch)  # to host memory, all blocks at once
            x = h.full[:, :, 0].flatten(0, 1)  # (L B, N, C)
            grid = call.grid
            if call.past_r:
                row["warp_err1"] = self._warp_errors(call, h).cpu().numpy()
            # warping is measured on the first branch every WARP_EVERY steps: it is the recorder's costliest part
            warpable = grid is not None and grid[0] * grid[1] * grid[2] == x.shape[1]
            measure_next = warpable and call.branch == 0 and (call.step + 1) % WARP_EVERY == 0
            h.frame_map, h.direction = motion.frame_maps(x, grid) if measure_next else (None, None)
        h.steps.append(call.step)
        self.rows[(call.branch, call.step)] = row

    def _motion(self, step: int) -> float:
        if step in self._motion_sources:
            self._estimate_motion()
        return self.steps[step][2]

    def _estimate_motion(self) -> None:
        """The steps' content motion, as the live session estimates it (`content_motion` of the same videos),
        the videos waiting for it in one batch: one at a time took 2 ms a step on the built-in model."""
        sources, self._motion_sources = self._motion_sources, {}
        by_shape: dict[torch.Size, list[int]] = {}
        for step, video in sources.items():
            by_shape.setdefault(video.shape, []).append(step)
        for steps in by_shape.values():
            for step, m in zip(steps, motion.content_motions([sources[s] for s in steps])):
                self.steps[step] = (*self.steps[step][:2], m)

    def _warp_errors(self, call: _Call, h: _History) -> torch.Tensor:
        """||r - warp(r_prev)|| / ||x + r|| of every block, all blocks' shifts estimated in one batch."""
        xr = h.full.float()  # (L, B, 2, N, C)
        now, _ = motion.frame_maps(xr[:, :, 0].flatten(0, 1), call.grid, h.direction)
        shifts = motion.estimate_shift(h.frame_map, now).mean(dim=1)  # (L B, 2)
        warped, _ = motion.warp_by_shift(torch.stack(call.past_r).flatten(0, 1), shifts, call.grid,
                                         self._motion(call.step))
        err = (xr[:, :, 1].flatten(0, 1) - warped.float()).flatten(1).norm(dim=1).view(xr.shape[:2])
        out_norm = _out_norm(h.buffers["token_norm"][call.slot], h.buffers["x_dot_r"][call.slot])
        return (err / out_norm).amax(dim=-1)


def _vecdot(x: torch.Tensor, y: torch.Tensor, product: torch.Tensor, out: torch.Tensor) -> None:
    """`torch.linalg.vecdot(x, y.float(), out=out)` bit for bit (it sums x * y over the last axis), with the product
    in room held for it: freshly allocated each call, its pages were faulted in again each time (the ring's
    dots took 0.9 ms a call on the built-in model)."""
    torch.sum(torch.mul(x, y, out=product), dim=-1, out=out)


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Keep the garbage collector's full passes off everything alive before recording starts.

    The recorder allocates enough Python objects to trigger the collector's oldest-generation passes,
    which walk every object of the model, diffusers and torch: 0.2-0.3 s at random points of a 2 s
    built-in run (measured). What existed before the run is not the recording's garbage, so it is
    frozen for the run's length (`gc.freeze`) and handed back after; a heap the caller froze is left alone.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _out_norm(token_norm: torch.Tensor, x_dot_r: torch.Tensor) -> torch.Tensor:
    """||x + r|| from token norms (..., 2, N) and x . r (...), clamped: what relative errors divide by."""
    sq = token_norm.double().square().sum(dim=(-1, -2))
    return (sq + 2 * x_dot_r.double()).clamp_min(0).sqrt().clamp_min(1e-12)


def _full_tensor_tables(token_norm: torch.Tensor, dots: torch.Tensor, x_dot_r: torch.Tensor, power: float
                        ) -> dict[str, np.ndarray]:
    """Norms, and drift and reuse error to the previous step on full tensors, (S, L); NaN at step 0.

    `token_norm` and `dots` are (S, L, B, 2, N): input and residual token norms, and their per-token dots
    with the previous step's. ||a - b||^2 = a.a + b.b - 2 a.b, summed in float64. The largest over the batch.
    """
    sq = token_norm.double().square().sum(dim=-1)  # (S, L, B, 2): ||x||^2, ||r||^2
    out = {"x_norm": sq[..., 0].sum(dim=-1).sqrt(), "r_norm": sq[..., 1].sum(dim=-1).sqrt()}
    change = (sq[1:] + sq[:-1] - 2 * dots[1:].double().sum(dim=-1)).clamp_min(0).sqrt()  # (S - 1, L, B, 2)
    norm = token_norm[..., 0, :].clamp_min(1e-12)  # (S, L, B, N)
    cos = dots[1:, :, :, 0] / (norm[1:] * norm[:-1])
    nan = torch.full_like(out["x_norm"][:1], torch.nan)
    out["reuse_err1"] = torch.cat([nan, (change[..., 1] / _out_norm(token_norm, x_dot_r)[1:]).amax(dim=-1)])
    out["drift1_cos"] = torch.cat([nan, saliency_drift(cos, norm[:-1], power).amax(dim=-1).double()])
    out["drift1_l2"] = torch.cat([nan, (change[..., 0] / sq[:-1, ..., 0].sqrt().clamp_min(1e-12)).amax(dim=-1)])
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def _lag_tables(x_dots: torch.Tensor, rs: torch.Tensor, x_sq: torch.Tensor, x_dot_r: torch.Tensor, lags: int
                ) -> dict[str, np.ndarray]:
    """Each step's sketches against the previous steps': drift and reuse error for `lags` steps back, the
    Gram table of residuals for `2 lags + 1`; arrays (S, L, ...).

    `x_dots` (S, L, G, B, K) are each input sketch token's dots with the same token 1 .. G steps back, taken at
    each call's end as `policy.drift`'s own `vecdot` takes them (`_vecdot`), so the drift at every lag is what
    the live policy would measure between the same two inputs, bit for bit; `rs` (S, L, B, K, C) the residuals
    on the K subset tokens, `x_sq` (S, L, B, K) the inputs' squared token norms, `x_dot_r` (S, L, B) their dots
    with the residuals.
    The residuals' dots over all pairs of steps are one batched matrix product, which reads each sketch once
    where comparing step by step reads it again for each lag. The products are float32, their differences
    float64: float64 sketches cost 10% more time and moved no replayed PSNR estimate by more than 0.03 dB
    (120 configs). The live policy takes the largest drift over the batch; so do the tables.
    """
    steps, g = len(rs), lags
    sq = x_sq.permute(1, 2, 3, 0)  # (L, B, K, S)
    flat = rs.flatten(-2).permute(1, 2, 0, 3)  # (L, B, S, K C)
    gram = (flat @ flat.transpose(-1, -2)).double()  # (L, B, S, S): <r_s, r_t>
    back = torch.arange(steps)[:, None] - torch.arange(2 * g + 2)  # (S, J): step s - j
    valid, back = back >= 0, back.clamp_min(0)
    lags_back = back[:, 1: g + 1]  # (S, G)
    dots = x_dots.permute(1, 3, 0, 2, 4).contiguous()  # (L, B, S, G, K)
    now, past = (t.permute(0, 1, 3, 4, 2).contiguous() for t in (sq[..., None].expand(*sq.shape, g),
                                                                 sq[..., lags_back]))  # (L, B, S, G, K)
    drift = drift_from_dots(dots, now, past, DRIFT_VARIANTS).amax(dim=2).permute(1, 2, 3, 0)  # (L, S, G, M)
    drift[:, ~valid[:, 1: g + 1]] = torch.nan  # before step 0
    pairs = gram.gather(-1, back.expand(*gram.shape[:-1], 2 * g + 2)) * valid  # (L, B, S, J): <r_s, r_{s - j}>
    r_sq = pairs[..., 0]
    x_dot_r = x_dot_r.double().permute(1, 2, 0)
    out_sq = sq.double().sum(dim=2) + r_sq + 2 * x_dot_r  # (L, B, S): ||x_s + r_s||^2
    err_sq = (r_sq[..., None] + r_sq[..., lags_back] - 2 * pairs[..., 1: g + 1]).clamp_min(0)
    reuse = (err_sq.sqrt() / out_sq.sqrt().clamp_min(1e-12)[..., None]).amax(dim=1).float()  # (L, S, G)
    reuse[:, ~valid[:, 1: g + 1]] = torch.nan
    rows = {"drift": drift.transpose(0, 1), "reuse_err": reuse.transpose(0, 1),
            "res_dot": pairs.sum(dim=1).transpose(0, 1), "out_sq": out_sq.sum(dim=1).transpose(0, 1)}
    return {k: v.cpu().numpy() for k, v in rows.items()}


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
        "call_dot": np.zeros((*shape[:3], 2 * lags + 2), np.float64),
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


def call_timer(transformer: torch.nn.Module, on_call: Callable[[float, Any], None]) -> list[Any]:
    """Forward pre/post hooks timing each whole transformer call, then given its seconds and output; returns the
    handles to remove."""
    start: list[float] = [0.0]

    def pre(module: torch.nn.Module, args: Any, kwargs: Any = None) -> None:
        start[0] = time.perf_counter()

    def post(module: torch.nn.Module, args: Any, output: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        on_call(time.perf_counter() - start[0], output)

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
        rec = Recorder(lags, sketch_tokens, on_step=(lambda s, i=i: on_progress(i, s)) if on_progress else None,
                       steps=req.steps)
        session = runtime.apply(pipe, policy, observer=rec)
        handles = call_timer(transformer, lambda secs, out, rec=rec, session=session: rec.on_call(session, secs, out))
        try:
            with _frozen_heap():
                start = time.perf_counter()
                frames = generate(pipe, req)
                rec.close()  # the lag tables: recording's cost, so inside the timing
                run_secs.append(time.perf_counter() - start)
        finally:
            for h in handles:
                h.remove()
            runtime.remove(pipe)
        recorders.append(rec)
        refs.append(frames)
    plain_seconds, block_seconds, call_seconds, block_input = _plain_timing(pipe, transformer, requests[0])
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
        plain_call_seconds=call_seconds,
    )
    trace.arrays["plain_block_seconds"] = block_seconds
    if session.grid is not None:
        trace.meta["warp_seconds"] = _warp_timing(block_input, session.grid)
    if calibrate:
        trace.meta["calibration"] = _calibration(pipe, requests, trace, refs, calibrate, policy)
    return trace


def _plain_timing(pipe: Any, transformer: torch.nn.Module, req: Request
                  ) -> tuple[float, np.ndarray, float, torch.Tensor | None]:
    """Wall time of an unhooked run, each block's mean time in it (what skipping a block really saves), the mean
    time of a whole transformer call (what skipping a call saves), and the last block input seen (a tensor of
    the right shape to time the warp on).

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

    call_seconds: list[float] = []
    handles = [h for i, b in enumerate(blocks)
               for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(functools.partial(post, i)))]
    handles += call_timer(transformer, lambda secs, out: call_seconds.append(secs))
    try:
        start = time.perf_counter()
        generate(pipe, req)
        seconds = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    return (seconds, (totals / np.maximum(calls, 1)).astype(np.float32), float(np.mean(call_seconds or [0.0])),
            seen[0] if seen else None)


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
    third a fixed schedule (the threshold at the largest drift there can be), the shape tuned configs often take;
    every other schedule skips the calls it does not compute (`skip_calls`).

    The schedules are what lets the speed fit tell a drift measurement from a reuse: they measure none,
    where drift-driven runs measure at nearly every call after warm-up, whether they reuse or not. Those that
    skip calls calibrate what a skipped call saves and how its output's forecast error maps to PSNR.
    """
    d = trace.arrays["drift"][0, :, 1:, :, 0, DRIFT_VARIANTS.index(("cosine", 1.0))]
    quantiles = np.linspace(0.3, 0.97, n)
    out = []
    for i, q in enumerate(quantiles):
        skip = False
        if i % 3 == 2:  # every 3rd, 4th, ... step: first order, by blocks and by whole calls, then second order
            k = i // 3
            t, warp, forecast, curvature, reuse = drift_ceiling("cosine"), 0.0, 1.0, 0.5 * (k % 4 == 2), 2 + k
            skip = k % 2 == 1
        else:  # the quality model sees plain, warped and extrapolated reuse, first and second order
            t, warped = float(max(np.nanquantile(d, q), 1e-6)), i % 2 == 1
            warp, forecast, reuse = t / 2 if warped else 0.0, 0.0 if warped else 1.0, 2 + i
            curvature = 0.5 if i % 4 == 0 and i else 0.0
        out.append(base.with_policy(
            drift_metric="cosine", saliency_power=1.0, base_threshold=t, min_threshold=t,
            warp_threshold=warp, forecast=forecast, forecast_curvature=curvature,  # warp 0: no warping
            motion_scale=0.0, phase_multipliers=(1.0, 1.0),
            warm_up_steps=2, max_consecutive_reuse=min(trace.lags, reuse), skip_calls=skip,
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

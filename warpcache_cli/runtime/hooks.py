"""diffusers `ModelHook`s that run the policy inside a live transformer.

`StepHook` sits on the transformer: it reads the timestep, CFG branch (the pipeline's
`cache_context`), token grid and content motion once per call, and with `policy.skip_calls` skips
the calls a fixed schedule does not compute, returning their forecast output. `BlockHook` sits on each
block: it measures drift on the token sketch, asks the policy, and either runs the block
(storing its residual) or really skips it, returning `x + residual` (warped if asked).
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager
from torch import nn

from warpcache_cli import motion
from warpcache_cli.policy import Action, choose, drift, drift_ceiling, measures_drift, recomputes
from warpcache_cli.runtime.adapters import Adapter, BlockIO, prediction, with_prediction
from warpcache_cli.runtime.session import CALL, BlockState, CacheSession, Decision
from warpcache_cli.runtime.steps import timestep_value
from warpcache_cli.store import FeatureKey


@functools.lru_cache(maxsize=64)
def _param_names(fn: Callable[..., Any]) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(fn).parameters if p not in ("self", "args", "kwargs"))


def _named(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    named = dict(zip(_param_names(fn), args))
    named.update(kwargs)
    return named


class _ContextSlot(BaseState):
    """Empty state: the StateManager exists only so `cache_context(name)` reaches this hook."""

    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class _ResidualCache:
    """What a cached unit (a block, or a whole transformer call) stores when it runs and serves when it does not:
    its residual at its last computation and the divided differences that forecast it."""

    session: CacheSession
    layer: int

    def _difference_key(self, stream: int, step: int, order: int = 1) -> FeatureKey:
        """Where the divided difference of `order` (1: slope, 2: curvature) computed at `step` is stored."""
        return FeatureKey(self.session.request_id(f"{stream}/d{order}"), self.layer, step)

    def _forecast(self, state: BlockState, residuals: list[torch.Tensor]) -> list[torch.Tensor]:
        """Cached residuals moved on along their last computations (Newton's forward form, TaylorSeer's idea):

        r_s = r_c + forecast (s - c) d1 + forecast_curvature (s - c)(s - p) d2, with c and p the last two
        computations, d1 = (r_c - r_p) / (c - p) and d2 the second divided difference through the last
        three. A term whose differences are not stored (too few computations, or they did not fit) is left out.
        """
        s, p = self.session, self.session.config.policy
        k, c = s.step.step, state.computed_step
        weights = ((1, p.forecast * (k - c)), (2, p.forecast_curvature * (k - c) * (k - state.previous_step)))
        out = []
        for stream, r in enumerate(residuals):
            for order, weight in weights:
                if not weight:
                    continue
                diff = s.store.get(self._difference_key(stream, c, order))
                if diff is None:  # and none of a higher order either
                    break
                r = torch.add(r, diff.tensor, alpha=weight)
            out.append(r)
        return out

    def _remember(self, state: BlockState, old_keys: list[FeatureKey], residuals: list[torch.Tensor],
                  sketch: torch.Tensor | None, x: torch.Tensor | None, needed: bool = True) -> None:
        """Store the new residuals in place of the old; a residual that does not fit means no reuse next time.

        With forecasting on, the divided differences through the last computations are stored too; they
        need those computations kept, so storing starts a step earlier per order. `x` is a block's input
        (None for a whole call's output); nothing is stored unless `needed`.
        """
        s = self.session
        step, p, grid = s.step.step, s.config.policy, s.grid
        order = 2 if p.forecast_curvature > 0 else 1 if p.forecast > 0 else 0
        # could a later step reuse (or extrapolate from) this?
        needed = needed and step + 1 + order >= p.warm_up_steps
        c, prev_c = state.computed_step, state.previous_step
        fits = True
        for k, (old, r) in enumerate(zip(old_keys, residuals)):
            prev = s.store.get(old) if order and needed else None
            prev_d1 = s.store.get(self._difference_key(k, c)) if order == 2 and needed else None
            s.store.delete(old)
            for o in range(1, order + 1):
                s.store.delete(self._difference_key(k, c, o))
            if needed:
                fits &= s.store.put(FeatureKey(s.request_id(k), self.layer, step), r.detach())
            if fits and prev is not None:  # differences that do not fit only mean a lower order
                d1 = (r.detach() - prev.tensor) / (step - c)
                if s.store.put(self._difference_key(k, step), d1) and prev_d1 is not None:
                    s.store.put(self._difference_key(k, step, 2), (d1 - prev_d1.tensor) / (step - prev_c))
        if x is not None:  # a block's input: what its drift and warp compare against later
            warpable = (needed and grid is not None and grid[0] * grid[1] * grid[2] == x.shape[1]
                        and p.warp_threshold > 0 and self.layer not in p.no_warp_layers)
            if needed and fits and sketch is None:
                sketch = x.index_select(1, s.subset(x.shape[1], x.device))
            state.sketch = sketch.detach() if needed and fits else None
            state.frame_map, state.direction = motion.frame_maps(x, grid) if warpable and fits else (None, None)
        state.previous_step, state.computed_step = c, step
        state.reuse_run = 0


class StepHook(_ResidualCache, ModelHook):
    _is_stateful = True

    def __init__(self, session: CacheSession, adapter: Adapter, forward: Callable[..., Any]) -> None:
        super().__init__()
        self.session, self.adapter, self.forward = session, adapter, forward
        self.context = StateManager(_ContextSlot)
        self._named: dict[str, Any] | None = None
        self.layer = CALL
        self._template: Any = None  # the last computed call's output, whose structure a skipped call returns

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        named = _named(self.forward, args, kwargs)
        video = self.adapter.video(named)
        grid = self.adapter.grid(module, video)
        context = self.context._context  # set by diffusers' cache_context; None when the pipeline gives none
        s = self.session
        # the clean video the model predicted last step (the noisy input before that): fixed now, since by the
        # time a block asks for the motion this call may have replaced the prediction
        source = s.prediction if s.prediction is not None else video
        s.begin_call(timestep_value(named.get("timestep", 0.0)), context, source, grid)
        self._named = named if s.step.call == 0 else None
        return args, kwargs

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Run the call, or skip it where `skip_calls` lets the schedule serve every block: the whole output is then
        forecast from the call's last computations, as a block's residual is (its input taken as zero)."""
        s = self.session
        if s.step is None or not s.skips_calls:
            return self.fn_ref.original_forward(*args, **kwargs)
        p, state = s.config.policy, s.block_state(CALL)
        keys = [FeatureKey(s.request_id(0), CALL, state.computed_step)]
        runs = recomputes(p, s.step.step, 0.0, drift_ceiling(p.drift_metric), state.reuse_run, s.reuse_limit)
        cached = None if runs or self._template is None else s.store.get(keys[0])
        if cached is None:
            out = self._template = self.fn_ref.original_forward(*args, **kwargs)
            self._remember(state, keys, [prediction(out).detach()], None, None)
            return out
        state.reuse_run += 1
        s.skip_call()
        return with_prediction(self._template, self._forecast(state, [cached.tensor])[0])

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        s = self.session
        context = self.context._context
        sigma = getattr(context, "sigma", None)
        if self._named is not None and sigma is not None:
            # flow matching: x_t = (1 - sigma) x_0 + sigma * noise and the model predicts noise - x_0
            pred = prediction(output)
            video = self.adapter.video(self._named)
            velocity = self.adapter.video({**self._named, "hidden_states": pred})
            if video is not None and velocity is not None and video.shape == velocity.shape:
                s.prediction = (video.float() - float(sigma) * velocity.float()).detach()
        self._named = None
        n = getattr(context, "num_inference_steps", None)
        if s.step is not None and n and s.step.step == n - 1:
            s.flush_metrics()
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.session.tracker.reset()
        return module


class BlockHook(_ResidualCache, ModelHook):
    def __init__(self, session: CacheSession, layer: int, io: BlockIO, forward: Callable[..., Any]) -> None:
        super().__init__()
        self.session, self.layer, self.io, self.forward = session, layer, io, forward
        self._out_len = 0

    def _streams(self, named: dict[str, Any]) -> list[torch.Tensor]:
        """The inputs whose residuals are cached: hidden states, and encoder states for dual-stream blocks."""
        streams = [named[self.io.hidden_arg]]
        if self.io.encoder_out is not None:
            streams.append(named[self.io.encoder_arg])
        return streams

    def _outputs(self, out: Any) -> list[torch.Tensor]:
        if self.io.hidden_out is None or isinstance(out, torch.Tensor):
            return [out]
        self._out_len = len(out)
        picked = [out[self.io.hidden_out]]
        if self.io.encoder_out is not None:
            picked.append(out[self.io.encoder_out])
        return picked

    def _pack(self, values: list[torch.Tensor]) -> Any:
        if self.io.hidden_out is None or self._out_len == 0:
            return values[0]
        out: list[Any] = [None] * self._out_len
        out[self.io.hidden_out] = values[0]
        if self.io.encoder_out is not None:
            out[self.io.encoder_out] = values[1]
        return tuple(out)

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        s = self.session
        if s.step is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        cfg = s.config.policy
        named = _named(self.forward, args, kwargs)
        inputs = self._streams(named)
        x = inputs[0]
        state = s.block_state(self.layer)
        subset = s.subset(x.shape[1], x.device)
        usable = state.sketch is not None and state.sketch.shape == (x.shape[0], len(subset), *x.shape[2:])
        if s.step.step < cfg.warm_up_steps or state.reuse_run >= s.reuse_limit or s.skips_calls:
            usable = False  # a forced recompute (a call not skipped runs every block): measuring drift costs time
        d, action, sketch = math.inf, Action.RECOMPUTE, None  # the sketch is taken where used: profiling never does
        if usable:  # otherwise the policy could only say recompute: skip it, and the motion estimate with it
            t, w = s.ceilings(self.layer)
            # where no drift could change the answer it is not measured (NaN in the record) and the policy is
            # asked with drift 0, which it answers as it would any drift the metric can report
            measured = bool(measures_drift(cfg, t, w))
            sketch = x.index_select(1, subset) if measured else None
            d = float(drift(sketch, state.sketch, cfg.drift_metric, cfg.saliency_power).max()) if measured else math.nan
            action = Action(int(choose(cfg, s.step.step, d if measured else 0.0, t, w, state.reuse_run,
                                       s.reuse_limit)))
        keys = [FeatureKey(s.request_id(k), self.layer, state.computed_step) for k in range(len(inputs))]
        cached = [s.store.get(k) for k in keys] if action != Action.RECOMPUTE else []
        if any(c is None for c in cached):
            action = Action.RECOMPUTE
        start = time.perf_counter()
        if action == Action.RECOMPUTE:
            out = self.fn_ref.original_forward(*args, **kwargs)
            residuals = [o - i for o, i in zip(self._outputs(out), inputs)]
            self._remember(state, keys, residuals, sketch, x, needed=not s.skips_calls)
        else:
            residuals = self._forecast(state, [c.tensor for c in cached])
            if action == Action.WARP and s.grid is not None and state.frame_map is not None:
                now_map, _ = motion.frame_maps(x, s.grid, state.direction)
                residuals[0], _ = motion.warp_with_maps(residuals[0], state.frame_map, now_map, s.grid, s.motion)
            out = self._pack([i + r for i, r in zip(inputs, residuals)])
            state.reuse_run += 1
        decision = Decision(s.step.generation, s.branch, s.step.step, self.layer, action, d)
        s.record(decision)
        if s.observer is not None:
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            s.observer.on_block(s, self.layer, x, residuals[0], time.perf_counter() - start, decision)
        return out

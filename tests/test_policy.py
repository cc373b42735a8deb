"""Property tests of the policy's formulas."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from warpcache_cli.config import Config
from warpcache_cli.policy import Action, ceilings, decide, drift, phase_multiplier, schedule_steps, token_subset

unit = st.floats(0.0, 1.0)
policy_fields = st.fixed_dictionaries({
    "base_threshold": st.floats(0.01, 2.0),
    "motion_scale": st.floats(0.0, 20.0),
    "phase_multipliers": st.tuples(st.floats(0.5, 1.5), st.floats(0.5, 1.5)).map(sorted).map(list),
    "phase_breakpoints": st.tuples(st.floats(0.0, 0.49), st.floats(0.51, 1.0)).map(list),
})


def _policy(fields: dict) -> object:
    base = fields["base_threshold"]
    return Config.default().with_policy(**fields, min_threshold=base / 4, warp_threshold=base / 2).policy


@settings(max_examples=200, deadline=None)
@given(policy_fields, unit, unit, unit)
def test_ceilings_fall_with_motion_and_respect_the_floor(fields, m1, m2, f):
    cfg = _policy(fields)
    lo, hi = sorted((m1, m2))
    t_lo, w_lo = ceilings(cfg, lo, f, 0)
    t_hi, w_hi = ceilings(cfg, hi, f, 0)
    assert t_hi <= t_lo + 1e-12 and w_hi <= w_lo + 1e-12
    phase = phase_multiplier(f, cfg.phase_breakpoints, cfg.phase_multipliers)
    assert t_hi >= cfg.min_threshold * phase - 1e-12
    assert w_hi <= t_hi


@settings(max_examples=200, deadline=None)
@given(policy_fields, unit, unit)
def test_phase_is_bounded_and_monotone(fields, f1, f2):
    cfg = _policy(fields)
    lo, hi = sorted((f1, f2))
    p_lo = phase_multiplier(lo, cfg.phase_breakpoints, cfg.phase_multipliers)
    p_hi = phase_multiplier(hi, cfg.phase_breakpoints, cfg.phase_multipliers)
    assert 0.5 <= p_lo <= p_hi <= 1.5


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(1, 40), st.integers(1, 16), st.floats(0.0, 4.0), st.integers(0, 2**31))
def test_drift_is_zero_on_identical_inputs(b, k, c, power, seed):
    x = torch.randn(b, k, c, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(drift(x, x.clone(), "cosine", power), torch.zeros(b), atol=1e-6)
    assert torch.equal(drift(x, x.clone(), "l2", power), torch.zeros(b))
    assert (drift(x + 1.0, x, "l2") > 0).all()


def test_decision_regions():
    cfg = Config.default().policy  # base 0.12, warp 0.06, warm-up 2, max run 3
    args = dict(layer=0, motion=0.0, position=1.0, reuse_run=0, has_cache=True)
    t, w = ceilings(cfg, 0.0, 1.0, 0)
    assert decide(cfg, step=5, drift=w * 0.5, **args) == Action.REUSE
    assert decide(cfg, step=5, drift=(w + t) / 2, **args) == Action.WARP
    assert decide(cfg, step=5, drift=t * 1.01, **args) == Action.RECOMPUTE
    assert decide(cfg, step=1, drift=0.0, **args) == Action.RECOMPUTE  # warm-up
    assert decide(cfg, step=5, drift=0.0, **{**args, "reuse_run": 3}) == Action.RECOMPUTE
    assert decide(cfg, step=5, drift=0.0, **{**args, "has_cache": False}) == Action.RECOMPUTE
    late = Config.default().with_policy(late_start=0.8, late_max_consecutive_reuse=1).policy
    assert decide(late, step=5, drift=0.0, **{**args, "reuse_run": 1, "position": 0.79}) == Action.REUSE
    assert decide(late, step=5, drift=0.0, **{**args, "reuse_run": 1, "position": 0.8}) == Action.RECOMPUTE
    off = Config.default().with_policy(no_warp_layers=[0], layer_multipliers={1: 0.0}).policy
    assert decide(off, step=5, drift=(w + t) / 2, **args) == Action.REUSE
    assert decide(off, step=5, drift=0.0, **{**args, "layer": 1}) == Action.RECOMPUTE


def test_token_subset_is_fixed_and_seeded():
    a, b = token_subset(1000, 64, 3), token_subset(1000, 64, 3)
    assert torch.equal(a, b) and len(a.unique()) == 64
    assert not torch.equal(a, token_subset(1000, 64, 4))
    assert torch.equal(token_subset(10, 64, 0), torch.arange(10))


def test_schedule_steps_names_a_fixed_schedule_and_only_that():
    at = np.linspace(0.0, 1.0, 30)
    fora = Config.default().with_schedule(4, warm_up=1)
    assert schedule_steps(fora.policy, at) == [0, 4, 8, 12, 16, 20, 24, 28]
    late = Config.default().with_schedule(4, warm_up=2, late_start=(25 - 0.5) / 29, late_every=3).policy
    assert schedule_steps(late, at) == [0, 1, 5, 9, 13, 17, 21, 25, 28]
    # drift can decide: a threshold under the cosine drift's reach, warping (which measures drift to choose
    # between reuse and warp), a block that is never reused, or a phase multiplier pulling a threshold down
    for change in ({"base_threshold": 0.1, "min_threshold": 0.1}, {"warp_threshold": 1.0},
                   {"layer_multipliers": {3: 0.0}}, {"phase_multipliers": (0.5, 1.0)}):
        assert schedule_steps(fora.with_policy(**change).policy, at) is None, change

"""Replay: same decisions as the live runtime, budgets and the CI gate."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from conftest import PROMPTS, STEPS
from typer.testing import CliRunner

import warpcache_cli as wc
from warpcache_cli.cli.app import app
from warpcache_cli.errors import WarpcacheError
from warpcache_cli.models import Request, generate
from warpcache_cli.policy import Action, schedule_steps
from warpcache_cli.profile import calibration_configs, profile
from warpcache_cli.replay import COST_TERMS, Replayer
from warpcache_cli.trace import Trace

runner = CliRunner()


def _config(trace, which: int) -> wc.Config:
    return calibration_configs(trace, 4, wc.Config.default())[which]


@pytest.mark.parametrize("which", [1, 3])
def test_live_and_replay_make_the_same_decisions(builtin, small_trace, which):
    cfg = _config(small_trace, which)
    session = wc.apply(builtin, cfg)
    generate(builtin, Request(PROMPTS[0], 0, STEPS))
    wc.remove(builtin)
    live = session.stats.decisions  # execution order: step, branch, block
    actions = Replayer(small_trace).decisions(cfg.policy).actions[0]  # run 0: (branch, step, layer)
    branches = small_trace.meta["branches"]
    agree = [actions[branches.index(d.branch), d.step, d.layer] == d.action for d in live]
    first_reuse = next(i for i, d in enumerate(live) if d.action != Action.RECOMPUTE)
    # on the reference trajectory (up to and including the first reuse) decisions are identical
    assert all(agree[: first_reuse + 1])
    print(f"agreement after the first reuse: {np.mean(agree[first_reuse + 1:]):.1%}")
    assert len(live) == actions.size


@pytest.mark.parametrize("skip_calls", [False, True])
def test_a_schedule_with_a_late_phase_replays_exactly_as_it_runs(builtin, small_trace, skip_calls):
    """`Config.with_schedule`: the schedule alone decides, so live and replay agree at every block and step,
    including the late phase's tighter reuse limit (every 4th step after 1 warm-up, every 2nd from the middle on),
    whether the steps it does not compute serve their blocks or skip the call whole."""
    late_start = (STEPS // 2 - 0.5) / (STEPS - 1)
    cfg = wc.Config.default().with_schedule(4, warm_up=1, forecast=1.0, late_start=late_start, late_every=2,
                                            skip_calls=skip_calls
                                            ).with_policy(token_subset=small_trace.meta["token_subset"])
    session = wc.apply(builtin, cfg)
    generate(builtin, Request(PROMPTS[0], 0, STEPS))
    wc.remove(builtin)
    computed = sorted({d.step for d in session.stats.decisions if d.action == Action.RECOMPUTE})
    assert STEPS == 10 and computed == [0, 4, 6, 8]
    assert schedule_steps(cfg.policy, np.linspace(0.0, 1.0, STEPS)) == computed  # what the tune report shows
    assert not any(np.isfinite(d.drift) for d in session.stats.decisions)  # a schedule measures no drift
    actions = Replayer(small_trace).decisions(cfg.policy).actions[0]
    branches = small_trace.meta["branches"]
    assert all(actions[branches.index(d.branch), d.step, d.layer] == d.action for d in session.stats.decisions)


@pytest.mark.parametrize("threshold", [1e-12, 1.9, 2.0])  # measured, then run; measured, then reused; a schedule
@pytest.mark.parametrize("late_start", [1.0, 0.5])
def test_replay_counts_the_drift_measurements_the_live_hooks_make(builtin, small_trace, threshold, late_start):
    cfg = wc.Config.default().with_policy(base_threshold=threshold, min_threshold=threshold, warp_threshold=0.0,
                                          phase_multipliers=(1.0, 1.0), warm_up_steps=2, max_consecutive_reuse=2,
                                          late_start=late_start,
                                          late_max_consecutive_reuse=1, token_subset=small_trace.meta["token_subset"])
    session = wc.apply(builtin, cfg)
    generate(builtin, Request(PROMPTS[0], 0, STEPS))
    wc.remove(builtin)
    live = [d for d in session.stats.decisions if np.isfinite(d.drift)]
    r = Replayer(small_trace)
    counts = r.cost_counts(cfg.policy, r.decisions(cfg.policy, slice(0, 1)))
    assert counts[0, 4] == len(live)
    assert (len(live) > 0) == (threshold < 2.0)
    assert any(d.action == Action.REUSE for d in live) == (threshold == 1.9)


def test_replay_estimates_order_configs_like_the_calibration(small_trace):
    r = Replayer(small_trace)
    assert r.quality is not None and r.quality.b < 0  # more injected error, lower PSNR
    assert (r.costs >= 0).all()
    configs = calibration_configs(small_trace, 4, wc.Config.default())
    psnr = [float(r.run(c.policy).psnr[0]) for c in configs]
    assert psnr == sorted(psnr, reverse=True)
    # the fitted overheads come from a few timed runs and vary with machine load: the order of
    # the block time saved must hold whatever they are
    r.costs[:] = 0.0
    speed = [float(r.run(c.policy).speedup[0]) for c in configs]
    drift_driven = [v for i, v in enumerate(speed) if i % 3 != 2]  # every third is a fixed schedule
    assert drift_driven == sorted(drift_driven) and speed[-1] > 1.0
    # the schedule (every 3rd step after 2 warm-up) runs exactly the steps its period says, whatever the drift
    actions = r.run(configs[2].policy).actions[0]
    assert [s for s in range(STEPS) if (actions[:, s] == Action.RECOMPUTE).all()] == [0, 1, *range(4, STEPS, 3)]
    assert ((actions == Action.RECOMPUTE).all(axis=(0, 2)) | (actions == Action.REUSE).all(axis=(0, 2))).all()


def test_quality_model_keeps_how_far_each_calibration_run_fell_from_its_estimate(small_trace):
    r = Replayer(small_trace)
    cal = small_trace.meta["calibration"]
    gaps = [ps - float(r.run(wc.Config.from_dict(c).policy, slice(run, run + 1)).psnr[0])
            for c, run, ps in zip(cal["configs"], cal["runs"], cal["psnr"]) if ps is not None]
    assert np.allclose(sorted(r.quality.residuals), sorted(g for g in gaps if np.isfinite(g)))
    assert abs(np.median(r.quality.residuals)) < 1e-9  # the intercept is their median


def test_never_reuse_replays_as_full_compute(small_trace):
    r = Replayer(small_trace)
    res = r.run(wc.Config.default().with_policy(warm_up_steps=1000).policy)
    # nothing is skipped, so the estimate is 1x less the hooks' per-generation overhead, whatever its fit
    assert (res.actions == Action.RECOMPUTE).all()
    assert np.allclose(res.speedup, r.plain_seconds / (r.plain_seconds + r.costs[0])) and (res.speedup <= 1.0).all()
    assert np.isinf(res.psnr).all() and (res.error == 0).all()


def test_a_reuse_run_beyond_the_recorded_lags_is_refused(small_trace):
    policy = wc.Config.default().with_policy(max_consecutive_reuse=small_trace.lags + 1).policy
    with pytest.raises(WarpcacheError, match=f"needs drift {small_trace.lags + 1} steps back"):
        Replayer(small_trace).run(policy)


def _save_cfg(tmp_path, cfg):
    return str(cfg.save(tmp_path / "c.json"))


def test_gate_passes_and_fails_with_exit_codes(small_trace, tmp_path):
    cfg = _save_cfg(tmp_path, _config(small_trace, 2))
    est = Replayer(small_trace).run(wc.Config.load(cfg).policy)
    low = float(est.psnr.min())
    ok = runner.invoke(app, ["replay", str(small_trace.path), "--config", cfg, "--min-psnr", f"{low - 1:.2f}",
                             "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["overall"]["within_budget"] is True
    junit = tmp_path / "r.xml"
    bad = runner.invoke(app, ["replay", str(small_trace.path), "--config", cfg, "--min-psnr", f"{low + 2:.2f}",
                              "--junit", str(junit)])
    assert bad.exit_code == 1
    assert "PSNR" in bad.stderr and "under the" in bad.stderr and "dB budget" in bad.stderr
    root = ET.parse(junit).getroot()
    assert root.get("tests") == "2" and int(root.get("failures")) >= 1


@pytest.mark.parametrize("args,message", [
    (["--min-psnr", "-3"], "--min-psnr"),
    (["--min-speedup", "0"], "--min-speedup"),
    (["--preset", "nope"], "nope"),
])
def test_bad_budgets_and_configs_exit_2(small_trace, args, message):
    res = runner.invoke(app, ["replay", str(small_trace.path), *args])
    assert res.exit_code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_config_for_another_model_is_refused(small_trace, tmp_path):
    cfg = wc.Config.from_dict({**_config(small_trace, 1).to_dict(), "upstream": "some/other-model"})
    res = runner.invoke(app, ["replay", str(small_trace.path), "--config", _save_cfg(tmp_path, cfg)])
    assert res.exit_code == 2 and "some/other-model" in res.stderr and "builtin" in res.stderr


def test_config_reusing_beyond_the_recorded_lags_exits_2(small_trace, tmp_path):
    cfg = _config(small_trace, 1).with_policy(max_consecutive_reuse=small_trace.lags + 1)
    res = runner.invoke(app, ["replay", str(small_trace.path), "--config", _save_cfg(tmp_path, cfg)])
    assert res.exit_code == 2 and f"--lags {small_trace.lags + 1}" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


# the last case reuses as long as the trace's lags allow: the forecast then reaches the Gram table's far end
@pytest.mark.parametrize(("weight", "curvature", "lags"), [(1.0, 0.0, 8), (0.4, 0.0, 8), (0.8, 0.5, 8), (1.0, 0.0, 2)])
def test_forecast_error_is_the_error_of_the_extrapolated_residual(builtin, weight, curvature, lags):
    # sketches as wide as the drift subset hold every residual the Gram table was built from
    trace = profile(builtin, [Request(PROMPTS[0], 0, 8)], model_id="builtin", tokens=32, sketch_tokens=32,
                    calibrate=0, lags=lags)
    rep = Replayer(trace)
    policy = wc.Config.default().with_policy(
        base_threshold=2.0, min_threshold=2.0, warp_threshold=0.0, motion_scale=0.0, warm_up_steps=3,
        max_consecutive_reuse=2, token_subset=32, forecast=weight, forecast_curvature=curvature).policy
    dec = rep.decisions(policy)
    lags, gaps, gaps2 = dec.lags, dec.gaps, dec.gaps2
    assert (lags[:, :, 3:] > 0).any() and (gaps[lags > 0] > 0).all() and (gaps2[lags > 0] > 0).all()
    r = trace.arrays["sketch_res"].astype(np.float64)  # (R, Br, S, L, B, K, C)
    out = r + trace.arrays["sketch_in"].astype(np.float64)
    tables = rep._dots, rep._out_sq
    got = rep._forecast_err(weight, curvature, lags, gaps, gaps2, *tables)
    plain = rep._forecast_err(0.0, 0.0, lags, gaps, gaps2, *tables)
    for idx in zip(*np.nonzero(lags)):
        run, br, s, layer = idx
        k, g, h = lags[idx], gaps[idx], gaps2[idx]
        rs, rc, rp, rq = (r[run, br, t, layer] for t in (s, s - k, s - k - g, s - k - g - h))
        norm = np.linalg.norm(out[run, br, s, layer])
        d1, d1_prev = (rc - rp) / g, (rp - rq) / h
        forecast = rc + weight * k * d1 + curvature * k * (k + g) * (d1 - d1_prev) / (g + h)
        want = np.linalg.norm(rs - forecast) / norm
        assert got[idx] == pytest.approx(want, rel=0.03, abs=1e-4)
        # no forecast: exactly the recorded plain-reuse error
        assert plain[idx] == pytest.approx(trace.arrays["reuse_err"][run, br, s, layer, k - 1], rel=1e-3)


def test_forecast_on_a_trace_without_the_gram_table_exits_2(small_trace, tmp_path):
    old = Trace(dict(small_trace.meta), {k: v for k, v in small_trace.arrays.items()
                                            if k not in ("res_dot", "out_sq")})
    path = old.save(tmp_path / "old.safetensors")
    cfg = _save_cfg(tmp_path, _config(small_trace, 1).with_policy(forecast=0.5))
    res = runner.invoke(app, ["replay", str(path), "--config", cfg])
    assert res.exit_code == 2 and "re-profile" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("weight", [1.0, 0.0])
def test_a_skipped_calls_error_is_the_forecast_error_of_its_output(builtin, weight):
    outputs = []
    hook = builtin.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].double().clone()))
    try:
        trace = profile(builtin, [Request(PROMPTS[0], 0, 8)], model_id="builtin", calibrate=0)
    finally:
        hook.remove()
    y = np.stack([o.numpy() for o in outputs[-16:]]).reshape(8, 2, -1)  # the recorded run: (step, branch, ...)
    rep = Replayer(trace)
    policy = wc.Config.default().with_schedule(3, 2, forecast=weight, skip_calls=True).policy
    dec = rep.decisions(policy)
    dots = rep._call_dots[:, :, :, None]
    got = rep._forecast_err(weight, 0.0, dec.lags[..., :1], dec.gaps[..., :1], dec.gaps2[..., :1], dots, dots[..., 0])
    assert trace.meta["branches"] == ["cond", "uncond"] and dec.lags[0, 0, :, 0].tolist() == [0, 0, 1, 2, 0, 1, 2, 0]
    for br in range(2):
        for s, c, p in ((2, 1, 0), (3, 1, 0), (5, 4, 1), (6, 4, 1)):
            forecast = y[c, br] + weight * (s - c) * (y[c, br] - y[p, br]) / (c - p)
            want = np.linalg.norm(y[s, br] - forecast) / np.linalg.norm(y[s, br])
            assert got[0, br, s, 0] == pytest.approx(want, rel=1e-3)


def test_a_skipped_call_saves_its_plain_time_and_pays_no_block_hooks(small_trace):
    rep = Replayer(small_trace)
    by_block, by_call = (wc.Config.default().with_schedule(3, 2, forecast=1.0, skip_calls=skip).policy
                         for skip in (False, True))
    blocks, calls = rep.run(by_block), rep.run(by_call)
    assert np.array_equal(blocks.actions, calls.actions)
    skipped = np.count_nonzero(calls.actions[..., 0] != Action.RECOMPUTE, axis=(1, 2))  # (R,) calls skipped
    assert skipped.all() and np.allclose(rep._saved(by_call, calls.actions, slice(None)),
                                         skipped * rep.plain_call_seconds)
    # a call's plain time holds its blocks' (timed inside it, in the same plain run)
    assert rep.plain_call_seconds > rep.block_seconds[0, 0, 0].sum() > 0
    terms = {name: i for i, name in enumerate(COST_TERMS)}
    assert (calls.cost_counts[:, terms["skipped call"]] == skipped).all()
    assert (calls.cost_counts[:, terms["reused block"]] == 0).all()
    assert (blocks.cost_counts[:, terms["reused block"]] == skipped * small_trace.shape[3]).all()
    assert rep.quality is not None and rep.quality.call_scale != 1.0  # calibrated by a skipping calibration run
    assert np.isfinite(calls.psnr).all() and (calls.error > 0).all()


def test_skipping_calls_on_a_trace_without_call_dots_exits_2(small_trace, tmp_path):
    old = Trace(dict(small_trace.meta), {k: v for k, v in small_trace.arrays.items() if k != "call_dot"})
    old.meta.pop("calibration")
    path = old.save(tmp_path / "old.safetensors")
    cfg = tmp_path / "skip.json"
    wc.Config.default().with_schedule(3, 2, forecast=1.0, skip_calls=True).save(cfg)
    res = CliRunner().invoke(app, ["replay", str(path), "--config", str(cfg)])
    assert res.exit_code == 2 and "re-profile" in res.stderr and len(res.stderr.strip().splitlines()) == 1

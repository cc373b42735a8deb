"""Profiling: traces recorded from real runs, the trace format, and bad trace files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from tiny import ARCHITECTURES, TinyPipeline
from typer.testing import CliRunner

import warpcache_cli as wc
from warpcache_cli.cli.app import app
from warpcache_cli.models import Request, generate
from warpcache_cli.policy import drift
from warpcache_cli.profile import profile
from warpcache_cli.trace import DRIFT_VARIANTS, Trace

runner = CliRunner()


@pytest.fixture(scope="module")
def trace(builtin, tmp_path_factory):
    reqs = [Request("a red circle moving right fast", 0, 6), Request("a blue square static", 1, 6)]
    t = profile(builtin, reqs, model_id="builtin")
    path = tmp_path_factory.mktemp("t") / "t.safetensors"
    t.save(path)
    return Trace.load(path)


def test_trace_round_trip_and_reference_is_the_uncached_output(builtin, trace):
    assert trace.shape == (2, 2, 6, 6)
    assert trace.meta["branches"] == ["cond", "uncond"] and trace.meta["seeds"] == [0, 1]
    plain = generate(builtin, Request("a blue square static", 1, 6))
    np.testing.assert_allclose(trace.arrays["reference"][1].astype(np.float32), plain, atol=1e-3)
    drift = trace.arrays["drift"]
    assert np.isnan(drift[:, :, 0]).all()  # nothing to compare with at step 0
    assert np.isfinite(drift[:, :, 1:, :, 0]).all() and (drift[:, :, 1:, :, 0] > 0).all()
    assert np.isnan(drift[:, :, 2, :, 2:]).all()  # lag 3 does not exist at step 2
    assert (trace.arrays["block_seconds"] > 0).all()
    assert (trace.arrays["position"][:, -1] == 1.0).all()


class _Capture:
    """An observer keeping every block call's input and residual, to check the recorder's tables against."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, int, int], tuple] = {}

    def on_block(self, session, layer, x, residual, seconds, decision) -> None:
        self.calls[(session.branch, session.step.step, layer)] = (x.clone(), residual.clone())


def test_recorded_tables_are_the_policy_arithmetic_on_the_block_tensors(builtin, trace):
    """Drift at every lag, reuse errors, the Gram table and the full-tensor scalars, recomputed directly."""
    req = Request("a red circle moving right fast", 0, 6)
    cap = _Capture()
    wc.apply(builtin, wc.Config.default().with_policy(warm_up_steps=1000), observer=cap)
    generate(builtin, req)
    wc.remove(builtin)
    a, idx = trace.arrays, torch.as_tensor(trace.arrays["token_subset"])
    checked = 0
    for (branch, s, layer), (x, r) in cap.calls.items():
        b = trace.meta["branches"].index(branch)
        xs, rs = x[:, idx], r[:, idx]
        out_sq = float((xs + rs).double().square().sum())
        assert a["out_sq"][0, b, s, layer] == pytest.approx(out_sq, rel=1e-4)
        assert a["x_norm"][0, b, s, layer] == pytest.approx(float(x.norm()), rel=1e-4)
        for lag in range(1, min(s, trace.lags) + 1):
            px, pr = cap.calls[(branch, s - lag, layer)]
            for m, (metric, power) in enumerate(DRIFT_VARIANTS):
                want = float(drift(xs, px[:, idx], metric, power).max())
                got = a["drift"][0, b, s, layer, lag - 1, m]
                if lag == 1:
                    assert got == np.float32(want)  # what the live policy measures, bit for bit
                else:
                    assert got == pytest.approx(want, rel=1e-3, abs=1e-6)
            err = float((rs - pr[:, idx]).norm() / (xs + rs).norm())
            assert a["reuse_err"][0, b, s, layer, lag - 1] == pytest.approx(err, rel=1e-3)
            dot = float((rs.double() * pr[:, idx].double()).sum())
            assert a["res_dot"][0, b, s, layer, lag] == pytest.approx(dot, rel=1e-4, abs=1e-3)
            checked += 1
        if s:
            px, pr = cap.calls[(branch, s - 1, layer)]
            assert a["drift1_l2"][0, b, s, layer] == pytest.approx(float((x - px).norm() / px.norm()), rel=1e-3)
            assert a["reuse_err1"][0, b, s, layer] == pytest.approx(float((r - pr).norm() / (x + r).norm()),
                                                                     rel=1e-3)
    assert checked == 2 * 6 * sum(min(s, trace.lags) for s in range(6))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_profile_every_architecture(arch):
    t = profile(TinyPipeline(arch), [Request("x", 0, 4)], model_id=f"tiny-{arch}", tokens=32)
    assert t.shape[2] == 4 and t.meta["model_class"] == type(TinyPipeline(arch).transformer).__name__
    assert np.isfinite(t.arrays["drift1_cos"][:, :, 1:]).all()


def test_cli_profile_and_info(tmp_path):
    out = tmp_path / "p.safetensors"
    res = runner.invoke(app, ["profile", "builtin", "--steps", "3", "--seeds", "0-1", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["trace", "info", str(out), "--json"])
    info = json.loads(res.stdout)
    assert res.exit_code == 0 and info["runs"] == 2 and info["steps"] == 3 and info["blocks"] == 6
    # what the recording cost and what calibrated it, from the trace's own measurements
    trace = Trace.load(out)
    assert info["recording_seconds"] == pytest.approx(trace.arrays["run_seconds"].tolist(), abs=1e-3)
    assert info["recording_ratio"] == pytest.approx(
        float(np.median(trace.arrays["run_seconds"])) / trace.meta["plain_seconds"], abs=1e-3)
    psnr = [v for v in trace.meta["calibration"]["psnr"] if v is not None]
    assert info["calibration_runs"] == len(psnr) >= 1
    assert info["calibration_psnr"] == pytest.approx([min(psnr), max(psnr)], abs=0.01)


def _bad_files(tmp_path, trace):
    good = tmp_path / "good.safetensors"
    trace.save(good)
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a trace at all" * 10)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(foreign))
    old = tmp_path / "old.safetensors"
    meta = {**trace.meta, "format": "warpcache-trace", "format_version": 9}
    save_file(dict(trace.arrays), str(old), metadata={"warpcache": json.dumps(meta)})
    half = tmp_path / "half.safetensors"  # a Gram table without the norms it is divided by
    save_file({k: v for k, v in trace.arrays.items() if k != "out_sq"}, str(half),
              metadata={"warpcache": json.dumps({**trace.meta, "format": "warpcache-trace", "format_version": 1})})
    return {
        "half": (half, "res_dot and out_sq come together"),
        "truncated": (truncated, "corrupt or truncated"),
        "garbage": (garbage, "corrupt or truncated"),
        "foreign": (foreign, "not a trace"),
        "old": (old, "format version 9"),
        "missing": (tmp_path / "nope.safetensors", "no such trace file"),
    }


@pytest.mark.parametrize("case", ["truncated", "garbage", "foreign", "old", "missing", "half"])
def test_bad_trace_files_exit_2_with_one_line(tmp_path, trace, case):
    path, message = _bad_files(tmp_path, trace)[case]
    res = runner.invoke(app, ["trace", "info", str(path)])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], res.stderr
    assert "Traceback" not in res.output


def test_interrupted_save_leaves_nothing(tmp_path, trace, monkeypatch):
    import warpcache_cli.trace as trace_mod

    def explode(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(trace_mod, "save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        trace.save(tmp_path / "t.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_trace_size_is_small(trace):
    r, br, s, lyr = trace.shape
    per_run_step = sum(a.nbytes for a in trace.arrays.values()) / (r * s)
    assert per_run_step * 30 < 5e6 and math.isfinite(per_run_step)


@pytest.mark.parametrize("args,message", [
    (["--seeds", "one,two"], "--seeds"),
    (["--prompts-file", "/no/such/prompts.txt"], "--prompts-file"),
])
def test_cli_profile_bad_arguments(tmp_path, args, message):
    out = tmp_path / "t.safetensors"
    res = runner.invoke(app, ["profile", "builtin", "--steps", "2", "--out", str(out), *args])
    assert res.exit_code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()

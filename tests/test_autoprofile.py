"""Zero-config mode: profile, tune in the background, switch at a generation boundary, validate or fall back."""

from __future__ import annotations

import json
import logging

import pytest
from typer.testing import CliRunner

import warpcache_cli as wc
from warpcache_cli.autoprofile import config_path
from warpcache_cli.cli.app import app
from warpcache_cli.errors import ConfigError
from warpcache_cli.models import Request, generate
from warpcache_cli.runtime import session_of
from warpcache_cli.runtime.adapters import find_blocks

PROMPT = "a red circle moving right fast"
STEPS = 8
CALLS = STEPS * 2 * 6  # steps x CFG branches x blocks of the built-in model


def auto_config(tmp_path, **profiler) -> wc.Config:
    settings = {"auto_profile": True, "profile_requests": 2, "trials": 40, "max_tune_seconds": 20.0,
                "min_psnr": 20.0, "sensitivity_path": str(tmp_path / "sensitivity.json"), **profiler}
    return wc.Config.from_dict({"metrics": {"enabled": True}, "profiler": settings})


@pytest.fixture
def auto(builtin, tmp_path):
    """Applies auto mode to the pipeline (or what it is given); always removes it, the model is shared."""
    yield lambda target=builtin, **profiler: wc.apply(target, auto_config(tmp_path, **profiler))
    wc.remove(builtin)


def run(pipe, seed: int, steps: int = STEPS) -> None:
    generate(pipe, Request(PROMPT, seed, steps))


def test_profiles_tunes_validates_and_serves_the_tuned_policy(auto, builtin, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="warpcache")
    pipe_class = type(builtin)
    session = auto()
    controller = session.controller
    run(builtin, 0)
    shape = controller.last.shape
    assert controller.last.phase == "profiling" and session.stats.phases == {shape: "profiling"}
    assert controller.last.counts["recompute"] == CALLS
    run(builtin, 1)
    assert session.stats.phases[shape] in ("tuning", "tuned")
    assert controller.wait(60)
    assert session.stats.to_dict()["phases"] == {shape: "tuned"}
    tuned = wc.Config.load(config_path(tmp_path / "sensitivity.json"))
    assert not tuned.profiler.auto_profile, "the written config is a static one"
    profile = json.loads((tmp_path / "sensitivity.json").read_text())
    assert profile["shape"] == shape and len(profile["blocks"]) == 6

    run(builtin, 2)  # the first tuned generation is checked against an uncached run of the same request
    assert controller.last.phase == "tuned" and controller.last.passed
    assert controller.last.validation_psnr >= 20.0
    assert any("validated" in r.getMessage() for r in caplog.records)

    counts = [0]
    handles = [next(b.children()).register_forward_hook(lambda *a: counts.__setitem__(0, counts[0] + 1))
               for b in find_blocks(builtin.transformer)]
    try:
        run(builtin, 3)
    finally:
        for h in handles:
            h.remove()
    assert controller.last.phase == "tuned"
    assert counts[0] == controller.last.counts["recompute"] < CALLS, "reused blocks must really be skipped"
    assert session.stats.phases == {shape: "tuned"}
    assert f'warpcache_autoprofile_phase{{phase="tuned",shape="{shape}"}} 1.0' in session.metrics.exposition()
    wc.remove(builtin)
    assert type(builtin) is pipe_class, "remove() must unwrap the pipeline"


def test_a_budget_no_config_meets_falls_back_with_a_reason(auto, builtin, tmp_path, caplog):
    session = auto(min_psnr=99.0)
    controller = session.controller
    run(builtin, 0)
    run(builtin, 1)
    assert controller.wait(60)
    shape = controller.last.shape
    assert session.stats.phases == {shape: "fallback"}
    warnings = [r.getMessage() for r in caplog.records if r.name == "warpcache" and r.levelno == logging.WARNING]
    assert any("no config meets the budget" in m and "falling back to full compute" in m for m in warnings)
    run(builtin, 2)
    assert controller.last.phase == "fallback" and controller.last.counts["recompute"] == CALLS
    assert not config_path(tmp_path / "sensitivity.json").exists()


def test_a_new_shape_starts_its_own_profile(auto, builtin):
    session = auto()
    run(builtin, 0)
    first = session.controller.last.shape
    run(builtin, 1, steps=6)
    second = session.controller.last.shape
    assert first != second and second.startswith("steps=6 ")
    assert session.stats.phases == {first: "profiling", second: "profiling"}


def test_bare_transformer_is_tuned_but_cannot_be_validated(auto, builtin, caplog):
    session = auto(builtin.transformer, profile_requests=1)
    run(builtin, 0)  # through the pipeline, but warpcache only sees the transformer's calls
    assert session.controller.wait(60)
    assert any("cannot be validated" in r.getMessage() for r in caplog.records)
    run(builtin, 1)
    last = session.controller.last
    assert last.phase == "tuned" and last.passed is None and last.counts["recompute"] < CALLS


def test_unwritable_sensitivity_path_fails_at_apply(builtin, tmp_path):
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "sensitivity.json"  # its folder is a file: nothing can be written there
    with pytest.raises(ConfigError, match="profiler.sensitivity_path") as err:
        wc.apply(builtin, auto_config(tmp_path, sensitivity_path=str(path)))
    assert str(path) in str(err.value)
    assert session_of(builtin) is None


def test_cli_run_auto(tmp_path):
    cfg = tmp_path / "auto.json"
    # 6 steps are few to reuse in: a budget the tiny run can meet, so a tuned config is written
    auto_config(tmp_path, auto_profile=False, max_tune_seconds=10.0, min_psnr=15.0).save(cfg)
    res = CliRunner().invoke(app, ["run", "builtin", "--auto", "--requests", "3", "--steps", "6",
                                   "--config", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [r["seed"] for r in data["requests"]] == [0, 1, 2]
    assert [r["phase"] for r in data["requests"]][:2] == ["profiling", "profiling"]
    assert data["config"] and wc.Config.load(data["config"]).policy
    bad = CliRunner().invoke(app, ["run", "builtin", "--requests", "3"])
    assert bad.exit_code == 2 and "--requests needs --auto" in bad.stderr

"""Tuning: configs that meet the budget, storage sharing and resuming, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from typer.testing import CliRunner

import warpcache_cli as wc
from warpcache_cli.budget import Budget
from warpcache_cli.cli.app import app
from warpcache_cli.cli.tune_cmd import measured_min
from warpcache_cli.models import Request
from warpcache_cli.replay import replay
from warpcache_cli.tune import Candidate, Tuner, _work, choose_measured, tune

runner = CliRunner()


def test_tuned_config_meets_the_budget_on_the_trace(small_trace):
    result = tune([small_trace], Budget(min_psnr=28.0), trials=80, seed=1)
    best = result.chosen
    assert best is not None and best.est_psnr >= 28.0 and best.est_speedup > 1.0
    est = replay(small_trace, best.config)
    assert float(est.psnr.min()) >= 28.0 - 1e-9
    assert best.config.upstream == "builtin"


def test_same_seed_same_search(small_trace):
    a = tune([small_trace], Budget(min_psnr=28.0), trials=30, seed=3).chosen
    b = tune([small_trace], Budget(min_psnr=28.0), trials=30, seed=3).chosen
    assert a.config == b.config


def test_candidates_past_the_estimate_are_kept_only_for_measuring(small_trace):
    budget = Budget(min_psnr=32.0)
    tuner = Tuner([small_trace], budget)
    study = tuner.search(200, seed=0)
    sure = tuner.candidates(study, 8)
    assert sure and all(c.est_psnr >= 32.0 and c.admitted == "estimate" for c in sure)
    schedules = [t for t in study.trials if t.user_attrs.get("schedule")]
    work = {t.number: _work(t) for t in study.trials if t.state.is_finished() and "est_compute" in t.user_attrs}
    for k in (8, 200):  # places for a few, and for every candidate the rules admit
        wide = tuner.candidates(study, k, band_db=3.0)
        assert len(wide) <= k and sure[0].trial in {c.trial for c in wide}
        assert [c.est_speedup for c in wide] == sorted((c.est_speedup for c in wide), reverse=True)
        assert len({(round(c.est_speedup, 4), round(c.est_psnr, 3)) for c in wide}) == len(wide)
        assert all(c.admitted == "estimate" for c in wide if c.est_psnr >= 32.0)
        # the schedule ladder: the schedules estimated faster than the fastest config the estimate admits, in
        # their order of work (steps computed, then skipping calls before serving blocks), most work first, while
        # the estimate is within the band of the budget and one level more, each with its best-estimated schedule
        # (a rung) and the runner-up (same work)
        fastest = sure[0].est_speedup
        speed = {w: max(t.user_attrs["est_speedup"] for t in schedules if _work(t) == w) for w in map(_work, schedules)}
        rungs = [c for c in wide if c.admitted == "ladder"]
        assert rungs and all(c.est_psnr < 32.0 for c in rungs)
        up = sorted((work[c.trial] for c in rungs if speed[work[c.trial]] > fastest), reverse=True)
        levels = sorted((w for w in speed if speed[w] > fastest), reverse=True)
        assert up and up == levels[: len(up)]
        assert all(c.est_psnr + 3.0 >= 32.0 for c in rungs if work[c.trial] in up[:-1])
        for c in rungs:
            assert c.est_psnr == max(t.user_attrs["est_psnr"] for t in schedules if _work(t) == work[c.trial])
        twins = [c for c in wide if c.admitted == "same work"]  # after every level's rung: with places to spare
        assert (twins or k == 8) and all(c.est_psnr < 32.0 for c in twins)
        for c in twins:
            assert any(o is not c and work[o.trial] == work[c.trial] and o.est_psnr >= c.est_psnr for o in wide)
    # with places left, every drift-driven config doing less work than the estimate admits that it puts less than
    # the band under the budget (which trials those are depends on the trace's timings)
    done = [t for t in study.trials if t.state.is_finished() and t.user_attrs.get("est_speedup", 1.0) > 1.0 + 1e-6]
    band = {t.number for t in done if t.user_attrs["constraint"] > 0 and not t.user_attrs.get("schedule")
            and t.user_attrs["est_psnr"] >= 29.0 and t.user_attrs["est_speedup"] > fastest}
    assert {(round(study.trials[n].user_attrs["est_speedup"], 4), round(study.trials[n].user_attrs["est_psnr"], 3))
            for n in band} <= {(round(c.est_speedup, 4), round(c.est_psnr, 3)) for c in wide}
    assert all(29.0 <= c.est_psnr < 32.0 and c.est_speedup > fastest
               and not c.config.policy.base_threshold >= 2.0 for c in wide if c.admitted == "band")


def test_validation_drops_a_candidate_at_its_first_miss_and_keeps_the_fastest_within_budget(small_trace, builtin):
    seeds = [77, 78, 79]
    reqs = [Request("a red circle moving right fast", seed, small_trace.meta["steps"]) for seed in seeds]
    result = tune([small_trace], Budget(min_psnr=32.0), trials=60, seed=0, pipe=builtin, validation=reqs, top_k=6)
    assert result.validated and len(result.candidates) > 1
    for c in result.candidates:
        psnr = [m["psnr"] for m in c.measured]
        assert [m["seed"] for m in c.measured] == seeds[: len(psnr)]
        assert all(p >= 32.0 for p in psnr[:-1])  # each further request only after meeting the budget on all before
    assert any(len(c.measured) < len(seeds) for c in result.candidates), "no candidate was dropped early"
    ok = [c for c in result.candidates if len(c.measured) == len(seeds) and c.measured_psnr >= 32.0]
    assert result.chosen is choose_measured(ok, result.timing_noise) and 0.0 <= result.timing_noise < 1.0
    if ok:  # the least work among those measured within the timing noise of the fastest, at its best quality
        fastest = max(c.measured_speedup for c in ok)
        close = [c for c in ok if c.measured_speedup >= fastest * (1 - result.timing_noise)]
        assert result.chosen.est_speedup == pytest.approx(max(c.est_speedup for c in close), abs=1e-3)
        assert result.chosen.measured_psnr == max(c.measured_psnr for c in ok
                                                  if abs(c.est_speedup - result.chosen.est_speedup) < 1e-3)
        psnr = [m["psnr"] for m in result.chosen.measured]
        assert f"({min(psnr):.1f} to {max(psnr):.1f} dB)" in result.message  # the spread the budget held over


def test_among_candidates_doing_the_same_work_the_better_measured_quality_wins():
    cfg = wc.Config.default()

    def cand(trial: int, est: float, speed: float, psnr: float) -> Candidate:
        return Candidate(cfg, trial, est, 30.0, 0.0, measured=[{"speedup": speed, "psnr": psnr}],
                         work=(round(1 / est, 4), 1))

    noisy_fast, same_work, other = cand(0, 2.59, 2.70, 30.6), cand(1, 2.59, 2.53, 33.5), cand(2, 2.40, 2.55, 36.0)
    assert choose_measured([noisy_fast, same_work, other]) is same_work  # same steps computed: noise, not speed
    assert choose_measured([noisy_fast, other]) is noisy_fast  # less work: the speed is real
    assert choose_measured([]) is None
    # within the timing noise of the fastest measured, the config doing less work wins; beyond it, the measurement
    less_work = cand(3, 2.82, 2.50, 28.7)
    assert choose_measured([same_work, other, less_work]) is other
    assert choose_measured([same_work, other, less_work], noise=0.01) is same_work  # 2.53 within 1% of 2.55
    assert choose_measured([same_work, other, less_work], noise=0.05) is less_work  # 2.50 within 5%
    # the report table says when a candidate's minimum is over the requests before it was dropped only
    dropped = Candidate(cfg, 4, 3.0, 24.0, 0.0, measured=[{"speedup": 3.1, "psnr": 29.6}])
    assert measured_min(dropped, 6) == "29.6 (dropped at request 1 of 6)" and measured_min(dropped, 1) == "29.6"


def test_cli_writes_config_sensitivity_and_report(small_trace, tmp_path):
    res = runner.invoke(app, ["tune", str(small_trace.path), "--min-psnr", "28", "--trials", "60", "--no-validate",
                              "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "warpcache-tune-report.json").read_text())
    assert report["chosen"]["est_psnr"] >= 28
    cfg = wc.Config.load(tmp_path / "warpcache-config.json")
    assert wc.Config.from_dict(report["chosen"]["config"]) == cfg  # every candidate's config is in the report
    assert len({json.dumps(c["config"], sort_keys=True) for c in report["candidates"]}) == len(report["candidates"])
    assert runner.invoke(app, ["replay", str(small_trace.path), "--config", str(tmp_path / "warpcache-config.json"),
                               "--min-psnr", "28"]).exit_code == 0
    prof = json.loads((tmp_path / "warpcache-sensitivity.json").read_text())
    assert len(prof["blocks"]) == 6 and {"sensitivity", "drift", "warp_helps"} <= set(prof["blocks"][0])
    assert (tmp_path / "warpcache-sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert cfg.policy.token_subset == small_trace.meta["token_subset"]


def test_validation_covers_extra_prompts_once(small_trace, tmp_path):
    new, profiled = "a yellow circle moving left fast", small_trace.meta["prompts"][0]
    res = runner.invoke(app, ["tune", str(small_trace.path), "--min-psnr", "10", "--trials", "30", "--top-k", "1",
                              "--validation-seeds", "7", "--validation-prompt", new, "--validation-prompt", profiled,
                              "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    measured = json.loads(res.stdout)["chosen"]["measured"]
    assert [m["prompt"] for m in measured] == [*dict.fromkeys(small_trace.meta["prompts"]), new]
    assert {m["seed"] for m in measured} == {7}


def test_impossible_budget_says_so_and_reports_the_closest(small_trace, tmp_path):
    res = runner.invoke(app, ["tune", str(small_trace.path), "--min-psnr", "99", "--trials", "30", "--no-validate",
                              "--out", str(tmp_path)])
    assert res.exit_code == 1 and "no config meets the budget" in res.stderr and "closest found" in res.stderr
    assert not (tmp_path / "warpcache-config.json").exists()
    assert json.loads((tmp_path / "warpcache-tune-report.json").read_text())["candidates"]


def _worker(trace, db, trials, name="s"):
    return subprocess.Popen(
        [sys.executable, "-m", "warpcache_cli", "tune", str(trace.path), "--min-psnr", "28", "--trials", str(trials),
         "--no-validate", "--storage", f"sqlite:///{db}", "--study-name", name, "--out", str(db.parent), "--json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _complete(db, name="s"):
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)), study.get_trials()


def test_two_workers_share_one_study(small_trace, tmp_path):
    db = tmp_path / "t.db"
    runner.invoke(app, ["tune", str(small_trace.path), "--trials", "1", "--no-validate", "--storage",
                        f"sqlite:///{db}", "--study-name", "s", "--out", str(tmp_path)])  # create the study once
    workers = [_worker(small_trace, db, 60) for _ in range(2)]
    for w in workers:
        assert w.wait(timeout=300) == 0, w.stderr.read().decode()
    complete, all_trials = _complete(db)
    assert 60 <= len(complete) <= 61  # two workers may finish their last trials at the same moment
    assert len({t.number for t in all_trials}) == len(all_trials)
    assert {t.state for t in all_trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}


def test_killed_tune_resumes_without_losing_trials(small_trace, tmp_path):
    db = tmp_path / "t.db"
    w = _worker(small_trace, db, 150)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            if len(_complete(db)[0]) >= 10:
                break
        except KeyError:  # the worker has not created the study yet
            continue
    w.send_signal(signal.SIGKILL)
    w.wait()
    before = len(_complete(db)[0])
    assert 10 <= before < 150
    time.sleep(7)  # past the heartbeat grace period, so the killed worker's running trial counts as failed
    w = _worker(small_trace, db, 150)
    assert w.wait(timeout=300) == 0, w.stderr.read().decode()
    complete, all_trials = _complete(db)
    assert len(complete) == 150
    failed = [t for t in all_trials if t.state == optuna.trial.TrialState.FAIL]
    retried = [t for t in all_trials if "failed_trial" in t.system_attrs]
    assert len(retried) == len(failed)  # the interrupted trial was run again, not lost


def test_storage_errors_hide_the_password(small_trace, tmp_path):
    res = runner.invoke(app, ["tune", str(small_trace.path), "--no-validate", "--trials", "5", "--out", str(tmp_path),
                              "--storage", "postgresql://alice:s3cret-pw@127.0.0.1:1/db"])
    assert res.exit_code == 2 and "cannot open storage" in res.stderr
    assert "s3cret-pw" not in res.output + res.stderr


def test_study_with_another_search_space_is_refused(small_trace, tmp_path):
    db = tmp_path / "o.db"
    other = optuna.create_study(study_name="other", storage=f"sqlite:///{db}", direction="maximize")
    other.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    res = runner.invoke(app, ["tune", str(small_trace.path), "--no-validate", "--trials", "5", "--out", str(tmp_path),
                              "--storage", f"sqlite:///{db}", "--study-name", "other"])
    assert res.exit_code == 2 and "different search space" in res.stderr


@pytest.mark.parametrize("args,message", [(["--objective", "fastest"], "--objective"),
                                          (["--min-psnr", "0"], "--min-psnr"),
                                          (["--band", "-1"], "--band")])
def test_bad_arguments_exit_2(small_trace, tmp_path, args, message):
    res = runner.invoke(app, ["tune", str(small_trace.path), "--no-validate", "--out", str(tmp_path), *args])
    assert res.exit_code == 2 and message in res.stderr

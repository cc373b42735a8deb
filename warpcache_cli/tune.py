"""Auto-tuning: Optuna searches the policy on offline replays, the real model has the last word.

Thresholds are searched as quantiles of the drift the trace recorded, so one search space
fits every model whatever its drift scale. Budgets are constraints (Optuna's
`constraints_func`), not penalties, so infeasible trials guide the sampler without
polluting the objective. Because quality can fall off a cliff between neighbouring
thresholds, the top candidates are run on the real model and the chosen config is the
fastest whose measured quality meets the budget on every validation seed.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import optuna

from warpcache_cli import quality, runtime
from warpcache_cli.budget import Budget
from warpcache_cli.config import Config
from warpcache_cli.errors import WarpcacheError
from warpcache_cli.measure import timed, warm_up
from warpcache_cli.models import Request
from warpcache_cli.policy import RECOMPUTE, drift_ceiling
from warpcache_cli.replay import Replayer
from warpcache_cli.sensitivity import recommended, sensitivity
from warpcache_cli.trace import DRIFT_VARIANTS, Trace

POWERS = sorted({p for m, p in DRIFT_VARIANTS if m == "cosine"})
# how far below the PSNR budget an estimate may fall and still be worth measuring, by default: how much better
# than estimated the calibration runs came out, at this quantile (3.8 dB on the sample traces), never
# under the floor
BAND_QUANTILE = 0.8
BAND_FLOOR_DB = 1.0
HEARTBEAT_SECONDS = 2
GRACE_SECONDS = 6


@dataclass
class Candidate:
    config: Config
    trial: int
    est_speedup: float
    est_psnr: float
    est_drift: float
    measured: list[dict[str, float]] = field(default_factory=list)
    # why it is measured: the estimate meets the budget ("estimate"), or misses it by less than the band ("band"),
    # or it is the best-estimated fixed schedule at one of the next speeds up ("ladder"), or the runner-up of a
    # schedule admitted so far at that schedule's speed ("same work")
    admitted: str = "estimate"
    work: tuple[float, int] = (1.0, 1)  # `_work`: share of block calls computed, then 0 if it skips calls whole

    @property
    def below_estimate(self) -> bool:
        """Admitted for measuring although its estimate misses the budget."""
        return self.admitted != "estimate"

    @property
    def measured_speedup(self) -> float:
        return statistics.median(m["speedup"] for m in self.measured) if self.measured else float("nan")

    @property
    def measured_psnr(self) -> float:
        return min(m["psnr"] for m in self.measured) if self.measured else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.trial, "est_speedup": self.est_speedup, "est_psnr": self.est_psnr,
                "est_drift": self.est_drift, "estimate_meets_budget": not self.below_estimate,
                "admitted": self.admitted,
                "measured_speedup": self.measured_speedup,
                "measured_min_psnr": self.measured_psnr, "measured": self.measured,
                "config": self.config.to_dict()}  # to run, replay or gate any candidate, not only the chosen


class SearchSpace:
    """Maps an Optuna trial to a Config; thresholds come from quantiles of the recorded drift."""

    def __init__(self, traces: list[Trace], base: Config) -> None:
        self.base = base
        self.lags = min(t.lags for t in traces)
        self.steps = steps = min(t.shape[2] for t in traces)
        # a third of the steps, but at least the enqueued schedules' warm-ups where the run is long enough
        self.max_warm_up = max(1, min(steps - 1, max(6, steps // 3)))
        self.quantiles = {}
        for v in range(len(DRIFT_VARIANTS)):
            values = np.concatenate([t.arrays["drift"][:, :, 1:, :, 0, v].ravel() for t in traces])
            values = np.sort(values[np.isfinite(values) & (values > 0)])
            if not values.size:
                raise WarpcacheError("the trace has no finite drift; it cannot be tuned")
            self.quantiles[v] = values
        self.multipliers, self.no_warp = recommended(sensitivity(traces[0]))
        self.forecast = all("res_dot" in t.arrays for t in traces)  # older traces cannot judge forecasting
        self.calls = all("call_dot" in t.arrays for t in traces)  # nor skipping whole calls

    def threshold(self, variant: int, q: float) -> float:
        """The drift at quantile q of the recorded ones; at q = 1 the largest the metric can report where it
        has a bound (no drift forces a recompute then, live either, so the hooks need not measure it)."""
        bound = drift_ceiling(DRIFT_VARIANTS[variant][0])
        if q >= 1.0 and np.isfinite(bound):
            return bound
        return float(min(2.0, max(1e-9, np.quantile(self.quantiles[variant], q))))

    def config(self, trial: optuna.trial.BaseTrial) -> Config:
        metric = trial.suggest_categorical("drift_metric", ["cosine", "l2"])
        power = trial.suggest_categorical("saliency_power", POWERS)
        variant = DRIFT_VARIANTS.index(("l2", 0.0) if metric == "l2" else ("cosine", power))
        # up to the largest drift recorded, and at the top beyond any drift: then the schedule alone (warm-up,
        # max_consecutive_reuse, forecast) decides, as in FORA or TaylorSeer, which the search must be able to reach
        base = self.threshold(variant, trial.suggest_float("base_q", 0.02, 1.0))
        warp_frac = trial.suggest_float("warp_frac", 0.0, 1.0)
        a = trial.suggest_float("phase_start", 0.0, 0.6)
        b = min(1.0, a + trial.suggest_float("phase_span", 0.05, 0.9))
        early = trial.suggest_float("phase_early", 0.5, 1.5)
        late = early + (1.5 - early) * trial.suggest_float("phase_late_share", 0.0, 1.0)
        strength = trial.suggest_float("sensitivity_strength", 0.0, 1.0)
        use_warp_profile = trial.suggest_categorical("warp_profile", [True, False])
        return self.base.with_policy(
            drift_metric=metric,
            saliency_power=power,
            base_threshold=base,
            min_threshold=base * trial.suggest_float("min_frac", 0.0, 1.0),
            warp_threshold=base * warp_frac if warp_frac >= 0.05 else 0.0,
            motion_scale=trial.suggest_float("motion_scale", 0.0, 8.0),
            warm_up_steps=trial.suggest_int("warm_up_steps", 0, self.max_warm_up),
            max_consecutive_reuse=trial.suggest_int("max_consecutive_reuse", 1, self.lags),
            late_start=trial.suggest_float("late_start", 0.5, 1.0),
            late_max_consecutive_reuse=trial.suggest_int("late_max_consecutive_reuse", 1, self.lags),
            forecast=trial.suggest_float("forecast", 0.0, 1.0) if self.forecast else 0.0,
            forecast_curvature=trial.suggest_float("forecast_curvature", 0.0, 1.0) if self.forecast else 0.0,
            # a fixed schedule's steps skip their calls whole, or serve block by block (drift-driven: blocks)
            skip_calls=trial.suggest_categorical("skip_calls", [False, True]) if self.calls else False,
            phase_breakpoints=(a, b),
            phase_multipliers=(early, min(1.5, late)),
            layer_multipliers={k: float(v**strength) for k, v in self.multipliers.items()},
            no_warp_layers=self.no_warp if use_warp_profile else (),
        )


    def schedules(self) -> list[dict[str, Any]]:
        """Trials the search starts from: fixed reuse schedules with first- and second-order forecasting
        (TaylorSeer's shape; the curvature at half weight, a damped extrapolation) and without (FORA's),
        every 2nd to 6th step after 1 to 6 warm-up steps; and the first-order ones again with their last
        five steps computed every 2nd or 3rd step (`late_start`, halfway between two steps' positions so
        rounding cannot move it). The first-order ones of every 3rd to 5th step after up to 3 warm-up steps
        once more skipping the calls they do not compute (`skip_calls`: faster at the same steps, and on the
        built-in model a few dB lower). Drift-driven configs must beat these to win, and a schedule is a corner
        (threshold at the largest drift) a sampler seldom lands on by itself.
        """
        late_start = (self.steps - 5.5) / (self.steps - 1) if self.steps > 6 else 1.0
        out = []
        for interval, warm, (forecast, curvature), late in itertools.product(
                (2, 3, 4, 5, 6), (1, 2, 3, 4, 6), ((1.0, 0.5), (1.0, 0.0), (0.0, 0.0)), (0, 1, 2)):
            if warm > self.max_warm_up or interval - 1 > self.lags:  # outside the search space
                continue
            if late and (late >= interval - 1 or curvature or not forecast or late_start == 1.0):
                continue  # no tighter than the schedule itself, or not a first-order forecast
            params = {"drift_metric": "cosine", "saliency_power": 1.0, "base_q": 1.0, "warp_frac": 0.0,
                      "phase_early": 1.0, "phase_late_share": 0.0, "sensitivity_strength": 0.0, "min_frac": 1.0,
                      "motion_scale": 0.0, "warm_up_steps": warm, "max_consecutive_reuse": interval - 1,
                      "late_start": late_start if late else 1.0, "late_max_consecutive_reuse": late or self.lags}
            if self.forecast:
                params |= {"forecast": forecast, "forecast_curvature": curvature}
            elif forecast:
                continue
            if self.calls:
                out.append(params | {"skip_calls": False})
                if forecast and not curvature and interval in (3, 4, 5) and warm <= 3:  # the speeds near 3x
                    out.append(params | {"skip_calls": True})
            else:
                out.append(params)
        return out


def open_storage(url: str | None) -> optuna.storages.BaseStorage | None:
    """In memory, any SQLAlchemy URL (SQLite, PostgreSQL, MySQL), or `journal:PATH` for a journal file."""
    if not url:
        return None
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
    except Exception as exc:
        detail = (str(exc).splitlines() or [""])[0]
        raise WarpcacheError(f"cannot open storage {redact(url)}: {type(exc).__name__}: "
                             f"{scrub(detail, url)}") from None


def _password(url: str) -> str | None:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).password
    except Exception:
        return None


def scrub(text: str, url: str) -> str:
    """`text` with the storage URL's password masked wherever it appears."""
    secret = _password(url)
    return text.replace(secret, "***") if secret else text


def redact(url: str) -> str:
    """A storage URL with its password masked, for messages and reports."""
    return scrub(url, url)


@dataclass
class TuneResult:
    study: optuna.Study
    candidates: list[Candidate]
    chosen: Candidate | None
    validated: bool
    message: str
    seconds: float
    band_db: float = 0.0  # configs estimated up to this far below the PSNR budget were validated too
    timing_noise: float = 0.0  # relative difference of two timings of one plain run during validation (median)

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self.study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]

    def pareto(self) -> list[dict[str, Any]]:
        trials = self.trials()
        pts = [(t.user_attrs["est_speedup"], t.user_attrs["est_psnr"], t.number) for t in trials]
        front = [p for p in pts if not any(q[0] >= p[0] and q[1] >= p[1] and q[:2] != p[:2] for q in pts)]
        return [{"trial": n, "est_speedup": s, "est_psnr": q} for s, q, n in sorted(front)]


class Tuner:
    def __init__(self, traces: list[Trace], budget: Budget, base: Config | None = None) -> None:
        if not traces:
            raise WarpcacheError("no traces to tune on")
        self.traces, self.budget = traces, budget
        self.replayers = [Replayer(t) for t in traces]
        if budget.min_psnr is not None and any(r.quality is None for r in self.replayers):
            raise WarpcacheError("a PSNR budget needs calibrated traces; re-profile with --calibrate 4 or more")
        model = traces[0].model
        tokens = traces[0].meta.get("token_subset"), traces[0].meta.get("token_seed")
        base = base or Config.default()
        base = Config.from_dict({**base.to_dict(), "upstream": model})
        self.space = SearchSpace(traces, base.with_policy(token_subset=tokens[0], token_seed=tokens[1]))

    def evaluate(self, cfg: Config) -> dict[str, float]:
        results = [r.run(cfg.policy) for r in self.replayers]
        return {
            "est_speedup": float(np.mean(np.concatenate([r.speedup for r in results]))),
            "est_psnr": float(np.min(np.concatenate([r.psnr for r in results]))),
            "est_drift": float(np.max(np.concatenate([r.drift for r in results]))),
            "est_compute": float(np.mean([np.mean(r.actions == RECOMPUTE) for r in results])),
        }

    def objective(self, trial: optuna.Trial, pareto: bool, total: int) -> float | tuple[float, float]:
        if len(trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) >= total:
            raise optuna.TrialPruned("another worker completed the study's last trial")
        est = self.evaluate(self.space.config(trial))
        for k, v in est.items():
            trial.set_user_attr(k, v)
        slack = self.budget.slack(est["est_psnr"], est["est_drift"])
        trial.set_user_attr("constraint", slack)
        trial.set_constraint("budget", slack)
        if pareto:
            return est["est_speedup"], est["est_psnr"]
        return est["est_speedup"]

    def search(self, trials: int, *, timeout: float | None = None, seed: int = 0, storage: str | None = None,
               study_name: str | None = None, pareto: bool = False,
               on_trial: Callable[[int], None] | None = None) -> optuna.Study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=min(40, max(10, trials // 10)), multivariate=True,
        )
        directions = ["maximize", "maximize"] if pareto else ["maximize"]
        try:
            study = optuna.create_study(storage=open_storage(storage), study_name=study_name, sampler=sampler,
                                        directions=directions, load_if_exists=True)
        except ValueError as exc:
            raise WarpcacheError(f"study {study_name!r}: {exc}") from None
        if study.directions != [optuna.study.StudyDirection.MAXIMIZE] * len(directions):
            raise WarpcacheError(f"study {study_name!r} was created with other objectives; use another --study-name")
        done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        if done and set(done[0].params) != set(self._param_names()):
            raise WarpcacheError(f"study {study_name!r} has a different search space; use another --study-name")
        complete = (optuna.trial.TrialState.COMPLETE,)
        if storage is None:  # not in shared studies: SQLite can hand one queued trial to two workers
            for params in self.space.schedules():
                study.enqueue_trial(params, user_attrs={"schedule": True})

        def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if on_trial:
                on_trial(len(study.get_trials(deepcopy=False, states=complete)))

        study.optimize(lambda t: self.objective(t, pareto, trials), n_trials=trials, timeout=timeout,
                       callbacks=[optuna.study.MaxTrialsCallback(trials, states=complete), callback],
                       gc_after_trial=False)
        return study

    def _param_names(self) -> list[str]:
        names: list[str] = []
        self.space.config(_Recorder(names))
        return names

    def _candidate(self, t: optuna.trial.FrozenTrial) -> Candidate:
        return Candidate(self.space.config(optuna.trial.FixedTrial(t.params)), t.number,
                         t.user_attrs["est_speedup"], t.user_attrs["est_psnr"], t.user_attrs["est_drift"],
                         work=_work(t))

    def closest(self, study: optuna.Study) -> Candidate | None:
        """The trial that missed the budget by the least, to report when none met it."""
        done = self._skipping(study)
        return self._candidate(min(done, key=lambda t: t.user_attrs["constraint"])) if done else None

    @staticmethod
    def _skipping(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
        """Complete trials that skip any work: a config that reuses nothing meets every budget and is no answer."""
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        return [t for t in done if t.user_attrs.get("est_speedup", 1.0) > 1.0 + 1e-6]

    def band_db(self) -> float:
        """How far below the budget an estimate may be and its config still be measured: the calibration
        runs' scatter above their estimates (a config estimated at budget - band came out at least that much
        better in 1 of 5 of them), so the band follows the model instead of a constant."""
        scatter = [v for r in self.replayers if r.quality for v in r.quality.residuals]
        return max(BAND_FLOOR_DB, float(np.quantile(scatter, BAND_QUANTILE))) if scatter else BAND_FLOOR_DB

    def candidates(self, study: optuna.Study, k: int, margin_db: float = 1.0, band_db: float = 0.0
                   ) -> list[Candidate]:
        """Up to k configs for validation, fastest first: the fastest the estimate says meets the budget, then
        ones trading speed for at least `margin_db` more PSNR headroom each, and the fastest fixed schedule.

        With `band_db` > 0 (a model will measure them), half the places go to the schedule ladder
        (`_schedules_by_work`): among the schedules estimated faster than the fastest config admitted, level by level of
        work (`_work`), most work first, the schedule the estimate rates best at each level (a rung), climbing while the
        rung's estimate is within `band_db` of the budget and one level more (the estimate underrates schedules most);
        then the next best at each of those levels (same work: its other forecast order or placement, say, which the
        estimate misjudges by 2 to 4 dB on the built-in model), the fastest levels' first; then the levels just under
        the fastest admitted, fallbacks should it fail. The estimate cannot say how fast a schedule may go, so the
        speeds around what it admits are measured in turn. (Starting past the band's fastest trial instead jumped past
        them when the band was wide: 6 dB on one trace, where schedules estimated 6 to 9 dB under the budget were
        measured and the next speeds up never.) Then the same-work twin of the fastest schedule admitted; then the
        fastest drift-driven configs whose estimated PSNR falls short of the budget by less than `band_db`: the estimate
        errs by a few dB on unseen seeds, so the fastest config that truly meets the budget is often just outside its
        feasible set. Places still free go to the same-work twins of the slower schedules admitted, then to the next
        fastest feasible configs.
        """
        done = self._skipping(study)
        done.sort(key=lambda t: (-t.user_attrs["est_speedup"], -t.user_attrs["est_psnr"]))
        feasible = [t for t in done if t.user_attrs["constraint"] <= 0.0]
        schedule = next((t for t in feasible if t.user_attrs.get("schedule")), None)
        picked: list[optuna.trial.FrozenTrial] = []
        slots = k - (schedule is not None) - (k // 2 if band_db > 0 else 0)
        for t in feasible:
            if len(picked) >= max(1, slots):
                break
            if not picked or t.user_attrs["est_psnr"] >= picked[-1].user_attrs["est_psnr"] + margin_db:
                picked.append(t)
        if schedule is not None and schedule not in picked:
            picked.append(schedule)
        admitted = {t.number: "estimate" for t in picked}
        if band_db > 0:

            def within_band(t: optuna.trial.FrozenTrial) -> bool:  # estimated less than the band under the budget
                return self.budget.slack(t.user_attrs["est_psnr"] + band_db, t.user_attrs["est_drift"]) <= 0.0

            groups = _schedules_by_work(done)
            floor = max(t.user_attrs["est_speedup"] for t in picked) if picked else 1.0
            # climbing from the fastest config admitted while the estimate is within the band of the budget, and
            # one speed more (the estimate underrates schedules most), then, as fallbacks, the speeds just under it:
            # the schedules estimated faster than it, in their order of work, then the others, least work first
            up = [group for work, group in sorted(groups.items(), reverse=True) if _fastest(group) > floor]
            plausible = sum(1 for _ in itertools.takewhile(lambda g: within_band(g[0]), up))
            down = [group for work, group in sorted(groups.items()) if _fastest(group) <= floor]
            # every level's rung before any level's runner-up (the fastest levels' first): schedules skipping calls
            # and served by blocks make twice the levels, and the climb must reach as far
            climb = up[: plausible + 1]
            ladder = ([g[0] for g in climb] + [g[1] for g in reversed(climb) if len(g) > 1]
                      + [t for group in down for t in group[:2]])[: k // 2]
            # the same-work twin of each schedule admitted, fastest first
            twins = [u for t in sorted(picked, key=_work) if t.user_attrs.get("schedule")
                     for u in groups[_work(t)][:2] if u is not t]
            near = [t for t in done if t.user_attrs["constraint"] > 0.0 and not t.user_attrs.get("schedule")
                    and t.user_attrs["est_speedup"] > floor and within_band(t)]
            labels = ({t.number: "same work" for t in twins}
                      | {t.number: "ladder" if t is groups[_work(t)][0] else "same work" for t in ladder}
                      | {t.number: "band" for t in near})
            seen = {_outcome(t) for t in picked}
            # in this order while places last; then the next fastest feasible configs the headroom rule passed by
            for t in ladder + twins[:1] + near + twins[1:] + feasible:
                if len(picked) >= k:
                    break
                if _outcome(t) not in seen:  # trials that decide alike estimate alike: one of them is enough
                    seen.add(_outcome(t))
                    picked.append(t)
                    admitted[t.number] = "estimate" if t.user_attrs["constraint"] <= 0.0 else labels[t.number]
        picked.sort(key=lambda t: -t.user_attrs["est_speedup"])
        return [replace(self._candidate(t), admitted=admitted[t.number]) for t in picked[:k]]


def _work(t: optuna.trial.FrozenTrial) -> tuple[float, int]:
    """How much a trial computes, the order of speed that timing noise cannot shuffle: the share of block calls it
    runs (a schedule's: its steps), then, at an equal share, 0 where the steps it does not compute skip their
    calls whole and 1 where they are served block by block (hooks, embeddings and output layer still run).

    Estimated speeds rest on a few timed runs at profile time: on one trace they put 5 computed steps at 3.14x and
    9 skipping their calls at 3.21x (measured 4.39x and about 3.1x), which sent the ladder past the second. Only
    schedules compare this way: a drift-driven config pays for measuring drift, which its share does not show."""
    skips = bool(t.params.get("skip_calls")) and bool(t.user_attrs.get("schedule"))
    return round(t.user_attrs.get("est_compute", 1.0), 4), 0 if skips else 1


def _fastest(group: list[optuna.trial.FrozenTrial]) -> float:
    return max(t.user_attrs["est_speedup"] for t in group)


def _schedules_by_work(done: list[optuna.trial.FrozenTrial]) -> dict[tuple[float, int], list[optuna.trial.FrozenTrial]]:
    """The fixed schedules by their work (`_work`: the steps they compute, and whether they skip calls), each
    group's best estimated first.

    The rungs of the schedule ladder come from here: past what the estimate admits, the best-estimated schedule
    at each of the next speeds is measured anyway. The estimate cannot be trusted to say how fast a schedule may
    go: it cannot see well where a schedule's computations fall late in the run, which on the built-in model
    moves measured PSNR by 8 dB at equal speed (29.4 against 37.4 dB computing 9 of 30 steps) and the estimate
    by 1 dB. Each rung that misses the budget costs about one run.
    """
    groups: dict[tuple[float, int], list[optuna.trial.FrozenTrial]] = {}
    for t in done:
        if t.user_attrs.get("schedule"):
            groups.setdefault(_work(t), []).append(t)
    for group in groups.values():
        group.sort(key=lambda t: -t.user_attrs["est_psnr"])
    return groups


def _outcome(t: optuna.trial.FrozenTrial) -> tuple[float, float]:
    return round(t.user_attrs["est_speedup"], 4), round(t.user_attrs["est_psnr"], 3)


class _Recorder(optuna.trial.FixedTrial):
    """A trial that answers every suggestion with its lower bound and remembers the names asked for."""

    def __init__(self, names: list[str]) -> None:
        super().__init__({})
        self._names = names

    def _suggest(self, name: str, distribution: optuna.distributions.BaseDistribution) -> Any:
        self._names.append(name)
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            return distribution.choices[0]
        return distribution.low


def validate(pipe: Any, candidates: list[Candidate], requests: list[Request], budget: Budget,
             tick: Callable[[], None] | None = None) -> tuple[Candidate | None, float]:
    """Run each candidate on the real model; the fastest that meets the PSNR budget on every request wins
    (`choose_measured`). Returns it and the timing noise it was chosen with.

    A candidate is dropped at its first run under the budget, so failing ones cost about one run
    each and more candidates can be measured for the same time.
    """
    tick = tick or (lambda: None)
    runtime.remove(pipe)
    warm_up(pipe, requests[0])
    alive = list(candidates)
    noise = []  # how far two timings of the same plain run differ, relatively
    for req in requests:
        ref, plain_before = timed(pipe, req)
        tick()
        runs = []
        for cand in alive:
            runtime.apply(pipe, cand.config)
            try:
                runs.append(timed(pipe, req))
            finally:
                runtime.remove(pipe)
            tick()
        # the plain run is timed before and after the cached ones, so load drift hits both sides alike
        plain_after = timed(pipe, req)[1]
        plain_s = (plain_before + plain_after) / 2
        noise.append(abs(plain_before - plain_after) / plain_s)
        for cand, (frames, cached_s) in zip(alive, runs):
            q = quality.compare(frames, ref)
            cand.measured.append({"seed": req.seed, "prompt": req.prompt, "speedup": plain_s / cached_s,
                                  "psnr": q["psnr"], "ssim": q["ssim"]})
        alive = [c for c in alive if budget.min_psnr is None or c.measured_psnr >= budget.min_psnr]
    noise_level = statistics.median(noise) if noise else 0.0
    return choose_measured(alive, noise_level), noise_level


def choose_measured(passed: list[Candidate], noise: float = 0.0) -> Candidate | None:
    """The fastest measured, unless a candidate doing less work (`Candidate.work`: fewer blocks computed, or as
    many skipping calls whole) measured within the timing noise of it (`noise`, relative: how far two timings of
    one plain run differ); then, among the candidates doing that same work, the best measured quality. Their
    measured speeds differ by timing noise alone (5% between two timings of one config in one run here), which
    should pick neither the worse output nor the config doing more work (a 10-step schedule over a 9-step one,
    at a 25 dB budget). Work, not the estimated speed: on the sample traces that put a 10-step schedule
    skipping calls (2.94x) above a 9-step one served by blocks (2.68x; measured 2.85x and 2.97x)."""
    if not passed:
        return None
    fastest = max(c.measured_speedup for c in passed)
    least_work = min(c.work for c in passed if c.measured_speedup >= fastest * (1.0 - noise))
    return max((c for c in passed if c.work == least_work), key=lambda c: c.measured_psnr)


def validation_requests(traces: list[Trace], seeds: list[int] | None, prompts: Sequence[str] = ()) -> list[Request]:
    """Every prompt of the traces, and `prompts` besides, on seeds they did not record (unless given), same steps
    and shape. The budget is checked on these requests only, and one config's PSNR scatters widely between them
    (26.2 to 37.0 dB over 9 requests of the built-in model): the more requests that stand for production's, the
    more the budget means."""
    m = traces[0].meta
    if seeds is None:
        top = max(s for t in traces for s in t.meta["seeds"])
        seeds = [top + 1001, top + 1002]
    shape = m.get("request", {})
    prompts = dict.fromkeys([*(p for t in traces for p in t.meta["prompts"]), *prompts])
    return [Request(p, s, m["steps"], m["guidance"], shape.get("frames"), shape.get("height"), shape.get("width"))
            for p in prompts for s in seeds]


def tune(traces: list[Trace], budget: Budget, *, trials: int = 300, timeout: float | None = None, seed: int = 0,
         storage: str | None = None, study_name: str | None = None, pareto: bool = False,
         pipe: Any = None, validation: list[Request] | None = None, top_k: int = 16, band_db: float | None = None,
         base: Config | None = None, on_trial: Callable[[int], None] | None = None,
         on_validate: Callable[[], None] | None = None) -> TuneResult:
    start = time.perf_counter()
    tuner = Tuner(traces, budget, base)
    study = tuner.search(trials, timeout=timeout, seed=seed, storage=storage, study_name=study_name,
                         pareto=pareto, on_trial=on_trial)
    validating = pipe is not None and bool(validation)
    band = (tuner.band_db() if band_db is None else band_db) if validating else 0.0  # nothing measures without
    cands = tuner.candidates(study, top_k, band_db=band)
    if not cands:
        closest = tuner.closest(study)
        msg = "no config meets the budget on the trace"
        if closest is not None:
            msg += f"; the closest found estimates {closest.est_psnr:.2f} dB at {closest.est_speedup:.2f}x"
        return TuneResult(study, [closest] if closest else [], None, False, msg, time.perf_counter() - start)
    if not validating:
        return TuneResult(study, cands, cands[0], False, "chosen on estimates (no model to validate on)",
                          time.perf_counter() - start)
    chosen, noise = validate(pipe, cands, validation, budget, on_validate)
    psnrs = [m["psnr"] for m in chosen.measured] if chosen is not None else []
    msg = ("no candidate met the budget on the real model" if chosen is None else
           f"fastest candidate whose measured PSNR met the budget on every one of the {len(validation)} validation "
           f"requests ({min(psnrs):.1f} to {max(psnrs):.1f} dB); others can fall below it (PSNR scatters between "
           "seeds as much as between prompts): validate on "
           "prompts and seeds that stand for production's (warpcache tune --validation-prompt, --validation-seeds)")
    return TuneResult(study, cands, chosen, True, msg, time.perf_counter() - start, band, noise)

"""How well the replay's PSNR estimate tracks PSNR measured on the real model.

    python benchmarks/estimate_accuracy.py sample_traces/*.safetensors --configs 20

Configs span fast to quality (trials of an offline tune, spread over the estimated PSNR
range). Each is replayed on the traces (estimate) and run live with the traces' prompts on
seeds the traces did not record (measurement). Prints the mean absolute error (goal <= 1.5 dB)
and Spearman's rank correlation (goal >= 0.9), the estimate's bias, and the MAE that measurement
noise alone would give (PSNR varies between seeds; more `--seeds` lower that floor).
`--rescore DUMP` re-estimates the configs of an earlier `--dump` against its measurements,
without the model: a change to the quality model is judged in seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import optuna
import torch

import warpcache_cli as wc
from warpcache_cli.budget import Budget
from warpcache_cli.measure import cached_psnr
from warpcache_cli.models import Request, load_model
from warpcache_cli.replay import Replayer
from warpcache_cli.trace import Trace
from warpcache_cli.tune import Tuner


def spread_configs(tuner: Tuner, study: optuna.Study, n: int) -> list[wc.Config]:
    """n trials whose estimated PSNR is spread evenly over the 20-45 dB range."""
    done = [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
            if 20 <= t.user_attrs["est_psnr"] <= 45 and t.user_attrs["est_speedup"] > 1.05]
    done.sort(key=lambda t: t.user_attrs["est_psnr"])
    # nearest trial to each of n evenly spaced PSNR targets: most trials sit at low PSNR, so picking by rank
    # would crowd the sample there instead of spanning fast to quality
    values = np.array([t.user_attrs["est_psnr"] for t in done])
    picks = []
    for target in np.linspace(values[0], values[-1], n):
        order = np.argsort(np.abs(values - target))
        picks.append(next(done[i] for i in order if done[i] not in picks))
    return [tuner.space.config(optuna.trial.FixedTrial(t.params)) for t in picks]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+", type=Path)
    ap.add_argument("--configs", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[2001])
    ap.add_argument("--dump", type=Path, help="write each config's per-run estimates and per-request measurements "
                    "here (JSON), to study the quality model without rerunning the model")
    ap.add_argument("--rescore", type=Path, help="take the configs and measurements from a --dump of an earlier run "
                    "of the same traces and only estimate again: a change to the quality model is judged in seconds")
    args = ap.parse_args()
    torch.set_num_threads(1)
    traces = [Trace.load(p) for p in args.traces]
    replayers = [Replayer(t) for t in traces]
    if args.rescore:
        earlier = json.loads(args.rescore.read_text())
        configs = [wc.Config.from_dict(r["config"]) for r in earlier]
        requests = [Request(p, s, traces[0].meta["steps"]) for p, s in earlier[0]["requests"]]
        measured = [r["measured"] for r in earlier]
    else:
        tuner = Tuner(traces, Budget(min_psnr=20.0))
        configs = spread_configs(tuner, tuner.search(400, seed=0), args.configs)
        requests = [Request(p, s, t.meta["steps"], t.meta["guidance"]) for t in traces for p in dict.fromkeys(
            t.meta["prompts"]) for s in args.seeds]
        measured = cached_psnr(load_model(traces[0].model), configs, requests)
    est, meas, rows = [], [], []
    print(f"{'config':>6} {'est PSNR':>9} {'measured':>9} {'est speedup':>11}")
    for i, (cfg, psnrs) in enumerate(zip(configs, measured)):
        results = [r.run(cfg.policy) for r in replayers]
        e = np.mean([res.psnr.mean() for res in results])
        m = float(np.mean(psnrs))
        sp = np.mean([res.speedup.mean() for res in results])
        est.append(e)
        meas.append(m)
        rows.append({"config": cfg.to_dict(), "measured": psnrs, "requests": [[q.prompt, q.seed] for q in requests],
                     "est_psnr": [res.psnr.tolist() for res in results],
                     "error": [res.error.tolist() for res in results]})
        print(f"{i:>6} {e:>9.2f} {m:>9.2f} {sp:>10.2f}x")
    est_a, meas_a = np.array(est), np.array(meas)
    finite = np.isfinite(est_a) & np.isfinite(meas_a)  # inf: the config reused nothing, the output is exact
    exact = np.isinf(est_a) & np.isinf(meas_a)
    print(f"{len(configs)} configs x {len(requests)} unprofiled requests: mean absolute error "
          f"{np.mean(np.abs(est_a - meas_a)[finite]):.2f} dB over the {finite.sum()} finite ones "
          f"({exact.sum()} exact on both sides, {len(est_a) - finite.sum() - exact.sum()} exact on one side only), "
          f"Spearman rank correlation {spearman(est_a, meas_a):.3f}")
    print(f"bias (estimated - measured) {np.mean((est_a - meas_a)[finite]):+.2f} dB")
    # the measured side is a mean over a few seeds per prompt, and PSNR varies by several dB between seeds:
    # even an estimate equal to the mean over all seeds would show this error, the floor the MAE can reach
    if len({q.seed for q in requests}) > 1:
        prompts = [q.prompt for q in requests]
        se = np.array([np.sqrt(np.mean([np.var([m for m, p in zip(r["measured"], prompts) if p == prompt], ddof=1)
                                        for prompt in set(prompts)]) / len(requests)) for r in rows])
        print(f"seed-to-seed noise of the measured means alone gives an MAE near "
              f"{np.nanmean(se) * np.sqrt(2 / np.pi):.2f} dB ({len({q.seed for q in requests})} seeds per prompt)")
    if args.dump:
        args.dump.write_text(json.dumps(rows, default=float))


if __name__ == "__main__":
    main()

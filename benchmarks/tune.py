"""Tuner figures: offline search speed, and the tuned config on seeds that were not profiled.

    python benchmarks/tune.py sample_traces/*.safetensors --min-psnr 30

Prints the time for 500 offline trials (goal <= 30 s) and, next to the three presets, the real
speedup and PSNR of the tuned (closed-loop validated) config on unprofiled seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import warpcache_cli as wc
from warpcache_cli.budget import Budget
from warpcache_cli.measure import measure
from warpcache_cli.models import Request, load_model
from warpcache_cli.trace import Trace
from warpcache_cli.tune import Tuner, tune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+", type=Path)
    ap.add_argument("--min-psnr", type=float, default=30.0)
    ap.add_argument("--trials", type=int, default=500)
    ap.add_argument("--test-seeds", type=int, nargs="+", default=[3001, 3002])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    traces = [Trace.load(p) for p in args.traces]
    start = time.perf_counter()
    Tuner(traces, Budget(min_psnr=args.min_psnr)).search(args.trials, seed=0)
    print(f"{args.trials} offline trials on {len(traces)} traces: {time.perf_counter() - start:.1f} s")
    pipe = load_model(traces[0].model)
    meta = traces[0].meta
    validation = [Request(p, s, meta["steps"], meta["guidance"]) for t in traces for p in dict.fromkeys(
        t.meta["prompts"]) for s in (1001, 1002)]
    result = tune(traces, Budget(min_psnr=args.min_psnr), trials=args.trials, seed=0, pipe=pipe,
                  validation=validation)
    print(result.message)
    print(f"{'trial':>6} {'est speedup':>11} {'est min PSNR':>12} {'measured speedup':>16} {'measured min PSNR':>17}")
    for c in result.candidates:
        mark = "  <- chosen" if c is result.chosen else ""
        print(f"{c.trial:>6} {c.est_speedup:>10.2f}x {c.est_psnr:>12.2f} {c.measured_speedup:>15.2f}x "
              f"{c.measured_psnr:>17.2f}{mark}")
    configs = {name: wc.Config.preset(name) for name in ("quality", "balanced", "fast")}
    if result.chosen is not None:
        configs["tuned"] = result.chosen.config
    prompts = [p for t in traces for p in dict.fromkeys(t.meta["prompts"])]
    print(f"{'config':<9} {'speedup (median)':>16} {'min PSNR dB':>12} {'mean PSNR dB':>13} "
          f"({len(prompts)} prompts x seeds {args.test_seeds}, {args.repeats} timed repeats each)")
    for name, cfg in configs.items():
        ms = [measure(pipe, cfg, Request(p, s, meta["steps"], meta["guidance"]), repeats=args.repeats)
              for p in prompts for s in args.test_seeds]
        psnr = np.array([m.quality["psnr"] for m in ms])
        print(f"{name:<9} {statistics.median(m.speedup for m in ms):>15.2f}x {psnr.min():>12.2f} "
              f"{psnr.mean():>13.2f}")


if __name__ == "__main__":
    main()

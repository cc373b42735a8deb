"""Fixed reuse schedules on the built-in model: the quality ceiling of block-level forecasting.

    python benchmarks/schedules.py --seeds 5000

Each schedule recomputes every block every N-th step after W warm-up steps (thresholds out of
reach, so only the schedule decides; some with the last five steps computed more densely, `late`),
with and without `forecast` (first order, and with its
`forecast_curvature` second-order term), and diffusers' TaylorSeer on the same full-compute steps:
the same Taylor forecast (order 1 or 2), but of each attention and feed-forward output, with the
block's norms and timestep gates run afresh. Prints mean and min PSNR over the
bench prompts against the uncached output, the fraction of block calls computed (its inverse
bounds the speedup), and warpcache's measured speedup (median over the prompts of the ratio of
median uncached and cached wall times, interleaved; PSNR does not depend on machine load, the
speedup does).

    python benchmarks/schedules.py --seeds 3001 3002 --skip-calls

runs the same schedules skipping the calls they do not compute (`skip_calls`: the call's output forecast
whole), TaylorSeer aside.

    python benchmarks/schedules.py --seeds 1003 1004 --computed 8

instead tries every schedule of this family that computes 8 steps (1 to 3 warm-up steps, every 4th to
7th step, the steps from a late start on every 2nd to 4th; first-order forecast) and prints each one's
PSNR only, best minimum first: whether any way of spending that much compute holds a PSNR budget.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

import warpcache_cli as wc
from warpcache_cli import quality
from warpcache_cli.bench import taylorseer_config
from warpcache_cli.measure import cached_psnr, measure
from warpcache_cli.models import Request, generate, load_model
from warpcache_cli.policy import schedule_steps

PROMPTS = ("a red circle moving right fast", "a blue square moving up slow", "a green triangle static")
# (interval, warm-up, forecast, forecast_curvature, late: the last five steps' reuse limit, 0 for none)
SCHEDULES = ((3, 3, 1.0, 0.0, 0), (3, 3, 1.0, 0.5, 0), (4, 3, 1.0, 0.0, 0), (4, 3, 1.0, 0.5, 0), (4, 3, 0.8, 0.5, 0),
             (5, 3, 1.0, 0.5, 0), (4, 3, 0.0, 0.0, 0), (4, 2, 1.0, 0.0, 0), (4, 2, 1.0, 0.0, 2), (5, 2, 1.0, 0.0, 2),
             (4, 1, 1.0, 0.0, 1))
TAYLORSEER_SCHEDULES = ((4, 2, 1), (4, 2, 2), (5, 2, 2))  # (interval, steps before the first forecast, order)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[5000])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side; the speedup is their medians' ratio")
    ap.add_argument("--computed", type=int, help="try every schedule computing this many steps (PSNR only)")
    ap.add_argument("--skip-calls", action="store_true", help="skip the calls the schedules do not compute")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = load_model("builtin")
    requests = [Request(p, s, args.steps) for p in PROMPTS for s in args.seeds]
    if args.computed:
        sweep(pipe, requests, args.steps, args.computed)
        return
    references = [generate(pipe, r) for r in requests]
    print(f"{'interval':>8} {'warm-up':>7} {'forecast':>8} {'curv.':>5} {'late':>4} {'mean PSNR':>9} {'min PSNR':>8} "
          f"{'computed':>8} {'speedup':>7}")
    for interval, warm, forecast, curvature, late in SCHEDULES:
        # the last five steps, as the tuner's enqueued schedules
        config = schedule(args.steps, warm, interval, args.steps - 5 if late else args.steps, late + 1, forecast,
                          curvature).with_policy(skip_calls=args.skip_calls)
        runs = [measure(pipe, config, req, args.repeats) for req in requests]
        psnr = [m.quality["psnr"] for m in runs]
        print(f"{interval:>8} {warm:>7} {forecast:>8.1f} {curvature:>5.1f} {late or '-':>4} {np.mean(psnr):>9.2f} "
              f"{np.min(psnr):>8.2f} "
              f"{np.mean([m.stats['compute_fraction'] for m in runs]):>8.3f} "
              f"{np.median([m.speedup for m in runs]):>6.2f}x")
    for interval, warm, order in () if args.skip_calls else TAYLORSEER_SCHEDULES:
        # full compute at steps < warm and at warm + 1 + k interval (diffusers' `_measure_should_compute`)
        psnr = []
        for req, ref in zip(requests, references):
            pipe.transformer.enable_cache(taylorseer_config(interval, order, disable_cache_before_step=warm))
            try:
                psnr.append(quality.psnr(generate(pipe, req), ref))
            finally:
                pipe.transformer.disable_cache()
        computed = (warm + len(range(warm + 1, args.steps, interval))) / args.steps
        print(f"{'TaylorSeer ' + str(interval):>8} {warm:>7} {'order ' + str(order):>8} {'':>5} {'':>4} "
              f"{np.mean(psnr):>9.2f} {np.min(psnr):>8.2f} "
              f"{computed:>8.3f}")


def schedule(steps: int, warm: int, interval: int, late_step: int, late: int, forecast: float = 1.0,
             curvature: float = 0.0) -> wc.Config:
    """Every `interval`-th step after `warm` warm-up steps, every `late`-th from step `late_step` on (none at
    `steps`): thresholds out of reach, so only the schedule decides."""
    late_on = late_step < steps
    return wc.Config.default().with_schedule(interval, warm, forecast=forecast, curvature=curvature,
                                             late_start=(late_step - 0.5) / (steps - 1) if late_on else 1.0,
                                             late_every=late if late_on else None)


def sweep(pipe, requests: list[Request], steps: int, n: int) -> None:
    found: dict[tuple[int, ...], wc.Config] = {}
    for warm, interval, late_step, late in itertools.product(range(1, 4), range(4, 8), range(steps // 2, steps + 1),
                                                             range(2, 5)):
        config = schedule(steps, warm, interval, late_step, late)
        at = tuple(schedule_steps(config.policy, np.linspace(0.0, 1.0, steps)))
        if len(at) == n:
            found.setdefault(at, config)
    rows = [(min(psnr), float(np.mean(psnr)), at)
            for at, psnr in zip(found, cached_psnr(pipe, list(found.values()), requests))]
    print(f"{len(found)} schedules computing {n} of {steps} steps, first-order forecast")
    print(f"{'min PSNR':>8} {'mean PSNR':>9}  computed steps")
    for low, mean, at in sorted(rows, reverse=True):
        print(f"{low:>8.2f} {mean:>9.2f}  {list(at)}")


if __name__ == "__main__":
    main()

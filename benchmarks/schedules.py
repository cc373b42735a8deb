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
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import warpcache_cli as wc
from warpcache_cli import quality
from warpcache_cli.bench import taylorseer_config
from warpcache_cli.measure import measure
from warpcache_cli.models import Request, generate, load_model

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
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = load_model("builtin")
    requests = [Request(p, s, args.steps) for p in PROMPTS for s in args.seeds]
    references = [generate(pipe, r) for r in requests]
    print(f"{'interval':>8} {'warm-up':>7} {'forecast':>8} {'curv.':>5} {'late':>4} {'mean PSNR':>9} {'min PSNR':>8} "
          f"{'computed':>8} {'speedup':>7}")
    late_start = (args.steps - 5.5) / (args.steps - 1)  # the last five steps, as the tuner's enqueued schedules
    for interval, warm, forecast, curvature, late in SCHEDULES:
        config = wc.Config.default().with_policy(
            base_threshold=2.0, min_threshold=2.0, warp_threshold=0.0, motion_scale=0.0, phase_multipliers=(1.0, 1.0),
            warm_up_steps=warm, max_consecutive_reuse=interval - 1, forecast=forecast, forecast_curvature=curvature,
            late_start=late_start if late else 1.0, late_max_consecutive_reuse=late or interval - 1)
        runs = [measure(pipe, config, req, args.repeats) for req in requests]
        psnr = [m.quality["psnr"] for m in runs]
        print(f"{interval:>8} {warm:>7} {forecast:>8.1f} {curvature:>5.1f} {late or '-':>4} {np.mean(psnr):>9.2f} "
              f"{np.min(psnr):>8.2f} "
              f"{np.mean([m.stats['compute_fraction'] for m in runs]):>8.3f} "
              f"{np.median([m.speedup for m in runs]):>6.2f}x")
    for interval, warm, order in TAYLORSEER_SCHEDULES:
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


if __name__ == "__main__":
    main()

"""Runtime overhead and preset speedups on the built-in model, as ratios measured in one run.

    python benchmarks/runtime_overhead.py --repeats 5

Prints the wall-time ratio of a never-reuse config to the plain model (goal <= 1.05) and
each preset's speedup and PSNR against the uncached output.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import warpcache_cli as wc
from warpcache_cli.measure import measure, timed, warm_up
from warpcache_cli.models import Request, load_model

PROMPTS = ("a red circle moving right fast", "a blue square moving up slow", "a green triangle static")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_model("builtin")
    req = Request(PROMPTS[0], args.seed, args.steps)
    warm_up(pipe, req)
    never = wc.Config.default().with_policy(warm_up_steps=1000)
    plain, hooked = [], []
    for _ in range(args.repeats):  # interleaved, so load drift hits both sides alike
        plain.append(timed(pipe, req)[1])
        wc.apply(pipe, never)
        hooked.append(timed(pipe, req)[1])
        wc.remove(pipe)
    ratio = statistics.median(hooked) / statistics.median(plain)
    print(f"never-reuse / plain wall time: {ratio:.3f} (median of {args.repeats}, {args.steps} steps, "
          f"plain {statistics.median(plain):.3f} s)")
    print(f"{'preset':<10} {'prompt':<34} {'speedup':>8} {'PSNR dB':>8} {'SSIM':>6} {'computed':>9}")
    for name in ("quality", "balanced", "fast"):
        cfg = wc.Config.preset(name)
        for prompt in PROMPTS:
            m = measure(pipe, cfg, Request(prompt, args.seed, args.steps), repeats=args.repeats)
            print(f"{name:<10} {prompt:<34} {m.speedup:>7.2f}x {m.quality['psnr']:>8.2f} {m.quality['ssim']:>6.3f} "
                  f"{m.stats['compute_fraction']:>8.0%}")


if __name__ == "__main__":
    main()

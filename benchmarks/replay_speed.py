"""Replay speed on a 50-step x 30-block trace (goal: at most 1 ms median per replay).

    python benchmarks/replay_speed.py

The trace is a real 50-step built-in trace whose 6 blocks are tiled to 30 (the replay's cost
depends on the shape, not on the values).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import warpcache_cli as wc
from warpcache_cli.models import Request, load_model
from warpcache_cli.profile import profile
from warpcache_cli.replay import Replayer
from warpcache_cli.trace import Trace


def widen(trace: Trace, blocks: int) -> Trace:
    arrays = {}
    for key, value in trace.arrays.items():
        if value.ndim >= 4 and key not in ("reference",):
            reps = -(-blocks // value.shape[3])
            value = np.concatenate([value] * reps, axis=3)[:, :, :, :blocks]
        elif key == "plain_block_seconds":
            value = np.resize(value, blocks)
        arrays[key] = value
    return Trace(dict(trace.meta), arrays)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--replays", type=int, default=1000, help="per round")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds of replays, back to back: this machine's speed drifts by up to 1.6x over seconds, "
                         "and each round's median shows where it stood")
    args = ap.parse_args()
    torch.set_num_threads(1)
    trace = widen(profile(load_model("builtin"), [Request("a red circle moving right fast", 0, args.steps)],
                          model_id="builtin", calibrate=0), args.blocks)
    replayer = Replayer(trace)
    policies = [wc.Config.preset(n).policy for n in ("fast", "balanced", "quality")]
    rounds = []
    for _ in range(args.rounds):
        times = []
        for i in range(args.replays):
            start = time.perf_counter()
            replayer.run(policies[i % 3])
            times.append(time.perf_counter() - start)
        rounds.append(times)
    times = [t for r in rounds for t in r]
    runs, branches, steps, blocks = trace.shape
    print(f"trace shape: {runs} run x {branches} branches x {steps} steps x {blocks} blocks")
    print(f"replay: median {statistics.median(times) * 1e3:.3f} ms, p90 {np.percentile(times, 90) * 1e3:.3f} ms "
          f"over {len(times)} replays ({1 / statistics.median(times):.0f} per second); the median of each round of "
          f"{args.replays}: {' '.join(f'{statistics.median(r) * 1e3:.3f}' for r in rounds)} ms")


if __name__ == "__main__":
    main()

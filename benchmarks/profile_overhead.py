"""Profiling cost on the built-in model: recorded run vs plain run, and the trace's size.

    python benchmarks/profile_overhead.py --repeats 3

Goals: recording costs at most 1.15x the plain run; a 30-step trace at the default token
subset is at most 5 MB. The ratio depends on the torch threads (`--threads`, default 1): the recorder's
small operations do not speed up with more threads the way the model does, and the CLI uses torch's
default (every core).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from warpcache_cli.measure import timed, warm_up
from warpcache_cli.models import Request, load_model
from warpcache_cli.profile import profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frames", type=int, default=None, help="default: the built-in model's own")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_model("builtin")
    shape = {k: v for k, v in (("frames", args.frames), ("height", args.height), ("width", args.width)) if v}
    req = Request("a red circle moving right fast", 3, args.steps, **shape)
    warm_up(pipe, req)
    plain, recorded = [timed(pipe, req)[1]], []
    for _ in range(args.repeats):
        trace = profile(pipe, [req], model_id="builtin", calibrate=0)
        recorded.append(float(trace.arrays["run_seconds"][0]))
        plain.append(timed(pipe, req)[1])
    # each recording against the plain runs just before and after it: this machine's speed drifts by 10-25% over
    # tens of seconds, which a ratio of medians over the whole benchmark mixes in, and a pair mostly shares
    pairs = [r / ((a + b) / 2) for r, a, b in zip(recorded, plain, plain[1:])]
    ratio = statistics.median(pairs)
    with tempfile.TemporaryDirectory() as tmp:
        size = trace.save(Path(tmp) / "t.safetensors").stat().st_size
    print(f"recorded / plain wall time: {ratio:.3f} (median of {args.repeats} recordings, each against the plain "
          f"runs before and after it; {args.steps} steps, plain {statistics.median(plain):.3f} s)")
    print(f"  per recording: {' '.join(f'{p:.3f}' for p in pairs)}; ratio of the medians "
          f"{statistics.median(recorded) / statistics.median(plain):.3f}")
    print(f"trace size, 1 run, {args.steps} steps, {trace.shape[3]} blocks, 2 branches, {trace.meta['resolution']}, "
          f"{trace.meta['token_subset']} drift tokens, {trace.meta['sketch_tokens']} sketch tokens: "
          f"{size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

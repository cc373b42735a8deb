"""Regenerate sample_traces/: calibrated 30-step traces of the built-in model, one per kind of motion.

Each holds three seeds of its prompt, so estimates average over seeds as measurements on unseen
seeds do, and no sketches (nothing reads them; they would triple the size). Run it on an idle
machine: the calibration runs are timed, and the replay's speed estimate is fit to them.

    python scripts/make_sample_traces.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from warpcache_cli.models import Request, load_model
from warpcache_cli.profile import profile

SAMPLES = {
    "static": "a green triangle static",
    "slow": "a blue square moving up slow",
    "fast": "a red circle moving right fast",
}
SEEDS = (0, 1, 2)
OUT = Path(__file__).parents[1] / "sample_traces"


def main() -> None:
    torch.set_num_threads(1)
    pipe = load_model("builtin")
    for name, prompt in SAMPLES.items():
        requests = [Request(prompt, seed, 30) for seed in SEEDS]
        trace = profile(pipe, requests, model_id="builtin", calibrate=6, sketch_tokens=0)
        path = trace.save(OUT / f"builtin-{name}.safetensors")
        print(f"{path}: {path.stat().st_size / 1e6:.2f} MB, calibration PSNR {trace.meta['calibration']['psnr']}")


if __name__ == "__main__":
    main()

"""Regenerate the presets: closed-loop tunes of the built-in model's sample traces at three budgets.

    python scripts/make_presets.py

quality, balanced and fast are the validated choices at a minimum PSNR of 35, 30 and 25 dB on
unprofiled seeds; each file's first line says what was measured. Run it on an idle machine after
`scripts/make_sample_traces.py`: validation times the candidates.
"""

from __future__ import annotations

from pathlib import Path

import torch

from warpcache_cli.budget import Budget
from warpcache_cli.config import PRESETS_DIR, Config
from warpcache_cli.models import load_model
from warpcache_cli.trace import Trace
from warpcache_cli.tune import tune, validation_requests

BUDGETS = {"quality": 35.0, "balanced": 30.0, "fast": 25.0}
TRACES = sorted((Path(__file__).parents[1] / "sample_traces").glob("*.safetensors"))


def main() -> None:
    torch.set_num_threads(1)
    traces = [Trace.load(p) for p in TRACES]
    pipe = load_model(traces[0].model)
    requests = validation_requests(traces, None)
    for name, db in BUDGETS.items():
        result = tune(traces, Budget(min_psnr=db), trials=500, seed=0, pipe=pipe, validation=requests)
        if result.chosen is None:
            raise SystemExit(f"{name}: {result.message}")
        c = result.chosen
        seeds = sorted({r.seed for r in requests})
        preset = Config.from_dict({**c.config.to_dict(), "upstream": ""})  # a starting point for any model
        path = preset.save(PRESETS_DIR / f"{name}.yaml")
        header = (f"# {name}: tuned on the built-in model at >= {db:g} dB (scripts/make_presets.py, trial {c.trial}); "
                  f"measured {c.measured_speedup:.2f}x, PSNR >= {c.measured_psnr:.1f} dB on seeds {seeds} "
                  "against uncached. Tune for your model.\n")
        path.write_text(header + path.read_text())
        print(header.strip())


if __name__ == "__main__":
    main()

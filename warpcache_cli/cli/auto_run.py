"""`warpcache run MODEL --auto`: serve N requests under auto-profiling and show what phase each ran in."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from warpcache_cli.autoprofile import Served, serve
from warpcache_cli.cli._output import console, print_json, progress, table
from warpcache_cli.config import Config
from warpcache_cli.models import Request, load_model


def _phase(s: Served) -> str:
    if s.info.passed is None:
        return s.info.phase
    verdict = "validated" if s.info.passed else "failed validation, fell back"
    return f"{s.info.phase} ({verdict}: {s.info.validation_psnr:.2f} dB)"


def _psnr(s: Served) -> str:
    if s.psnr is None:
        return "exact (full compute)"
    return "inf" if math.isinf(s.psnr) else f"{s.psnr:.2f} dB"


def run_auto(model: str, cfg: Config, req: Request, n: int, device: str, dtype: str, json_out: bool) -> None:
    """N requests with seeds seed, seed+1, ... and `profiler.auto_profile` forced on."""
    cfg = dataclasses.replace(cfg, profiler=dataclasses.replace(cfg.profiler, auto_profile=True))
    requests = [dataclasses.replace(req, seed=req.seed + i) for i in range(n)]
    with progress(json_out) as bar:
        task = bar.add_task("loading model", total=None)
        pipe = load_model(model, device, dtype)
        served, controller = serve(pipe, cfg, requests, progress=lambda text: bar.update(task, description=text))
    config_path = controller.outputs.get("config")
    data: dict[str, Any] = {
        "model": model,
        "requests": [{"seed": s.request.seed, "seconds": s.seconds, "shape": s.info.shape, "phase": s.info.phase,
                      "decisions": s.info.counts, "psnr": s.psnr, "validation_psnr": s.info.validation_psnr,
                      "validated": s.info.passed} for s in served],
        "shapes": controller.summary(),
        "config": config_path,
        "sensitivity": controller.outputs.get("sensitivity"),
    }
    if json_out:
        print_json(data)
        return
    table(f"warpcache run --auto: {model}, {req.steps} steps, {n} requests, budget {cfg.profiler.min_psnr:g} dB",
          ["#", "seed", "wall time", "phase", "recompute / reuse / warp", "PSNR vs uncached"],
          [[i + 1, s.request.seed, f"{s.seconds:.3f} s", _phase(s),
            " / ".join(str(s.info.counts[a]) for a in ("recompute", "reuse", "warp")), _psnr(s)]
           for i, s in enumerate(served)])
    console.print("a validated request's wall time includes its uncached reference run")
    for shape in controller.summary():
        reason = f" ({shape['reason']})" if shape["reason"] else ""
        console.print(f"shape {shape['shape']}: {shape['phase']}{reason}")
    console.print(f"tuned config: {config_path}" if config_path else "no tuned config was written")

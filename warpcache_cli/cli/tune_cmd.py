"""`warpcache tune`: search a config on traces, validate it on the real model, write config and profile."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from warpcache_cli import sensitivity
from warpcache_cli.atomic import write_text
from warpcache_cli.budget import Budget
from warpcache_cli.cli._errors import handle_errors
from warpcache_cli.cli._options import Device, Dtype, JsonOut
from warpcache_cli.cli._output import console, err_console, print_json, progress, table
from warpcache_cli.cli.profile_cmd import parse_seeds
from warpcache_cli.config import PolicyConfig
from warpcache_cli.errors import BudgetExceeded, ModelError, WarpcacheError
from warpcache_cli.models import load_model
from warpcache_cli.policy import schedule_steps
from warpcache_cli.trace import Trace
from warpcache_cli.tune import Candidate, TuneResult, redact, tune, validation_requests

CONFIG_NAME = "warpcache-config.json"
SENSITIVITY_NAME = "warpcache-sensitivity.json"
HEATMAP_NAME = "warpcache-sensitivity.png"
REPORT_NAME = "warpcache-tune-report.json"


def _report(result: TuneResult, budget: Budget, storage: str | None, outputs: dict[str, str]) -> dict[str, Any]:
    return {
        "message": result.message,
        "budget": {"min_psnr": budget.min_psnr, "max_drift": budget.max_drift},
        "trials": len(result.trials()),
        "seconds": result.seconds,
        "validated": result.validated,
        "storage": redact(storage) if storage else "memory",
        "study_name": result.study.study_name,
        "chosen": result.chosen.to_dict() if result.chosen else None,
        "band_db": result.band_db,
        "timing_noise": result.timing_noise,
        "candidates": [c.to_dict() for c in result.candidates],
        "pareto": result.pareto() if len(result.study.directions) == 2 else None,
        "outputs": outputs,
    }


@handle_errors
def tune_command(
    traces: Annotated[list[Path], typer.Argument(help="trace files recorded by `warpcache profile`")],
    min_psnr: Annotated[float, typer.Option(help="quality budget: PSNR (dB) against the uncached output")] = 30.0,
    max_drift: Annotated[float | None, typer.Option(help="budget on accumulated drift")] = None,
    trials: Annotated[int, typer.Option(min=1, help="Optuna trials in all (across workers sharing a study)")] = 300,
    timeout: Annotated[float | None, typer.Option(help="stop searching after this many seconds")] = None,
    seed: Annotated[int, typer.Option(help="sampler seed, for reproducible searches")] = 0,
    objective: Annotated[str, typer.Option(help="'speed' (max speedup under budget) or 'pareto'")] = "speed",
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (sqlite:///t.db, journal:FILE, ...)")] = None,
    study_name: Annotated[str | None, typer.Option(help="study to create or resume in --storage")] = None,
    model: Annotated[str | None, typer.Option(help="model to validate on (default: the trace's)")] = None,
    validate: Annotated[bool, typer.Option("--validate/--no-validate", help="run top candidates for real")] = True,
    validation_seeds: Annotated[str | None, typer.Option(help="seeds for validation, e.g. 1001,1002")] = None,
    validation_prompt: Annotated[list[str] | None, typer.Option(
        help="validate on this prompt too, besides the traces' (repeat for several): the budget holds on the "
             "prompts validated, not on every prompt")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="candidates validated on the real model")] = 16,
    band: Annotated[float | None, typer.Option(min=0.0, help="also validate configs estimated up to this many dB "
                                               "below --min-psnr (default: from the calibration runs' "
                                               "scatter around the estimate)")] = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    out: Annotated[Path, typer.Option(help="folder for the config, sensitivity profile and report")] = Path("."),
    json_out: JsonOut = False,
) -> None:
    """Tune the caching policy on traces against a quality budget; write config, sensitivity and report.

    Example: warpcache tune sample_traces/*.safetensors --min-psnr 30 --trials 500 --out tuned/
    """
    if objective not in ("speed", "pareto"):
        raise WarpcacheError(f"--objective {objective!r}: expected 'speed' or 'pareto'")
    budget = Budget(min_psnr, max_drift)
    loaded = [Trace.load(p) for p in traces]
    if len({t.model for t in loaded}) > 1:
        raise WarpcacheError(f"traces record different models: {sorted({t.model for t in loaded})}")
    pipe, requests = None, []
    if validate:
        spec = model or loaded[0].model
        try:
            pipe = load_model(spec, device, dtype)
        except ModelError as exc:
            if model is not None:
                raise
            err_console.print(f"[yellow]not validating: the trace's model cannot be loaded here ({exc})")
        requests = validation_requests(loaded, parse_seeds(validation_seeds) if validation_seeds else None,
                                       validation_prompt or ())
    with progress(json_out) as bar:
        search = bar.add_task("searching (offline replay)", total=trials)
        check = bar.add_task("validating on the model", total=len(requests) * (1 + top_k), visible=False)

        def on_validate() -> None:
            bar.update(check, visible=True, advance=1)

        result = tune(
            loaded,
            budget,
            trials=trials,
            timeout=timeout,
            seed=seed,
            storage=storage,
            study_name=study_name,
            pareto=objective == "pareto",
            pipe=pipe,
            validation=requests,
            top_k=top_k,
            band_db=band,
            on_trial=lambda n: bar.update(search, completed=n),
            on_validate=on_validate,
        )
    profile = sensitivity.sensitivity(loaded[0])
    outputs = {
        "sensitivity": str(sensitivity.save(profile, out / SENSITIVITY_NAME)),
        "heatmap": str(sensitivity.heatmap(loaded[0], out / HEATMAP_NAME)),
    }
    if result.chosen is not None:
        outputs["config"] = str(result.chosen.config.save(out / CONFIG_NAME))
    report = _report(result, budget, storage, outputs)
    write_text(out / REPORT_NAME, json.dumps(report, indent=2, default=float))
    if json_out:
        print_json(report)
    else:
        position = loaded[0].arrays["position"][0]
        rows = [
            [
                c.trial,
                _describe(c.config.policy, position),
                f"{c.est_speedup:.2f}x",
                c.est_psnr,
                f"{c.measured_speedup:.2f}x" if c.measured else "-",
                measured_min(c, len(requests)),
                " ".join(w for w, on in (("chosen", c is result.chosen),
                                         (f"(est. below budget: {c.admitted})", c.below_estimate)) if on),
            ]
            for c in result.candidates
        ]
        table(
            f"warpcache tune: {report['trials']} trials in {result.seconds:.1f} s, budget PSNR >= {min_psnr} dB",
            ["trial", "config", "est speedup", "est PSNR dB", "measured speedup", "measured min PSNR dB", ""],
            rows,
        )
        console.print(result.message)
        for name, path in outputs.items():
            console.print(f"wrote {name}: {path}")
    if result.chosen is None:
        raise BudgetExceeded(result.message)


def _describe(policy: PolicyConfig, position: np.ndarray) -> str:
    """A candidate in a few words: a fixed schedule by the steps it computes (listed when few), else
    drift-driven; and how reused residuals are served."""
    steps = schedule_steps(policy, position)
    served = ("no forecast" if not policy.forecast else
              f"curvature {policy.forecast_curvature:g}" if policy.forecast_curvature else
              "first order" if policy.forecast == 1.0 else f"forecast {policy.forecast:.2g}")
    if steps is None:
        return f"drift-driven, {served}"
    listed = f": {' '.join(map(str, steps))}" if len(steps) <= 12 else ""
    return f"{len(steps)} of {len(position)} steps{listed}, {served}{', whole calls' if policy.skip_calls else ''}"


def measured_min(c: Candidate, requests: int) -> str:
    """The lowest PSNR measured, saying when the candidate was dropped before the last request: its minimum
    is then only over the requests it ran on, a failing run, not how far it is from the budget."""
    if not c.measured:
        return "-"
    low = f"{c.measured_psnr:.1f}"
    return low if len(c.measured) >= requests else f"{low} (dropped at request {len(c.measured)} of {requests})"

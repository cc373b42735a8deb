"""`warpcache replay`: a config judged against traces, with a CI-friendly exit code."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from warpcache_cli.atomic import write_text
from warpcache_cli.budget import Budget
from warpcache_cli.cli._errors import handle_errors
from warpcache_cli.cli._options import JsonOut
from warpcache_cli.cli._output import console, decision_map, print_json, table
from warpcache_cli.cli.run_cmd import resolve_config
from warpcache_cli.errors import BudgetExceeded
from warpcache_cli.policy import Action
from warpcache_cli.replay import ReplayResult, replay
from warpcache_cli.trace import Trace


def _rows(path: Path, trace: Trace, result: ReplayResult) -> list[dict[str, Any]]:
    rows = []
    for r in range(trace.shape[0]):
        a = result.actions[r]
        rows.append(
            {
                "trace": str(path),
                "run": r,
                "prompt": trace.meta["prompts"][r],
                "seed": trace.meta["seeds"][r],
                "recompute": int((a == Action.RECOMPUTE).sum()),
                "reuse": int((a == Action.REUSE).sum()),
                "warp": int((a == Action.WARP).sum()),
                "compute_fraction": float((a == Action.RECOMPUTE).mean()),
                "est_speedup": float(result.speedup[r]),
                "est_psnr": float(result.psnr[r]),
                "est_ssim": float(result.ssim[r]),
                "drift": float(result.drift[r]),
            }
        )
    return rows


def write_junit(path: Path, rows: list[dict[str, Any]], failures: dict[int, list[str]]) -> None:
    suite = ET.Element(
        "testsuite", name="warpcache replay", tests=str(len(rows)), failures=str(sum(1 for f in failures.values() if f))
    )
    for i, row in enumerate(rows):
        case = ET.SubElement(suite, "testcase", classname=row["trace"], name=f"run {row['run']}: {row['prompt']}")
        for message in failures.get(i, []):
            ET.SubElement(case, "failure", message=message).text = message
    write_text(path, ET.tostring(suite, encoding="unicode", xml_declaration=True))


@handle_errors
def replay_command(
    traces: Annotated[list[Path], typer.Argument(help="trace files recorded by `warpcache profile`")],
    config: Annotated[Path | None, typer.Option(help="config file (JSON or YAML)")] = None,
    preset: Annotated[str | None, typer.Option(help="fast, balanced or quality")] = None,
    min_psnr: Annotated[float | None, typer.Option(help="fail when estimated PSNR (dB) is lower")] = None,
    max_drift: Annotated[float | None, typer.Option(help="fail when accumulated drift is higher")] = None,
    min_speedup: Annotated[float | None, typer.Option(help="fail when estimated speedup is lower")] = None,
    junit: Annotated[Path | None, typer.Option(help="write a JUnit XML report for CI")] = None,
    show_map: Annotated[bool, typer.Option("--map/--no-map", help="print the decision map of run 0")] = True,
    json_out: JsonOut = False,
) -> None:
    """Replay traces through a config; exit 1 when any run is over budget (a CI quality gate).

    Example: warpcache replay sample_traces/*.safetensors --config warpcache-config.json --min-psnr 30
    """
    budget = Budget(min_psnr, max_drift, min_speedup)
    cfg = resolve_config(config, preset)
    loaded = [(p, Trace.load(p)) for p in traces]
    rows, maps = [], []
    for path, trace in loaded:
        result = replay(trace, cfg)
        rows += _rows(path, trace, result)
        maps.append((path, result.actions[0, 0]))
    failures = {i: budget.violations(r["est_psnr"], r["drift"], r["est_speedup"]) for i, r in enumerate(rows)}
    failed = [f"{rows[i]['trace']} run {rows[i]['run']}: {msg}" for i, msgs in failures.items() for msg in msgs]
    if junit is not None:
        write_junit(junit, rows, failures)
    overall = {
        "runs": len(rows),
        "est_speedup": float(np.mean([r["est_speedup"] for r in rows])),
        "min_est_psnr": float(np.min([r["est_psnr"] for r in rows])),
        "max_drift": float(np.max([r["drift"] for r in rows])),
        "within_budget": not failed,
        "violations": failed,
    }
    if json_out:
        print_json({"runs": rows, "overall": overall})
    else:
        table(
            "warpcache replay (estimates)",
            ["trace", "run", "prompt", "seed", "compute", "est speedup", "est PSNR dB", "est SSIM", "drift"],
            [
                [
                    Path(r["trace"]).name,
                    r["run"],
                    r["prompt"],
                    r["seed"],
                    f"{r['compute_fraction']:.0%}",
                    f"{r['est_speedup']:.2f}x",
                    r["est_psnr"],
                    r["est_ssim"],
                    r["drift"],
                ]
                for r in rows
            ],
        )
        console.print(
            f"overall: {overall['runs']} runs, mean est speedup {overall['est_speedup']:.2f}x, "
            f"min est PSNR {overall['min_est_psnr']:.2f} dB, max drift {overall['max_drift']:.4g}"
        )
        if show_map:
            for path, actions in maps:
                console.print(decision_map(actions, f"{Path(path).name} run 0, branch 0"))
    if failed:
        raise BudgetExceeded("over budget: " + "; ".join(failed))

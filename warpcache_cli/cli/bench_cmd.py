"""`warpcache bench` (every caching method on one model, side by side) and `warpcache report` (the HTML page)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from warpcache_cli import bench
from warpcache_cli.atomic import write_text
from warpcache_cli.cli._errors import handle_errors
from warpcache_cli.cli._options import Device, Dtype, JsonOut
from warpcache_cli.cli._output import _clean, console, print_json, progress, table
from warpcache_cli.cli.profile_cmd import parse_seeds
from warpcache_cli.cli.run_cmd import ModelArg, resolve_config
from warpcache_cli.config import Config
from warpcache_cli.errors import WarpcacheError
from warpcache_cli.models import Request, load_model
from warpcache_cli.report import Frames, write_report
from warpcache_cli.trace import Trace

BENCH_NAME = "bench.json"
DEFAULT_METHODS = ",".join(bench.METHOD_NAMES)
DEFAULT_PROMPTS = ("a red circle moving right fast", "a blue square moving up slow")


def _shown(methods: list[bench.Method], rows: list[dict[str, Any]]) -> tuple[bench.Method, float] | None:
    """The run whose frames the report shows: warpcache's if it ran, else the first method's that did; its
    fastest setting at 30 dB, else at 25 dB, else its best-quality one."""
    bests = [bench.best_at(rows, b) for b in bench.BUDGETS]
    summary = bench.summarise(rows)
    for m in sorted(methods, key=lambda m: m.name != "warpcache"):
        ran = [s for s in summary if s["method"] == m.name]
        if ran:
            passing = [best[m.name]["setting"] for best in bests if best[m.name]["status"] == "ok"]
            return m, passing[0] if passing else max(ran, key=lambda s: s["psnr_mean"])["setting"]
    return None


def _value(row: dict[str, Any], key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    return "identical" if v == float("inf") else format(v, fmt)


def _print_tables(rows: list[dict[str, Any]], best: dict[str, dict[str, dict[str, Any]]], title: str) -> None:
    table(title, ["method", "setting", "prompt", "seed", "speedup", "computed", "PSNR dB", "SSIM", "temporal dB"], [
        [r["method"], f"{r['knob']} {r['setting']:g}" if r["setting"] is not None else r["status"], r["prompt"],
         r["seed"], _value(r, "speedup", ".2f"), _value(r, "compute_fraction", ".0%"), _value(r, "psnr", ".2f"),
         _value(r, "ssim", ".3f"), _value(r, "temporal_psnr", ".2f")]
        for r in rows
    ])
    for budget, per_method in best.items():
        table(f"fastest setting at mean PSNR >= {budget} dB", ["method", "setting", "speedup", "PSNR mean / min"], [
            [name, f"{b['knob']} {b['setting']:g}", f"{b['speedup']:.2f}x",
             f"{_value(b, 'psnr_mean', '.2f')} / {_value(b, 'psnr_min', '.2f')}"] if b["status"] == "ok"
            else [name, b["status"], "-", "-"]
            for name, b in per_method.items()
        ])


@handle_errors
def bench_command(
    model: ModelArg = "builtin",
    methods: Annotated[str, typer.Option(help=f"comma-separated, from: {DEFAULT_METHODS}")] = DEFAULT_METHODS,
    config: Annotated[Path | None, typer.Option(help="warpcache config to bench (JSON or YAML)")] = None,
    preset: Annotated[str | None, typer.Option(help="warpcache preset to bench: fast, balanced or quality")] = None,
    prompts: Annotated[list[str] | None, typer.Option("--prompt", help="prompt; repeat for several")] = None,
    seeds: Annotated[str, typer.Option(help="seeds, e.g. 0,1,2 or 0-3")] = "0",
    steps: Annotated[int, typer.Option(min=2)] = 30,
    repeats: Annotated[int, typer.Option(min=1, help="timed runs of each; medians are compared")] = 3,
    guidance: float = 4.0,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    out: Annotated[Path, typer.Option(help="folder for bench.json and report.html")] = Path("bench"),
    json_out: JsonOut = False,
) -> None:
    """Run MODEL under every caching method and sweep; print speedup, PSNR, SSIM; write bench.json and report.html.

    warpcache runs its config with thresholds scaled x0.5 to x4; a method that fails on the model is reported.

    Example: warpcache bench builtin --preset fast --methods warpcache,fbcache,fora --steps 20 --out bench/
    """
    cfg = resolve_config(config, preset)
    chosen = bench.methods_named([n.strip() for n in methods.split(",") if n.strip()], cfg)
    prompt_list, seed_list = list(prompts or DEFAULT_PROMPTS), parse_seeds(seeds)
    if not seed_list:
        raise WarpcacheError(f"--seeds {seeds!r}: no seed given")
    total = bench.planned_runs(chosen, len(prompt_list) * len(seed_list), repeats)
    with progress(json_out) as bar:
        task = bar.add_task("loading model", total=None)
        pipe = load_model(model, device, dtype)
        bar.update(task, description=f"benchmarking {len(chosen)} methods", total=total)
        rows = bench.run_bench(pipe, chosen, prompt_list, seed_list, steps, repeats, guidance,
                               tick=lambda: bar.advance(task))
        bar.update(task, description="frames for the report")
        shown = _shown(chosen, rows)
        frames = decisions = None
        if shown is not None:
            method, setting = shown
            uncached, cached, decisions = bench.side_by_side(pipe, method, setting,
                                                             Request(prompt_list[0], seed_list[0], steps, guidance))
            frames = Frames(uncached, cached, f"{method.name} {method.knob} {setting:g}")
    best = {f"{b:g}": bench.best_at(rows, b) for b in bench.BUDGETS}
    data = {"model": model, "steps": steps, "repeats": repeats, "guidance": guidance, "prompts": prompt_list,
            "seeds": seed_list, "methods": [m.name for m in chosen], "rows": rows, "best": best,
            "note": "speedups: ratios of median wall times in this process, uncached and cached runs interleaved"}
    write_text(out / BENCH_NAME, json.dumps(_clean(data), indent=2))  # strict JSON: an identical output's PSNR is null
    page = write_report(out, rows, frames=frames, decisions=decisions)
    if json_out:
        print_json({**data, "outputs": {"bench": str(out / BENCH_NAME), "report": str(page)}})
        return
    _print_tables(rows, best, f"warpcache bench: {model}, {steps} steps, median of {repeats}")
    console.print(f"wrote {out / BENCH_NAME} and {page}")


@handle_errors
def report_command(
    trace: Annotated[Path, typer.Argument(help="trace recorded by `warpcache profile`")],
    config: Annotated[Path | None, typer.Option(help="config whose decision map to show (JSON or YAML)")] = None,
    bench: Annotated[Path | None, typer.Option(help="bench.json written by `warpcache bench`")] = None,
    out: Annotated[Path, typer.Option(help="folder for report.html and its figures")] = Path("report"),
    json_out: JsonOut = False,
) -> None:
    """Write an HTML report: drift heatmap of TRACE, decision map of a config, and bench results.

    Example: warpcache report trace.safetensors --config tuned/warpcache-config.json --bench bench/bench.json
    """
    loaded = Trace.load(trace)
    cfg = Config.load(config) if config is not None else None
    rows = _bench_rows(bench) if bench is not None else []
    page = write_report(out, rows, trace=loaded, config=cfg)
    if json_out:
        print_json({"report": str(page)})
        return
    console.print(f"wrote {page}")


def _bench_rows(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data["rows"]
    except FileNotFoundError:
        raise WarpcacheError(f"bench file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise WarpcacheError(f"{path}: not a bench.json written by `warpcache bench` ({exc})") from None
    for r in rows:  # JSON has no infinity: an identical output's PSNR was written as null
        for key in ("psnr", "temporal_psnr"):
            if r.get("status") == "ok" and r.get(key) is None:
                r[key] = float("inf")
    return rows

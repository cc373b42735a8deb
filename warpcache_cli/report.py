"""The HTML report: every method's speed against quality, a config's decisions, drift, and frames side by side.

One `report.html` with its PNG figures beside it in one folder, each file written atomically, so
the folder can be opened from disk or published as a CI artifact as it is. Sections appear for
what is given: bench rows, a trace, a config, frames.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from warpcache_cli import sensitivity
from warpcache_cli.atomic import atomic_path, write_text
from warpcache_cli.bench import BUDGETS, best_at, summarise
from warpcache_cli.config import Config
from warpcache_cli.policy import Action
from warpcache_cli.replay import Replayer, check_compatible
from warpcache_cli.trace import Trace

REPORT_NAME = "report.html"
CHART_NAME = "speedup-vs-psnr.png"
DECISIONS_NAME = "decision-map.png"
HEATMAP_NAME = "drift-heatmap.png"
FRAMES_NAME = "frames.png"
# decision-map colours by action; -1 marks a block and step the run never reached
ACTION_COLOURS = {-1: "#d0d0d0", Action.RECOMPUTE: "#d62728", Action.REUSE: "#2ca02c", Action.WARP: "#f2c014"}


class Frames(NamedTuple):
    """One request's uncached and cached output, (F, H, W, 3) in [0, 1], and what made the cached one."""

    uncached: np.ndarray
    cached: np.ndarray
    label: str


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    _pyplot().close(fig)
    return path


def speed_quality_chart(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """One line per method through its sweep: mean PSNR across, mean speedup up; identical outputs at the right edge."""
    plt = _pyplot()
    summary = summarise(rows)
    finite = [s["psnr_mean"] for s in summary if math.isfinite(s["psnr_mean"])]
    identical = max([*finite, *BUDGETS]) + 5.0
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in dict.fromkeys(s["method"] for s in summary):
        points = [s for s in summary if s["method"] == name]
        x = [s["psnr_mean"] if math.isfinite(s["psnr_mean"]) else identical for s in points]
        y = [s["speedup"] for s in points]
        ax.plot(x, y, marker="o", label=f"{name} ({points[0]['knob']})")
        labels: dict[tuple[float, float], list[str]] = {}  # settings that land on one point share one label
        for xi, yi, s in zip(x, y, points):
            labels.setdefault((round(xi, 1), round(yi, 2)), []).append(f"{s['setting']:g}")
        for (xi, yi), names in labels.items():
            ax.annotate(", ".join(names), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for budget in BUDGETS:
        ax.axvline(budget, color="grey", linestyle="--", linewidth=0.8)
    ax.axvline(identical, color="grey", linestyle=":", linewidth=0.8)
    ax.text(identical, ax.get_ylim()[0], " identical", rotation=90, va="bottom", fontsize=7, color="grey")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set(xlabel="PSNR against the uncached output, dB (mean over prompts and seeds)",
           ylabel="speedup (uncached / cached median wall time)", title="speed against quality, every method")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def decision_map_figure(decisions: np.ndarray, path: Path, title: str) -> Path:
    """Blocks up, steps across, one colour per action."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plt = _pyplot()
    codes = sorted(ACTION_COLOURS)
    fig, ax = plt.subplots(figsize=(max(5.0, decisions.shape[1] * 0.22), max(2.5, decisions.shape[0] * 0.3)))
    ax.imshow(decisions, aspect="auto", origin="lower", interpolation="nearest",
              cmap=ListedColormap([ACTION_COLOURS[c] for c in codes]), vmin=codes[0] - 0.5, vmax=codes[-1] + 0.5)
    ax.set(xlabel="step", ylabel="block", title=title)
    names = {-1: "not run", **{a: a.name.lower() for a in Action}}
    ax.legend(handles=[Patch(color=ACTION_COLOURS[c], label=names[c]) for c in codes], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, path)


def replayed_decisions(trace: Trace, config: Config) -> np.ndarray:
    """(blocks, steps) actions the config takes on the trace's run 0, first branch, as the live hooks would."""
    check_compatible(trace, config)
    actions = Replayer(trace).decisions(config.policy, slice(0, 1)).actions
    return actions[0, 0].T


def frames_figure(frames: Frames, path: Path, columns: int = 8) -> Path:
    """Rows: uncached, cached, |difference| (scaled to its own maximum, which the title gives)."""
    plt = _pyplot()
    picks = np.unique(np.linspace(0, len(frames.uncached) - 1, min(columns, len(frames.uncached))).round().astype(int))
    diff = np.abs(frames.cached.astype(np.float64) - frames.uncached.astype(np.float64)).mean(axis=-1)
    top = float(diff.max()) or 1.0
    fig, axes = plt.subplots(3, len(picks), figsize=(1.6 * len(picks), 5.2), squeeze=False)
    rows = (("uncached", frames.uncached), (frames.label, frames.cached))
    for col, f in enumerate(picks):
        for row, (_, video) in enumerate(rows):
            axes[row, col].imshow(np.clip(video[f], 0.0, 1.0), interpolation="nearest")
        axes[2, col].imshow(diff[f], cmap="magma", vmin=0.0, vmax=top, interpolation="nearest")
        axes[0, col].set_title(f"frame {f}", fontsize=8)
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    for row, name in enumerate([r[0] for r in rows] + [f"|difference| (max {top:.3f})"]):
        axes[row, 0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "identical" if value == math.inf else f"{value:.3g}"
    return html.escape(str(value))


def _table(columns: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _bench_tables(rows: Sequence[dict[str, Any]]) -> str:
    parts = []
    for budget in BUDGETS:
        best = best_at(rows, budget)
        parts.append(f"<h3>Fastest setting at PSNR &ge; {budget:g} dB (mean over prompts and seeds)</h3>")
        parts.append(_table(["method", "setting", "speedup", "PSNR mean", "PSNR min", "SSIM mean", "status"], [
            [name, f"{b['knob']} {b['setting']:g}" if "setting" in b else None, b.get("speedup"),
             b.get("psnr_mean"), b.get("psnr_min"), b.get("ssim_mean"), b["status"]]
            for name, b in best.items()
        ]))
    parts.append("<h3>Every run</h3>")
    parts.append(_table(
        ["method", "setting", "prompt", "seed", "speedup", "blocks computed", "PSNR", "SSIM", "temporal PSNR",
         "repeats", "status"],
        [[r["method"], r["setting"], r["prompt"], r["seed"], r.get("speedup"), r.get("compute_fraction"),
          r.get("psnr"), r.get("ssim"), r.get("temporal_psnr"), r.get("repeats"), r["status"]] for r in rows],
    ))
    return "\n".join(parts)


_STYLE = """body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; } img { max-width: 100%; border: 1px solid #eee; } .note { color: #666; }"""


def write_report(
    out_dir: str | Path,
    bench_rows: Sequence[dict[str, Any]],
    trace: Trace | None = None,
    config: Config | None = None,
    frames: Frames | None = None,
    decisions: np.ndarray | None = None,
) -> Path:
    """Write report.html and its figures into `out_dir`; returns the page's path.

    `decisions` is a (blocks, steps) map of Action values from a live run; without it the map is
    replayed from `trace` with `config` (run 0, first branch) when both are given.
    """
    out = Path(out_dir)
    sections: list[str] = []

    def figure(heading: str, path: Path, note: str = "") -> None:
        note_html = f'<p class="note">{html.escape(note)}</p>' if note else ""
        sections.append(f'<h2>{html.escape(heading)}</h2>{note_html}<img src="{html.escape(path.name)}" '
                        f'alt="{html.escape(heading)}">')

    ok = [r for r in bench_rows if r["status"] == "ok"]
    if ok:
        repeats = sorted({r["repeats"] for r in ok})
        figure("Speed against quality", speed_quality_chart(bench_rows, out / CHART_NAME),
               f"Speedups are ratios of median wall times measured in one process (timed runs of each: "
               f"{'/'.join(map(str, repeats))}, uncached and cached interleaved); quality is against the model's "
               "own uncached output.")
    source = "live run"
    if decisions is None and trace is not None and config is not None:
        decisions, source = replayed_decisions(trace, config), f"replayed on {trace.model or 'the trace'}, run 0"
    if decisions is not None:
        figure("Decision map", decision_map_figure(decisions, out / DECISIONS_NAME, f"decisions ({source})"),
               "Which blocks recompute, reuse or warp at each step.")
    if trace is not None:
        figure("Drift", sensitivity.heatmap(trace, out / HEATMAP_NAME),
               "Input drift of every block to the previous step, and the error reusing or warping would inject.")
    if frames is not None:
        figure("Frames", frames_figure(frames, out / FRAMES_NAME), f"Uncached against {frames.label}.")
    if bench_rows:
        sections.append("<h2>Results</h2>" + _bench_tables(bench_rows))
    if not sections:
        sections.append('<p class="note">Nothing to report: no bench results, trace or frames were given.</p>')
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>warpcache report</title>'
            f"<style>{_STYLE}</style></head>\n<body><h1>warpcache report</h1>\n" + "\n".join(sections)
            + "\n</body></html>\n")
    path = out / REPORT_NAME
    write_text(path, page)
    return path

"""Renders results as a rich table or as JSON, so commands only build data."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from warpcache_cli.policy import Action

# wide enough for tables when piped (CI logs), the terminal's own width otherwise
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity; write them as null rather than emit invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def print_json(data: Any) -> None:
    print(json.dumps(_clean(data), indent=2, sort_keys=False))


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in r])
    console.print(t)


def progress(quiet: bool) -> Progress:
    """The progress display every long command shows on stderr (off with --json)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=quiet,
    )


GLYPHS = {Action.RECOMPUTE: ("█", "red"), Action.REUSE: ("·", "green"), Action.WARP: ("~", "yellow")}


def decision_map(actions: np.ndarray, title: str) -> Text:
    """Blocks down, steps across: █ recompute, · reuse, ~ warp."""
    text = Text(f"{title}  (█ recompute  · reuse  ~ warp)\n")
    for layer in range(actions.shape[1]):
        text.append(f"block {layer:>3} ")
        for a in actions[:, layer]:
            glyph, style = GLYPHS[Action(int(a))]
            text.append(glyph, style=style)
        text.append("\n")
    return text

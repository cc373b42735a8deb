"""`warpcache trace info`: what a trace file holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from warpcache_cli.cli._errors import handle_errors
from warpcache_cli.cli._options import JsonOut
from warpcache_cli.cli._output import print_json, table
from warpcache_cli.trace import Trace

app = typer.Typer(help="Inspect trace files.", no_args_is_help=True)


@app.command("info")
@handle_errors
def info(
    path: Annotated[Path, typer.Argument(help="trace file (.safetensors)")],
    json_out: JsonOut = False,
) -> None:
    """Print a trace's model, runs, steps, blocks, size and what was recorded.

    Example: warpcache trace info sample_traces/builtin-fast.safetensors
    """
    data = Trace.load(path).info()
    if json_out:
        print_json(data)
        return
    rows = [[k, ", ".join(map(str, v)) if isinstance(v, list) else v] for k, v in data.items()]
    table(f"trace {path}", ["field", "value"], rows)

"""`warpcache config`: create, check and inspect config files; a thin layer over warpcache_cli.config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from warpcache_cli.cli._errors import handle_errors, one_line
from warpcache_cli.cli._output import print_json, table
from warpcache_cli.config import Config, load_config
from warpcache_cli.errors import ConfigError

app = typer.Typer(
    help="Create, check and inspect config files (JSON or YAML, chosen by the file's suffix).",
    no_args_is_help=True,
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


@app.command("init")
@handle_errors
def init(
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write (.json, .yaml or .yml).")],
    preset: Annotated[str, typer.Option("--preset", help="Preset to start from: fast, balanced or quality.")] = (
        "balanced"
    ),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Write a full config file (every field) from a preset, ready to edit.

    Example: warpcache config init --preset fast -o config.yaml
    """
    if output.exists() and not force:
        raise ConfigError(f"{output} already exists; pass --force to overwrite it")
    Config.preset(preset).save(output)
    if as_json:
        print_json({"path": str(output), "preset": preset})
    else:
        print(f"wrote {output} (preset {preset})")


@app.command("validate")
@handle_errors
def validate(
    file: Annotated[Path, typer.Argument(help="Config file to check.")],
    as_json: JsonFlag = False,
) -> None:
    """Check a config file; exit 0 and print "ok", or exit 2 with the problem naming the field.

    Example: warpcache config validate config.json
    """
    if not as_json:
        Config.load(file)
        print("ok")
        return
    try:
        Config.load(file)
    except ConfigError as exc:
        print_json({"path": str(file), "ok": False, "error": one_line(exc)})
        raise typer.Exit(exc.exit_code) from None
    print_json({"path": str(file), "ok": True})


@app.command("show")
@handle_errors
def show(
    spec: Annotated[str, typer.Argument(metavar="FILE|NAME", help="Config file or preset name.")],
    as_json: JsonFlag = False,
) -> None:
    """Print the full resolved config, defaults filled in, as dotted field = value.

    Example: warpcache config show balanced --json
    """
    data = load_config(spec).to_dict()
    if as_json:
        print_json(data)
    else:
        table(f"config {spec}", ["field", "value"], _rows(data))


def _rows(data: dict[str, Any]) -> list[list[str]]:
    """One row per field, sections expanded to dotted names; values shown as JSON, so they can be copied back."""
    rows: list[list[str]] = []
    for key, value in data.items():
        section = value.items() if isinstance(value, dict) else [(None, value)]
        rows.extend([key if sub is None else f"{key}.{sub}", json.dumps(v)] for sub, v in section)
    return rows

"""Top-level typer app; each command group lives in its own module and is mounted here."""

from __future__ import annotations

import typer

from warpcache_cli.cli import bench_cmd, config_cmd, profile_cmd, replay_cmd, run_cmd, trace_cmd, tune_cmd

app = typer.Typer(
    name="warpcache",
    help="Profile, tune and apply feature caching for DiT video models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(config_cmd.app, name="config")
app.add_typer(trace_cmd.app, name="trace")
app.command(name="run")(run_cmd.run)
app.command(name="profile")(profile_cmd.profile_command)
app.command(name="replay")(replay_cmd.replay_command)
app.command(name="tune")(tune_cmd.tune_command)
app.command(name="bench")(bench_cmd.bench_command)
app.command(name="report")(bench_cmd.report_command)


def main() -> None:
    app()

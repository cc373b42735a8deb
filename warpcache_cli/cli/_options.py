"""Options several commands share, declared once so they read and behave the same everywhere."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOut = Annotated[bool, typer.Option("--json", help="machine-readable output")]
Device = Annotated[str, typer.Option(help="torch device, e.g. cpu, cuda, cuda:1")]
Dtype = Annotated[str, typer.Option(help="float32, bfloat16 or float16")]

"""Maps library exceptions to one line on stderr and an exit code; no tracebacks for bad input."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from warpcache_cli.errors import WarpcacheError

F = TypeVar("F", bound=Callable[..., Any])


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def handle_errors(fn: F) -> F:
    """Wrap a command so library errors become `error: ...` and their exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except WarpcacheError as exc:
            prefix = "error" if exc.exit_code == 2 else "failed"
            print(f"{prefix}: {one_line(exc)}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]

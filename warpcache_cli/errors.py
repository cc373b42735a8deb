"""Typed errors raised by the library; only the CLI decides how they look (one line, exit code)."""

from __future__ import annotations


class WarpcacheError(Exception):
    """Bad input of any kind: the CLI prints the message on one line and exits with `exit_code`."""

    exit_code = 2


class ConfigError(WarpcacheError):
    """A config that does not parse or validate; the message names the field."""


class ModelError(WarpcacheError):
    """A MODEL argument that cannot be loaded or a transformer that cannot be adapted."""


class TraceError(WarpcacheError):
    """A trace file that is missing, corrupt, truncated or of another format version."""


class BudgetExceeded(WarpcacheError):
    """A quality gate failed: the run is valid, its result is over budget."""

    exit_code = 1

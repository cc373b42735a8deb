"""Shared fixtures: the built-in model and a small calibrated trace of it (recorded once per session)."""

from __future__ import annotations

import pytest
import torch

from warpcache_cli.models import Request, load_model
from warpcache_cli.profile import profile
from warpcache_cli.trace import Trace

torch.set_num_threads(1)  # tiny tensors: threading costs more than it gains on small CI machines

PROMPTS = ("a red circle moving right fast", "a blue square static")
STEPS = 10


@pytest.fixture(scope="session")
def builtin():
    return load_model("builtin")


@pytest.fixture(scope="session")
def small_trace(builtin, tmp_path_factory) -> Trace:
    reqs = [Request(p, i, STEPS) for i, p in enumerate(PROMPTS)]
    path = tmp_path_factory.mktemp("trace") / "small.safetensors"
    profile(builtin, reqs, model_id="builtin", calibrate=6).save(path)
    return Trace.load(path)

"""Resolve a MODEL argument to a pipeline, and generate frames with it in one uniform way.

MODEL is `builtin` (the small trained Wan shipped in the package), a local diffusers pipeline
directory, or `module:function`: an importable zero-argument callable (it may accept `device`
and `dtype` keywords) returning a pipeline object with a `transformer` attribute and a
diffusers-style `__call__(prompt=..., num_inference_steps=..., guidance_scale=...,
generator=..., [num_frames=..., height=..., width=..., output_type="np"])` whose result has
`.frames` shaped (batch, frames, height, width, 3) with values in [0, 1].
"""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from warpcache_cli.errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Request:
    """One generation: what `run`, `profile` and `bench` ask a pipeline for."""

    prompt: str = "a red circle moving right fast"
    seed: int = 0
    steps: int = 30
    guidance: float = 4.0
    frames: int | None = None
    height: int | None = None
    width: int | None = None


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ModelError(f"unknown device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def load_model(spec: str, device: str = "cpu", dtype: str = "float32") -> Any:
    """Load MODEL offline; raises ModelError naming what is wrong with the spec."""
    dev, dt = parse_device(device), parse_dtype(dtype)
    if spec == "builtin":
        from warpcache_cli.builtin.pipeline import load_builtin

        return load_builtin(dev, dt)
    path = Path(spec)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{spec}: not a diffusers pipeline directory (no model_index.json)")
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dt, local_files_only=True)
        except Exception as exc:  # diffusers raises many types for a broken directory
            raise ModelError(f"{spec}: cannot load pipeline: {exc}") from None
        return pipe.to(dev)
    if ":" in spec:
        return _from_factory(spec, dev, dt)
    raise ModelError(f"model {spec!r} not found: expected 'builtin', a pipeline directory or module:function")


def _from_factory(spec: str, device: torch.device, dtype: torch.dtype) -> Any:
    module_name, _, fn_name = spec.partition(":")
    if "" not in sys.path:
        sys.path.insert(0, "")  # let `module:function` name a module in the current folder, like python -m
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except Exception as exc:
        raise ModelError(f"cannot import factory {spec!r}: {type(exc).__name__}: {exc}") from None
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if k in params}
    try:
        pipe = fn(**kwargs)
    except Exception as exc:
        raise ModelError(f"factory {spec!r} failed: {type(exc).__name__}: {exc}") from None
    if not hasattr(pipe, "transformer"):
        raise ModelError(f"factory {spec!r} returned {type(pipe).__name__}, which has no 'transformer'")
    return pipe


def generate(pipe: Any, req: Request) -> np.ndarray:
    """Frames (F, H, W, 3) float32 in [0, 1] for one request, deterministic in its seed."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {
        "prompt": req.prompt,
        "num_inference_steps": req.steps,
        "guidance_scale": req.guidance,
        "generator": torch.Generator(device="cpu").manual_seed(req.seed),
    }
    for name, value in (("num_frames", req.frames), ("height", req.height), ("width", req.width)):
        if value is not None:
            kwargs[name] = value
    if "output_type" in params:
        kwargs["output_type"] = "np"
    with torch.no_grad():  # a pipeline without its own: no graph, and the hooks' observers write into buffers
        frames = pipe(**kwargs).frames[0]
    if isinstance(frames, torch.Tensor):
        frames = frames.float().cpu().numpy()
    return np.asarray(frames, dtype=np.float32)

"""Trace files: what a full-compute profile recorded, as safetensors plus JSON metadata.

Never pickled: traces are shared between people and loaded in CI. Tensors are read
memory-mapped and validated against the metadata, so a truncated, corrupt or foreign file
fails with one line naming the file and the problem.

Arrays (R runs, Br branches, S steps, L blocks, B batch, G look-back lags, M drift variants,
K sketch tokens, C channels):

    drift        (R, Br, S, L, G, M) f32  drift of x_s against x_{s-g} on the policy token subset
    reuse_err    (R, Br, S, L, G)    f32  ||r_s - r_{s-g}|| / ||x_s + r_s|| on the token subset
    reuse_err1   (R, Br, S, L)       f32  the same for g = 1 on full tensors
    warp_err1    (R, Br, S, L)       f32  ||r_s - warp(r_{s-1})|| / ||x_s + r_s|| on full tensors (NaN where
                                          not measured: first branch, every third step)
    drift1_cos   (R, Br, S, L)       f32  full-tensor cosine drift to the previous step
    drift1_l2    (R, Br, S, L)       f32  full-tensor L2 drift to the previous step
    x_norm, r_norm (R, Br, S, L)     f32  full-tensor norms of block input and residual
    block_seconds (R, Br, S, L)      f32  wall time of each block under the recorder (synchronised on CUDA)
    plain_block_seconds (L,)         f32  mean wall time of each block in an unhooked run
    call_seconds (R, Br, S)          f32  wall time of each transformer call
    run_seconds  (R,)                f32  wall time of each whole generation
    timestep, position, motion (R, S) f32
    sketch_in, sketch_res (R, Br, S, L, B, K, C) f16  input and residual on the first K subset tokens
    res_dot      (R, Br, S, L, J)    f64  <r_s, r_{s-j}> on the token subset, summed over the batch, for
                                          j = 0 .. 2G + 1 (0 where s - j < 0); forecast errors come from these
    out_sq       (R, Br, S, L)       f64  ||x_s + r_s||^2 on the token subset, summed over the batch
    call_dot     (R, Br, S, J)       f64  <y_s, y_{s-j}> of the transformer call's whole output, j as in res_dot:
                                          the forecast error of a call skipped whole (`skip_calls`)
    reference    (R, F, H, W, 3)     f16  the uncached output
    token_subset (K_drift,)          i64
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from warpcache_cli.atomic import atomic_path
from warpcache_cli.errors import TraceError

FORMAT = "warpcache-trace"
FORMAT_VERSION = 1
META_KEY = "warpcache"
DRIFT_VARIANTS: tuple[tuple[str, float], ...] = (
    ("cosine", 0.0), ("cosine", 0.5), ("cosine", 1.0), ("cosine", 1.5), ("cosine", 2.0), ("l2", 0.0),
)

PER_BLOCK = ("reuse_err1", "warp_err1", "drift1_cos", "drift1_l2", "x_norm", "r_norm", "block_seconds")
REQUIRED = ("drift", "reuse_err", *PER_BLOCK, "call_seconds", "run_seconds", "timestep", "position", "motion",
            "reference", "token_subset")
OPTIONAL = ("sketch_in", "sketch_res", "plain_block_seconds", "res_dot", "out_sq", "call_dot")


def drift_variant(metric: str, power: float) -> int:
    """Index of the recorded drift variant matching a policy's metric and saliency power."""
    if metric == "l2":
        return DRIFT_VARIANTS.index(("l2", 0.0))
    powers = [p for m, p in DRIFT_VARIANTS if m == "cosine"]
    nearest = min(powers, key=lambda p: abs(p - power))
    return DRIFT_VARIANTS.index(("cosine", nearest))


@dataclass
class Trace:
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(repr=False)
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(runs, branches, steps, blocks)."""
        r, br, s, lyr = self.arrays["x_norm"].shape
        return r, br, s, lyr

    @property
    def lags(self) -> int:
        return int(self.arrays["drift"].shape[4])

    @property
    def model(self) -> str:
        return str(self.meta.get("model", ""))

    def save(self, path: str | Path) -> Path:
        meta = {**self.meta, "format": FORMAT, "format_version": FORMAT_VERSION}
        with atomic_path(path) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in self.arrays.items()}, str(tmp),
                      metadata={META_KEY: json.dumps(meta)})
        self.path = Path(path)
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        p = Path(path)
        if not p.is_file():
            raise TraceError(f"{p}: no such trace file")
        try:
            with safe_open(str(p), framework="numpy") as f:
                raw = (f.metadata() or {}).get(META_KEY)
                meta = _parse_meta(p, raw)
                keys = set(f.keys())
                missing = [k for k in REQUIRED if k not in keys]
                if missing:
                    raise TraceError(f"{p}: trace is missing arrays {', '.join(missing)}")
                arrays = {k: f.get_tensor(k) for k in (*REQUIRED, *OPTIONAL) if k in keys}
        except TraceError:
            raise
        except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
            raise TraceError(f"{p}: not a readable trace (corrupt or truncated safetensors: {exc})") from None
        trace = cls(meta, arrays, p)
        trace._check_shapes()
        return trace

    def _check_shapes(self) -> None:
        r, br, s, lyr = self.shape
        if ("res_dot" in self.arrays) != ("out_sq" in self.arrays):
            raise TraceError(f"{self.path}: arrays res_dot and out_sq come together; the trace has one")
        expect = {k: (r, br, s, lyr) for k in (*PER_BLOCK, "out_sq")}
        expect.update(call_seconds=(r, br, s), run_seconds=(r,), timestep=(r, s), position=(r, s), motion=(r, s),
                      plain_block_seconds=(lyr,), res_dot=(r, br, s, lyr, 2 * self.lags + 2),
                      call_dot=(r, br, s, 2 * self.lags + 2))
        for key, shape in expect.items():
            if key in self.arrays and self.arrays[key].shape != shape:
                raise TraceError(f"{self.path}: array {key} has shape {self.arrays[key].shape}, expected {shape}")
        d = self.arrays["drift"].shape
        if d[:4] != (r, br, s, lyr) or d[5] != len(DRIFT_VARIANTS):
            raise TraceError(f"{self.path}: array drift has shape {d}, inconsistent with the trace")
        if s < 2:
            raise TraceError(f"{self.path}: trace has {s} step(s); at least 2 are needed to replay caching")

    def info(self) -> dict[str, Any]:
        r, br, s, lyr = self.shape
        size = self.path.stat().st_size if self.path else sum(a.nbytes for a in self.arrays.values())
        m = self.meta
        return {
            "path": str(self.path) if self.path else None,
            "model": m.get("model"),
            "model_class": m.get("model_class"),
            "runs": r,
            "branches": m.get("branches"),
            "steps": s,
            "blocks": lyr,
            "prompts": m.get("prompts"),
            "seeds": m.get("seeds"),
            "resolution": m.get("resolution"),
            "dtype": m.get("dtype"),
            "token_subset": m.get("token_subset"),
            "sketch_tokens": m.get("sketch_tokens"),
            "lags": self.lags,
            "bytes": size,
            **self._costs(),
            "recorded": sorted(self.arrays),
            "format_version": m.get("format_version"),
            "package_version": m.get("package_version"),
        }

    def _costs(self) -> dict[str, Any]:
        """What the recording cost and what calibrated it, as measured: each recorded run's wall time against the
        plain run `profile` times after them (single runs), and the calibration runs' PSNR range."""
        out: dict[str, Any] = {}
        plain, runs = self.meta.get("plain_seconds"), self.arrays.get("run_seconds")
        if plain and runs is not None and len(runs):
            out["recording_seconds"] = [round(float(t), 3) for t in runs]
            out["plain_seconds"] = round(float(plain), 3)
            out["recording_ratio"] = round(float(np.median(runs)) / float(plain), 3)
        psnr = [v for v in (self.meta.get("calibration") or {}).get("psnr", []) if v is not None]
        if psnr:
            out["calibration_runs"] = len(psnr)
            out["calibration_psnr"] = [round(min(psnr), 2), round(max(psnr), 2)]
        return out


def _parse_meta(path: Path, raw: str | None) -> dict[str, Any]:
    if raw is None:
        raise TraceError(f"{path}: safetensors file without warpcache metadata; not a trace")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: trace metadata is not valid JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise TraceError(f"{path}: not a warpcache trace (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TraceError(
            f"{path}: trace format version {meta.get('format_version')}, this warpcache reads {FORMAT_VERSION}; "
            "re-record it with `warpcache profile`"
        )
    return meta

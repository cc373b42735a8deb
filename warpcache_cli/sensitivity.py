"""Per-block sensitivity profile from a trace: where reuse hurts, where warping helps.

A block whose reused residual injects more error per unit of drift is more sensitive and
gets a lower threshold multiplier; a block where the warped residual is not clearly
closer to the truth than the plain one gets warping switched off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from warpcache_cli.atomic import atomic_path, write_text
from warpcache_cli.trace import Trace

PHASES = {"early": (0.0, 0.3), "mid": (0.3, 0.7), "late": (0.7, 1.01)}
WARP_GAIN = 0.97  # warping must cut the reuse error by at least 3% to be kept


def _stats(values: np.ndarray) -> dict[str, float]:
    v = values[np.isfinite(values)]
    if not v.size:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan")}
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90))}


def sensitivity(trace: Trace) -> dict[str, Any]:
    a = trace.arrays
    _, _, _, blocks = trace.shape
    reuse = np.asarray(a["reuse_err1"], np.float64)  # (R, Br, S, L)
    warp = np.asarray(a["warp_err1"], np.float64)
    drift = np.asarray(a["drift1_cos"], np.float64)
    pos = np.asarray(a["position"], np.float64)[:, None, :, None] * np.ones_like(reuse)
    per_block_err = np.array([np.nanmean(reuse[..., i]) for i in range(blocks)])
    score = per_block_err / np.nanmean(per_block_err)
    rows = []
    for i in range(blocks):
        both = np.isfinite(warp[..., i]) & np.isfinite(reuse[..., i])  # warping is measured at some steps only
        r_err = float(reuse[..., i][both].mean()) if both.any() else float(np.nanmean(reuse[..., i]))
        w_err = float(warp[..., i][both].mean()) if both.any() else float("nan")
        rows.append({
            "block": i,
            "sensitivity": float(score[i]),
            "drift": {name: _stats(drift[..., i][(pos[..., i] >= lo) & (pos[..., i] < hi)])
                      for name, (lo, hi) in PHASES.items()},
            "reuse_error": float(r_err),
            "warp_error": float(w_err),
            "warp_helps": bool(w_err < WARP_GAIN * r_err),
            "recommended_multiplier": float(np.clip(1.0 / score[i], 0.25, 4.0)),
        })
    return {"model": trace.model, "trace": str(trace.path) if trace.path else None, "blocks": rows}


def recommended(profile: dict[str, Any]) -> tuple[dict[int, float], list[int]]:
    """Layer multipliers and the blocks where warping should be off."""
    rows = profile["blocks"]
    return ({r["block"]: r["recommended_multiplier"] for r in rows},
            [r["block"] for r in rows if not r["warp_helps"]])


def save(profile: dict[str, Any], path: str | Path) -> Path:
    write_text(path, json.dumps(profile, indent=2))
    return Path(path)


def heatmap(trace: Trace, path: str | Path) -> Path:
    """Drift heatmap (blocks x steps, run 0, first branch) beside each block's reuse and warp error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.asarray(trace.arrays["drift1_cos"][0, 0], np.float64).T  # (L, S)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.5), gridspec_kw={"width_ratios": [3, 1]})
    im = ax.imshow(np.log10(np.where(d > 0, d, np.nan)), aspect="auto", cmap="magma", origin="lower")
    ax.set(xlabel="step", ylabel="block", title=f"log10 input drift to previous step ({trace.model})")
    fig.colorbar(im, ax=ax)
    reuse = np.nanmean(trace.arrays["reuse_err1"], axis=(0, 1, 2))
    warp = np.nanmean(trace.arrays["warp_err1"], axis=(0, 1, 2))
    y = np.arange(len(reuse))
    bx.barh(y - 0.2, reuse, 0.4, label="reuse")
    bx.barh(y + 0.2, warp, 0.4, label="warp")
    bx.set(xlabel="error injected", title="per block", yticks=y)
    bx.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)

"""Quality of a cached output against the model's own uncached output for the same request."""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import structural_similarity


def psnr(output: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """PSNR in dB over the whole video; infinite when identical."""
    mse = float(np.mean((output.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(output: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM over frames of (F, H, W, 3) videos."""
    win = min(7, *reference.shape[1:3]) | 1
    return float(np.mean([
        structural_similarity(o, r, data_range=data_range, channel_axis=-1, win_size=win)
        for o, r in zip(output, reference)
    ]))


def temporal_psnr(output: np.ndarray, reference: np.ndarray) -> float:
    """PSNR of the frame-to-frame differences: does the cached video move like the reference?"""
    if len(reference) < 2:
        return math.inf
    return psnr(np.diff(output, axis=0), np.diff(reference, axis=0), data_range=2.0)


def compare(output: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    return {"psnr": psnr(output, reference), "ssim": ssim(output, reference),
            "temporal_psnr": temporal_psnr(output, reference)}

"""Writing generated frames to .mp4 or .gif (atomically)."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np

from warpcache_cli.atomic import atomic_path
from warpcache_cli.errors import WarpcacheError

SUFFIXES = (".mp4", ".gif")


def check_video_path(path: str | Path) -> Path:
    p = Path(path)
    if p.suffix.lower() not in SUFFIXES:
        raise WarpcacheError(f"--out {path}: unsupported video format; use one of {', '.join(SUFFIXES)}")
    return p


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8, upscale: int = 1) -> Path:
    """Frames (F, H, W, 3) in [0, 1]; `upscale` repeats pixels so tiny clips are visible."""
    p = check_video_path(path)
    data = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    if upscale > 1:
        data = data.repeat(upscale, axis=1).repeat(upscale, axis=2)
    with atomic_path(p) as tmp:
        if p.suffix.lower() == ".gif":
            iio.imwrite(tmp, data, extension=".gif", duration=1000 / fps, loop=0)
        else:
            iio.imwrite(tmp, data, extension=".mp4", fps=fps, codec="libx264", macro_block_size=1)
    return p

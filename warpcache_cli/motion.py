"""Content motion and residual warping on the token grid of a video DiT.

Tokens are laid out frame-major as ``grid = (frames, rows, cols)`` and flattened to ``(B, N, C)``
with ``N = F * H * W``. Shifts are ``(dx, dy)`` in grid cells, ``dx`` along columns and ``dy`` along
rows, with the convention ``curr(x) ~= prev(x - d)``: a positive ``dx`` means content moved right.

Everything here is vectorised over tokens and computed in float32 whatever the input dtype, so
bfloat16 activations on CUDA give the same decisions as float32 ones on CPU (up to rounding).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

BLEND_GAIN = 2.0
"""``k`` in ``alpha = clip(k * motion, 0, 1)``.

``motion`` is the mean inter-frame speed divided by the search radius (4 cells by default), so
``k = 2`` trusts the warp fully from half the radius (2 cells per frame) upward and fades it out
linearly towards static content, where the estimated shift is mostly noise and bilinear
resampling would only blur the residual.
"""

POWER_ITERATIONS = 4
"""Power-iteration steps for the channel reduction; started from the channel-mean direction, a
few steps are enough to find a direction with most of the variance, which is all that matters."""

WHITENING = 0.5
"""Exponent of the cross-power normalisation (1 is classic phase correlation). On smooth 16..32-cell
maps 0.5 halved the failures (error over half a cell) of full whitening on non-periodic crops."""

WHITENING_FLOOR = 0.03
"""Floor of the normalisation, relative to the strongest bin, so empty bins stay quiet."""

SUBCELL_TOLERANCE = 1e-4
"""Sub-cell offsets smaller than this (in cells) are treated as zero."""

_EPS = 1e-12


# --------------------------------------------------------------------------- phase correlation


def _periodic_component(x: Tensor) -> Tensor:
    """The periodic part of Moisan's periodic-plus-smooth decomposition of maps ``(..., H, W)``.

    The DFT treats a map as periodic, so the jump between opposite borders, which does not move
    with the content, would add a strong zero-shift peak to the correlation. Removing the smooth
    component that carries that jump keeps every cell, where a window would fade out the border
    cells that a small latent grid cannot spare (a Hann window measured far worse on 16..32 grids).
    """
    h, w = x.shape[-2:]
    jump_rows = x[..., -1, :] - x[..., 0, :]
    jump_cols = x[..., :, -1] - x[..., :, 0]
    boundary = torch.zeros_like(x)
    boundary[..., 0, :] += jump_rows
    boundary[..., -1, :] -= jump_rows
    boundary[..., :, 0] += jump_cols
    boundary[..., :, -1] -= jump_cols
    smooth = torch.fft.fft2(boundary) / _laplacian(h, w, x.dtype, x.device)
    smooth[..., 0, 0] = 0
    return x - torch.fft.ifft2(smooth).real


@functools.lru_cache(maxsize=16)
def _laplacian(h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The periodic Laplacian's eigenvalues on an ``h x w`` grid, 1 at the mean (left to the periodic part and
    removed by the caller). Cached: every motion estimate of a run divides by the same one."""
    q = torch.arange(h, device=device, dtype=dtype)[:, None]
    r = torch.arange(w, device=device, dtype=dtype)[None, :]
    laplacian = 2 * torch.cos(2 * math.pi * q / h) + 2 * torch.cos(2 * math.pi * r / w) - 4
    laplacian[0, 0] = 1.0
    return laplacian


def _peak_offset(left: Tensor, centre: Tensor, right: Tensor) -> Tensor:
    """Sub-cell offset of a peak from its two neighbours by a parabolic fit, clamped to half a cell.

    Offsets below ``SUBCELL_TOLERANCE`` are rounding noise of a symmetric peak and read as zero, so
    static content gives an exactly zero shift (and ``warp_tokens`` an exact identity).
    """
    denom = left - 2.0 * centre + right
    offset = (left - right) / (2.0 * denom).where(denom < 0, torch.ones_like(denom))
    keep = (denom < 0) & (offset.abs() > SUBCELL_TOLERANCE)
    return offset.where(keep, torch.zeros_like(offset)).clamp(-0.5, 0.5)


def estimate_shift(prev: Tensor, curr: Tensor) -> Tensor:
    """Global translation ``(dx, dy)`` with ``curr(x) ~= prev(x - d)``, by phase correlation.

    ``prev`` and ``curr`` are single-channel maps ``(..., H, W)``; the result is ``(..., 2)`` float32.
    Maps are reduced to their periodic component and mean-removed; the cross-power spectrum is
    whitened by ``|X|^WHITENING`` rather than ``|X|``, because on smooth maps full whitening lifts
    bins that hold only rounding and border noise to equal weight. The integer peak is refined by
    a parabolic fit along each axis. Shifts are recovered modulo the grid, in
    ``(-H/2, H/2] x (-W/2, W/2]``; maps without any structure give zero.
    """
    if prev.shape != curr.shape or prev.dim() < 2:
        raise ValueError(f"estimate_shift needs two maps of the same shape (..., H, W), got {prev.shape}, {curr.shape}")
    return _shift_between(_spectrum(prev), _spectrum(curr))


def _spectrum(maps: Tensor) -> Tensor:
    """The DFT of maps ``(..., H, W)`` reduced to their periodic component and mean-removed: `estimate_shift`'s
    first half, apart so that a sequence of maps is transformed once for all its neighbouring pairs."""
    a = _periodic_component(maps.float())
    return torch.fft.fft2(a - a.mean(dim=(-2, -1), keepdim=True))


def _shift_between(prev: Tensor, curr: Tensor) -> Tensor:
    """`estimate_shift` from the two maps' `_spectrum`s."""
    h, w = prev.shape[-2:]
    cross = curr * prev.conj()
    mag = cross.abs()
    peak = mag.amax(dim=(-2, -1), keepdim=True)
    surface = torch.fft.ifft2(cross / (mag + WHITENING_FLOOR * peak + _EPS) ** WHITENING).real

    flat = surface.flatten(-2)
    idx = flat.argmax(dim=-1, keepdim=True)
    py, px = idx // w, idx % w
    # the peak's neighbours, wrapping around: left and up, then right and down; fitted along both axes at once
    left_up = torch.cat([py * w + (px - 1) % w, (py - 1) % h * w + px], dim=-1)
    right_down = torch.cat([py * w + (px + 1) % w, (py + 1) % h * w + px], dim=-1)
    offset = _peak_offset(flat.gather(-1, left_up), flat.gather(-1, idx), flat.gather(-1, right_down))
    offset = offset * torch.tensor([w > 2, h > 2], device=offset.device)  # a 1- or 2-cell axis has no fit
    cells, size = torch.cat([px, py], dim=-1), torch.tensor([w, h], device=idx.device)
    shift = torch.where(cells > size // 2, cells - size, cells).float() + offset
    # No structure in either map (e.g. constant frames): the surface is flat and its peak meaningless.
    return shift.masked_fill(peak[..., 0] <= _EPS, 0.0)


# --------------------------------------------------------------------------- dense motion field


@dataclass
class MotionField:
    """Dense per-cell 2-D motion on an ``(H, W)`` grid, ``dx`` and ``dy`` in cells."""

    dx: Tensor
    dy: Tensor

    @classmethod
    def from_tensors(
        cls, prev: Tensor, curr: Tensor, grid_hw: tuple[int, int], block: int = 4, radius: int = 4
    ) -> MotionField:
        """Block matching: each ``block x block`` tile of ``curr`` takes the whole-cell displacement
        within ``radius`` cells that best explains it from ``prev`` (sum of squared differences over
        all channels). No sub-cell refinement: the cost of a tile is not symmetric about its
        minimum (the tile sees different cells at +d and -d), so a parabolic fit is biased by up to
        half a cell even for static content; ``estimate_shift`` gives the sub-cell global shift.

        ``prev`` and ``curr`` hold one frame, as ``(H, W)`` maps or ``(H * W, C)`` tokens (anything
        that reshapes to ``(H, W, C)``). The loop runs over the ``(2r + 1)^2`` candidate
        displacements, never over cells.
        """
        h, w = grid_hw
        if prev.shape != curr.shape or prev.numel() % (h * w):
            raise ValueError(f"from_tensors needs two frames of {h}x{w} cells, got {prev.shape}, {curr.shape}")
        a = prev.float().reshape(h, w, -1).permute(2, 0, 1)
        b = curr.float().reshape(h, w, -1).permute(2, 0, 1)
        r = int(radius)
        padded = F.pad(a[None], (r, r, r, r), mode="replicate")[0]
        # Candidates sorted by length: argmin keeps the first minimum, so exact ties (flat tiles)
        # resolve to the smallest motion.
        span = range(-r, r + 1)
        offsets = sorted(((dy, dx) for dy in span for dx in span), key=lambda d: d[0] ** 2 + d[1] ** 2)
        costs = []
        for dy, dx in offsets:
            moved = padded[:, r - dy : r - dy + h, r - dx : r - dx + w]  # prev(x - d)
            costs.append((b - moved).square().sum(dim=0))
        tiles = F.avg_pool2d(torch.stack(costs)[None], block, ceil_mode=True)[0]  # (K, by, bx)
        best = torch.tensor(offsets, dtype=torch.float32, device=a.device)[tiles.argmin(dim=0)]  # (by, bx, 2)
        tile_dy, tile_dx = best[..., 0], best[..., 1]
        rows = torch.arange(h, device=a.device) // block
        cols = torch.arange(w, device=a.device) // block
        return cls(dx=tile_dx[rows][:, cols], dy=tile_dy[rows][:, cols])

    def magnitude(self) -> Tensor:
        """Per-cell motion length, ``(H, W)``."""
        return torch.hypot(self.dx, self.dy)

    def mean_magnitude(self) -> float:
        return float(self.magnitude().mean())

    def max_magnitude(self) -> float:
        return float(self.magnitude().max())

    def interpolate(self, fx: float | Tensor, fy: float | Tensor) -> tuple[Tensor, Tensor]:
        """Bilinear sample of ``(dx, dy)`` at fractional cell coordinates (``fx`` column, ``fy`` row),
        clamped to the grid; tensors of coordinates give tensors of the same shape."""
        h, w = self.dx.shape
        x = torch.as_tensor(fx, dtype=torch.float32, device=self.dx.device).clamp(0, w - 1)
        y = torch.as_tensor(fy, dtype=torch.float32, device=self.dx.device).clamp(0, h - 1)
        x0 = x.floor().long().clamp(max=max(w - 2, 0))
        y0 = y.floor().long().clamp(max=max(h - 2, 0))
        x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
        tx, ty = x - x0, y - y0

        def sample(field: Tensor) -> Tensor:
            f = field.float()
            top = f[y0, x0] * (1 - tx) + f[y0, x1] * tx
            bottom = f[y1, x0] * (1 - tx) + f[y1, x1] * tx
            return top * (1 - ty) + bottom * ty

        return sample(self.dx), sample(self.dy)


# --------------------------------------------------------------------------- channel reduction


def _as_frames(tokens: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """``(B, N, C)`` tokens to ``(B, F, H, W, C)`` float32, checking the grid."""
    f, h, w = grid
    if tokens.dim() != 3 or tokens.shape[1] != f * h * w:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not match grid {grid}")
    return tokens.float().reshape(tokens.shape[0], f, h, w, tokens.shape[2])


def _principal_direction(frames: Tensor) -> Tensor:
    """First principal channel direction of centred ``(B, F, H, W, C)`` frames, ``(B, C)``.

    Power iteration from the channel-mean direction (tilted so it is never orthogonal to
    everything). Each step multiplies by ``x^T x``: through the tokens, two passes over them, where
    the ``C x C`` matrix costs more; with fewer channels than twice the steps (a video latent's few),
    through that matrix, formed in one pass.
    """
    x = frames.flatten(1, 3)  # (B, M, C)
    c = x.shape[-1]
    v = torch.linspace(1.0, 1.5, c, device=x.device).expand(x.shape[0], c)
    gram = x.transpose(1, 2) @ x if c < 2 * POWER_ITERATIONS else None
    for _ in range(POWER_ITERATIONS):
        v = _row_times(v, gram) if gram is not None else _row_times(_row_times(v, x.transpose(1, 2)), x)
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return v


def _row_times(v: Tensor, m: Tensor) -> Tensor:
    """``v_b m_b`` for rows ``v`` ``(B, K)`` and matrices ``m`` ``(B, K, N)``, ``(B, N)``.

    As a row vector times a matrix: on CPU the batched matrix-vector product ``m^T v`` (what einsum
    makes of it) takes a path 7x slower on the built-in model's blocks (measured).
    """
    return torch.bmm(v[:, None, :], m)[:, 0]


def _reduce(frames: Tensor, direction: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Single-channel maps ``(B, F, H, W)`` from ``(B, F, H, W, C)`` frames, and the direction used.

    Each frame's per-channel mean is removed first, so global brightness or offset changes do not
    read as motion. The channels are then projected on their first principal component rather than
    averaged: latent and hidden channels have arbitrary signs, so a plain mean can cancel the very
    structure that moves. One direction is used for all frames so they stay comparable.
    """
    centred = frames - frames.mean(dim=(2, 3), keepdim=True)
    if direction is None:
        direction = _principal_direction(centred)
    return _row_times(direction, centred.flatten(1, 3).transpose(1, 2)).view(centred.shape[:-1]), direction


# --------------------------------------------------------------------------- public operations


def frame_maps(tokens: Tensor, grid: tuple[int, int, int], direction: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Channel-reduced maps ``(B, F, H, W)`` of tokens ``(B, N, C)`` for the shift estimate, and the
    ``(B, C)`` direction used; pass a cached input's direction when reducing the current input so
    both maps are comparable (this is how ``warp_residual`` pairs them)."""
    return _reduce(_as_frames(tokens, grid), direction)


def content_motion(video: Tensor, grid: tuple[int, int, int] | None = None, radius: float = 4.0) -> float:
    """Content motion ``m`` in ``[0, 1]``: the mean inter-frame shift between neighbouring frames,
    divided by ``radius`` (cells) and clipped; 0.0 for a single frame.

    ``video`` is a latent or pixel tensor ``(B, C, F, H, W)``, or tokens ``(B, N, C)`` with ``grid``.
    """
    if grid is not None:
        frames = _as_frames(video, grid)
    elif video.dim() == 5:
        frames = video.float().permute(0, 2, 3, 4, 1)
    else:
        raise ValueError(f"content_motion needs (B, C, F, H, W) or (B, N, C) with grid, got {tuple(video.shape)}")
    return _motion(frames[None], radius)[0]


def content_motions(videos: list[Tensor], radius: float = 4.0) -> list[float]:
    """`content_motion` of each of several ``(B, C, F, H, W)`` videos of one shape, as one batch: a video
    latent's few maps make the estimate a few dozen small operations, which one batch pays once."""
    frames = torch.stack(videos).float().permute(0, 1, 3, 4, 5, 2)  # (V, B, F, H, W, C)
    return _motion(frames, radius)


def _motion(frames: Tensor, radius: float) -> list[float]:
    """Each video's mean shift between neighbouring frames over ``radius``, clipped to [0, 1]; frames
    ``(V, B, F, H, W, C)``."""
    if radius <= 0:
        raise ValueError(f"content_motion radius must be positive, got {radius}")
    v = len(frames)
    if frames.shape[2] < 2:
        return [0.0] * v
    maps, _ = _reduce(frames.flatten(0, 1))
    spectra = _spectrum(maps)
    speeds = _shift_between(spectra[:, :-1], spectra[:, 1:]).norm(dim=-1).view(v, -1).mean(dim=1)
    return [min(max(s / radius, 0.0), 1.0) for s in speeds.tolist()]


def warp_tokens(residual: Tensor, shift: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """Inverse-warp tokens ``(B, N, C)`` by a per-batch shift ``(B, 2)`` in cells: ``out(x) = r(x - d)``
    on every frame, bilinear with border padding. Batch elements with a zero shift are returned
    bit-for-bit, and a zero shift overall returns ``residual`` itself without any work.

    A translation is separable: each axis is two row gathers and a lerp, in the tokens' own layout, where
    ``grid_sample`` needed the frames permuted to channels-first and back (1.6x slower on the built-in
    model's six blocks at once, 1.6x for one).
    """
    shift = torch.as_tensor(shift, device=residual.device).float().reshape(-1, 2)
    if not bool(shift.any()):
        return residual
    b, n, c = residual.shape
    f, h, w = grid
    frames = _as_frames(residual, grid)  # (B, F, H, W, C)
    x0, x1, fx = _axis_taps(w, shift[:, 0])
    y0, y1, fy = _axis_taps(h, shift[:, 1])
    warped = []
    for i, t in enumerate(frames):  # the batch is small (CFG branches, or a call's blocks): no sync per element
        t = torch.lerp(t.index_select(2, x0[i]), t.index_select(2, x1[i]), fx[i][:, None])
        t = torch.lerp(t.index_select(1, y0[i]), t.index_select(1, y1[i]), fy[i][:, None, None])
        warped.append(t.reshape(n, c))
    still = ~shift.any(dim=-1)
    return torch.where(still[:, None, None], residual, torch.stack(warped).to(residual.dtype))


def _axis_taps(n: int, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear taps of ``out(i) = in(i - d)`` along an axis of ``n`` cells, per batch shift ``d`` ``(B,)``:
    the two cells read and the second's weight, each ``(B, n)``, the source clamped to the axis (border
    padding)."""
    pos = (torch.arange(n, device=shift.device, dtype=torch.float32) - shift[:, None]).clamp(0, n - 1)
    low = pos.floor().long().clamp(max=max(n - 2, 0))
    return low, (low + 1).clamp(max=n - 1), pos - low


def simple_blend(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """``(1 - alpha) * a + alpha * b`` in float32, in ``a``'s dtype; ``alpha`` 0 or 1 returns the operand."""
    if alpha <= 0.0:
        return a
    if alpha >= 1.0:
        return b.to(a.dtype)
    return torch.lerp(a.float(), b.float(), alpha).to(a.dtype)


def _alpha(motion: float, gain: float = BLEND_GAIN) -> float:
    """The blend weight of the warped residual; 0 leaves the cached residual untouched."""
    return min(max(gain * float(motion), 0.0), 1.0)


def blend(cached: Tensor, warped: Tensor, motion: float, gain: float = BLEND_GAIN) -> tuple[Tensor, float]:
    """Motion-adaptive blend: ``alpha = clip(gain * motion, 0, 1)``, returns
    ``(alpha * warped + (1 - alpha) * cached, alpha)``; see ``BLEND_GAIN`` for the choice of gain."""
    alpha = _alpha(motion, gain)
    return simple_blend(cached, warped, alpha), alpha


def warp_residual(
    residual: Tensor, x_cached: Tensor, x_now: Tensor, grid: tuple[int, int, int], motion: float
) -> tuple[Tensor, float]:
    """The policy's warp step: the shift from ``x_cached`` to ``x_now`` (channel-reduced on the cached
    input's principal direction, estimated per frame, averaged over frames), the residual warped by
    it and blended with the unwarped one by ``motion``. Returns ``(residual', alpha)`` in the
    residual's dtype and device. Static content (``alpha == 0``) skips the estimate altogether.
    """
    if _alpha(motion) == 0.0:
        return residual, 0.0
    cached_maps, direction = frame_maps(x_cached, grid)
    now_maps, _ = frame_maps(x_now, grid, direction)
    return warp_with_maps(residual, cached_maps, now_maps, grid, motion)


def warp_with_maps(
    residual: Tensor, cached_maps: Tensor, now_maps: Tensor, grid: tuple[int, int, int], motion: float
) -> tuple[Tensor, float]:
    """`warp_residual` from already reduced maps, so the runtime keeps a (B, F, H, W) map per block
    instead of the full cached input."""
    if _alpha(motion) == 0.0:
        return residual, 0.0
    return warp_by_shift(residual, estimate_shift(cached_maps, now_maps).mean(dim=1), grid, motion)


def warp_by_shift(residual: Tensor, shift: Tensor, grid: tuple[int, int, int], motion: float) -> tuple[Tensor, float]:
    """`warp_with_maps` with the ``(B, 2)`` shift already estimated: the profiler estimates every block's
    shift of a call in one batch, which costs about what one block's estimate does."""
    if _alpha(motion) == 0.0:
        return residual, 0.0
    return blend(residual, warp_tokens(residual, shift, grid), motion)

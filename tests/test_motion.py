"""Property tests of shift estimation, content motion and residual warping on smooth synthetic patterns."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from warpcache_cli import motion

FAST = settings(max_examples=25, deadline=None)


Centres = list[tuple[float, float, float]]


def blobs(n: int, centres: Centres, sigma: float, dx: float = 0.0, dy: float = 0.0) -> torch.Tensor:
    """A sum of Gaussians on an n x n grid, analytically moved by (dx, dy) cells: exact fractional shifts."""
    ys = torch.arange(n, dtype=torch.float32)[:, None, None]
    xs = torch.arange(n, dtype=torch.float32)[None, :, None]
    cy, cx, amp = (torch.tensor(v) for v in zip(*centres))
    return (amp * torch.exp(-((ys - cy - dy) ** 2 + (xs - cx - dx) ** 2) / (2 * sigma**2))).sum(-1)


@st.composite
def scenes(draw: st.DrawFn) -> tuple[int, Centres, float]:
    """Grid size, blob centres and width, with the blobs far enough from the border to move 3 cells."""
    n = draw(st.integers(16, 32))
    sigma = draw(st.floats(1.5, 2.5))
    margin = 2 * sigma + 3
    coord = st.floats(margin, n - margin)
    centres = draw(st.lists(st.tuples(coord, coord, st.floats(0.5, 1.5)), min_size=2, max_size=4))
    return n, centres, sigma


def tokens_of(frames: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """(F, H, W) maps to (1, F*H*W, C) tokens whose channels are signed copies of the map."""
    return (frames[..., None] * mix).reshape(1, -1, mix.numel())


MIX = torch.tensor([1.0, -0.5, 2.0, 0.25])


@FAST
@given(scenes(), st.integers(-3, 3), st.integers(-3, 3))
def test_integer_shift_is_recovered(scene, dx, dy):
    n, centres, sigma = scene
    shift = motion.estimate_shift(blobs(n, centres, sigma), blobs(n, centres, sigma, dx, dy))
    assert torch.allclose(shift, torch.tensor([float(dx), float(dy)]), atol=0.5)


@FAST
@given(scenes(), st.floats(-3, 3), st.floats(-3, 3))
def test_fractional_shift_is_recovered(scene, dx, dy):
    n, centres, sigma = scene
    shift = motion.estimate_shift(blobs(n, centres, sigma), blobs(n, centres, sigma, dx, dy))
    assert torch.allclose(shift, torch.tensor([dx, dy]), atol=0.5)


def test_estimate_shift_batches_and_flat_maps():
    a = blobs(20, [(10.0, 9.0, 1.0), (7.0, 12.0, 0.8)], 2.0)
    b = blobs(20, [(10.0, 9.0, 1.0), (7.0, 12.0, 0.8)], 2.0, dx=2.0, dy=-1.0)
    shift = motion.estimate_shift(torch.stack([a, a]), torch.stack([b, a]))
    assert shift.shape == (2, 2)
    assert torch.allclose(shift[0], torch.tensor([2.0, -1.0]), atol=0.25)
    assert torch.equal(shift[1], torch.zeros(2))
    assert torch.equal(motion.estimate_shift(torch.ones(8, 8), torch.ones(8, 8)), torch.zeros(2))


@FAST
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 12), st.integers(1, 6))
def test_warp_is_exact_identity_at_zero_shift(b, f, h, c):
    grid = (f, h, h + 1)
    residual = torch.randn(b, f * h * (h + 1), c)
    assert motion.warp_tokens(residual, torch.zeros(b, 2), grid) is residual


def test_warp_leaves_unshifted_batch_elements_bit_for_bit():
    residual = torch.randn(2, 2 * 8 * 8, 3)
    out = motion.warp_tokens(residual, torch.tensor([[0.0, 0.0], [1.5, -0.5]]), (2, 8, 8))
    assert torch.equal(out[0], residual[0])
    assert not torch.equal(out[1], residual[1])


def test_integer_warp_moves_content_exactly():
    grid = (1, 6, 7)
    residual = torch.randn(1, 42, 2)
    out = motion.warp_tokens(residual, torch.tensor([[2.0, 1.0]]), grid)
    src, dst = residual.reshape(6, 7, 2), out.reshape(6, 7, 2)
    assert torch.allclose(dst[1:, 2:], src[:-1, :-2], atol=1e-5)  # out(x) = r(x - d)


@FAST
@given(scenes(), st.floats(-2.5, 2.5), st.floats(-2.5, 2.5))
def test_warp_by_estimated_shift_moves_towards_the_shifted_pattern(scene, dx, dy):
    assume(abs(dx) + abs(dy) >= 0.25)  # below that the patterns are too close to halve their distance
    n, centres, sigma = scene
    grid = (2, n, n)
    before = tokens_of(torch.stack([blobs(n, centres, sigma), blobs(n, centres, sigma, 0.5, 0.0)]), MIX)
    after = tokens_of(torch.stack([blobs(n, centres, sigma, dx, dy), blobs(n, centres, sigma, 0.5 + dx, dy)]), MIX)
    maps_before, direction = motion.frame_maps(before, grid)
    maps_after, _ = motion.frame_maps(after, grid, direction)
    shift = motion.estimate_shift(maps_before, maps_after).mean(dim=1)
    warped = motion.warp_tokens(before, shift, grid)
    assert (warped - after).norm() <= (before - after).norm() * 0.5 + 1e-4


def video(n: int, centres: Centres, sigma: float, speed: float, frames: int = 4) -> torch.Tensor:
    """(1, C, F, H, W) latents of a pattern moving diagonally by `speed` cells per frame."""
    maps = torch.stack([blobs(n, centres, sigma, speed * f, 0.5 * speed * f) for f in range(frames)])
    return (maps[None, None] * MIX[None, :, None, None, None]).float()


SLOW_SCENE = (24, [(12.0, 10.0, 1.0), (9.0, 14.0, 0.7), (14.0, 13.0, -0.6)], 2.0)


def test_content_motion_is_zero_for_a_static_video():
    assert motion.content_motion(video(*SLOW_SCENE, speed=0.0)) == 0.0
    assert motion.content_motion(video(*SLOW_SCENE, speed=1.0)[:, :, :1]) == 0.0  # one frame


@FAST
@given(st.floats(0.2, 1.2), st.floats(0.5, 1.5))
def test_content_motion_grows_with_speed(slow, extra):
    m_slow = motion.content_motion(video(*SLOW_SCENE, speed=slow))
    m_fast = motion.content_motion(video(*SLOW_SCENE, speed=slow + extra))
    assert 0.0 < m_slow < m_fast <= 1.0


@FAST
@given(st.integers(1, 2), st.integers(1, 4), st.integers(1, 5), st.integers(1, 9), st.floats(0.5, 100.0))
def test_content_motion_is_within_unit_interval_and_deterministic(b, c, f, h, scale):
    x = torch.randn(b, c, f, h, h + 2) * scale
    m = motion.content_motion(x)
    assert 0.0 <= m <= 1.0
    assert motion.content_motion(x) == m


def test_content_motions_estimates_each_video_as_content_motion_does():
    """The profiler estimates its steps' motion in batches; the trace must hold what the live session reads."""
    videos = [video(*SLOW_SCENE, speed=s) for s in (0.0, 0.4, 1.0, 1.6)]
    videos.append(torch.randn_like(videos[0]))
    assert motion.content_motions(videos) == [motion.content_motion(v) for v in videos]
    assert motion.content_motions([v[:, :, :1] for v in videos]) == [0.0] * len(videos)  # one frame each


def test_content_motion_of_tokens_matches_latents():
    lat = video(*SLOW_SCENE, speed=1.0)
    _, c, f, h, w = lat.shape
    tokens = lat.permute(0, 2, 3, 4, 1).reshape(1, f * h * w, c)
    assert motion.content_motion(tokens, grid=(f, h, w)) == pytest.approx(motion.content_motion(lat), abs=1e-5)
    with pytest.raises(ValueError):
        motion.content_motion(tokens, grid=(f, h, w + 1))


def test_blend_weights_and_exact_ends():
    a, b = torch.zeros(3), torch.ones(3)
    out, alpha = motion.blend(a, b, 0.2)
    assert alpha == pytest.approx(0.2 * motion.BLEND_GAIN)
    assert torch.allclose(out, torch.full((3,), alpha))
    assert motion.blend(a, b, 0.0) == (a, 0.0)
    assert motion.blend(a, b, 5.0)[1] == 1.0
    assert torch.allclose(motion.simple_blend(a, b, 0.25), torch.full((3,), 0.25))


def test_warp_residual_follows_the_input_motion():
    n, centres, sigma = SLOW_SCENE
    grid = (2, n, n)
    x_cached = tokens_of(torch.stack([blobs(n, centres, sigma), blobs(n, centres, sigma, 1.0, 0.0)]), MIX)
    x_now = tokens_of(torch.stack([blobs(n, centres, sigma, 2.0, 1.0), blobs(n, centres, sigma, 3.0, 1.0)]), MIX)
    residual = 0.1 * x_cached  # a residual that moves with the content
    out, alpha = motion.warp_residual(residual, x_cached, x_now, grid, motion=0.5)
    assert alpha == 1.0
    assert (out - 0.1 * x_now).norm() < 0.3 * (residual - 0.1 * x_now).norm()
    assert motion.warp_residual(residual, x_cached, x_now, grid, motion=0.0) == (residual, 0.0)


def test_bfloat16_keeps_dtype():
    n, centres, sigma = SLOW_SCENE
    grid = (2, n, n)
    x = tokens_of(torch.stack([blobs(n, centres, sigma), blobs(n, centres, sigma, 1.0, 0.0)]), MIX).bfloat16()
    y = tokens_of(torch.stack([blobs(n, centres, sigma, 1, 1), blobs(n, centres, sigma, 2, 1)]), MIX).bfloat16()
    out, _ = motion.warp_residual(x, x, y, grid, motion=0.3)
    assert out.dtype == torch.bfloat16
    assert motion.warp_tokens(x, torch.tensor([[0.5, 0.5]]), grid).dtype == torch.bfloat16
    assert motion.blend(x, y, 0.1)[0].dtype == torch.bfloat16
    assert 0.0 < motion.content_motion(x, grid=grid) <= 1.0


def test_motion_field_block_matching():
    n, centres, sigma = SLOW_SCENE
    prev = tokens_of(blobs(n, centres, sigma)[None], MIX)[0]
    curr = tokens_of(blobs(n, centres, sigma, 2.0, -1.0)[None], MIX)[0]
    field = motion.MotionField.from_tensors(prev, curr, (n, n), block=4, radius=4)
    assert field.dx.shape == field.dy.shape == (n, n)
    assert field.dx[12, 12] == pytest.approx(2.0, abs=0.25)
    assert field.dy[12, 12] == pytest.approx(-1.0, abs=0.25)
    assert 0.0 < field.mean_magnitude() <= field.max_magnitude() <= 4 * 2**0.5
    dx, dy = field.interpolate(12.0, 12.0)
    assert (float(dx), float(dy)) == (float(field.dx[12, 12]), float(field.dy[12, 12]))
    still = motion.MotionField.from_tensors(prev, prev, (n, n))
    assert still.max_magnitude() == 0.0


def test_motion_field_interpolates_bilinearly():
    field = motion.MotionField(dx=torch.tensor([[0.0, 2.0], [4.0, 6.0]]), dy=torch.zeros(2, 2))
    dx, _ = field.interpolate(torch.tensor([0.5, 1.0, 9.0]), torch.tensor([0.5, 0.0, 9.0]))
    assert torch.allclose(dx, torch.tensor([3.0, 2.0, 6.0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    n, centres, sigma = SLOW_SCENE
    grid = (2, n, n)
    x = tokens_of(torch.stack([blobs(n, centres, sigma), blobs(n, centres, sigma, 1.0, 0.0)]), MIX)
    y = tokens_of(torch.stack([blobs(n, centres, sigma, 1, 1), blobs(n, centres, sigma, 2, 1)]), MIX)
    cpu, _ = motion.warp_residual(x, x, y, grid, motion=0.3)
    gpu, _ = motion.warp_residual(x.cuda().bfloat16(), x.cuda().bfloat16(), y.cuda().bfloat16(), grid, motion=0.3)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    assert torch.allclose(gpu.float().cpu(), cpu, atol=0.05)

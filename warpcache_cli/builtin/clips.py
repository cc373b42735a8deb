"""Procedural moving-shape clips with the prompts that describe them.

The built-in model is trained on these, and its prompt-following check measures generated
clips with the same geometry, so the generator is the single source of truth for what
"a red circle moving left fast" means in pixels per frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.16, 0.14),
    "green": (0.18, 0.80, 0.25),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
    "white": (0.95, 0.95, 0.95),
    "purple": (0.65, 0.25, 0.85),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS: dict[str, float] = {"static": 0.0, "slow": 1.0, "fast": 2.5}  # pixels per frame
BACKGROUNDS = ((0.08, 0.08, 0.10), (0.22, 0.22, 0.25), (0.12, 0.16, 0.22))

FRAMES = 8
SIZE = 32
RADIUS = 5.0
MAX_PROMPT_TOKENS = 12


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    direction: str
    speed: str

    @property
    def velocity(self) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        s = SPEEDS[self.speed]
        return dx * s, dy * s


@dataclass(frozen=True)
class ClipSpec:
    """What a prompt says: the first shape moves as named, an optional second one is static."""

    main: ShapeSpec
    other: ShapeSpec | None = None

    @property
    def prompt(self) -> str:
        m = self.main
        text = f"a {m.colour} {m.shape} " + ("static" if m.speed == "static" else f"moving {m.direction} {m.speed}")
        if self.other is not None:
            text += f" and a {self.other.colour} {self.other.shape}"
        return text


def vocabulary() -> list[str]:
    """All words prompts may use; index 0 is padding, 1 is unknown."""
    words = ["<pad>", "<unk>", "a", "moving", "and", "static"]
    return words + list(COLOURS) + list(SHAPES) + list(DIRECTIONS) + [s for s in SPEEDS if s != "static"]


def parse_prompt(prompt: str) -> ClipSpec:
    """Inverse of `ClipSpec.prompt`, for evaluating what a generated clip was asked to show."""
    words = prompt.lower().replace(",", " ").split()
    if len(words) < 4 or words[0] != "a":
        raise ValueError(f"prompt {prompt!r} is not of the form 'a COLOUR SHAPE moving DIRECTION SPEED'")
    colour, shape = words[1], words[2]
    if words[3] == "static":
        main, rest = ShapeSpec(colour, shape, "left", "static"), words[4:]
    else:
        main, rest = ShapeSpec(colour, shape, words[4], words[5]), words[6:]
    other = ShapeSpec(rest[2], rest[3], "left", "static") if rest[:2] == ["and", "a"] else None
    for spec in filter(None, (main, other)):
        if spec.colour not in COLOURS or spec.shape not in SHAPES or spec.direction not in DIRECTIONS:
            raise ValueError(f"prompt {prompt!r} names an unknown colour, shape or direction")
    return ClipSpec(main, other)


def random_spec(
    rng: np.random.Generator, two_shapes_prob: float = 0.15, speed_p: tuple[float, ...] | None = None
) -> ClipSpec:
    """A random clip; `speed_p` weights static/slow/fast (uniform by default)."""
    colours = list(COLOURS)
    main = ShapeSpec(
        colours[rng.integers(len(colours))],
        SHAPES[rng.integers(len(SHAPES))],
        list(DIRECTIONS)[rng.integers(len(DIRECTIONS))],
        list(SPEEDS)[rng.choice(len(SPEEDS), p=speed_p)],
    )
    if main.speed == "static":
        main = ShapeSpec(main.colour, main.shape, "left", "static")
    other = None
    if rng.random() < two_shapes_prob:
        rest = [c for c in colours if c != main.colour]
        other = ShapeSpec(rest[rng.integers(len(rest))], SHAPES[rng.integers(len(SHAPES))], "left", "static")
    return ClipSpec(main, other)


def _mask(shape: str, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance (one pixel of soft edge)."""
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        sd = np.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        sd = np.maximum(np.abs(dx), np.abs(dy)) - r * 0.9
    else:  # upward triangle: inside three half-planes
        k = math.sqrt(3.0)
        sd = np.maximum.reduce([dy - r * 0.8, (-k * dx - dy) / 2 - r * 0.5, (k * dx - dy) / 2 - r * 0.5])
    return np.clip(0.5 - sd, 0.0, 1.0)


def _start(rng: np.random.Generator, velocity: tuple[float, float], frames: int, size: int) -> tuple[float, float]:
    """A start point from which the whole trajectory stays inside the frame."""
    lo, hi = RADIUS + 1.0, size - RADIUS - 2.0
    out = []
    for v in velocity:
        travel = v * (frames - 1)
        a, b = (lo, hi - travel) if travel >= 0 else (lo - travel, hi)
        out.append(float(rng.uniform(a, b)))
    return out[0], out[1]


def render(spec: ClipSpec, seed: int, frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """Render a clip as float32 (3, frames, size, size) in [-1, 1]; deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    bg = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], dtype=np.float32)
    texture = rng.normal(0.0, 0.02, size=(1, 1, size, size)).astype(np.float32)
    video = np.broadcast_to(bg[:, None, None, None], (3, frames, size, size)) + texture
    video = np.array(video)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    shapes = [spec.main] + ([spec.other] if spec.other else [])
    starts = [_start(rng, s.velocity, frames, size) for s in shapes]
    for f in range(frames):
        # the moving shape is drawn last, so it passes in front of the static one
        for s, (x0, y0) in reversed(list(zip(shapes, starts))):
            vx, vy = s.velocity
            m = _mask(s.shape, x0 + vx * f, y0 + vy * f, RADIUS, yy, xx)
            col = np.array(COLOURS[s.colour], dtype=np.float32)[:, None, None]
            video[:, f] = video[:, f] * (1 - m) + col * m
    return (np.clip(video, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


def centroid_track(video: np.ndarray, colour: str, tol: float = 0.35) -> np.ndarray:
    """Per-frame centroid (x, y) of the pixels close to `colour`; NaN where none are.

    `video` is (3, F, H, W) in [-1, 1].
    """
    rgb = (video + 1.0) / 2.0
    target = np.array(COLOURS[colour], dtype=np.float32)[:, None, None, None]
    dist = np.sqrt(((rgb - target) ** 2).sum(axis=0))
    w = np.clip(1.0 - dist / tol, 0.0, 1.0)
    _, h, wd = w.shape
    yy, xx = np.mgrid[0:h, 0:wd]
    mass = w.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (w * xx).sum(axis=(1, 2)) / mass
        cy = (w * yy).sum(axis=(1, 2)) / mass
    track = np.stack([cx, cy], axis=1)
    track[mass < 2.0] = np.nan
    return track


def follows_prompt(video: np.ndarray, prompt: str, speed_tol: float = 0.3) -> tuple[bool, tuple[float, float]]:
    """Whether a clip shows what its prompt asks: direction and speed within `speed_tol`.

    Returns the verdict and the fitted velocity (pixels per frame). A static prompt passes when
    the shape moves less than `speed_tol` times the slow speed.
    """
    spec = parse_prompt(prompt).main
    track = centroid_track(video, spec.colour)
    ok = ~np.isnan(track[:, 0])
    if ok.sum() < video.shape[1] // 2 + 1:
        return False, (float("nan"), float("nan"))
    t = np.arange(video.shape[1])[ok]
    vx = float(np.polyfit(t, track[ok, 0], 1)[0])
    vy = float(np.polyfit(t, track[ok, 1], 1)[0])
    want = SPEEDS[spec.speed]
    if want == 0.0:
        return math.hypot(vx, vy) < speed_tol * SPEEDS["slow"], (vx, vy)
    dx, dy = DIRECTIONS[spec.direction]
    along = vx * dx + vy * dy
    across = abs(vx * dy - vy * dx)
    good = abs(along - want) <= speed_tol * want and across <= speed_tol * want
    return good, (vx, vy)

"""Measure the built-in model: prompt following on held-out clips, a contact sheet, and per-block drift.

Prompt following is judged by `clips.follows_prompt`, the same geometry the training clips are
rendered with. Drift (how much each block's input changes between neighbouring denoising steps)
is what feature caching exploits, so it is plotted for the trained model next to a random one of
the same shape: a cache policy tuned on `builtin` should see trained-model structure, not noise.

    python scripts/evaluate_builtin.py --n 48 --steps 30 --guidance 4.0 --seed 0 --out docs/

Always exits 0: this is a measurement, not a gate.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from diffusers import WanTransformer3DModel

from warpcache_cli.builtin import clips
from warpcache_cli.builtin.pipeline import WEIGHTS_DIR, BuiltinPipeline, load_builtin, new_scheduler

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

EVAL_SEED_BASE = 10**9  # training clips use seeds below 10**8
MOVING = [s for s in clips.SPEEDS if s != "static"]
SAMPLE_PROMPTS = [
    "a red circle static",
    "a blue square moving left slow",
    "a green triangle moving right fast",
    "a yellow circle moving up slow",
    "a white square moving down fast",
    "a purple triangle moving left fast",
    "a green circle moving up fast",
    "a red square moving down slow",
]
DRIFT_PROMPTS = SAMPLE_PROMPTS[:4]


def load_fresh(weights: Path = WEIGHTS_DIR, tries: int = 5) -> BuiltinPipeline:
    """Load weights, retrying briefly: the training job swaps the weights folder while exporting."""
    for _ in range(tries - 1):
        try:
            return load_builtin("cpu", weights_dir=weights)
        except OSError:
            time.sleep(1.0)
    return load_builtin("cpu", weights_dir=weights)


def balanced_specs(n: int, seed: int = 0) -> list[clips.ClipSpec]:
    """Single-shape specs with speeds cycling (so each is a third) and, within each speed, directions cycling.

    Colours and shapes are dealt evenly but shuffled (seeded) so neither is tied to a speed or direction.
    """
    rng = np.random.default_rng(seed)
    colours = [list(clips.COLOURS)[i % len(clips.COLOURS)] for i in rng.permutation(n)]
    shapes = [clips.SHAPES[i % len(clips.SHAPES)] for i in rng.permutation(n)]
    speeds, directions = list(clips.SPEEDS), list(clips.DIRECTIONS)
    specs = []
    for i in range(n):
        speed = speeds[i % len(speeds)]
        direction = "left" if speed == "static" else directions[(i // len(speeds)) % len(directions)]
        specs.append(clips.ClipSpec(clips.ShapeSpec(colours[i], shapes[i], direction, speed)))
    return specs


def direction_ok(prompt: str, velocity: tuple[float, float]) -> bool:
    """Moving the named way (within 45 degrees) at any speed; separates 'wrong way' from 'wrong speed'."""
    spec = clips.parse_prompt(prompt).main
    dx, dy = clips.DIRECTIONS[spec.direction]
    vx, vy = velocity
    if math.isnan(vx):
        return False
    along, across = vx * dx + vy * dy, abs(vx * dy - vy * dx)
    return along > 0 and along > across


def _fraction(rows: list[dict[str, Any]], key: str = "ok") -> float:
    return float(np.mean([r[key] for r in rows])) if rows else float("nan")


def _groups(rows: list[dict[str, Any]], field: str) -> dict[str, dict[str, float]]:
    out = {}
    for key in sorted({r[field] for r in rows}):
        group = [r for r in rows if r[field] == key]
        out[key] = {"n": len(group), "ok": _fraction(group)}
    return out


def evaluate(pipe: BuiltinPipeline, n: int = 48, steps: int = 30, guidance: float = 4.0, seed: int = 0) -> dict:
    """Generate `n` balanced held-out clips (generator seed 10**9 + 10**6 * seed + i) and judge each."""
    rows = []
    for i, spec in enumerate(balanced_specs(n, seed)):
        gen_seed = EVAL_SEED_BASE + 10**6 * seed + i
        out = pipe(spec.prompt, steps, guidance, generator=torch.Generator().manual_seed(gen_seed))
        ok, (vx, vy) = clips.follows_prompt(out.videos[0].float().cpu().numpy(), spec.prompt)
        rows.append({
            "prompt": spec.prompt, "seed": gen_seed, "speed": spec.main.speed, "direction": spec.main.direction,
            "colour": spec.main.colour, "shape": spec.main.shape, "ok": bool(ok),
            "velocity": None if math.isnan(vx) else [round(vx, 4), round(vy, 4)],
            "direction_ok": None if spec.main.speed == "static" else direction_ok(spec.prompt, (vx, vy)),
        })
    moving = [r for r in rows if r["speed"] != "static"]
    summary = {
        "n": n, "steps": steps, "guidance": guidance, "overall": _fraction(rows),
        "moving_direction_ok": _fraction(moving, "direction_ok"),
        "by_speed": _groups(rows, "speed"), "by_direction": _groups(moving, "direction"),
        "by_colour": _groups(rows, "colour"), "by_shape": _groups(rows, "shape"),
    }
    return {"clips": rows, "summary": summary}


def print_report(result: dict) -> None:
    s = result["summary"]
    print(f"prompt following: {s['n']} clips, {s['steps']} steps, guidance {s['guidance']}")
    for title, field in (("speed", "by_speed"), ("direction (moving)", "by_direction"), ("colour", "by_colour"),
                         ("shape", "by_shape")):
        print(f"  {title:<20} {'n':>4} {'ok':>6}")
        for k, g in s[field].items():
            print(f"    {k:<18} {g['n']:>4} {g['ok']:>6.2f}")
    print(f"  overall {s['overall']:.3f}; moving clips going the right way (any speed) {s['moving_direction_ok']:.3f}")


def contact_sheet(pipe: BuiltinPipeline, path: Path, prompts: list[str] = SAMPLE_PROMPTS, steps: int = 30,
                  guidance: float = 4.0, scale: int = 4, seed: int = EVAL_SEED_BASE) -> None:
    """One row per prompt, all frames side by side, upscaled (nearest) so 32 px shapes are visible."""
    fig, axes = plt.subplots(len(prompts), 1, figsize=(11, 1.75 * len(prompts)), squeeze=False)
    for i, (prompt, ax) in enumerate(zip(prompts, axes[:, 0])):
        out = pipe(prompt, steps, guidance, generator=torch.Generator().manual_seed(seed + i))
        frames = out.frames[0]  # (F, H, W, 3)
        ok, (vx, vy) = clips.follows_prompt(out.videos[0].float().cpu().numpy(), prompt)
        gap = np.ones((frames.shape[1], 2, 3), dtype=np.float32)
        strip = np.concatenate([x for f in frames for x in (f, gap)][:-1], axis=1)
        ax.imshow(np.clip(strip.repeat(scale, 0).repeat(scale, 1), 0, 1), interpolation="nearest")
        ax.set_title(f"{prompt}   [{'ok' if ok else 'FAIL'}: v=({vx:+.2f}, {vy:+.2f}) px/frame]",
                     loc="left", fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@contextmanager
def _record_block_inputs(pipe: BuiltinPipeline, calls_per_step: int) -> Iterator[list[list[torch.Tensor]]]:
    """Per block, the hidden states entering it on the first (cond) call of every step."""
    blocks = pipe.transformer.blocks
    inputs: list[list[torch.Tensor]] = [[] for _ in blocks]
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    def hook(index: int):
        def record(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if (calls[0] - 1) % calls_per_step == 0:
                inputs[index].append((args[0] if args else kwargs["hidden_states"]).detach().float().clone())
        return record

    handles = [pipe.transformer.register_forward_pre_hook(count)]
    handles += [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        yield inputs
    finally:
        for h in handles:
            h.remove()


def drift_curves(pipe: BuiltinPipeline, prompts: list[str] = DRIFT_PROMPTS, steps: int = 30, guidance: float = 4.0,
                 seed: int = EVAL_SEED_BASE) -> np.ndarray:
    """(blocks, steps - 1): ||x_s - x_{s-1}|| / ||x_{s-1}|| of each block's input, averaged over prompts."""
    per_prompt = []
    for i, prompt in enumerate(prompts):
        with _record_block_inputs(pipe, 2 if guidance > 1.0 else 1) as inputs:
            pipe(prompt, steps, guidance, generator=torch.Generator().manual_seed(seed + i))
        per_prompt.append([[float((b[s] - b[s - 1]).norm() / b[s - 1].norm()) for s in range(1, len(b))]
                           for b in inputs])
    return np.mean(np.array(per_prompt), axis=0)


def random_pipeline(pipe: BuiltinPipeline) -> BuiltinPipeline:
    """Same architecture and prompt encoder, transformer freshly initialised (torch seed 0); float32 like `main`."""
    torch.manual_seed(0)
    return BuiltinPipeline(WanTransformer3DModel.from_config(pipe.transformer.config).eval(), pipe.prompt_encoder,
                           new_scheduler())


def phase_means(drift: np.ndarray) -> dict[str, float]:
    """Mean drift over all blocks in the first, middle and last third of the steps."""
    thirds = np.array_split(np.arange(drift.shape[1]), 3)
    return {name: float(drift[:, idx].mean()) for name, idx in zip(("early", "mid", "late"), thirds)}


def drift_figure(curves: dict[str, np.ndarray], path: Path) -> None:
    """One panel per model, one line per block, shared log y so the two scales compare directly."""
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), sharey=True, squeeze=False)
    for ax, (name, drift) in zip(axes[0], curves.items()):
        steps = np.arange(1, drift.shape[1] + 1)
        for b, row in enumerate(drift):
            ax.plot(steps, row, label=f"block {b}", color=plt.cm.viridis(b / max(1, len(drift) - 1)))
        ax.set_yscale("log")
        ax.set_title(f"{name} model")
        ax.set_xlabel("denoising step s")
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("||x_s - x_{s-1}|| / ||x_{s-1}||  (block input, cond)")
    axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def drift_summary(curves: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    out = {name: phase_means(d) for name, d in curves.items()}
    out["ratio trained/random"] = {k: out["trained"][k] / out["random"][k] for k in out["trained"]}
    return out


def _log_step(log: Path = Path("checkpoints/builtin.log")) -> int | None:
    """Training step of the last log line; the exported weights are from the last multiple of 100 at or before."""
    if not log.exists():
        return None
    lines = log.read_text().strip().splitlines()
    return json.loads(lines[-1])["step"] if lines else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=48, help="held-out clips for the prompt-following check (>= 32)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0, help="picks the held-out set; 0 means generator seeds 10**9 + i")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help="weights folder (default: the shipped ones)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train_step = _log_step()
    pipe = load_fresh(args.weights)
    print(f"weights: training log at step {train_step}")

    result = evaluate(pipe, args.n, args.steps, args.guidance, args.seed)
    print_report(result)

    contact_sheet(pipe, args.out / "builtin-samples.png", steps=args.steps, guidance=args.guidance)

    curves = {"trained": drift_curves(pipe, steps=args.steps, guidance=args.guidance),
              "random": drift_curves(random_pipeline(pipe), steps=args.steps, guidance=args.guidance)}
    drift_figure(curves, args.out / "builtin-drift.png")
    summary = drift_summary(curves)
    print("block-input drift, mean over blocks (early / mid / late thirds of the steps):")
    for name, phases in summary.items():
        print(f"  {name:<22} " + "  ".join(f"{k} {v:.4f}" for k, v in phases.items()))

    result["summary"]["train_log_step"] = train_step
    result["drift"] = {"summary": summary, "per_block": {k: v.round(6).tolist() for k, v in curves.items()}}
    (args.out / "builtin-eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote builtin-eval.json, builtin-samples.png and builtin-drift.png under {args.out}")


if __name__ == "__main__":
    main()

"""Train the built-in model (flow matching in pixel space) and export it into the package.

Deterministic for a seed, checkpoints every `--ckpt-every` steps and resumes from the last
checkpoint, so it survives a session ending mid-run. CI never runs this.

The shipped weights, one run from scratch (about 85 minutes on 2 idle CPU cores at 1.27 s a step;
all 48 held-out clips follow their prompts; log: docs/builtin-train.log):

    python scripts/train_builtin.py --steps 4000 --motion-weight 5 --fg-weight 2 --speed-p 0.2 0.4 0.4
    python scripts/train_builtin.py --steps 4000 --export   # re-export the last checkpoint only
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from warpcache_cli.builtin import clips
from warpcache_cli.builtin.pipeline import (
    SCHEDULER_SHIFT,
    WEIGHTS_DIR,
    coordinates,
    load_builtin,
    new_prompt_encoder,
    new_transformer,
    tokenize,
)


def batch(step: int, size: int, seed: int, speed_p: tuple[float, ...] | None) -> tuple[torch.Tensor, list[str]]:
    """Training clips for one step; clip seeds stay below 10**8 (evaluation uses seeds above)."""
    rng = np.random.default_rng([seed, step])
    specs = [clips.random_spec(rng, speed_p=speed_p) for _ in range(size)]
    videos = [clips.render(s, seed=step * size + i) for i, s in enumerate(specs)]
    return torch.from_numpy(np.stack(videos)), [s.prompt for s in specs]


def loss_weight(x0: torch.Tensor, shape_weight: float, motion_weight: float) -> torch.Tensor:
    """Per-pixel loss weight: `shape_weight` on shapes, `motion_weight` where a frame differs from a neighbour.

    Shapes cover under a tenth of a clip and their moving edges far less, so a plain MSE is
    dominated by the background: the model learns where a shape is only weakly, and which way it
    moves hardly at all (the shipped model's loss did not change when a prompt's direction was
    swapped). Weighting the pixels that change between frames puts the loss on the motion.
    """
    bg = x0.flatten(2).median(dim=2).values[:, :, None, None, None]
    shape = ((x0 - bg).abs().sum(dim=1, keepdim=True) > 0.3).float()
    step = (x0[:, :, 1:] - x0[:, :, :-1]).abs().sum(dim=1, keepdim=True) > 0.3  # (B, 1, F-1, H, W)
    pad = torch.zeros_like(step[:, :, :1])
    moving = (torch.cat([step, pad], 2) | torch.cat([pad, step], 2)).float()
    return torch.maximum(1.0 + (shape_weight - 1.0) * shape, 1.0 + (motion_weight - 1.0) * moving)


def sample_t(n: int, gen: torch.Generator) -> torch.Tensor:
    """Logit-normal times shifted towards high noise, where layout and motion are decided."""
    u = torch.sigmoid(torch.randn(n, generator=gen))
    return SCHEDULER_SHIFT * u / (1 + (SCHEDULER_SHIFT - 1) * u)


@torch.no_grad()
def direction_probe(transformer: torch.nn.Module, encoder: torch.nn.Module, n: int = 32, t: float = 0.9) -> dict:
    """Loss on held-out moving clips with the true prompt and with the direction reversed.

    A model that ignores direction words scores both the same (ratio 1): weights trained without
    coordinate channels did. The ratio is the cheapest early sign, long before sampling, that motion is learnt.
    """
    rng = np.random.default_rng(12345)
    specs = [clips.random_spec(rng, two_shapes_prob=0.0, speed_p=(0.0, 0.5, 0.5)) for _ in range(n)]
    x0 = torch.from_numpy(np.stack([clips.render(s, seed=10**8 + i) for i, s in enumerate(specs)]))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    xt = torch.cat([(1 - t) * x0 + t * noise, coordinates(n, *x0.shape[2:])], dim=1)
    opposite = {v: d for d, v in clips.DIRECTIONS.items()}
    swapped = [clips.ClipSpec(dataclasses.replace(s.main, direction=opposite[tuple(-c for c in clips.DIRECTIONS[
        s.main.direction])])).prompt for s in specs]
    losses = {}
    for name, prompts in (("true", [s.prompt for s in specs]), ("reversed", swapped)):
        pred = transformer(xt, torch.full((n,), t * 1000), encoder(tokenize(prompts)), return_dict=False)[0]
        losses[name] = float(((pred - (noise - x0)) ** 2).mean())
    return {"probe_true": round(losses["true"], 5), "probe_ratio": round(losses["reversed"] / losses["true"], 4)}


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def export(transformer: torch.nn.Module, encoder: torch.nn.Module, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
    encoder.save_pretrained(tmp / "prompt_encoder", safe_serialization=True)
    if out.exists():
        old = out.with_name(out.name + ".old")
        os.replace(out, old)
        os.replace(tmp, out)
        import shutil

        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt", type=Path, default=Path("checkpoints/builtin.pt"))
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fg-weight", type=float, default=1.0, help="loss weight on shape pixels (1: plain MSE)")
    ap.add_argument("--motion-weight", type=float, default=1.0,
                    help="loss weight on pixels that change between neighbouring frames (1: none)")
    ap.add_argument("--speed-p", type=float, nargs=3, default=None, metavar=("STATIC", "SLOW", "FAST"),
                    help="sampling weights of the speeds (default uniform)")
    ap.add_argument("--export", action="store_true", help="only export the last checkpoint's EMA weights")
    ap.add_argument("--warm-start", type=Path, nargs="?", const=WEIGHTS_DIR, default=None, metavar="DIR",
                    help="without a checkpoint, start from these weights (default: the ones shipped in the package), "
                         "fresh optimizer")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    transformer, encoder = new_transformer(), new_prompt_encoder()
    params = list(transformer.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema_t, ema_e = copy.deepcopy(transformer), copy.deepcopy(encoder)
    gen = torch.Generator().manual_seed(args.seed)
    start = 0
    if args.ckpt.exists():
        state = torch.load(args.ckpt, weights_only=True)
        transformer.load_state_dict(state["transformer"])
        encoder.load_state_dict(state["encoder"])
        ema_t.load_state_dict(state["ema_transformer"])
        ema_e.load_state_dict(state["ema_encoder"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start = state["step"]
        print(f"resumed at step {start}", flush=True)
    elif args.warm_start is not None:
        shipped = load_builtin(weights_dir=args.warm_start)
        for m, e, src in ((transformer, ema_t, shipped.transformer), (encoder, ema_e, shipped.prompt_encoder)):
            m.load_state_dict(src.state_dict())
            e.load_state_dict(src.state_dict())
        print(f"warm start from {args.warm_start}", flush=True)
    if args.export:
        export(ema_t, ema_e, args.out)
        return

    n_params = sum(p.numel() for p in params)
    print(f"params {n_params / 1e6:.2f}M, steps {start}..{args.steps}", flush=True)
    log = args.ckpt.with_suffix(".log")
    args.ckpt.parent.mkdir(parents=True, exist_ok=True)
    losses: list[float] = []
    t0 = time.time()
    for step in range(start, args.steps):
        x0, prompts = batch(step, args.batch, args.seed, args.speed_p)
        drop = torch.rand(len(prompts), generator=gen) < 0.1
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        t = sample_t(len(prompts), gen)
        noise = torch.randn(x0.shape, generator=gen)
        tt = t.view(-1, 1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * noise
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        model_in = torch.cat([xt, coordinates(xt.shape[0], *xt.shape[2:])], dim=1)
        pred = transformer(model_in, t * 1000, encoder(tokenize(prompts)), return_dict=False)[0]
        loss = (loss_weight(x0, args.fg_weight, args.motion_weight) * (pred - (noise - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for m, e in ((transformer, ema_t), (encoder, ema_e)):
                for p, q in zip(m.parameters(), e.parameters()):
                    q.lerp_(p, 1 - decay)
        losses.append(loss.item())
        done = step + 1
        if done % 50 == 0:
            rate = (time.time() - t0) / len(losses)
            line = {"step": done, "loss": float(np.mean(losses[-50:])), "s_per_step": round(rate, 3)}
            if done % args.ckpt_every == 0:
                line |= direction_probe(ema_t, ema_e)
            print(json.dumps(line), flush=True)
            with log.open("a") as f:
                f.write(json.dumps(line) + "\n")
        if done % args.ckpt_every == 0 or done == args.steps:
            state = {
                "transformer": transformer.state_dict(),
                "encoder": encoder.state_dict(),
                "ema_transformer": ema_t.state_dict(),
                "ema_encoder": ema_e.state_dict(),
                "opt": opt.state_dict(),
                "gen": gen.get_state(),
                "step": done,
            }
            tmp = args.ckpt.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, args.ckpt)
            export(ema_t, ema_e, args.out)


if __name__ == "__main__":
    main()

"""`warpcache run`: the tuned policy on the real model, with the measured speedup and quality."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from warpcache_cli.cli._errors import handle_errors
from warpcache_cli.cli._options import Device, Dtype, JsonOut
from warpcache_cli.cli._output import console, decision_map, print_json, progress, table
from warpcache_cli.cli.auto_run import run_auto
from warpcache_cli.config import Config, load_config
from warpcache_cli.errors import ConfigError
from warpcache_cli.measure import measure
from warpcache_cli.models import Request, load_model
from warpcache_cli.video import check_video_path, write_video

ModelArg = Annotated[str, typer.Argument(help="'builtin', a diffusers pipeline directory, or module:function")]


def resolve_config(config: Path | None, preset: str | None) -> Config:
    if config is not None and preset is not None:
        raise ConfigError("give either --config or --preset, not both")
    return load_config(str(config) if config is not None else (preset or "balanced"))


@handle_errors
def run(
    model: ModelArg = "builtin",
    config: Annotated[Path | None, typer.Option(help="config file (JSON or YAML)")] = None,
    preset: Annotated[str | None, typer.Option(help="fast, balanced or quality")] = None,
    prompt: str = "a red circle moving right fast",
    seed: int = 0,
    steps: Annotated[int, typer.Option(min=1)] = 30,
    frames: Annotated[int | None, typer.Option(min=1)] = None,
    height: Annotated[int | None, typer.Option(min=8)] = None,
    width: Annotated[int | None, typer.Option(min=8)] = None,
    guidance: float = 4.0,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    repeats: Annotated[int, typer.Option(min=1, help="timed runs of each; the median is reported")] = 1,
    out: Annotated[Path, typer.Option(help="cached video to write (.mp4 or .gif)")] = Path("warpcache-run.gif"),
    json_out: JsonOut = False,
    auto: Annotated[bool, typer.Option("--auto", help="zero-config: profile, tune and switch while serving")] = False,
    requests: Annotated[int | None, typer.Option(min=1, help="with --auto: requests, seeds seed, seed+1, ...")] = None,
) -> None:
    """Run MODEL uncached and cached with the same seed; print speedup, PSNR, SSIM; write the video.

    Example: warpcache run builtin --preset fast --prompt "a blue square moving left slow" --out clip.gif
    Zero-config: warpcache run builtin --auto --requests 6 --steps 12
    """
    cfg = resolve_config(config, preset)
    req = Request(prompt, seed, steps, guidance, frames, height, width)
    if auto:
        run_auto(model, cfg, req, requests or 4, device, dtype, json_out)
        return
    if requests is not None:
        raise ConfigError("--requests needs --auto")
    check_video_path(out)
    with progress(json_out) as bar:
        task = bar.add_task("loading model", total=None)
        pipe = load_model(model, device, dtype)
        bar.update(task, description=f"running uncached and cached x{repeats}")
        result = measure(pipe, cfg, req, repeats, tick=lambda: bar.advance(task))
    write_video(out, result.frames, upscale=max(1, 256 // result.frames.shape[1]))
    data = {"model": model, **result.to_dict(), "out": str(out)}
    if json_out:
        print_json(data)
        return
    s, q = result.stats, result.quality
    table(
        f"warpcache run: {model}, {steps} steps, seed {seed}, median of {repeats}",
        ["measure", "value"],
        [
            ["uncached wall time", f"{result.uncached_seconds:.3f} s"],
            ["cached wall time", f"{result.cached_seconds:.3f} s"],
            ["speedup", f"{result.speedup:.2f}x"],
            ["PSNR vs uncached", f"{q['psnr']:.2f} dB"],
            ["SSIM vs uncached", f"{q['ssim']:.4f}"],
            ["temporal PSNR", f"{q['temporal_psnr']:.2f} dB"],
            ["block calls recompute / reuse / warp", f"{s['recompute']} / {s['reuse']} / {s['warp']}"],
            ["blocks computed", f"{s['compute_fraction']:.1%}"],
            ["peak cache memory", f"{s['peak_bytes'] / 1e6:.1f} MB"],
        ],
    )
    if result.decision_map.size:
        console.print(decision_map(result.decision_map.T, "cached run (a step's most reusing branch)"))
    print(f"wrote {out}")

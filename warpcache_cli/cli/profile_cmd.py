"""`warpcache profile`: record a trace of full-compute runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from warpcache_cli.cli._errors import handle_errors
from warpcache_cli.cli._options import Device, Dtype, JsonOut
from warpcache_cli.cli._output import print_json, progress, table
from warpcache_cli.cli.run_cmd import ModelArg
from warpcache_cli.errors import WarpcacheError
from warpcache_cli.models import Request, load_model
from warpcache_cli.profile import DEFAULT_LAGS, DEFAULT_SKETCH_TOKENS, profile


def read_prompts(prompt: list[str] | None, prompts_file: Path | None) -> list[str]:
    prompts = list(prompt or [])
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise WarpcacheError(f"--prompts-file {prompts_file}: no such file")
        prompts += [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    return prompts or ["a red circle moving right fast"]


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-3'."""
    try:
        if "-" in text.strip("-"):
            lo, hi = text.split("-", 1)
            return list(range(int(lo), int(hi) + 1))
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise WarpcacheError(f"--seeds {text!r}: expected a list like 0,1,2 or a range like 0-3") from None


@handle_errors
def profile_command(
    model: ModelArg = "builtin",
    prompt: Annotated[list[str] | None, typer.Option(help="prompt to profile; repeat for several")] = None,
    prompts_file: Annotated[Path | None, typer.Option(help="file with one prompt per line")] = None,
    seeds: Annotated[str, typer.Option(help="seeds, e.g. 0,1,2 or 0-3; each prompt runs with each")] = "0",
    steps: Annotated[int, typer.Option(min=2)] = 30,
    frames: Annotated[int | None, typer.Option(min=1)] = None,
    height: Annotated[int | None, typer.Option(min=8)] = None,
    width: Annotated[int | None, typer.Option(min=8)] = None,
    guidance: float = 4.0,
    tokens: Annotated[int, typer.Option(min=8, help="token subset for drift (the policy's token_subset)")] = 256,
    sketch_tokens: Annotated[
        int, typer.Option(min=0, help="tokens kept as float16 sketches (0: none)")
    ] = DEFAULT_SKETCH_TOKENS,
    lags: Annotated[int, typer.Option(min=1, max=64, help="look-back steps recorded for drift")] = DEFAULT_LAGS,
    calibrate: Annotated[int, typer.Option(min=0, help="live cached runs that calibrate the estimates")] = 6,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    out: Annotated[Path, typer.Option(help="trace file to write")] = Path("trace.safetensors"),
    json_out: JsonOut = False,
) -> None:
    """Record per-block feature traces of full-compute runs of MODEL.

    Example: warpcache profile builtin --prompt "a red circle moving left fast" --seeds 0,1 --out trace.safetensors
    """
    prompts = read_prompts(prompt, prompts_file)
    requests = [Request(p, s, steps, guidance, frames, height, width) for p in prompts for s in parse_seeds(seeds)]
    with progress(json_out) as bar:
        load = bar.add_task("loading model", total=None)
        pipe = load_model(model, device, dtype)
        bar.remove_task(load)
        bars = [
            bar.add_task(f"run {i + 1}/{len(requests)}: {r.prompt} (seed {r.seed})", total=steps)
            for i, r in enumerate(requests)
        ]
        trace = profile(
            pipe,
            requests,
            model_id=model,
            tokens=tokens,
            sketch_tokens=sketch_tokens,
            lags=lags,
            dtype=dtype,
            calibrate=calibrate,
            on_progress=lambda run, step: bar.update(bars[run], completed=step + 1),
        )
    trace.save(out)
    info = trace.info()
    if json_out:
        print_json(info)
        return
    cost = f"{info['recording_ratio']:.2f}x plain" if "recording_ratio" in info else "-"
    calibration = "none"
    if "calibration_runs" in info:
        low, high = info["calibration_psnr"]
        calibration = f"{info['calibration_runs']} runs, {low:.1f}-{high:.1f} dB"
    table(
        f"trace {out}",
        ["runs", "branches", "steps", "blocks", "size", "recording (median run)", "calibration"],
        [[info["runs"], ",".join(info["branches"]), info["steps"], info["blocks"], f"{info['bytes'] / 1e6:.2f} MB",
          cost, calibration]],
    )

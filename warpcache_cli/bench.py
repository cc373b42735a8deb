"""`bench`: one model under every caching method, side by side, measured in the same process.

Each method is a `Method`: how to switch it on at a setting, how to switch it off, and the
sweep of its main knob. The peers are diffusers' own cache hooks (and cache-dit's DBCache when
it is installed), configured as their documentation intends for the model; warpcache and the
fixed-interval FORA baseline run on warpcache's runtime. Quality is measured against the model's
own uncached output; speedups are ratios of median wall times, with uncached and cached runs
interleaved so drift in machine load hits both.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import io
import json
import re
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from diffusers.utils import logging as diffusers_logging
from torch import nn

from warpcache_cli import quality, runtime
from warpcache_cli.config import Config
from warpcache_cli.errors import ModelError, WarpcacheError
from warpcache_cli.measure import timed, warm_up
from warpcache_cli.models import Request, generate
from warpcache_cli.runtime.adapters import find_blocks, find_transformer
from warpcache_cli.runtime.steps import timestep_value

BUDGETS = (30.0, 25.0)  # dB: the quality levels `best_at` is reported for
MAX_THRESHOLD = 2.0  # the top of the policy's threshold range (cosine drift never exceeds it)


@dataclass(frozen=True)
class Method:
    """A caching method: on at a setting of its main knob, off again, and the settings to sweep."""

    name: str
    knob: str  # what a setting means, for tables
    settings: tuple[float, ...]
    apply: Callable[[Any, float], None]
    remove: Callable[[Any], None]
    prepare: Callable[[Any, Request], None] = lambda pipe, req: None  # one-off calibration on the model, if any
    unavailable: str = ""  # why the method cannot run in this environment at all
    hint: str = ""  # the likely cause when it raises on a model


# --- warpcache and FORA: warpcache's own runtime --------------------------------------------------------------


def scaled(config: Config, scale: float) -> Config:
    """The config with its base, warp and min thresholds multiplied by `scale` (capped at the range's top)."""
    p = config.policy
    names = ("base_threshold", "warp_threshold", "min_threshold")
    return config.with_policy(**{n: min(MAX_THRESHOLD, getattr(p, n) * scale) for n in names})


def warpcache(config: Config, scales: Sequence[float] = (0.5, 1.0, 2.0, 4.0)) -> Method:
    """The given config (scale 1) and the same config with every threshold scaled, for the quality/speed curve."""
    return Method("warpcache", "threshold scale", tuple(scales),
                  lambda pipe, scale: runtime.apply(pipe, scaled(config, scale)), runtime.remove)


def fora_config(interval: int) -> Config:
    """FORA: every block recomputes at steps 0, N, 2N, ... and reuses its cached residual at every other step."""
    return Config.default().with_schedule(int(interval), warm_up=1)


def fora(intervals: Sequence[int] = (2, 3, 4, 6)) -> Method:
    """The fixed-interval reuse baseline (FORA), run by warpcache's own hooks with `fora_config`."""
    return Method("fora", "recompute interval", tuple(float(n) for n in intervals),
                  lambda pipe, n: runtime.apply(pipe, fora_config(int(n))), runtime.remove)


# --- diffusers' cache hooks ------------------------------------------------------------------------------------


class Clock:
    """The timestep of the transformer's current call, for hooks that gate on it (PAB, FasterCache).

    diffusers pipelines expose `current_timestep`; a pre-hook on the transformer works for any pipeline.
    """

    def __init__(self, transformer: nn.Module) -> None:
        self.timestep = float("inf")
        self._signature = inspect.signature(type(transformer).forward)
        self._handle = transformer.register_forward_pre_hook(self._read, with_kwargs=True)

    def _read(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = self._signature.bind_partial(module, *args, **kwargs).arguments.get("timestep")
        if t is not None:
            self.timestep = timestep_value(t)

    def __call__(self) -> float:
        return self.timestep

    def close(self) -> None:
        self._handle.remove()


def _hooked_modules(transformer: nn.Module) -> int:
    """Submodules (the transformer itself excluded) that carry at least one diffusers hook."""
    return sum(1 for m in transformer.modules()
               if m is not transformer and getattr(getattr(m, "_diffusers_hook", None), "hooks", None))


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers warns on every FasterCache apply; the bench reports what matters itself."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


class DiffusersCache:
    """A diffusers cache config switched on and off through the transformer's `enable_cache` / `disable_cache`.

    Several hooks find their layers by module-name patterns and attach to nothing, silently, when
    the names do not match the model; `apply` refuses that, so a no-op never passes for a method.
    """

    def __init__(self, name: str, make: Callable[[float, Clock], Any]) -> None:
        self.name, self.make = name, make
        self.clock: Clock | None = None

    def apply(self, pipe: Any, setting: float) -> None:
        transformer = find_transformer(pipe)
        if not hasattr(transformer, "enable_cache"):
            raise ModelError(f"{type(transformer).__name__} has no enable_cache (not a diffusers CacheMixin)")
        before = _hooked_modules(transformer)
        self.clock = Clock(transformer)
        with _quiet_diffusers():
            transformer.enable_cache(self.make(setting, self.clock))
        if _hooked_modules(transformer) == before:
            self.remove(pipe)
            raise ModelError(f"{self.name} attached to no layer of {type(transformer).__name__}: "
                             "its module-name patterns match nothing in this model")

    def remove(self, pipe: Any) -> None:
        transformer = find_transformer(pipe)
        if getattr(transformer, "is_cache_enabled", False):
            transformer.disable_cache()
        if self.clock is not None:
            self.clock.close()
            self.clock = None


def _diffusers_method(name: str, knob: str, settings: Sequence[float], make: Callable[[float, Clock], Any],
                      **extra: Any) -> Method:
    cache = DiffusersCache(name, make)
    return Method(name, knob, tuple(settings), cache.apply, cache.remove, **extra)


def fbcache(thresholds: Sequence[float] = (0.05, 0.1, 0.2, 0.4)) -> Method:
    """First Block Cache: skip all later blocks when the first block's residual changed less than the threshold."""
    return _diffusers_method("fbcache", "threshold", thresholds, lambda t, clock: FirstBlockCacheConfig(threshold=t))


_RATIOS_LINE = re.compile(r"\[[0-9eE.,+\- ]+\]")


def calibrate_magcache(pipe: Any, req: Request) -> list[float]:
    """MagCache's magnitude ratios for this model at `req.steps`, from its own calibrate mode.

    Calibration prints one list per CFG branch (state is kept per cache context); MagCache takes
    one list for all branches, so the ratios are their per-step mean.
    """
    transformer = find_transformer(pipe)
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=req.steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            generate(pipe, req)
    finally:
        transformer.disable_cache()
    runs = [json.loads(line) for line in printed.getvalue().splitlines() if _RATIOS_LINE.fullmatch(line.strip())]
    if not runs or any(len(r) != req.steps for r in runs):
        raise ModelError(f"MagCache calibration gave no ratios for {req.steps} steps")
    return [float(np.mean(step)) for step in zip(*runs)]


def magcache(thresholds: Sequence[float] = (0.03, 0.06, 0.12, 0.24)) -> Method:
    """MagCache with ratios calibrated on this model and step count (`prepare`) before the sweep."""
    ratios: list[float] = []

    def prepare(pipe: Any, req: Request) -> None:
        ratios[:] = calibrate_magcache(pipe, req)

    def make(threshold: float, clock: Clock) -> MagCacheConfig:
        return MagCacheConfig(threshold=threshold, num_inference_steps=len(ratios), mag_ratios=list(ratios))

    return _diffusers_method("magcache", "threshold", thresholds, make, prepare=prepare)


# TaylorSeer's default patterns ("^blocks.*attn", fullmatch) miss Wan's `blocks.N.attn1`, and then it hooks
# nothing; these name every block's attention and feed-forward layers, the features the paper forecasts.
TAYLORSEER_LAYERS = r"(blocks|transformer_blocks|single_transformer_blocks)\.\d+\.(attn\d?|ffn?|ff_context)"


def taylorseer_config(interval: int, order: int = 1, **options: Any) -> TaylorSeerCacheConfig:
    """TaylorSeer on every block's attention and feed-forward layers, its factors in float32: bfloat16
    (the default) loses most of the bits of a difference between neighbouring steps."""
    return TaylorSeerCacheConfig(cache_interval=interval, max_order=order, taylor_factors_dtype=torch.float32,
                                 cache_identifiers=[TAYLORSEER_LAYERS], **options)


def taylorseer(intervals: Sequence[int] = (2, 3, 4, 6), order: int = 1) -> Method:
    """TaylorSeer: attention and feed-forward outputs forecast by a Taylor series of `order` between full steps."""
    return _diffusers_method(
        "taylorseer" if order == 1 else f"taylorseer{order}", "cache interval", tuple(float(n) for n in intervals),
        lambda n, clock: taylorseer_config(int(n), order),
    )


def pab(ranges: Sequence[int] = (2, 3, 4)) -> Method:
    """Pyramid Attention Broadcast on self-attention in the documented default timestep window (100, 800).

    PAB keeps one state per attention layer, not per cache context, and counts calls, not steps:
    on a pipeline that calls the transformer once per CFG branch, one branch is served the
    other's attention output. Its quality there is measured as it is, not corrected.
    """
    return _diffusers_method(
        "pab", "attention skip range", tuple(float(n) for n in ranges),
        lambda n, clock: PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=int(n),
                                                         current_timestep_callback=clock),
    )


def fastercache(ranges: Sequence[int] = (2, 3)) -> Method:
    """FasterCache: attention reuse plus its CFG cache, which approximates the uncond branch from the cond one."""
    return _diffusers_method(
        "fastercache", "attention skip range", tuple(float(n) for n in ranges),
        lambda n, clock: FasterCacheConfig(spatial_attention_block_skip_range=int(n), current_timestep_callback=clock,
                                           attention_weight_callback=lambda module: 0.5, tensor_format="BCFHW"),
        hint="FasterCache's CFG cache needs cond and uncond batched in one transformer call",
    )


# --- cache-dit (optional) --------------------------------------------------------------------------------------


def dbcache(thresholds: Sequence[float] = (0.08, 0.12, 0.24, 0.4)) -> Method:
    """cache-dit's DBCache through its documented one-line API; unavailable unless `cache_dit` is installed."""

    def apply(pipe: Any, threshold: float) -> None:
        import cache_dit

        cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(residual_diff_threshold=threshold))

    def remove(pipe: Any) -> None:
        import cache_dit

        cache_dit.disable_cache(pipe)

    missing = importlib.util.find_spec("cache_dit") is None
    return Method("dbcache", "threshold", tuple(thresholds), apply, remove,
                  unavailable="cache_dit is not installed (pip install cache-dit)" if missing else "")


PEERS: dict[str, Callable[[], Method]] = {
    "fbcache": fbcache, "magcache": magcache, "taylorseer": taylorseer,
    "taylorseer2": functools.partial(taylorseer, order=2), "pab": pab, "fastercache": fastercache,
    "fora": fora, "dbcache": dbcache,
}
METHOD_NAMES = ("warpcache", *PEERS)


def methods_named(names: Sequence[str], config: Config) -> list[Method]:
    """Methods in the order given; `config` is warpcache's. Unknown names raise, listing the known ones."""
    known = f"known methods: {', '.join(METHOD_NAMES)}"
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown:
        raise WarpcacheError(f"unknown method {', '.join(map(repr, unknown))}; {known}")
    if not names:
        raise WarpcacheError(f"no method given; {known}")
    return [warpcache(config) if n == "warpcache" else PEERS[n]() for n in dict.fromkeys(names)]


# --- measuring -------------------------------------------------------------------------------------------------


class ComputeCounter:
    """Counts real executions of each block's attention query projection, which skipped work never reaches.

    Counting a layer inside the block, not the block call, sees skips made at any level: whole
    blocks (warpcache, FBCache, MagCache) or single layers (PAB, TaylorSeer).
    """

    def __init__(self, pipe: Any) -> None:
        self.calls = 0
        self._handles = [_probe(b).register_forward_pre_hook(self._count) for b in find_blocks(find_transformer(pipe))]

    def _count(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.calls += 1

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _probe(block: nn.Module) -> nn.Module:
    """The first attention's query projection, or the block's first linear layer where there is none."""
    for m in block.modules():
        if isinstance(getattr(m, "to_q", None), nn.Linear):
            return m.to_q
    return next(m for m in block.modules() if isinstance(m, nn.Linear))


@dataclass
class _Cell:
    """One method at one setting on one request, while it is being measured."""

    method: Method
    setting: float
    seconds: list[float] = field(default_factory=list)
    quality: dict[str, float] = field(default_factory=dict)
    compute_fraction: float = 1.0


def _run(pipe: Any, req: Request, counter: ComputeCounter) -> tuple[np.ndarray, float, int]:
    """One timed generation: frames, seconds and the probe layers' executions."""
    counter.calls = 0
    frames, seconds = timed(pipe, req)
    return frames, seconds, counter.calls


def _run_cached(pipe: Any, req: Request, counter: ComputeCounter, method: Method,
                setting: float) -> tuple[np.ndarray, float, int]:
    """`_run` with the method switched on (outside the timing) and off again, also when it fails."""
    try:
        method.apply(pipe, setting)
        result = _run(pipe, req, counter)
    except Exception:
        with contextlib.suppress(Exception):  # best effort: the method's own error is what gets reported
            method.remove(pipe)
        raise
    method.remove(pipe)
    return result


def _status_row(method: Method, req: Request, status: str) -> dict[str, Any]:
    return {"method": method.name, "knob": method.knob, "setting": None, "prompt": req.prompt, "seed": req.seed,
            "steps": req.steps, "status": status}


def _failure(method: Method, setting: float | None, exc: Exception) -> str:
    at = f" at {method.knob} {setting:g}" if setting is not None else ""
    hint = f" ({method.hint})" if method.hint else ""
    return f"unsupported: {type(exc).__name__}: {' '.join(str(exc).split())}{at}{hint}"


def run_bench(
    pipe: Any,
    methods: Sequence[Method],
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    repeats: int = 3,
    guidance: float = 4.0,
    tick: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Every method at every setting on every prompt and seed: speedup, compute fraction and quality.

    Per request: one untimed warm-up, then `repeats` rounds in which every method runs uncached
    once and then at each of its settings, so reference and cached runs see the same machine load;
    times are medians. Quality and the compute fraction come from the first round (runs are
    deterministic in their seed). A method that raises
    on the model gives one "unsupported: <reason>" row and is not run again; a method that cannot
    run here at all gives one "unavailable: <reason>" row.
    """
    tick = tick or (lambda: None)
    requests = [Request(p, s, steps, guidance) for p in prompts for s in seeds]
    if not requests:
        raise WarpcacheError("nothing to bench: give at least one prompt and one seed")
    runtime.remove(pipe)  # references and calibration must run uncached, as in `measure`
    rows: list[dict[str, Any]] = []
    not_run: list[dict[str, Any]] = []
    live: list[Method] = []
    for m in methods:
        if m.unavailable:
            not_run.append(_status_row(m, requests[0], f"unavailable: {m.unavailable}"))
            continue
        try:
            m.prepare(pipe, requests[0])
            live.append(m)
        except Exception as exc:  # a peer may fail in any way on a model it does not support; report, go on
            not_run.append(_status_row(m, requests[0], _failure(m, None, exc)))
    counter = ComputeCounter(pipe)
    try:
        for req in requests:
            warm_up(pipe, req)
            rows += _bench_request(pipe, req, live, counter, repeats, tick)
    finally:
        counter.close()
    return rows + not_run


def _bench_request(pipe: Any, req: Request, methods: list[Method], counter: ComputeCounter, repeats: int,
                   tick: Callable[[], None]) -> list[dict[str, Any]]:
    """Rounds over the methods, each an uncached run then the method at every setting; drops methods that fail.

    An uncached run beside each method's sweep, rather than one per round, keeps reference and
    cached runs seconds apart: on a shared machine the load changes faster than a round takes.
    """
    cells = {m.name: [_Cell(m, s) for s in m.settings] for m in methods}
    plain: dict[str, list[float]] = {m.name: [] for m in methods}
    failed: list[dict[str, Any]] = []
    for _ in range(repeats):
        for method in list(methods):
            reference, seconds, full_calls = _run(pipe, req, counter)
            plain[method.name].append(seconds)
            tick()
            for cell in cells[method.name]:
                try:
                    frames, seconds, calls = _run_cached(pipe, req, counter, method, cell.setting)
                except Exception as exc:  # see run_bench: a failing peer is a result, not a crash
                    methods.remove(method)
                    failed.append(_status_row(method, req, _failure(method, cell.setting, exc)))
                    break
                finally:
                    tick()
                if not cell.seconds:
                    cell.quality = quality.compare(frames, reference)
                    cell.compute_fraction = calls / full_calls if full_calls else 1.0
                cell.seconds.append(seconds)
    rows = []
    for m in methods:
        uncached = statistics.median(plain[m.name])
        rows += [
            {
                "method": m.name, "knob": m.knob, "setting": c.setting, "prompt": req.prompt, "seed": req.seed,
                "steps": req.steps, "status": "ok", "repeats": len(c.seconds), "uncached_seconds": uncached,
                "cached_seconds": statistics.median(c.seconds), "speedup": uncached / statistics.median(c.seconds),
                "compute_fraction": c.compute_fraction, **c.quality,
            }
            for c in cells[m.name]
        ]
    return rows + failed


def planned_runs(methods: Sequence[Method], requests: int, repeats: int) -> int:
    """Generations `run_bench` times, for a progress bar: per method and round, one uncached run and the sweep."""
    live = [m for m in methods if not m.unavailable]
    return requests * repeats * sum(1 + len(m.settings) for m in live)


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per method and setting that ran: means over prompts and seeds, and the minimum PSNR.

    The minimum sits beside the mean because one bad prompt can hide behind a good average.
    """
    ok = [r for r in rows if r["status"] == "ok"]
    out = []
    for name, setting in dict.fromkeys((r["method"], r["setting"]) for r in ok):
        at = [r for r in ok if r["method"] == name and r["setting"] == setting]
        out.append({
            "method": name, "knob": at[0]["knob"], "setting": setting,
            "speedup": float(np.mean([r["speedup"] for r in at])),
            "psnr_mean": float(np.mean([r["psnr"] for r in at])), "psnr_min": float(np.min([r["psnr"] for r in at])),
            "ssim_mean": float(np.mean([r["ssim"] for r in at])),
            "compute_fraction": float(np.mean([r["compute_fraction"] for r in at])), "runs": len(at),
        })
    return out


def best_at(rows: Sequence[dict[str, Any]], min_psnr: float) -> dict[str, dict[str, Any]]:
    """Per method, its fastest setting whose mean PSNR over prompts and seeds reaches `min_psnr`.

    Methods with no such setting, and methods that did not run, carry a status saying so.
    """
    summary = summarise(rows)
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["method"] for r in rows):
        ran = [s for s in summary if s["method"] == name]
        passing = [s for s in ran if s["psnr_mean"] >= min_psnr]
        if passing:
            out[name] = {"status": "ok", **max(passing, key=lambda s: s["speedup"])}
        elif ran:
            out[name] = {"status": f"no setting reaches {min_psnr:g} dB"}
        else:
            out[name] = {"status": next(r["status"] for r in rows if r["method"] == name)}
    return out


def side_by_side(pipe: Any, method: Method, setting: float, req: Request) -> tuple[np.ndarray, np.ndarray,
                                                                                   np.ndarray | None]:
    """Uncached and cached frames of one request, and the (blocks, steps) decision map where warpcache ran."""
    reference = generate(pipe, req)
    method.apply(pipe, setting)
    try:
        frames = generate(pipe, req)
        session = runtime.session_of(pipe)
        decisions = None
        if session is not None and session.stats.decisions:
            decisions = session.stats.decision_map(session.stats.decisions[0].branch)
    finally:
        method.remove(pipe)
    return reference, frames, decisions

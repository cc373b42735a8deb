"""Zero-config caching (`profiler.auto_profile`): profile, tune and switch policies while serving.

Each input shape (steps, token grid, CFG branches) goes through these phases:

- profiling: its first `profile_requests` generations run at full compute with a `Recorder` observing
  them (a never-reuse policy, so their outputs are exactly the uncached ones);
- tuning: a background thread builds a trace from them and tunes it against
  `Budget(min_psnr=profiler.min_psnr)` (`profiler.trials` trials, at most `profiler.max_tune_seconds`);
  generations that start meanwhile run at full compute and never wait;
- tuned: the sensitivity profile and the tuned config are written, and the tuned policy serves the
  following generations. When warpcache was applied to a pipeline, the first of them is validated
  against an uncached run of the same request;
- fallback: no config met the budget, on the trace or on the validation run, so full compute is used.

A session's config and observer change only when a generation starts (`on_generation` runs before any
block). At that moment the steps (from the pipeline's cache context) and the token grid are known,
but the CFG branches are not. So the shape is predicted as the most recently used one with those
steps and grid, and checked when the generation ends: a recording is filed under the shape it really had.
A generation ends when the pipeline call returns. With a bare transformer it ends after the last call of
the announced last step, or, when the steps are not announced, when the next generation starts.

Calibration: the replay maps the error E that reused residuals inject to PSNR with a line fitted to
live cached runs. Auto mode runs nothing extra before tuning (the model serves one generation at a
time, and the user's generations come first), so it tunes on a prior, PSNR = -20 log10(E): the output's
RMS error on a unit data range is taken to equal E. The slope is the first-order relation; the
intercept assumes the trajectory neither amplifies nor damps errors. On the built-in model this is
within about 6 dB of the measurements, either way. The prior enters the trace through the normal
calibration field, as one point on that line marked `"source": "prior"`. The validation run is the
real check: a measured PSNR under the budget means fallback. A bare transformer has no request to
re-run, so it cannot be validated; this is logged and the tuned policy is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from warpcache_cli import quality, runtime, sensitivity
from warpcache_cli.atomic import atomic_path
from warpcache_cli.budget import Budget
from warpcache_cli.config import Config
from warpcache_cli.errors import ConfigError, WarpcacheError
from warpcache_cli.measure import timed
from warpcache_cli.metrics import PHASES
from warpcache_cli.models import Request, generate
from warpcache_cli.policy import Action
from warpcache_cli.profile import DEFAULT_LAGS, Recorder, build_trace, calibration_configs, call_timer
from warpcache_cli.replay import PRIOR_PSNR_INTERCEPT, PSNR_SLOPE, Replayer
from warpcache_cli.runtime.adapters import Grid, find_transformer
from warpcache_cli.runtime.session import CacheSession
from warpcache_cli.trace import Trace
from warpcache_cli.tune import tune

log = logging.getLogger("warpcache")

MAX_SHAPES = 8  # input shapes tracked at once; a new one pushes out the least recently used
NEVER = 1000  # warm-up steps of the full-compute policy: nothing is ever reused
REFERENCE = "reference"  # what a forced uncached generation (validation, `plain()`) runs as; not a phase


def config_path(sensitivity_path: str | Path) -> Path:
    """Where the tuned config goes: beside the sensitivity profile, `<stem>-config.json`."""
    p = Path(sensitivity_path)
    return p.with_name(f"{p.stem}-config.json")


def check_writable(path: str) -> None:
    """Raise ConfigError unless a file can be created atomically in `path`'s folder (probed, then removed)."""
    target = Path(path)
    if not target.name or target.is_dir():
        raise ConfigError(f"profiler.sensitivity_path = {path!r} must name a file")
    probe = target.with_name(f".{target.name}.probe")
    try:
        with atomic_path(probe) as tmp:
            tmp.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"profiler.sensitivity_path = {path!r}: cannot write in {target.parent} "
                          f"({exc.strerror or exc})") from None


def prior_calibration(trace: Trace, base: Config) -> dict[str, Any]:
    """The prior PSNR = PRIOR_PSNR_INTERCEPT - 20 log10(E) (and 1 - SSIM = E^2) as one point in the trace's
    calibration format.

    With one point the replay keeps its prior slopes (-20 and 2) and puts the line through that point,
    so the line does not depend on which config is the anchor. The anchor only has to inject some
    error, and the most aggressive calibration config does.
    """
    anchor = calibration_configs(trace, 2, base)[-1]
    error = float(Replayer(trace).run(anchor.policy, slice(0, 1)).error[0])
    if not error > 0:
        raise WarpcacheError("the profiled generations leave nothing to reuse (too few steps)")
    return {"configs": [anchor.to_dict()], "psnr": [PRIOR_PSNR_INTERCEPT + PSNR_SLOPE * math.log10(error)],
            "ssim": [1.0 - error**2], "source": "prior"}


@dataclass(frozen=True)
class ShapeKey:
    steps: int
    grid: Grid | None
    branches: tuple[str, ...]

    def __str__(self) -> str:
        grid = "x".join(map(str, self.grid)) if self.grid else "?"
        return f"steps={self.steps} grid={grid} branches={'+'.join(self.branches)}"


@dataclass
class _Shape:
    key: ShapeKey
    phase: str = "profiling"
    recorders: list[Recorder] = field(default_factory=list)
    references: list[np.ndarray | None] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    config: Config | None = None  # the tuned policy
    estimate: float = math.nan  # its PSNR estimate on the prior calibration
    validate: bool = False  # the next generation of this shape is checked against an uncached run
    reason: str = ""  # why it fell back
    thread: threading.Thread | None = None


@dataclass
class _Generation:
    shape: _Shape | None  # predicted at its start; None for a shape not seen yet
    phase: str  # what it runs as: a phase, or REFERENCE
    steps: int | None  # announced by the pipeline's cache context, when it does
    grid: Grid | None
    recorder: Recorder | None
    validate: bool


@dataclass
class GenerationInfo:
    """What the last generation (not counting references) ran as: for logs, tests and `warpcache run --auto`."""

    shape: str
    phase: str
    counts: dict[str, int]  # block calls per action
    validation_psnr: float | None = None  # measured against an uncached run, when this was the validation
    passed: bool | None = None


class _Detached(Exception):
    """Stops a background search whose session was removed."""


class AutoProfiler:
    """The session's generation controller in auto mode: `apply` attaches it and `remove` detaches it."""

    def __init__(self, session: CacheSession, pipe_or_transformer: Any) -> None:
        self.session = session
        self.profiler = session.config.profiler
        # the configs it serves and writes are static ones: loading the tuned config must not auto-profile again
        self.base = dataclasses.replace(session.config,
                                        profiler=dataclasses.replace(self.profiler, auto_profile=False))
        self.full = self.base.with_policy(warm_up_steps=NEVER)
        self.sensitivity_path = Path(self.profiler.sensitivity_path)
        self.config_path = config_path(self.sensitivity_path)
        self.outputs: dict[str, str] = {}  # files written: "sensitivity", "config"
        self.last: GenerationInfo | None = None
        self._shapes: OrderedDict[ShapeKey, _Shape] = OrderedDict()
        self._current: _Generation | None = None
        self._references = 0  # > 0 while generations are forced to run uncached
        self._detached = False
        self._lock = threading.RLock()
        self._transformer = find_transformer(pipe_or_transformer)
        self._timer = call_timer(self._transformer, self._on_call)
        self._pipe = pipe_or_transformer if pipe_or_transformer is not self._transformer else None
        self._unwrap: Callable[[], None] | None = self._wrap(self._pipe) if self._pipe is not None else None
        session.config = self.full

    # -- the session's side: choose each generation's config at its start, file it at its end

    def on_generation(self, context: Any | None, grid: Grid | None) -> None:
        with self._lock:
            self._close()
            steps = getattr(context, "num_inference_steps", None)
            shape = self._predict(steps, grid)
            phase = REFERENCE if self._references else shape.phase if shape else "profiling"
            validate = phase == "tuned" and shape.validate
            if validate:
                shape.validate = False
            recorder = Recorder(DEFAULT_LAGS, sketch_tokens=0) if phase == "profiling" else None
            self.session.config = shape.config if phase == "tuned" else self.full
            self.session.observer = recorder
            self._current = _Generation(shape, phase, steps, grid, recorder, validate)

    def detach(self) -> None:
        """Unwrap the pipeline and stop timing; a search still running stops at its next trial, unused."""
        self._detached = True
        for handle in self._timer:
            handle.remove()
        if self._unwrap is not None:
            self._unwrap()

    def _predict(self, steps: int | None, grid: Grid | None) -> _Shape | None:
        """The most recently used shape a starting generation can be (its branches are not known yet)."""
        return next((s for s in reversed(self._shapes.values())
                     if s.key.grid == grid and steps in (None, s.key.steps)), None)

    def _on_call(self, seconds: float, output: Any) -> None:
        """After each transformer call: time it; without a pipeline, file the generation after its last call."""
        g = self._current
        if g is None:
            return
        if g.recorder is not None:
            g.recorder.on_call(self.session, seconds, output)
        step = self.session.step
        if self._pipe is None and g.steps is not None and step.step == g.steps - 1:
            calls = sum(1 for d in self.session.stats.decisions if d.step == 0 and d.layer == 0)  # branches
            if step.call == calls - 1:
                with self._lock:
                    self._close()

    def _close(self, reference: np.ndarray | None = None, seconds: float | None = None) -> _Generation | None:
        """File the generation that just ended under the shape it really had; returns it."""
        g, self._current = self._current, None
        if g is None or g.phase == REFERENCE:
            return g
        decisions = self.session.stats.decisions
        key = ShapeKey(self.session.step.step + 1, g.grid, tuple(dict.fromkeys(d.branch for d in decisions)))
        counts = Counter(d.action for d in decisions)
        self.last = GenerationInfo(str(key), g.phase, {a.name.lower(): counts[a] for a in Action})
        if g.steps is not None and key.steps != g.steps:
            log.info("generation stopped after %d of %d steps; not used for profiling", key.steps, g.steps)
            return g
        shape = self._shape(key)
        if g.recorder is not None:
            g.recorder.close()
            if shape.phase == "profiling":  # else it was predicted as another shape and this one is past profiling
                self._record(shape, g.recorder, reference, seconds)
        elif g.phase == "tuned" and g.shape is not shape:
            log.warning("a generation of shape %s ran the tuned policy of shape %s; its own profile starts with the "
                        "next one", key, g.shape.key)
            self._rearm(g)  # it says nothing about the other shape's quality
        return g

    def _rearm(self, g: _Generation) -> None:
        """A validation generation that did not happen as planned: the shape's next generation validates."""
        if g.validate:
            g.shape.validate, g.validate = True, False

    def _shape(self, key: ShapeKey) -> _Shape:
        """The shape's state, marked most recently used; a new shape may push out the least recently used."""
        shape = self._shapes.get(key)
        if shape is None:
            if len(self._shapes) >= MAX_SHAPES:
                _, old = self._shapes.popitem(last=False)
                self.session.stats.phases.pop(str(old.key), None)
                if self.session.metrics is not None:  # set_phase made all four series; a running search is dropped
                    for phase in PHASES:
                        self.session.metrics.phase.remove(str(old.key), phase)
            shape = self._shapes[key] = _Shape(key)
            self._set_phase(shape, "profiling")
        self._shapes.move_to_end(key)
        return shape

    def _set_phase(self, shape: _Shape, phase: str) -> None:
        shape.phase = phase
        self.session.stats.phases[str(shape.key)] = phase
        if self.session.metrics is not None:
            self.session.metrics.set_phase(str(shape.key), phase)

    def _owns(self, shape: _Shape) -> bool:
        return not self._detached and self._shapes.get(shape.key) is shape

    # -- profiling and tuning

    def _record(self, shape: _Shape, recorder: Recorder, reference: np.ndarray | None,
                seconds: float | None) -> None:
        """Add one profiled generation; the last one needed starts the search in the background."""
        shape.recorders.append(recorder)
        shape.references.append(reference)
        # a bare transformer's generation is timed by its calls: the caller's own work around them is unseen
        shape.seconds.append(seconds if seconds is not None else sum(recorder.call_seconds.values()))
        if len(shape.recorders) < self.profiler.profile_requests:
            return
        refs = shape.references
        if any(r is None for r in refs):
            refs = [np.zeros((0, 0, 0, 3), np.float32)] * len(refs)  # no output seen: an empty reference
        trace = build_trace(self._transformer, self.session, shape.recorders, refs, shape.seconds,
                            model=self.base.upstream)
        shape.recorders, shape.references, shape.seconds = [], [], []
        self._set_phase(shape, "tuning")
        shape.thread = threading.Thread(target=self._tune, args=(shape, trace), name=f"warpcache tune {shape.key}",
                                        daemon=True)
        shape.thread.start()

    def _tune(self, shape: _Shape, trace: Trace) -> None:
        p = self.profiler
        try:
            trace.meta["calibration"] = prior_calibration(trace, self.base)
            result = tune([trace], Budget(min_psnr=p.min_psnr or None), trials=p.trials, timeout=p.max_tune_seconds,
                          base=self.base, top_k=1, on_trial=self._stop_if_detached)
            if result.chosen is None:
                self._fall_back(shape, result.message)
                return
            if self._owns(shape):
                self._write(trace, result.chosen.config, shape.key)
        except _Detached:
            return
        except Exception as exc:  # whatever fails in the background, the model keeps serving at full compute
            self._fall_back(shape, f"tuning failed: {type(exc).__name__}: {exc}")
            return
        with self._lock:
            if not self._owns(shape):
                return
            shape.config, shape.estimate = result.chosen.config, result.chosen.est_psnr
            shape.validate = p.validate and self._pipe is not None
            self._set_phase(shape, "tuned")
        log.info("shape %s: tuned in %.1f s (%d trials): estimated %.2fx, %.2f dB on the prior calibration; wrote %s",
                 shape.key, result.seconds, len(result.trials()), result.chosen.est_speedup,
                 result.chosen.est_psnr, self.config_path)
        if p.validate and self._pipe is None:
            log.warning("shape %s: the tuned policy cannot be validated: warpcache was applied to a bare "
                        "transformer, so there is no request to re-run uncached; keeping it unvalidated", shape.key)

    def _stop_if_detached(self, trials: int) -> None:
        if self._detached:
            raise _Detached

    def _write(self, trace: Trace, config: Config, key: ShapeKey) -> None:
        """The sensitivity profile and the tuned config, each atomically; the last shape tuned owns the files."""
        profile = {**sensitivity.sensitivity(trace), "shape": str(key)}
        self.outputs["sensitivity"] = str(sensitivity.save(profile, self.sensitivity_path))
        self.outputs["config"] = str(config.save(self.config_path))

    def _fall_back(self, shape: _Shape, reason: str) -> None:
        with self._lock:
            if not self._owns(shape):
                return
            shape.config, shape.reason = None, reason
            self._set_phase(shape, "fallback")
        log.warning("shape %s: %s; falling back to full compute", shape.key, reason)

    # -- the pipeline's side: whole calls, so outputs, wall times and validation

    def _wrap(self, pipe: Any) -> Callable[[], None]:
        """Route the pipeline's calls through `_generate` by swapping in a subclass; returns the undo."""
        cls = type(pipe)
        call = cls.__call__
        controller = self

        @functools.wraps(call)
        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            return controller._generate(functools.partial(call, self), args, kwargs)

        pipe.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                    "__qualname__": cls.__qualname__})
        return lambda: setattr(pipe, "__class__", cls)

    def _generate(self, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One pipeline call. Its generation is filed with its output; the first tuned one is validated.

        A validation that misses the budget returns the uncached output, which is already computed and
        meets it.
        """
        again = _replayable(kwargs)
        start = time.perf_counter()
        try:
            out = call(*args, **kwargs)
        except BaseException:
            with self._lock:
                g, self._current = self._current, None  # a generation cut short is no profile
                if g is not None:
                    self._rearm(g)
            raise
        seconds = time.perf_counter() - start
        frames = _pixels(out)
        with self._lock:
            g = self._close(frames[0] if frames is not None and len(frames) else None, seconds)
        if g is None or not g.validate:
            return out
        with self.plain():
            reference = self._generate(call, args, again())
        return out if self._validated(g.shape, frames, _pixels(reference)) else reference

    def _validated(self, shape: _Shape, frames: np.ndarray | None, reference: np.ndarray | None) -> bool:
        if frames is None or reference is None or frames.shape != reference.shape:
            log.warning("shape %s: the tuned policy cannot be validated: the pipeline's output is not an array "
                        "of frames or images; keeping it unvalidated", shape.key)
            return True
        measured = quality.psnr(frames, reference)
        ok = measured >= self.profiler.min_psnr
        if self.last is not None:
            self.last.validation_psnr, self.last.passed = measured, ok
        if ok:
            log.info("shape %s: validated: %.2f dB against an uncached run of the same request (budget %g dB, "
                     "estimated %.2f dB)", shape.key, measured, self.profiler.min_psnr, shape.estimate)
        else:
            self._fall_back(shape, f"the tuned policy measured {measured:.2f} dB against an uncached run of the same "
                                   f"request, under the {self.profiler.min_psnr:g} dB budget (estimated "
                                   f"{shape.estimate:.2f} dB on the prior calibration)")
        return ok

    # -- for callers

    @contextlib.contextmanager
    def plain(self) -> Iterator[None]:
        """Generations started inside run uncached and count for nothing: references for quality checks."""
        self._references += 1
        try:
            yield
        finally:
            self._references -= 1

    def wait(self, timeout: float | None = None) -> bool:
        """Wait at most `timeout` seconds for running searches to finish; True when none is running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            threads = [s.thread for s in self._shapes.values() if s.thread is not None]
        for t in threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    def summary(self) -> list[dict[str, Any]]:
        """Each tracked shape's phase, and why it fell back."""
        with self._lock:
            return [{"shape": str(s.key), "phase": s.phase, "reason": s.reason or None} for s in self._shapes.values()]


def _replayable(kwargs: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """The call's keyword arguments again, with every random generator back where it was before the call.

    Generators passed in are cloned from their saved state. A pipeline given none draws from torch's
    global generators, so their state is restored too; since the same draws follow, they end where
    the first call left them.
    """
    given = kwargs.get("generator")
    gens = list(given) if isinstance(given, (list, tuple)) else [] if given is None else [given]
    states = [g.get_state() for g in gens]
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def again() -> dict[str, Any]:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        if given is None:
            return dict(kwargs)
        clones = [torch.Generator(device=g.device).set_state(s) for g, s in zip(gens, states)]
        return {**kwargs, "generator": clones if isinstance(given, (list, tuple)) else clones[0]}

    return again


def _pixels(out: Any) -> np.ndarray | None:
    """A pipeline output's frames (or images) as floats in [0, 1], batch first; None when it holds no array."""
    value = getattr(out, "frames", None)
    if value is None:
        value = getattr(out, "images", None)
    if value is None:
        value = out[0] if isinstance(out, (tuple, list)) else out
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().numpy()
    try:
        arr = np.asarray(value)  # lists of PIL images become uint8 arrays
    except (TypeError, ValueError):
        return None
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32) if np.issubdtype(arr.dtype, np.number) and arr.ndim >= 3 else None


@dataclass
class Served:
    """One request of `serve`: what it ran as, its wall time and its quality."""

    request: Request
    seconds: float  # a validated request's includes its uncached reference run
    info: GenerationInfo
    psnr: float | None  # against the uncached output of the same request; None where it ran at full compute


def serve(pipe: Any, config: Config, requests: list[Request],
          progress: Callable[[str], None] | None = None) -> tuple[list[Served], AutoProfiler]:
    """Run requests one after another under auto-profiling, as a server would, then wait for the last search.

    A full-compute generation is bit-identical to the uncached one, so only tuned generations need a
    reference. The validation generation already ran its own reference; the others run one through
    `plain()`.
    """
    progress = progress or (lambda text: None)
    session = runtime.apply(pipe, config)
    controller: AutoProfiler = session.controller
    served: list[Served] = []
    try:
        for i, req in enumerate(requests):
            progress(f"request {i + 1}/{len(requests)}")
            frames, seconds = timed(pipe, req)
            info = controller.last
            psnr = None
            if info.passed is not None:
                psnr = info.validation_psnr if info.passed else math.inf  # a failed one returned the uncached output
            elif info.phase == "tuned":
                with controller.plain():
                    psnr = quality.psnr(frames, generate(pipe, req))
            served.append(Served(req, seconds, info, psnr))
        progress("waiting for tuning to finish")
        controller.wait(config.profiler.max_tune_seconds + 30.0)
    finally:
        runtime.remove(pipe)
    return served, controller

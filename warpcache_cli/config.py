"""The config schema: one set of dataclasses shared by JSON and YAML files, presets and the tuner.

Every field carries its own check in its metadata, so construction, `from_dict` and `with_policy`
all validate the same way and every error names the dotted field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar, TextIO

import yaml

from warpcache_cli.atomic import atomic_path
from warpcache_cli.errors import ConfigError

PRESETS_DIR = Path(__file__).with_name("presets")

Check = Callable[[str, Any], Any]
"""(dotted field name, raw value) -> normalised value; raises ConfigError."""


def _show(value: Any) -> str:
    """Values in messages are shown as they would be written in a JSON config."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _bound(x: float) -> str:
    if math.isinf(x):
        return "inf"
    return str(int(x)) if float(x).is_integer() else str(x)


def _span(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    left = "(" if lo_open else "["
    right = ")" if hi_open or math.isinf(hi) else "]"
    return f"{left}{_bound(lo)}, {_bound(hi)}{right}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False,
            integer: bool = False) -> dict[str, Check]:
    """A float (ints accepted) or an int (integral floats accepted) within a range."""
    span = _span(lo, hi, lo_open, hi_open)

    def check(name: str, value: Any) -> float | int:
        if not _is_number(value):
            kind = "an integer" if integer else "a number"
            raise ConfigError(f"{name} = {_show(value)} must be {kind} in {span}")
        if integer and not float(value).is_integer():
            raise ConfigError(f"{name} = {_show(value)} must be an integer in {span}")
        too_low = value <= lo if lo_open else value < lo
        too_high = value >= hi if hi_open else value > hi
        if too_low or too_high or not math.isfinite(value):
            raise ConfigError(f"{name} = {_show(value)} is out of range {span}")
        return int(value) if integer else float(value)

    return {"check": check}


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} = {_show(value)} must be true or false")
    return value


def _check_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name} = {_show(value)} must be a string")
    return value


def _choice(*options: str) -> dict[str, Check]:
    def check(name: str, value: Any) -> str:
        if value not in options:
            allowed = ", ".join(_show(o) for o in options)
            raise ConfigError(f"{name} = {_show(value)} must be one of {allowed}")
        return value

    return {"check": check}


def _ordered_pair(lo: float, hi: float, *, strict: bool, what: str) -> dict[str, Check]:
    """Two numbers in [lo, hi], the first below (or, when not strict, at most) the second."""
    rule = f"two numbers a {'<' if strict else '<='} b, each in [{_bound(lo)}, {_bound(hi)}] ({what})"

    def check(name: str, value: Any) -> tuple[float, float]:
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_number(v) for v in value):
            raise ConfigError(f"{name} = {_show(value)} must be {rule}")
        a, b = float(value[0]), float(value[1])
        in_range = all(lo <= v <= hi for v in (a, b))
        ordered = a < b if strict else a <= b
        if not (in_range and ordered):
            raise ConfigError(f"{name} = {_show(value)} must be {rule}")
        return (a, b)

    return {"check": check}


def _block_index(name: str, key: Any) -> int:
    """Block indices are ints; JSON object keys arrive as strings, so digit strings are accepted."""
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    raise ConfigError(f"{name} has {_show(key)}, which is not a block index (an integer >= 0)")


def _check_layer_multipliers(name: str, value: Any) -> dict[int, float]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} = {_show(value)} must be a mapping of block index to multiplier")
    check = _number(0, 10)["check"]
    out = {_block_index(name, k): check(f"{name}.{k}", v) for k, v in value.items()}
    return dict(sorted(out.items()))


def _check_block_list(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name} = {_show(value)} must be a list of block indices")
    return tuple(sorted({_block_index(name, v) for v in value}))


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, **{f"{p}b": 1000 ** (i + 1) for i, p in enumerate("kmgt")},
          **{f"{p}ib": 1024 ** (i + 1) for i, p in enumerate("kmgt")}}


def parse_capacity(value: int | float | str, name: str = "cache.capacity") -> tuple[int | None, int | None]:
    """Return (entries, bytes) for a capacity; both None when it is 0 (unbounded)."""
    rule = 'an entry count (e.g. 100) or a size with a unit (e.g. "4GB", "512MB", "1.5GiB"); 0 = unbounded'
    if _is_number(value):
        if value < 0 or not float(value).is_integer():
            raise ConfigError(f"{name} = {_show(value)} must be {rule}")
        return (int(value) or None, None)
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"{name} = {_show(value)} must be {rule}")
    number, unit = match.groups()
    if unit is None:
        if "." in number:
            raise ConfigError(f"{name} = {_show(value)} must be {rule}")
        return (int(number) or None, None)
    size = Decimal(number) * _UNITS[unit.lower()]
    if size != size.to_integral_value():
        raise ConfigError(f"{name} = {_show(value)} is not a whole number of bytes")
    return (None, int(size) or None)


def _check_capacity(name: str, value: Any) -> int | str:
    parse_capacity(value, name)
    return int(value) if _is_number(value) else value


_ADDR = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^\s:\[\]]*):(\d{1,5})$")


def parse_listen_addr(value: str, name: str = "listen_addr") -> tuple[str, int] | None:
    """Split "host:port" (host may be empty or a bracketed IPv6 address); None when "" (not served)."""
    if value == "":
        return None
    match = _ADDR.match(value)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise ConfigError(f'{name} = {_show(value)} must be "host:port" with a port in [1, 65535], or "" for none')
    return match.group(1).strip("[]"), int(match.group(2))


def _check_listen_addr(name: str, value: Any) -> str:
    parse_listen_addr(_check_str(name, value), name)
    return value


def _build(cls: type[_Node], data: Any, prefix: str) -> Any:
    """Construct `cls` from a mapping, rejecting keys the schema does not know."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'} = {_show(data)} must be a mapping of field names to values")
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"unknown field '{dotted}'{hint}")
    return cls(**data)


def _section(cls: type[_Node]) -> dict[str, Check]:
    """A nested section: an instance, or a mapping built into one."""
    return {"check": lambda name, value: value if isinstance(value, cls) else _build(cls, value, name)}


def _plain(value: Any) -> Any:
    if isinstance(value, _Node):
        return value.to_dict()
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    return value


@dataclass(frozen=True)
class _Node:
    """Runs each field's check at construction (normalising the value), then the cross-field checks."""

    _prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            name = f"{self._prefix}.{f.name}" if self._prefix else f.name
            object.__setattr__(self, f.name, f.metadata["check"](name, getattr(self, f.name)))
        self._check_fields_together()

    def _check_fields_together(self) -> None:
        """Cross-field rules; sections that have none keep this."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class CacheConfig(_Node):
    _prefix: ClassVar[str] = "cache"

    capacity: int | str = field(default=0, metadata={"check": _check_capacity})
    ttl: float = field(default=600.0, metadata=_number(0))

    def capacity_bytes(self) -> int | None:
        """The byte budget when capacity is a size ("4GB"); None for an entry count or unbounded."""
        return parse_capacity(self.capacity)[1]

    def capacity_entries(self) -> int | None:
        """The entry budget when capacity is a count (100); None for a size or unbounded."""
        return parse_capacity(self.capacity)[0]


@dataclass(frozen=True)
class PolicyConfig(_Node):
    _prefix: ClassVar[str] = "policy"

    base_threshold: float = field(default=0.12, metadata=_number(0, 2, lo_open=True))
    warp_threshold: float = field(default=0.06, metadata=_number(0, 2))
    min_threshold: float = field(default=0.02, metadata=_number(0, 2))
    motion_scale: float = field(default=3.0, metadata=_number(0, 20))
    saliency_power: float = field(default=1.0, metadata=_number(0, 4))
    warm_up_steps: int = field(default=2, metadata=_number(0, 1000, integer=True))
    max_consecutive_reuse: int = field(default=3, metadata=_number(1, 1000, integer=True))
    # from this schedule position on, at most `late_max_consecutive_reuse` (if lower) reuses in a row
    late_start: float = field(default=1.0, metadata=_number(0, 1))
    late_max_consecutive_reuse: int = field(default=1000, metadata=_number(1, 1000, integer=True))
    # a reused block's residual is extrapolated along its last two computations, weighted by this (0: plain reuse)
    forecast: float = field(default=0.0, metadata=_number(0, 1))
    # and the second-order (curvature) term through the last three, weighted by this (0: first order only)
    forecast_curvature: float = field(default=0.0, metadata=_number(0, 1))
    # a fixed schedule only: at steps where it serves every block, skip the whole transformer call and forecast
    # the call's output instead, with the same forecast weights (no block, embedding or output layer runs)
    skip_calls: bool = field(default=False, metadata={"check": _check_bool})
    drift_metric: str = field(default="cosine", metadata=_choice("cosine", "l2"))
    token_subset: int = field(default=256, metadata=_number(8, 1_000_000, integer=True))
    token_seed: int = field(default=0, metadata=_number(0, integer=True))
    phase_breakpoints: tuple[float, float] = field(
        default=(0.3, 0.7), metadata=_ordered_pair(0, 1, strict=True, what="where the phase ramp starts and ends"))
    phase_multipliers: tuple[float, float] = field(
        default=(0.5, 1.5), metadata=_ordered_pair(0.5, 1.5, strict=False, what="early and late multipliers"))
    layer_multipliers: dict[int, float] = field(default_factory=dict, metadata={"check": _check_layer_multipliers})
    no_warp_layers: tuple[int, ...] = field(default=(), metadata={"check": _check_block_list})

    def _check_fields_together(self) -> None:
        for name in ("warp_threshold", "min_threshold"):
            value = getattr(self, name)
            if value > self.base_threshold:
                raise ConfigError(f"policy.{name} = {_show(value)} must be <= policy.base_threshold "
                                  f"= {_show(self.base_threshold)}")


@dataclass(frozen=True)
class MetricsConfig(_Node):
    _prefix: ClassVar[str] = "metrics"

    enabled: bool = field(default=False, metadata={"check": _check_bool})
    path: str = field(default="", metadata={"check": _check_str})


@dataclass(frozen=True)
class ProfilerConfig(_Node):
    _prefix: ClassVar[str] = "profiler"

    auto_profile: bool = field(default=False, metadata={"check": _check_bool})
    profile_requests: int = field(default=2, metadata=_number(1, 100, integer=True))
    sensitivity_path: str = field(default="warpcache-sensitivity.json", metadata={"check": _check_str})
    min_psnr: float = field(default=30.0, metadata=_number(0, 100))
    trials: int = field(default=200, metadata=_number(1, 100_000, integer=True))
    validate: bool = field(default=True, metadata={"check": _check_bool})
    max_tune_seconds: float = field(default=60.0, metadata=_number(0, lo_open=True))


@dataclass(frozen=True)
class Config(_Node):
    """The whole config. Sections may be passed as instances or as plain mappings."""

    upstream: str = field(default="", metadata={"check": _check_str})
    listen_addr: str = field(default="", metadata={"check": _check_listen_addr})
    cache: CacheConfig = field(default_factory=CacheConfig, metadata=_section(CacheConfig))
    policy: PolicyConfig = field(default_factory=PolicyConfig, metadata=_section(PolicyConfig))
    metrics: MetricsConfig = field(default_factory=MetricsConfig, metadata=_section(MetricsConfig))
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig, metadata=_section(ProfilerConfig))

    @classmethod
    def default(cls) -> Config:
        return cls()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Missing fields take defaults; unknown fields, wrong types and bad values raise ConfigError."""
        return _build(cls, data, "")

    def validate(self) -> None:
        """Re-run every field and cross-field check (construction already did; this is for callers that ask)."""
        for section in (self.cache, self.policy, self.metrics, self.profiler):
            dataclasses.replace(section)
        dataclasses.replace(self)

    def with_policy(self, **changes: Any) -> Config:
        """A copy with policy fields replaced and validated; the tuner's way of trying a candidate."""
        merged = {**self.policy.to_dict(), **changes}
        return dataclasses.replace(self, policy=_build(PolicyConfig, merged, "policy"))

    def with_schedule(self, every: int, warm_up: int, *, forecast: float = 0.0, curvature: float = 0.0,
                      late_start: float = 1.0, late_every: int | None = None, skip_calls: bool = False) -> Config:
        """A copy that computes a fixed schedule, whatever the drift: the first `warm_up` steps, then every
        `every`-th step (every `late_every`-th from schedule position `late_start` on), reusing in between;
        FORA's shape, and TaylorSeer's with `forecast` (and `curvature`). Thresholds sit at the top of the
        cosine drift's range, so the hooks do not even measure drift, and warping is off. With `skip_calls` the
        steps it does not compute skip the transformer call altogether (TeaCache's shape, forecast as above).
        """
        return self.with_policy(
            drift_metric="cosine", base_threshold=2.0, min_threshold=2.0, warp_threshold=0.0, motion_scale=0.0,
            phase_multipliers=(1.0, 1.0), layer_multipliers={}, warm_up_steps=warm_up,
            max_consecutive_reuse=every - 1, forecast=forecast, forecast_curvature=curvature,
            late_start=late_start, late_max_consecutive_reuse=(late_every or every) - 1, skip_calls=skip_calls)

    def listen_address(self) -> tuple[str, int] | None:
        """(host, port) where metrics are served over HTTP, or None when they are not."""
        return parse_listen_addr(self.listen_addr)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Config:
        """Read a .json or .yaml/.yml file; every problem becomes one ConfigError line naming the file."""
        p = Path(path)
        fmt = _format_of(p)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {p}: {exc}") from None
        data = _parse(text, fmt, p)
        try:
            return cls.from_dict({} if data is None else data)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write JSON or YAML by suffix, atomically: a reader never sees a partial file."""
        p = Path(path)
        fmt = _format_of(p)
        try:
            with atomic_path(p) as tmp, tmp.open("w", encoding="utf-8") as stream:
                _SERIALIZERS[fmt](self.to_dict(), stream)
        except OSError as exc:
            raise ConfigError(f"cannot write config file {p}: {exc}") from None
        return p

    @classmethod
    def preset(cls, name: str) -> Config:
        if name not in preset_names():
            raise ConfigError(f"unknown preset '{name}'; known presets: {', '.join(preset_names())}")
        return cls.load(PRESETS_DIR / f"{name}.yaml")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(spec: str) -> Config:
    """A config from a file path or a preset name; an existing path wins over a preset of the same name."""
    if Path(spec).exists():
        return Config.load(spec)
    if spec in preset_names():
        return Config.preset(spec)
    raise ConfigError(f"'{spec}' is neither a config file nor a preset (known presets: {', '.join(preset_names())})")


_FORMATS = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}


def _format_of(path: Path) -> str:
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: unsupported config format '{path.suffix}'; use .json, .yaml or .yml")
    return fmt


def _parse(text: str, fmt: str, path: Path) -> Any:
    if fmt == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None


def _dump_json(data: dict[str, Any], stream: TextIO) -> None:
    json.dump(data, stream, indent=2)
    stream.write("\n")


class _YamlDumper(yaml.SafeDumper):
    """Block style for sections, flow style for lists such as `[0.3, 0.7]`, so files read like the presets."""


_YamlDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
)


def _dump_yaml(data: dict[str, Any], stream: TextIO) -> None:
    yaml.dump(data, stream, Dumper=_YamlDumper, sort_keys=False, default_flow_style=False)


_SERIALIZERS: dict[str, Callable[[dict[str, Any], TextIO], None]] = {"json": _dump_json, "yaml": _dump_yaml}

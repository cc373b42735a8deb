"""Config schema, files, presets and the `warpcache config` commands, on real files in tmp_path."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from typer.testing import CliRunner

from warpcache_cli import config as config_mod
from warpcache_cli.cli.app import app
from warpcache_cli.config import Config, load_config, preset_names
from warpcache_cli.errors import ConfigError

runner = CliRunner()


def _custom() -> Config:
    """A config with every kind of non-default value, to make round trips meaningful."""
    return Config.from_dict({
        "upstream": "builtin",
        "listen_addr": "127.0.0.1:9100",
        "cache": {"capacity": "4GB", "ttl": 30},
        "policy": {"base_threshold": 0.2, "warm_up_steps": 4, "drift_metric": "l2",
                   "phase_breakpoints": [0.2, 0.8], "layer_multipliers": {"3": 0.5, "0": 0},
                   "no_warp_layers": [5, 1]},
        "metrics": {"enabled": True, "path": "metrics.prom"},
        "profiler": {"auto_profile": True, "trials": 50, "validate": False},
    })


def _one_line_error(result, *needles: str) -> str:
    """Bad input must be exit 2 and one `error:` line naming the problem, never a traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_defaults_match_design() -> None:
    c = Config.default()
    assert (c.upstream, c.listen_addr) == ("", "")
    assert (c.cache.capacity, c.cache.ttl) == (0, 600.0)
    p = c.policy
    assert (p.base_threshold, p.warp_threshold, p.min_threshold) == (0.12, 0.06, 0.02)
    assert (p.motion_scale, p.saliency_power, p.warm_up_steps, p.max_consecutive_reuse) == (3.0, 1.0, 2, 3)
    assert (p.drift_metric, p.token_subset, p.token_seed) == ("cosine", 256, 0)
    assert (p.phase_breakpoints, p.phase_multipliers) == ((0.3, 0.7), (0.5, 1.5))
    assert (p.layer_multipliers, p.no_warp_layers) == ({}, ())
    assert (c.metrics.enabled, c.metrics.path) == (False, "")
    f = c.profiler
    assert (f.auto_profile, f.profile_requests, f.sensitivity_path) == (False, 2, "warpcache-sensitivity.json")
    assert (f.min_psnr, f.trials, f.validate, f.max_tune_seconds) == (30.0, 200, True, 60.0)
    assert Config.from_dict({}) == c


def test_json_and_yaml_round_trip(tmp_path) -> None:
    c = _custom()
    assert c.policy.layer_multipliers == {0: 0.0, 3: 0.5} and c.policy.no_warp_layers == (1, 5)
    assert Config.from_dict(c.to_dict()) == c
    json.dumps(c.to_dict())  # plain data only
    loaded = [Config.load(c.save(tmp_path / name)) for name in ("c.json", "c.yaml", "c.yml")]
    assert loaded == [c, c, c]


def test_presets_load_validate_and_differ() -> None:
    assert preset_names() == ["balanced", "fast", "quality"]
    presets = {name: Config.preset(name) for name in preset_names()}
    for c in presets.values():
        c.validate()
    assert len({repr(c) for c in presets.values()} | {repr(Config.default())}) == 4
    # presets are tuned on the built-in model: replayed on its sample trace, fast > balanced > quality
    from pathlib import Path

    from warpcache_cli.replay import replay
    from warpcache_cli.trace import Trace

    trace = Trace.load(Path(__file__).parents[1] / "sample_traces" / "builtin-fast.safetensors")
    speed = [float(replay(trace, presets[n]).speedup[0]) for n in ("quality", "balanced", "fast")]
    assert speed == sorted(speed) and speed[0] > 1.0
    assert load_config("fast") == presets["fast"]


def test_presets_are_complete_and_commented() -> None:
    for name in preset_names():
        path = config_mod.PRESETS_DIR / f"{name}.yaml"
        text = path.read_text()
        assert text.startswith("# ") and not text.splitlines()[1].startswith("#")
        assert _shape(yaml.safe_load(text)) == _shape(Config.default().to_dict())


def _shape(data: dict) -> dict:
    return {key: sorted(value) if isinstance(value, dict) else None for key, value in data.items()}


@pytest.mark.parametrize(
    ("data", "field"),
    [({"policy": {"base_treshold": 0.1}}, "'policy.base_treshold'"),
     ({"cache": {"size": 1}}, "'cache.size'"),
     ({"upstreem": ""}, "'upstreem'")],
)
def test_unknown_key_rejected(data, field) -> None:
    with pytest.raises(ConfigError, match=f"unknown field {field}"):
        Config.from_dict(data)


@pytest.mark.parametrize(
    ("section", "field", "value", "allowed"),
    [("policy", "base_threshold", 3.0, "(0, 2]"),
     ("policy", "base_threshold", 0, "(0, 2]"),
     ("policy", "motion_scale", 21, "[0, 20]"),
     ("policy", "saliency_power", -0.5, "[0, 4]"),
     ("policy", "forecast_curvature", 1.5, "[0, 1]"),
     ("policy", "warm_up_steps", 1001, "[0, 1000]"),
     ("policy", "max_consecutive_reuse", 0, "[1, 1000]"),
     ("policy", "token_subset", 4, "[8, 1000000]"),
     ("cache", "ttl", -1, "[0, inf)"),
     ("profiler", "min_psnr", 101, "[0, 100]"),
     ("profiler", "max_tune_seconds", 0, "(0, inf)"),
     ("profiler", "profile_requests", 0, "[1, 100]")],
)
def test_out_of_range_rejected_naming_field(section, field, value, allowed) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_dict({section: {field: value}})
    assert str(info.value) == f"{section}.{field} = {json.dumps(value)} is out of range {allowed}"


@pytest.mark.parametrize(
    ("data", "field"),
    [({"metrics": {"enabled": 1}}, "metrics.enabled"),
     ({"policy": {"warm_up_steps": 2.5}}, "policy.warm_up_steps"),
     ({"policy": {"warm_up_steps": True}}, "policy.warm_up_steps"),
     ({"policy": {"base_threshold": "0.1"}}, "policy.base_threshold"),
     ({"policy": {"drift_metric": "cos"}}, "policy.drift_metric"),
     ({"policy": {"phase_breakpoints": [0.7, 0.3]}}, "policy.phase_breakpoints"),
     ({"policy": {"phase_multipliers": [1.5, 0.5]}}, "policy.phase_multipliers"),
     ({"policy": {"layer_multipliers": {"2": 11}}}, "policy.layer_multipliers.2"),
     ({"policy": {"layer_multipliers": {"x": 1}}}, "policy.layer_multipliers"),
     ({"policy": {"no_warp_layers": [-1]}}, "policy.no_warp_layers"),
     ({"listen_addr": "localhost"}, "listen_addr"),
     ({"listen_addr": "localhost:99999"}, "listen_addr"),
     ({"upstream": None}, "upstream"),
     ({"policy": 3}, "policy")],
)
def test_wrong_type_or_value_rejected_naming_field(data, field) -> None:
    with pytest.raises(ConfigError, match=rf"^{field} "):
        Config.from_dict(data)


def test_ints_accept_integral_floats_and_floats_accept_ints() -> None:
    p = Config.from_dict({"policy": {"warm_up_steps": 4.0, "base_threshold": 1}}).policy
    assert p.warm_up_steps == 4 and isinstance(p.warm_up_steps, int)
    assert p.base_threshold == 1.0 and isinstance(p.base_threshold, float)
    assert Config.from_dict({"listen_addr": "[::1]:9090"}).listen_address() == ("::1", 9090)


@pytest.mark.parametrize("field", ["warp_threshold", "min_threshold"])
def test_threshold_above_base_rejected(field) -> None:
    with pytest.raises(ConfigError, match=rf"policy.{field} = 0.2 must be <= policy.base_threshold = 0.12"):
        Config.from_dict({"policy": {field: 0.2}})
    with pytest.raises(ConfigError, match=f"policy.{field}"):
        Config.default().with_policy(**{field: 0.2})


def test_with_policy_returns_validated_copy() -> None:
    c = Config.default()
    tuned = c.with_policy(base_threshold=0.3, warp_threshold=0.2)
    assert (tuned.policy.base_threshold, tuned.policy.warp_threshold) == (0.3, 0.2)
    assert c.policy.base_threshold == 0.12 and tuned.profiler == c.profiler
    with pytest.raises(ConfigError, match="unknown field 'policy.bogus'"):
        c.with_policy(bogus=1)


@pytest.mark.parametrize(
    ("capacity", "entries", "size"),
    [("4GB", None, 4 * 10**9), ("512MB", None, 512 * 10**6), ("1.5GiB", None, int(1.5 * 2**30)),
     ("100", 100, None), (100, 100, None), ("0", None, None), (0, None, None)],
)
def test_capacity_parsing(capacity, entries, size) -> None:
    cache = Config.from_dict({"cache": {"capacity": capacity}}).cache
    assert cache.capacity == capacity
    assert (cache.capacity_entries(), cache.capacity_bytes()) == (entries, size)


@pytest.mark.parametrize("capacity", ["4XB", "-1", -1, "1.5", 2.5, "GB", True])
def test_bad_capacity_rejected(capacity) -> None:
    with pytest.raises(ConfigError, match=r"^cache.capacity = "):
        Config.from_dict({"cache": {"capacity": capacity}})


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [("bad.json", '{"policy": {"base_threshold": 0.1,}}', "invalid JSON at line 1"),
     ("bad.yaml", "policy:\n  base_threshold: [0.1\n", "invalid YAML at line")],
)
def test_malformed_file_is_one_line_cli_error(tmp_path, name, text, problem) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        Config.load(path)
    for args in (["config", "validate", str(path)], ["config", "show", str(path)]):
        _one_line_error(runner.invoke(app, args), str(path), problem)


def test_bad_field_in_file_names_file_and_field(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("policy:\n  base_threshold: 3.0\n")
    _one_line_error(runner.invoke(app, ["config", "validate", str(path)]), str(path), "policy.base_threshold = 3.0")
    result = runner.invoke(app, ["config", "validate", str(path), "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["ok"] is False


def test_missing_file_and_unknown_preset(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        Config.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="known presets: balanced, fast, quality"):
        Config.preset("turbo")
    _one_line_error(runner.invoke(app, ["config", "show", "turbo"]), "neither a config file nor a preset",
                    "balanced, fast, quality")
    _one_line_error(runner.invoke(app, ["config", "init", "--preset", "turbo", "-o", str(tmp_path / "c.json")]),
                    "unknown preset 'turbo'", "balanced, fast, quality")
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("name", ["c.json", "c.yaml"])
def test_init_writes_file_that_validate_accepts(tmp_path, name) -> None:
    path = tmp_path / name
    result = runner.invoke(app, ["config", "init", "--preset", "quality", "-o", str(path)])
    assert result.exit_code == 0, result.output
    assert Config.load(path) == Config.preset("quality")
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert (result.exit_code, result.stdout.strip()) == (0, "ok")
    _one_line_error(runner.invoke(app, ["config", "init", "-o", str(path)]), "already exists", "--force")
    assert Config.load(path) == Config.preset("quality")
    assert runner.invoke(app, ["config", "init", "-o", str(path), "--force"]).exit_code == 0
    assert Config.load(path) == Config.preset("balanced")


def test_show_prints_full_config(tmp_path) -> None:
    path = _custom().save(tmp_path / "c.json")
    result = runner.invoke(app, ["config", "show", str(path), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout) == _custom().to_dict()
    result = runner.invoke(app, ["config", "show", "fast"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "policy.base_threshold" in result.stdout
    assert f"{Config.preset('fast').policy.base_threshold:.6g}"[:6] in result.stdout


def test_help_has_examples() -> None:
    for command in ("init", "validate", "show"):
        result = runner.invoke(app, ["config", command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and f"Example: warpcache config {command}" in result.stdout


def test_existing_path_wins_over_preset(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fast").mkdir()  # a directory named like a preset is a path, and not a readable config
    with pytest.raises(ConfigError, match="unsupported config format"):
        load_config("fast")
    with pytest.raises(ConfigError, match="neither a config file nor a preset"):
        load_config("missing.json")


@pytest.mark.parametrize(("name", "module"), [("c.json", json), ("c.yaml", yaml)])
def test_save_is_atomic(tmp_path, monkeypatch, name, module) -> None:
    def fail_midway(data, stream, **kwargs) -> None:
        stream.write('{"upstream": "half')
        stream.flush()
        raise RuntimeError("disk full")

    monkeypatch.setattr(module, "dump", fail_midway)
    path = tmp_path / name
    with pytest.raises(RuntimeError, match="disk full"):
        _custom().save(path)
    assert os.listdir(tmp_path) == []

    monkeypatch.undo()
    Config.default().save(path)
    monkeypatch.setattr(module, "dump", fail_midway)
    with pytest.raises(RuntimeError):
        _custom().save(path)
    assert os.listdir(tmp_path) == [name]
    monkeypatch.undo()
    assert Config.load(path) == Config.default()


def test_save_reports_unwritable_path(tmp_path) -> None:
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ConfigError, match="cannot write config file"):
        Config.default().save(tmp_path / "c.json" / "c.json")  # a file where the folder should be
    with pytest.raises(ConfigError, match="unsupported config format '.toml'"):
        Config.default().save(tmp_path / "c.toml")

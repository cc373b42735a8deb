"""`warpcache run` end to end, and its bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from warpcache_cli.cli.app import app
from warpcache_cli.config import Config

runner = CliRunner()


def test_run_builtin_writes_video_and_reports_measurements(tmp_path):
    out = tmp_path / "clip.gif"
    eager = Config.default().with_policy(base_threshold=2.0, warp_threshold=2.0, min_threshold=2.0, warm_up_steps=1,
                                         max_consecutive_reuse=2).save(tmp_path / "eager.json")
    res = runner.invoke(app, ["run", "builtin", "--config", str(eager), "--steps", "4", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["speedup"] > 0 and data["uncached_seconds"] > 0 and data["psnr"] > 10
    d = data["decisions"]
    assert d["recompute"] + d["reuse"] + d["warp"] == 4 * 2 * 6 and d["compute_fraction"] < 1
    assert out.read_bytes()[:3] == b"GIF"


def test_run_a_factory(tmp_path, monkeypatch):
    (tmp_path / "tinyfactory.py").write_text("from tiny import TinyPipeline\n\ndef make():\n"
                                             "    return TinyPipeline('wan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    res = runner.invoke(app, ["run", "tinyfactory:make", "--steps", "3", "--out", str(tmp_path / "o.gif"),
                              "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["decisions"]["block_calls"] == 3 * 2 * 3


@pytest.mark.parametrize("args,message", [
    (["builtin", "--preset", "nope"], "nope"),
    (["/no/such/model"], "not found"),
    (["nosuchmodule_xyz:make"], "cannot import factory"),
    (["builtin", "--out", "clip.avi"], "unsupported video format"),
    (["builtin", "--dtype", "float8"], "unknown dtype"),
    (["builtin", "--preset", "fast", "--config", "x.json"], "either --config or --preset"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["run", *args, "--steps", "2"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_directory_that_is_not_a_pipeline(tmp_path):
    res = runner.invoke(app, ["run", str(tmp_path), "--steps", "2", "--out", str(tmp_path / "o.gif")])
    assert res.exit_code == 2 and "no model_index.json" in res.stderr


def test_malformed_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: [unclosed\n")
    res = runner.invoke(app, ["run", "builtin", "--config", str(bad), "--out", str(tmp_path / "o.gif")])
    assert res.exit_code == 2 and str(bad) in res.stderr and not (tmp_path / "o.gif").exists()

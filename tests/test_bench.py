"""`bench` and `report`: methods measured side by side on the built-in model, failures reported, the HTML page."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import imageio.v3 as iio
import pytest
import typer
from diffusers.hooks import TaylorSeerCacheConfig
from typer.testing import CliRunner

from warpcache_cli import bench
from warpcache_cli.cli.bench_cmd import bench_command, report_command
from warpcache_cli.config import PRESETS_DIR, Config
from warpcache_cli.errors import ModelError
from warpcache_cli.models import Request, generate
from warpcache_cli.profile import profile
from warpcache_cli.report import Frames, write_report
from warpcache_cli.trace import Trace

STEPS = 6
PROMPT = "a red circle moving right fast"
PNG = b"\x89PNG\r\n\x1a\n"

# app.py is not ours to edit: a tiny app mounts the commands the way it does
app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
app.command(name="bench")(bench_command)
app.command(name="report")(report_command)
runner = CliRunner()


@pytest.fixture(scope="module")
def rows(builtin):
    """warpcache (a config that reuses from step 1), FORA every 2nd step and diffusers' FBCache, one setting each."""
    eager = Config.default().with_policy(base_threshold=2.0, warp_threshold=2.0, min_threshold=2.0, motion_scale=0.0,
                                         warm_up_steps=1, max_consecutive_reuse=2)
    methods = [bench.warpcache(eager, scales=(1.0,)), bench.fora(intervals=(2,)),
               bench.fbcache(thresholds=(0.4,))]
    return bench.run_bench(builtin, methods, [PROMPT], [0], STEPS, repeats=1)


@pytest.fixture(scope="module")
def trace(builtin, tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "t.safetensors"
    profile(builtin, [Request(PROMPT, 0, STEPS)], model_id="builtin", calibrate=0).save(path)
    return Trace.load(path)


def test_every_method_measured_with_finite_speedup_and_quality(rows):
    assert [(r["method"], r["status"]) for r in rows] == [("warpcache", "ok"), ("fora", "ok"), ("fbcache", "ok")]
    for r in rows:
        assert math.isfinite(r["speedup"]) and r["speedup"] > 0, r
        assert math.isfinite(r["psnr"]) and 0 < r["ssim"] < 1, f"{r['method']} left the output unchanged"
        assert r["compute_fraction"] < 1.0, f"{r['method']} skipped no work"


def test_fora_recomputes_exactly_every_nth_step(rows):
    fora = next(r for r in rows if r["method"] == "fora")
    assert fora["compute_fraction"] == pytest.approx(0.5)  # steps 0, 2, 4 of 6, all blocks, both branches


def test_best_at_takes_the_fastest_setting_whose_mean_psnr_meets_the_budget():
    def row(setting, prompt, speedup, psnr):
        return {"method": "m", "knob": "k", "setting": setting, "prompt": prompt, "seed": 0, "status": "ok",
                "speedup": speedup, "psnr": psnr, "ssim": 0.9, "compute_fraction": 0.5}

    rows = [row(1, "a", 1.2, 34), row(1, "b", 1.4, 32), row(2, "a", 2.0, 33), row(2, "b", 2.2, 28),
            {"method": "x", "setting": None, "status": "unsupported: boom"}]
    best = bench.best_at(rows, 30)
    assert best["m"]["setting"] == 2 and best["m"]["speedup"] == pytest.approx(2.1)
    assert best["m"]["psnr_mean"] == pytest.approx(30.5) and best["m"]["psnr_min"] == 28
    assert best["x"] == {"status": "unsupported: boom"}
    assert bench.best_at(rows, 40)["m"]["status"] == "no setting reaches 40 dB"


def test_a_diffusers_hook_that_attaches_to_nothing_is_refused(builtin):
    # TaylorSeer's default patterns do not match Wan's attn1/attn2: without the check it would silently do nothing
    default = bench.DiffusersCache("taylorseer", lambda n, clock: TaylorSeerCacheConfig(cache_interval=int(n)))
    with pytest.raises(ModelError, match="attached to no layer"):
        default.apply(builtin, 2)
    assert not builtin.transformer.is_cache_enabled
    method = bench.taylorseer()
    method.apply(builtin, 2)
    try:
        assert bench._hooked_modules(builtin.transformer) == 3 * len(builtin.transformer.blocks)
    finally:
        method.remove(builtin)
    assert bench._hooked_modules(builtin.transformer) == 0


def test_magcache_is_calibrated_on_the_model(builtin):
    ratios = bench.calibrate_magcache(builtin, Request(PROMPT, 0, STEPS))
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(0.5 < r < 2.0 for r in ratios)
    assert not builtin.transformer.is_cache_enabled


def test_unknown_method_is_exit_2_listing_the_known_ones(tmp_path):
    res = runner.invoke(app, ["bench", "builtin", "--methods", "warpcache,teacache", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2, res.output
    line, = res.stderr.strip().splitlines()
    assert "'teacache'" in line and all(name in line for name in bench.METHOD_NAMES)
    assert not (tmp_path / "b").exists()


def test_cli_reports_an_unsupported_method_in_its_table(tmp_path):
    # FasterCache needs both CFG branches batched in one call; the built-in pipeline makes one call per branch
    out = tmp_path / "b"
    res = runner.invoke(app, ["bench", "builtin", "--methods", "fastercache,dbcache,fora", "--prompt", PROMPT,
                              "--steps", str(STEPS), "--repeats", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "unsupported: IndexError" in res.stdout and "fastercache" in res.stdout and "fora" in res.stdout
    data = json.loads((out / "bench.json").read_text())
    status = {r["method"]: r["status"] for r in data["rows"]}
    assert status["fora"] == "ok" and status["fastercache"].startswith("unsupported:")
    assert status["dbcache"] == "ok" or status["dbcache"].startswith(("unavailable:", "unsupported:"))
    assert (out / "report.html").is_file() and (out / "frames.png").read_bytes().startswith(PNG)


@pytest.fixture(scope="module")
def report(rows, trace, builtin, tmp_path_factory):
    req = Request(PROMPT, 0, STEPS)
    fora = bench.fora(intervals=(2,))
    uncached, cached, decisions = bench.side_by_side(builtin, fora, 2, req)
    assert decisions.shape == (6, STEPS) and (uncached == generate(builtin, req)).all()
    out = tmp_path_factory.mktemp("report")
    return write_report(out, rows, trace=trace, config=Config.preset("fast"),
                        frames=Frames(uncached, cached, "fora every 2nd step"))


def test_write_report_writes_the_page_and_its_figures(report):
    page = report.read_text()
    for name in ("speedup-vs-psnr.png", "decision-map.png", "drift-heatmap.png", "frames.png"):
        assert (report.parent / name).read_bytes().startswith(PNG), name
        assert f'src="{name}"' in page
    assert "fora" in page and "Fastest setting at PSNR" in page
    assert not [p for p in report.parent.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_report_command_from_a_trace_config_and_bench_file(trace, tmp_path):
    bench_file = tmp_path / "bench.json"
    bench_file.write_text(json.dumps({"rows": [{"method": "fbcache", "knob": "threshold", "setting": 0.05,
                                                "prompt": PROMPT, "seed": 0, "status": "ok", "speedup": 1.0,
                                                "compute_fraction": 1.0, "psnr": None, "ssim": 1.0,
                                                "temporal_psnr": None, "repeats": 1}]}))
    res = runner.invoke(app, ["report", str(trace.path), "--config", str(PRESETS_DIR / "fast.yaml"),
                              "--bench", str(bench_file), "--out", str(tmp_path / "r"), "--json"])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r" / "report.html").read_text()
    assert "identical" in page and (tmp_path / "r" / "decision-map.png").is_file()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", "--window-size=1200,1600", report.resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    assert shot.read_bytes().startswith(PNG) and shot.stat().st_size > 20_000
    assert iio.imread(shot).std() > 10, "blank page"

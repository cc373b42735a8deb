"""The live runtime on tiny random models of every supported architecture."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import ARCHITECTURES, build, denoise
from torch import nn

import warpcache_cli as wc
from warpcache_cli.errors import ModelError
from warpcache_cli.measure import cached_psnr
from warpcache_cli.models import Request, generate
from warpcache_cli.runtime.adapters import find_blocks

NEVER = wc.Config.default().with_policy(warm_up_steps=1000)
AGGRESSIVE = wc.Config.default().with_policy(
    base_threshold=2.0, warp_threshold=2.0, min_threshold=2.0, motion_scale=0.0, warm_up_steps=1,
    max_consecutive_reuse=1000,
)


def count_block_runs(model: nn.Module) -> list[int]:
    """Counts real block executions through a hook on each block's first child, which skips don't reach."""
    counts = []
    for block in find_blocks(model):
        counts.append(0)
        i = len(counts) - 1
        child = next(block.children())
        child.register_forward_hook(lambda *a, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_never_reuse_is_bit_identical(arch):
    model, inputs = build(arch)
    plain = denoise(model, inputs, steps=4, branches=("cond", "uncond"))
    session = wc.apply(model, NEVER)
    cached = denoise(model, inputs, steps=4, branches=("cond", "uncond"))
    wc.remove(model)
    assert torch.equal(plain, cached)
    assert session.stats.compute_fraction == 1.0
    assert session.stats.total == 4 * 2 * len(find_blocks(model))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_aggressive_config_really_skips_blocks(arch):
    model, inputs = build(arch)
    counts = count_block_runs(model)
    plain = denoise(model, inputs, steps=5)
    assert counts == [5] * len(counts)
    counts[:] = [0] * len(counts)
    session = wc.apply(model, AGGRESSIVE)
    cached = denoise(model, inputs, steps=5)
    # warm-up step 0 computes, then every block is served from cache
    assert counts == [1] * len(counts)
    assert session.stats.counts[wc.Action.REUSE] == 4 * len(counts)
    assert cached.shape == plain.shape and torch.isfinite(cached).all()
    assert not torch.equal(cached, plain)
    wc.remove(model)
    counts[:] = [0] * len(counts)
    assert torch.equal(denoise(model, inputs, steps=5), plain), "remove() must restore the plain model"


def test_cfg_branches_keep_separate_state():
    model, inputs = build("wan")
    cfg = wc.Config.default().with_policy(warm_up_steps=1, base_threshold=0.05, warp_threshold=0.0,
                                          min_threshold=0.05)
    # the update uses only the cond prediction, so the cond trajectory is the same with or without uncond calls
    session = wc.apply(model, cfg)
    denoise(model, inputs, steps=6, branches=("cond",), guidance=None)
    alone = [(d.step, d.layer, d.action, d.drift) for d in session.stats.decisions]
    wc.remove(model)
    session = wc.apply(model, cfg)
    denoise(model, inputs, steps=6, branches=("cond", "uncond"), guidance=None, uncond_text_scale=-3.0)
    both = session.stats.decisions
    assert [(d.step, d.layer, d.action, d.drift) for d in both if d.branch == "cond"] == alone
    assert {d.branch for d in both} == {"cond", "uncond"}


def test_branches_without_cache_context_are_told_apart_by_call_order():
    model, inputs = build("cosmos")
    session = wc.apply(model, AGGRESSIVE)
    denoise(model, inputs, steps=3, branches=("cond", "uncond"))
    assert {d.branch for d in session.stats.decisions} == {"call0", "call1"}


def test_new_generation_resets_state():
    model, inputs = build("wan")
    session = wc.apply(model, AGGRESSIVE)
    denoise(model, inputs, steps=3)
    first = session.stats.decision_map().copy()
    denoise(model, inputs, steps=3)
    assert session.stats.generations == 2
    assert (session.stats.decision_map() == first).all()
    assert (first[:, 0] == int(wc.Action.RECOMPUTE)).all()


def test_capacity_bounds_memory_and_recomputes_what_does_not_fit():
    model, inputs = build("wan")
    tiny_cap = wc.Config.from_dict({**AGGRESSIVE.to_dict(), "cache": {"capacity": "2KB"}})
    session = wc.apply(model, tiny_cap)
    out = denoise(model, inputs, steps=4)
    assert torch.isfinite(out).all()
    assert session.stats.peak_bytes <= 2000
    assert session.stats.compute_fraction == 1.0  # nothing fits, so nothing is reused, and nothing fails
    wc.remove(model)
    session = wc.apply(model, AGGRESSIVE)
    denoise(model, inputs, steps=4)
    assert session.stats.peak_bytes > 2000


def test_bfloat16_runs_and_reuses():
    model, inputs = build("wan")
    model = model.to(torch.bfloat16)

    def bf16_inputs(x, t):
        return {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in inputs(x, t).items()}

    session = wc.apply(model, AGGRESSIVE)
    out = denoise(model, bf16_inputs, steps=3)
    assert torch.isfinite(out).all() and session.stats.counts[wc.Action.REUSE] > 0


def test_metrics_are_exported(tmp_path):
    model, inputs = build("wan")
    prom = tmp_path / "m.prom"
    cfg = wc.Config.from_dict({**AGGRESSIVE.to_dict(), "metrics": {"enabled": True, "path": str(prom)}})
    session = wc.apply(model, cfg)
    denoise(model, inputs, steps=4)
    wc.remove(model)
    text = prom.read_text()
    recomputes = session.stats.counts[wc.Action.RECOMPUTE]
    assert f"warpcache_recomputes_total {float(recomputes)}" in text
    assert "warpcache_cache_hits_total" in text


def test_unadaptable_model_names_what_it_looked_for():
    with pytest.raises(ModelError, match="transformer_blocks"):
        wc.apply(nn.Sequential(nn.Linear(2, 2)), NEVER)


def test_apply_twice_is_refused():
    model, _ = build("wan")
    wc.apply(model, NEVER)
    with pytest.raises(ModelError, match="already applied"):
        wc.apply(model, NEVER)
    wc.remove(model)


def test_full_wan_pipeline_call_with_prompt_embeddings():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    model, _ = build("wan")
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=model,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, 5, 16), torch.randn(1, 5, 16)

    def call():
        return pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], num_frames=9, height=32, width=32,
                    num_inference_steps=5, guidance_scale=3.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).frames

    plain = call()
    wc.apply(pipe, NEVER)
    assert (call() == plain).all()
    wc.remove(pipe)
    session = wc.apply(pipe, AGGRESSIVE)
    cached = call()
    assert {d.branch for d in session.stats.decisions} == {"cond", "uncond"}
    assert session.stats.counts[wc.Action.REUSE] == 4 * 2 * 3
    assert cached.shape == plain.shape


def test_warp_decisions_warp_the_cached_residual():
    model, inputs = build("wan")
    session = wc.apply(model, AGGRESSIVE)
    reuse_out = denoise(model, inputs, steps=4)
    wc.remove(model)
    warp_all = AGGRESSIVE.with_policy(warp_threshold=1e-9, motion_scale=3.0)
    session = wc.apply(model, warp_all)
    warp_out = denoise(model, inputs, steps=4)
    assert session.stats.counts[wc.Action.WARP] == 3 * 3
    assert torch.isfinite(warp_out).all() and not torch.equal(warp_out, reuse_out)


def test_metrics_served_on_listen_addr_until_remove():
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    model, inputs = build("wan")
    cfg = wc.Config.from_dict({**AGGRESSIVE.to_dict(), "listen_addr": f"127.0.0.1:{port}",
                               "metrics": {"enabled": True, "path": ""}})
    wc.apply(model, cfg)
    denoise(model, inputs, steps=2)
    url = f"http://127.0.0.1:{port}/metrics"
    assert "warpcache_recomputes_total" in urllib.request.urlopen(url, timeout=5).read().decode()
    wc.remove(model)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


class _Residuals:
    """Observer collecting each block's residual (computed, or served from cache) per step."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], torch.Tensor] = {}
        self.actions: dict[tuple[int, int], wc.Action] = {}

    def on_block(self, session, layer, x, residual, seconds, decision) -> None:
        self.seen[(decision.step, layer)] = residual.detach().clone()
        self.actions[(decision.step, layer)] = decision.action


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_forecast_extrapolates_along_the_last_two_computations(weight):
    model, inputs = build("wan")
    # warm-up computes steps 0-2, then reuse and recompute alternate
    cfg = AGGRESSIVE.with_policy(warm_up_steps=3, max_consecutive_reuse=1, forecast=weight)
    session = wc.apply(model, cfg)
    obs = session.observer = _Residuals()
    denoise(model, inputs, steps=6)
    wc.remove(model)
    for layer in range(3):
        assert [obs.actions[(s, layer)] for s in range(6)] == [wc.Action.RECOMPUTE] * 3 + [
            wc.Action.REUSE, wc.Action.RECOMPUTE, wc.Action.REUSE]
        r = {s: obs.seen[(s, layer)] for s in range(6)}
        # step 3 reuses step 2 (lag 1), whose slope is r2 - r1; step 5 reuses step 4, slope (r4 - r2) / 2
        torch.testing.assert_close(r[3], r[2] + weight * (r[2] - r[1]))
        torch.testing.assert_close(r[5], r[4] + weight * (r[4] - r[2]) / 2)


@pytest.mark.parametrize(("weight", "curvature"), [(1.0, 0.5), (0.0, 1.0)])
def test_forecast_curvature_is_newtons_second_order_term(weight, curvature):
    model, inputs = build("wan")
    # warm-up computes steps 0-3, then two reuses and a recompute: steps 4, 5 reuse 3; 7 reuses 6
    cfg = AGGRESSIVE.with_policy(warm_up_steps=4, max_consecutive_reuse=2, forecast=weight,
                                 forecast_curvature=curvature)
    session = wc.apply(model, cfg)
    obs = session.observer = _Residuals()
    denoise(model, inputs, steps=8)
    wc.remove(model)
    def newton(r: dict[int, torch.Tensor], s: int, c: int, p: int, q: int) -> torch.Tensor:
        d1, d1_prev = (r[c] - r[p]) / (c - p), (r[p] - r[q]) / (p - q)
        return r[c] + weight * (s - c) * d1 + curvature * (s - c) * (s - p) * (d1 - d1_prev) / (c - q)

    for layer in range(3):
        assert [s for s in range(8) if obs.actions[(s, layer)] == wc.Action.RECOMPUTE] == [0, 1, 2, 3, 6]
        r = {s: obs.seen[(s, layer)] for s in range(8)}
        torch.testing.assert_close(r[4], newton(r, 4, 3, 2, 1))
        torch.testing.assert_close(r[5], newton(r, 5, 3, 2, 1))
        torch.testing.assert_close(r[7], newton(r, 7, 6, 3, 2))


@pytest.mark.parametrize(("motion_scale", "estimated"), [(0.0, False), (1.0, True)])
def test_motion_is_estimated_only_when_the_policy_uses_it(monkeypatch, motion_scale, estimated):
    calls = []
    real = wc.runtime.hooks.motion.content_motion
    monkeypatch.setattr(wc.runtime.hooks.motion, "content_motion", lambda v: calls.append(1) or real(v))
    model, inputs = build("wan")
    cfg = wc.Config.default().with_policy(base_threshold=0.5, min_threshold=0.5, warp_threshold=0.0,
                                          motion_scale=motion_scale, warm_up_steps=1, max_consecutive_reuse=1)
    session = wc.apply(model, cfg)
    denoise(model, inputs, steps=4)
    wc.remove(model)
    assert session.stats.counts[wc.Action.REUSE] > 0
    assert bool(calls) == estimated


@pytest.mark.parametrize("threshold", [1.9, 2.0])  # above all real drift; at the cosine drift's bound
def test_drift_is_measured_only_where_it_can_change_the_decision(monkeypatch, threshold):
    """After `max_consecutive_reuse` reuses the block recomputes whatever the drift, and with both ceilings at
    the largest cosine drift there can be (2) it is reused whatever the drift: measuring would only cost."""
    measured = []
    real = wc.runtime.hooks.drift
    monkeypatch.setattr(wc.runtime.hooks, "drift", lambda *a, **k: measured.append(1) or real(*a, **k))
    model, inputs = build("wan")
    cfg = wc.Config.default().with_policy(base_threshold=threshold, min_threshold=threshold, warp_threshold=0.0,
                                          motion_scale=0.0, phase_multipliers=(1.0, 1.0), warm_up_steps=1,
                                          max_consecutive_reuse=1)
    session = wc.apply(model, cfg)
    denoise(model, inputs, steps=5)
    wc.remove(model)
    decisions = session.stats.decisions
    blocks = 1 + max(d.layer for d in decisions)
    # step 0 warms up; then reuse and forced recompute alternate, whether drift is measured or not
    assert [d.action for d in decisions if d.layer == 0] == [wc.Action.RECOMPUTE] + [
        wc.Action.REUSE, wc.Action.RECOMPUTE] * 2
    reuses = [d for d in decisions if d.action == wc.Action.REUSE]
    assert len(measured) == (2 * blocks if threshold < 2.0 else 0) and len(reuses) == 2 * blocks
    assert all(math.isfinite(d.drift) == (threshold < 2.0) for d in reuses)
    assert all(math.isinf(d.drift) for d in decisions if d.action == wc.Action.RECOMPUTE)


def test_cached_psnr_is_exact_without_reuse_and_leaves_the_model_unhooked(builtin):
    requests = [Request(seed=0, steps=4), Request(seed=1, steps=4)]
    before = generate(builtin, requests[1])
    (exact, other_seed), (reusing, _) = cached_psnr(builtin, [NEVER, AGGRESSIVE], requests)
    assert math.isinf(exact) and math.isinf(other_seed) and 5 < reusing < 60
    assert (generate(builtin, requests[1]) == before).all()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_skip_calls_skips_the_whole_call_and_forecasts_its_output(arch):
    model, inputs = build(arch)
    counts = count_block_runs(model)
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    calls = [0]

    def keep(module, args, output) -> None:  # every call's output, skipped or not, by (step, branch)
        outputs[divmod(calls[0], 2)] = output[0].clone()
        calls[0] += 1

    model.register_forward_hook(keep)
    # computes steps 0, 1, then every 3rd: 0 1 4 7; steps 2 3 5 6 skip both branches' calls
    cfg = wc.Config.default().with_schedule(3, 2, forecast=1.0, skip_calls=True)
    session = wc.apply(model, cfg)
    cached = denoise(model, inputs, steps=8, branches=("cond", "uncond"))
    wc.remove(model)
    assert counts == [2 * 4] * len(counts), "the blocks run in computed calls only"
    assert torch.isfinite(cached).all()
    assert session.stats.counts[wc.Action.REUSE] == 2 * 4 * len(counts)
    assert session.stats.decision_map()[0].tolist() == [0, 0, 1, 1, 0, 1, 1, 0]
    for b in range(2):  # the last two computations' slope, as a block's residual is forecast
        out = {s: outputs[(s, b)] for s in range(8)}
        torch.testing.assert_close(out[2], out[1] + (out[1] - out[0]))
        torch.testing.assert_close(out[3], out[1] + 2 * (out[1] - out[0]))
        torch.testing.assert_close(out[6], out[4] + 2 * (out[4] - out[1]) / 3)


def test_skip_calls_is_ignored_by_a_drift_driven_policy():
    model, inputs = build("wan")
    counts = count_block_runs(model)
    session = wc.apply(model, AGGRESSIVE.with_policy(base_threshold=1.0, warp_threshold=0.0, min_threshold=0.0,
                                                     skip_calls=True))
    denoise(model, inputs, steps=4)
    wc.remove(model)
    assert not session.skips_calls
    assert counts == [1] * len(counts)  # served block by block, as without skip_calls: the call itself ran

"""Tiny randomly initialised transformers of the six supported architectures, with inputs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import diffusers
import torch

B, F, H, W = 1, 3, 8, 8  # latent video: frames, height, width


def _wan() -> tuple[torch.nn.Module, Callable[[torch.Tensor, float], dict[str, Any]]]:
    m = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32,
    )
    text = torch.randn(B, 5, 16)
    return m, lambda x, t: {"hidden_states": x, "timestep": torch.tensor([t]), "encoder_hidden_states": text}


def _cogvideox() -> tuple[torch.nn.Module, Callable[[torch.Tensor, float], dict[str, Any]]]:
    m = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=3, sample_width=W, sample_height=H, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=5,
    )
    text = torch.randn(B, 5, 16)
    # CogVideoX takes (B, F, C, H, W)
    return m, lambda x, t: {"hidden_states": x.transpose(1, 2), "encoder_hidden_states": text,
                            "timestep": torch.tensor([int(t)])}


def _ltx() -> tuple[torch.nn.Module, Callable[[torch.Tensor, float], dict[str, Any]]]:
    m = diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=3, caption_channels=16,
    )
    text = torch.randn(B, 5, 16)

    def inputs(x: torch.Tensor, t: float) -> dict[str, Any]:
        tokens = x.permute(0, 2, 3, 4, 1).reshape(B, F * H * W, 4)
        return {"hidden_states": tokens, "encoder_hidden_states": text, "timestep": torch.tensor([t]),
                "encoder_attention_mask": torch.ones(B, 5), "num_frames": F, "height": H, "width": W}

    return m, inputs


def _hunyuan() -> tuple[torch.nn.Module, Callable[[torch.Tensor, float], dict[str, Any]]]:
    m = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 4, 4),
    )
    text, pooled = torch.randn(B, 5, 16), torch.randn(B, 8)
    return m, lambda x, t: {"hidden_states": x, "timestep": torch.tensor([int(t)]), "encoder_hidden_states": text,
                            "encoder_attention_mask": torch.ones(B, 5), "pooled_projections": pooled,
                            "guidance": torch.tensor([3000.0])}


def _mochi() -> tuple[torch.nn.Module, Callable[[torch.Tensor, float], dict[str, Any]]]:
    m = diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=3, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=16,
    )
    text = torch.randn(B, 5, 16)
    return m, lambda x, t: {"hidden_states": x, "encoder_hidden_states": text, "timestep": torch.tensor([t]),
                            "encoder_attention_mask": torch.ones(B, 5)}


def _cosmos() -> tuple[torch.nn.Module, Callable[[torch.Tensor, float], dict[str, Any]]]:
    m = diffusers.CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=3, mlp_ratio=2,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable",  # True needs torchvision
    )
    text = torch.randn(B, 5, 16)
    return m, lambda x, t: {"hidden_states": x, "timestep": torch.tensor([t]), "encoder_hidden_states": text,
}


ARCHITECTURES = {
    "wan": _wan, "cogvideox": _cogvideox, "ltx": _ltx, "hunyuan": _hunyuan, "mochi": _mochi, "cosmos": _cosmos,
}


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, Callable[[torch.Tensor, float], dict[str, Any]]]:
    torch.manual_seed(seed)
    model, inputs = ARCHITECTURES[name]()
    return model.eval(), inputs


def denoise(model: torch.nn.Module, inputs: Callable[[torch.Tensor, float], dict[str, Any]], steps: int = 6,
            branches: tuple[str, ...] = ("cond",), seed: int = 0, guidance: float | None = 2.0,
            uncond_text_scale: float = 1.0) -> torch.Tensor:
    """A minimal Euler flow-matching loop that, like diffusers pipelines, names CFG branches.

    `guidance=None` steps with the first branch's prediction alone; `uncond_text_scale` scales
    the other branches' text conditioning, so their inputs differ from the first branch's.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, F, H, W, generator=gen)
    ts = torch.linspace(1000, 50, steps)
    with torch.no_grad():
        for i, t in enumerate(ts.tolist()):
            preds = []
            for name in branches:
                ctx = getattr(model, "cache_context", None)
                # Cosmos has no cache_context: the runtime then tells branches apart by call order
                with ctx(name, step_index=i, num_inference_steps=steps) if ctx else contextlib.nullcontext():
                    args = inputs(x, t)
                    if name != branches[0]:
                        args["encoder_hidden_states"] = args["encoder_hidden_states"] * uncond_text_scale
                    out = model(**args, return_dict=False)[0]
                preds.append(out.transpose(1, 2) if out.shape[1] == F and out.shape[2] == 4 else out)
            pred = preds[0] if guidance is None or len(preds) == 1 else preds[1] + guidance * (preds[0] - preds[1])
            pred = pred.reshape(x.shape) if pred.ndim != 5 else pred
            x = x - pred * (1.0 / steps)
    return x


class TinyPipeline:
    """A diffusers-style pipeline around a tiny transformer, for `profile` and `run` on every architecture."""

    def __init__(self, arch: str) -> None:
        self.transformer, self._inputs = build(arch)

    def __call__(self, prompt: str, num_inference_steps: int, guidance_scale: float, generator: torch.Generator,
                 output_type: str = "np") -> Any:
        seed = int(generator.initial_seed())
        branches = ("cond", "uncond") if guidance_scale > 1 else ("cond",)
        x = denoise(self.transformer, self._inputs, steps=num_inference_steps, branches=branches, seed=seed,
                    guidance=guidance_scale)
        frames = x[:, :3].permute(0, 2, 3, 4, 1).clamp(-1, 1).add(1).div(2)  # (B, F, H, W, 3) in [0, 1]
        return type("Output", (), {"frames": frames.numpy()})()

"""The built-in text-to-video model: a small diffusers Wan transformer in pixel space.

The transformer is diffusers' own `WanTransformer3DModel`, so `builtin` takes exactly the
code path a Wan user takes (block list, cache contexts, CFG branches). The prompt encoder is
a word embedding learnt with it; there is no VAE, the model denoises RGB pixels directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from warpcache_cli.builtin import clips

WEIGHTS_DIR = Path(__file__).parent / "weights"

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 4, 4),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=3 + 3,  # RGB + the (frame, y, x) coordinate channels of `coordinates`
    out_channels=3,
    text_dim=64,
    freq_dim=64,
    ffn_dim=512,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=64,
)
SCHEDULER_SHIFT = 3.0


class PromptEncoder(ModelMixin, ConfigMixin):
    """Word + position embeddings with a small residual MLP; index 0 pads (the empty prompt)."""

    @register_to_config
    def __init__(self, vocab_size: int, dim: int = 64, max_tokens: int = clips.MAX_PROMPT_TOKENS):
        super().__init__()
        self.words = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.zeros(max_tokens, dim))
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.words(tokens) + self.positions[: tokens.shape[1]]
        return x + self.mlp(x)


def coordinates(batch: int, frames: int, height: int, width: int) -> torch.Tensor:
    """(batch, 3, frames, height, width) channels holding each pixel's frame, row and column in [-1, 1].

    Wan's only position signal is RoPE inside self-attention, which is relative: without an
    absolute one a small model cannot tell where a clip's first frame or left edge is, so it
    cannot start "moving right fast" at the left. The channels are concatenated to the noisy
    video like Wan image-to-video concatenates its condition channels.
    """
    axes = [torch.linspace(-1.0, 1.0, n) for n in (frames, height, width)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return grid.expand(batch, -1, -1, -1, -1)


def tokenize(prompts: list[str], max_tokens: int = clips.MAX_PROMPT_TOKENS) -> torch.Tensor:
    """Word ids, padded with 0; unknown words map to 1 so any prompt is accepted."""
    index = {w: i for i, w in enumerate(clips.vocabulary())}
    out = torch.zeros(len(prompts), max_tokens, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids = [index.get(w, 1) for w in prompt.lower().replace(",", " ").split()][:max_tokens]
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


@dataclass
class BuiltinOutput:
    frames: np.ndarray  # (batch, frames, height, width, 3) float32 in [0, 1]
    videos: torch.Tensor  # (batch, 3, frames, height, width) in [-1, 1], the model's raw output


class BuiltinPipeline(DiffusionPipeline):
    """Flow-matching sampler with classifier-free guidance, shaped like diffusers' WanPipeline."""

    model_cpu_offload_seq = "prompt_encoder->transformer"

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        prompt_encoder: PromptEncoder,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, prompt_encoder=prompt_encoder, scheduler=scheduler)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        tokens = tokenize(prompts).to(self.transformer.device)
        return self.prompt_encoder(tokens).to(self.transformer.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 30,
        guidance_scale: float = 4.0,
        num_frames: int = clips.FRAMES,
        height: int = clips.SIZE,
        width: int = clips.SIZE,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
    ) -> BuiltinOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device, dtype = self.transformer.device, self.transformer.dtype
        cond = self.encode_prompt(prompts)
        uncond = self.encode_prompt([""] * len(prompts))
        shape = (len(prompts), 3, num_frames, height, width)
        if latents is None:
            latents = torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32)
        # input channels beyond the ones denoised are coordinate channels (none in 3-channel weights)
        coords = coordinates(len(prompts), num_frames, height, width).to(device=device, dtype=dtype)
        coords = coords[:, : self.transformer.config.in_channels - latents.shape[1]]
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(timesteps):
            context = {"step_index": i, "sigma": float(self.scheduler.sigmas[i]), "num_inference_steps": len(timesteps)}
            model_in = torch.cat([latents.to(dtype), coords], dim=1)
            step_t = t.expand(latents.shape[0])
            with self.transformer.cache_context("cond", **context):
                pred = self.transformer(model_in, step_t, cond, return_dict=False)[0].float()
            if guidance_scale > 1.0:
                with self.transformer.cache_context("uncond", **context):
                    pred_u = self.transformer(model_in, step_t, uncond, return_dict=False)[0].float()
                pred = pred_u + guidance_scale * (pred - pred_u)
            latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]
        videos = latents.clamp(-1, 1)
        frames = ((videos + 1) / 2).permute(0, 2, 3, 4, 1).cpu().numpy().astype(np.float32)
        return BuiltinOutput(frames=frames, videos=videos)


def new_transformer() -> WanTransformer3DModel:
    return WanTransformer3DModel(**TRANSFORMER_CONFIG)


def new_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT)


def new_prompt_encoder() -> PromptEncoder:
    return PromptEncoder(vocab_size=len(clips.vocabulary()), dim=TRANSFORMER_CONFIG["text_dim"])


def _load(cls: type[ModelMixin], folder: Path) -> ModelMixin:
    """config.json + safetensors, strictly; plain torch loading needs neither accelerate nor a hub."""
    model = cls.from_config(cls.load_config(folder))
    safetensors.torch.load_model(model, folder / "diffusion_pytorch_model.safetensors", strict=True)
    return model


def load_builtin(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, weights_dir: Path = WEIGHTS_DIR
) -> BuiltinPipeline:
    """Load the shipped weights from the package; never touches the network."""
    if not (weights_dir / "transformer").is_dir():
        raise FileNotFoundError(f"built-in weights missing under {weights_dir}")
    transformer = _load(WanTransformer3DModel, weights_dir / "transformer")
    encoder = _load(PromptEncoder, weights_dir / "prompt_encoder")
    pipe = BuiltinPipeline(transformer.eval(), encoder.eval(), new_scheduler())
    pipe.to(device=device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)

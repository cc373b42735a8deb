"""How to find the transformer, its blocks and its token grid in diffusers video models.

Each supported architecture is one entry of `ADAPTERS`: which attributes hold the block
lists and how the transformer's input maps to a (frames, rows, cols) token grid and a
(B, C, F, H, W) video for the motion estimate. Anything else that has a block list of
block classes diffusers registers is adapted generically, without a grid (no warp, no motion).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from warpcache_cli.errors import ModelError

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class BlockIO:
    """Where a block's hidden and encoder-hidden streams are in its arguments and its output."""

    hidden_arg: str = "hidden_states"
    encoder_arg: str = "encoder_hidden_states"
    hidden_out: int | None = None  # None: the block returns a bare tensor
    encoder_out: int | None = None


def _patch(cfg: Any) -> tuple[int, int, int]:
    p = cfg.patch_size
    if isinstance(p, (tuple, list)):
        return int(p[0]), int(p[1]), int(p[2])
    return int(getattr(cfg, "patch_size_t", None) or 1), int(p), int(p)


def _video_bcfhw(args: dict[str, Any]) -> torch.Tensor | None:
    x = args.get("hidden_states")
    return x if isinstance(x, torch.Tensor) and x.ndim == 5 else None


def _video_bfchw(args: dict[str, Any]) -> torch.Tensor | None:
    x = args.get("hidden_states")
    return x.transpose(1, 2) if isinstance(x, torch.Tensor) and x.ndim == 5 else None


def _video_ltx(args: dict[str, Any]) -> torch.Tensor | None:
    """LTX receives packed tokens (B, F*H*W, C) with the grid as separate arguments."""
    x, f, h, w = (args.get(k) for k in ("hidden_states", "num_frames", "height", "width"))
    if not isinstance(x, torch.Tensor) or None in (f, h, w):
        return None
    b, _, c = x.shape
    return x.reshape(b, int(f), int(h), int(w), c).permute(0, 4, 1, 2, 3)


@dataclass(frozen=True)
class Adapter:
    block_lists: tuple[str, ...]
    video: Callable[[dict[str, Any]], torch.Tensor | None]
    patched: bool = True  # False: the video argument is already on the token grid (LTX)

    def grid(self, transformer: nn.Module, video: torch.Tensor | None) -> Grid | None:
        if video is None:
            return None
        _, _, f, h, w = video.shape
        if not self.patched:
            return f, h, w
        pt, ph, pw = _patch(transformer.config)
        return -(-f // pt), h // ph, w // pw


ADAPTERS: dict[str, Adapter] = {
    "WanTransformer3DModel": Adapter(("blocks",), _video_bcfhw),
    "CogVideoXTransformer3DModel": Adapter(("transformer_blocks",), _video_bfchw),
    "LTXVideoTransformer3DModel": Adapter(("transformer_blocks",), _video_ltx, patched=False),
    "HunyuanVideoTransformer3DModel": Adapter(("transformer_blocks", "single_transformer_blocks"), _video_bcfhw),
    "MochiTransformer3DModel": Adapter(("transformer_blocks",), _video_bcfhw),
    "CosmosTransformer3DModel": Adapter(("transformer_blocks",), _video_bcfhw),
}
GENERIC = Adapter(("blocks", "transformer_blocks", "single_transformer_blocks"), lambda args: None)


def find_transformer(obj: Any) -> nn.Module:
    """A pipeline's `transformer`, or the module itself."""
    module = getattr(obj, "transformer", obj)
    if not isinstance(module, nn.Module):
        raise ModelError(f"expected a diffusers pipeline or transformer, got {type(obj).__name__}")
    return module


def adapter_for(transformer: nn.Module) -> Adapter:
    return ADAPTERS.get(type(transformer).__name__, GENERIC)


def find_blocks(transformer: nn.Module) -> list[nn.Module]:
    """All transformer blocks in execution order, across the adapter's block lists."""
    adapter = adapter_for(transformer)
    blocks = [
        b for name in adapter.block_lists if isinstance(getattr(transformer, name, None), nn.ModuleList)
        for b in getattr(transformer, name)
    ]
    if not blocks:
        raise ModelError(
            f"cannot adapt {type(transformer).__name__}: found no block list "
            f"(looked for nn.ModuleList attributes {', '.join(adapter.block_lists)})"
        )
    return blocks


def block_io(block: nn.Module) -> BlockIO:
    """Stream layout from diffusers' block registry where the class is registered."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    try:
        meta = TransformerBlockRegistry.get(type(block))
    except ValueError:
        return BlockIO()
    return BlockIO(
        meta.hidden_states_argument_name,
        meta.encoder_hidden_states_argument_name,
        meta.return_hidden_states_index,
        meta.return_encoder_hidden_states_index,
    )


def prediction(output: Any) -> torch.Tensor:
    """A transformer call's prediction: the first of a tuple, or an output object's `sample`."""
    return output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)


def with_prediction(output: Any, sample: torch.Tensor) -> Any:
    """`output`'s structure with `sample` as its prediction."""
    if isinstance(output, (tuple, list)):
        return type(output)([sample, *output[1:]])
    if hasattr(output, "sample"):
        return type(output)(**{**output, "sample": sample})
    return sample

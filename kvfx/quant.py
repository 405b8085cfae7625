"""int8 storage for the rank-R latents: rank and precision multiply (Palu-style low-rank + quantisation).

Each cached latent row (one token of one latent head, R numbers) is stored as R int8 codes plus ONE int8
scale code e: x ≈ q · 2^(e/8), q in [-127, 127]. The log scale with eighth-of-an-octave steps spans
2^-16 … 2^15.9 in one byte and costs under 0.13 bit of precision against an exact absmax scale; keeping it
int8 lets the cache hold a single int8 tensor [b, h, N, R + 1] per slot, so transformers' own Dynamic and
Static layers store it unchanged.

Without kvfx's cache (perplexity runs, transformers' own cache) the rewrite pass inserts `fake_quant` on the
latents, so every path computes attention on the same rounded latents. Gradients pass straight through.
Rounding and scaling run in float32 whatever the model's dtype, then cast back.
"""
from __future__ import annotations

import torch

QUANTIZE = (None, "int8")
SCALE_STEPS = 8  # scale codes per octave


def check(quantize) -> None:
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be None (latents stored in the model's dtype) or 'int8', got {quantize!r}.")


def _codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes q, scale codes e) of each row of x, both float32 holding integers."""
    amax = x.detach().abs().amax(-1, keepdim=True).float().clamp_min(1e-30)
    e = torch.ceil(torch.log2(amax / 127.0) * SCALE_STEPS).clamp(-128, 127)
    return torch.round(x.float() * torch.exp2(-e / SCALE_STEPS)).clamp(-127, 127), e


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[..., R] float -> [..., R + 1] int8: the codes, then the row's scale code."""
    return torch.cat(_codes(x), -1).to(torch.int8)


def dequantize(stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., R + 1] int8 -> [..., R] in `dtype`."""
    return (stored[..., :-1].float() * torch.exp2(stored[..., -1:].float() / SCALE_STEPS)).to(dtype)


def fake_quant(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the int8 cache stores it: dequantize(quantize(x)) without the int8 tensor, in x's dtype
    (straight-through gradient when x requires one)."""
    q, e = _codes(x)
    rounded = (q * torch.exp2(e / SCALE_STEPS)).to(x.dtype)
    return x + (rounded - x).detach() if x.requires_grad else rounded

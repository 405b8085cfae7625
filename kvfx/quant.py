"""Low-bit storage for the rank-R latents: rank and precision multiply (Palu-style low-rank + quantisation).

Each cached latent row (one token of one latent head, R numbers) is cut into groups; each group stores its
numbers as signed integer codes plus ONE int8 scale code e: x ≈ q · 2^(e/8). The log scale with
eighth-of-an-octave steps spans 2^-16 … 2^15.9 in one byte and costs under 0.13 bit of precision against an
exact absmax scale. Formats (`quantize=`):

* "int8": codes in [-127, 127], one scale per row: R + 1 bytes.
* "int4": codes in [-7, 7] packed two per byte, one scale per 32 numbers: ⌈R/2⌉ + ⌈R/32⌉ bytes. Calibrated
  latents put their largest directions first, so groups of consecutive columns get scales that follow the
  decay of their variance.

A stored row is one int8 vector [codes | scale codes], so the cache holds a single int8 tensor
[b, h, N, row_bytes(R)] per slot and transformers' own Dynamic and Static layers store it unchanged.

Without kvfx's cache (perplexity runs, transformers' own cache) the rewrite pass inserts `fake_quant` on the
latents, so every path computes attention on the same rounded latents. Gradients pass straight through.
Rounding and scaling run in float32 whatever the model's dtype, then cast back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALE_STEPS = 8  # scale codes per octave


@dataclass(frozen=True)
class Format:
    bits: int
    group: int | None  # numbers per scale code; None: one scale for the whole row

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def groups(self, width: int) -> int:
        return 1 if self.group is None else math.ceil(width / self.group)

    def code_bytes(self, width: int) -> int:
        return math.ceil(width * self.bits / 8)

    def row_bytes(self, width: int) -> int:
        return self.code_bytes(width) + self.groups(width)


FORMATS = {"int8": Format(8, None), "int4": Format(4, 32)}
QUANTIZE = (None, *FORMATS)


def check(quantize, what: str = "quantize") -> None:
    if quantize not in QUANTIZE:
        raise ValueError(f"{what} must be None (latents stored in the model's dtype), 'int8' or 'int4', "
                         f"got {quantize!r}.")


def row_bytes(quantize: str | None, width: int) -> int:
    """Bytes one cached row of `width` latent numbers takes; None: 2·width (a 16-bit cache, the reference)."""
    check(quantize)
    return 2 * width if quantize is None else FORMATS[quantize].row_bytes(width)


def _split(x: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, ...]:
    """The groups of x's last dim (the last one shorter). Split and cat, not pad and reshape: Inductor (torch
    2.13, CPU) miscompiled padded groups feeding SDPA (tests/test_quant.py::test_forward_matches_reference)."""
    return x.split(fmt.group or max(x.shape[-1], 1), -1)


def _codes(x: torch.Tensor, fmt: Format) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per group of x [..., R]: (codes q [..., group], scale code e [..., 1]), float32 holding integers."""
    out = []
    for part in _split(x.float(), fmt):
        amax = part.detach().abs().amax(-1, keepdim=True).clamp_min(1e-30)
        e = torch.ceil(torch.log2(amax / fmt.qmax) * SCALE_STEPS).clamp(-128, 127)
        out.append((torch.round(part * torch.exp2(-e / SCALE_STEPS)).clamp(-fmt.qmax, fmt.qmax), e))
    return out


def _scaled(groups) -> torch.Tensor:
    return torch.cat([q * torch.exp2(e / SCALE_STEPS) for q, e in groups], -1)


def _pack4(q: torch.Tensor) -> torch.Tensor:
    """Codes in [-7, 7] (float) -> one byte value per pair: 16·high + (low mod 16), in [-112, 127]."""
    if q.shape[-1] % 2:
        q = torch.cat((q, torch.zeros_like(q[..., :1])), -1)
    low, high = q[..., 0::2], q[..., 1::2]
    return 16 * high + torch.remainder(low, 16)


def _unpack4(b: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of _pack4 (float in, float out): the first `width` codes."""
    high = torch.floor(b / 16)
    low = b - 16 * high
    low = torch.where(low > 7, low - 16, low)
    return torch.stack((low, high), -1).flatten(-2)[..., :width]


def quantize(x: torch.Tensor, kind: str = "int8") -> torch.Tensor:
    """[..., R] float -> [..., row_bytes(R)] int8: the codes, then the row's scale codes."""
    fmt = FORMATS[kind]
    groups = _codes(x, fmt)
    q = torch.cat([q for q, _ in groups], -1)
    codes = _pack4(q) if fmt.bits == 4 else q
    return torch.cat([codes] + [e for _, e in groups], -1).to(torch.int8)


def dequantize(stored: torch.Tensor, dtype: torch.dtype, width: int, kind: str = "int8") -> torch.Tensor:
    """[..., row_bytes(width)] int8 -> [..., width] in `dtype`."""
    fmt = FORMATS[kind]
    nb = fmt.code_bytes(width)
    codes, e = stored[..., :nb].float(), stored[..., nb:].float()
    q = _unpack4(codes, width) if fmt.bits == 4 else codes
    return _scaled(zip(_split(q, fmt), e.split(1, -1))).to(dtype)


def fake_quant(x: torch.Tensor, kind: str = "int8") -> torch.Tensor:
    """x rounded as the cache stores it: dequantize(quantize(x)) without the integer tensor, in x's dtype
    (straight-through gradient when x requires one)."""
    rounded = _scaled(_codes(x, FORMATS[kind])).to(x.dtype)
    return x + (rounded - x).detach() if x.requires_grad else rounded

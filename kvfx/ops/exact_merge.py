"""Exact rows beside a kernel that reads codes only: attention split into two softmaxes merged by log-sum-exp.

A format's exact rows ("|sinksS|recentW", kvfx.quant.exact_of) hold the 16-bit latents of a few tokens whose codes
the cache also stores. A decode kernel that knows only codes (the Triton kernel) runs with those tokens masked out
(`without_held`); the ≤ S + W + 1 exact rows are attended in torch (`attend_exact`), and `merge` combines the two
normalised outputs by their log-sum-exps — the same numbers as one softmax over the rows with the exact latents put
in place of the held tokens' codes (lowbit_attention.reference), up to float rounding.
"""
from __future__ import annotations

import torch


def held_index(positions: torch.Tensor, n: int) -> torch.Tensor:
    """The slots' positions [S] as an index into the n cached tokens, n where a slot holds none (-1, or past the
    cache): what `without_held` and `attend_exact` take."""
    positions = positions.to(torch.long)
    return torch.where((positions >= 0) & (positions < n), positions, n)


def without_held(mask: torch.Tensor | None, idx: torch.Tensor, n: int) -> torch.Tensor:
    """SDPA's mask ([B|1, 1, 1, n], bool or additive; None: all visible) with the held tokens (`held_index`) hidden."""
    held = torch.zeros(n + 1, dtype=torch.bool, device=idx.device)
    held[idx] = True
    held = held[:n].view(1, 1, 1, n)
    if mask is None:
        return ~held
    if mask.dtype == torch.bool:
        return mask & ~held
    return mask.masked_fill(held, float("-inf"))


def attend_exact(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, n: int,
                 scale: float, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [B, H, G, Rk] over the exact rows keys [B, H, S, Rk] / values [B, H, S, Rv] held at
    `idx` [S] (`held_index`; n: an empty slot), with SDPA's mask read there: (out [B, H, G, Rv] float32, its
    natural log-sum-exp [B, H, G]; -inf where no exact row is visible, the output then 0)."""
    visible = (idx < n).view(1, 1, 1, -1)
    s = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale
    if mask is not None:
        at = mask.reshape(mask.shape[0], n)[:, idx.clamp_max(n - 1)].view(-1, 1, 1, idx.numel())
        if at.dtype == torch.bool:
            visible = visible & at
        else:
            s = s + at.float()
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)  # no visible row: lse -inf, p NaN -> 0
    return torch.matmul(p, values.float()), lse


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Two softmax-normalised outputs over disjoint rows ([B, H, G, R], natural log-sum-exps [B, H, G]) as one;
    NaN where neither saw a row (SDPA's answer for a query that sees no key)."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - lse).unsqueeze(-1), torch.exp(lse_b - lse).unsqueeze(-1)
    out = torch.where(wa > 0, wa * out_a.float(), 0.0) + torch.where(wb > 0, wb * out_b.float(), 0.0)
    return torch.where(torch.isfinite(lse).unsqueeze(-1), out, float("nan"))

"""Attention-aware token weights for the calibration Grams (`collect_stats(..., attention_weight=γ)`).

A cached key's error reaches the layer's output only through the attention it receives. With p_qt the softmax
weight of query q on key t and o_q the attention output, an error δs_qt in the logit moves o_q by
p_qt·δs_qt·(v_t − o_q) to first order, and an error δv_t in the value moves it by p_qt·δv_t. So over a window the
error of token t's cached row costs in proportion to

    f_t = Σ_heads Σ_q p_qt² ‖v_t − o_q‖²        (a Fisher-style weight of key token t)

— a token no query reads costs nothing; the sink and the tokens a query locks onto cost most. Weighting each
token's row of the key / value Grams by f_t^γ (normalised to mean 1 over each sequence) makes kqsvd's fit and
`kvfx.allocate_bits` spend directions and bits where attention reads them. γ = 0 is the plain Gram (every token
once); γ = 1 the first-order weight itself; between them a tempered one (the window's early tokens are read by
more queries than a long cache's tokens would be, and the weight of one sequence should not rest on a handful of
tokens). Measured through the cache on four text domains: benchmarks/RESULTS.md, section "domains-weighted".
`attention_weights` also gives u_t = Σ_heads Σ_q p_qt², a value row's own first-order cost; weighting value rows by
u_t^γ instead (`collect_stats(..., own_value_weight=True)`) measured no better ("domains-value-weight").
"""
from __future__ import annotations

import math

import torch

QUERY_BLOCK = 256   # queries per block: memory b·H·QUERY_BLOCK·N floats, whatever the window length


def _mask_block(attn_mask, q0: int, q1: int, b: int, h: int, g: int, n_keys: int, device) -> torch.Tensor | None:
    """SDPA's attn_mask rows q0:q1 as an additive float mask broadcastable to [b, h, g, rows, N]."""
    if attn_mask is None:
        return None
    m = attn_mask.to(device)
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m[..., q0:q1, :]
    m = torch.zeros(m.shape, device=device).masked_fill(~m, float("-inf")) if m.dtype == torch.bool else m.float()
    heads = m.shape[1]
    m = m.reshape(m.shape[0], h, g, q1 - q0, m.shape[-1]) if heads == h * g else m[:, :, None]
    return m.expand(m.shape[0], m.shape[1], m.shape[2], q1 - q0, n_keys)


def check_attention_weight(gamma) -> None:
    if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0 <= gamma <= 1):
        raise ValueError(f"attention_weight must be a number in [0, 1] (the power of the attention-aware token "
                         f"weights: 0 plain Grams, 1 the first-order weight), got {gamma!r}.")


def token_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: float, attn_mask=None,
                  is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """f_t^γ for every key token, [b, N] float64 with mean 1 over each sequence (module docstring).

    q [b, H, n, d]; k, v [b, h, N, d] (before any repeat_kv; H a multiple of h); attn_mask, is_causal, scale as
    torch's scaled_dot_product_attention takes them (is_causal: the upper-left causal mask, as SDPA)."""
    return attention_weights(q, k, v, gamma, attn_mask, is_causal, scale)[0]


def attention_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: float, attn_mask=None,
                      is_causal: bool = False, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_t^γ, u_t^γ): the key weights of `token_weights` and the value weights u_t = Σ_heads Σ_q p_qt² (the
    first-order cost of an error in token t's value row alone), each [b, N] float64 with mean 1 per sequence."""
    check_attention_weight(gamma)
    b, H, n, d = q.shape
    h, N = k.shape[1], k.shape[2]
    if gamma == 0 or N == 0:
        ones = torch.ones(b, N, dtype=torch.float64, device=k.device)
        return ones, ones
    g = H // h
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qf = q.detach().float().reshape(b, h, g, n, d)
    kf, vf = k.detach().float(), v.detach().float()
    vv = (vf * vf).sum(-1)                                   # [b, h, N]
    f = torch.zeros(b, h, N, dtype=torch.float64, device=k.device)
    u = torch.zeros(b, h, N, dtype=torch.float64, device=k.device)
    for q0 in range(0, n, QUERY_BLOCK):
        q1 = min(n, q0 + QUERY_BLOCK)
        s = torch.einsum("bhgnd,bhmd->bhgnm", qf[:, :, :, q0:q1], kf) * scale
        if is_causal:
            rows = torch.arange(q0, q1, device=k.device)[:, None]
            s = s.masked_fill(torch.arange(N, device=k.device)[None, :] > rows, float("-inf"))
        m = _mask_block(attn_mask, q0, q1, b, h, g, N, k.device)
        if m is not None:
            s = s + m
        p = s.softmax(-1).nan_to_num(0.0)                     # a row that reads nothing weighs nothing
        o = torch.einsum("bhgnm,bhmd->bhgnd", p, vf)
        p2 = p * p
        p2q = p2.sum(3)                                       # [b, h, g, N]: Σ_q p²
        # Σ_q p² ‖v_t − o_q‖² = ‖v_t‖² Σ_q p² + Σ_q p² ‖o_q‖² − 2 v_t · Σ_q p² o_q
        part = p2q * vv[:, :, None] + torch.einsum("bhgnm,bhgn->bhgm", p2, (o * o).sum(-1)) \
            - 2 * torch.einsum("bhgnm,bhgnd,bhmd->bhgm", p2, o, vf)
        f += part.clamp_min(0).sum(2).double()
        u += p2q.sum(2).double()
    return _tempered(f.sum(1), gamma), _tempered(u.sum(1), gamma)   # one weight per token row (all kv heads)


def _tempered(f: torch.Tensor, gamma: float) -> torch.Tensor:
    """(f / mean f)^γ, renormalised to mean 1 per sequence; a sequence with no weight at all counts every token."""
    mean = f.mean(-1, keepdim=True)
    w = torch.where(mean > 0, f / mean.clamp_min(1e-300), torch.ones_like(f)).clamp_min(1e-8) ** gamma
    return w / w.mean(-1, keepdim=True)

"""Pass 2b — exact window: attention over rounded latents except where a format keeps them exact.

A format with exact rows ("int4|sinks4|recent32", kvfx.quant.exact_of) makes kvfx's cache hold the latents of the
first S tokens and of the last W in 16 bits beside every token's codes; a decode step at position t reads keys
0..S-1 and t-W+1..t exact and the rest rounded. Without that cache (perplexity over full forwards, `refine`'s
training through `fake_quant`) the rewrite pass gives each query the same view: the site's SDPA becomes `attention`
below, which scores each (query, key) pair on the exact or the rounded latent by their distance,

    s_ij = scale · q_i·(exact_j if j < S or i_pos - j < W else rounded_j) + mask_ij
    out_i = Σ_j softmax(s)_ij · (the same choice of value row)

so training and evaluation see what the cache's decode steps see (exact rows in the 16 bits the cache holds them
in; counter `exact_window`). It materialises the
[queries, keys] scores, as SDPA's math path does; a full forward over a few thousand tokens is what it is for.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import quant
from . import graph_utils as gu
from .counters import counters


@torch.library.custom_op("kvfx::held_exact", mutates_args=())
def held_exact(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the 16 bits the cache holds exact rows in (quant.exact_dtype), in x's dtype. An opaque op:
    Inductor would drop a float32 -> float16 -> float32 round trip inside a fused kernel."""
    return x.to(quant.exact_dtype(x.dtype)).to(x.dtype)


@held_exact.register_fake
def _(x):
    return torch.empty_like(x)


held_exact.register_autograd(lambda ctx, grad: grad)  # straight through, as fake_quant's rounding


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _held(x, offset):
    """x as the cache holds an exact row: x - offset in 16 bits, the offset added back on read."""
    return held_exact(x) if offset is None else held_exact(x - offset) + offset


def attention(q, k_exact, v_exact, k_rounded, v_rounded, attn_mask=None, is_causal=False, scale=None, sinks=0,
              recent=0, key_offset=None, value_offset=None):
    """q [b, H, T, R] (the last T of the N key positions); keys / values [b, h | 1 | H, N, R]; offsets: what the
    latents are rounded around (kvfx.cache), None: nothing."""
    heads, t, n = q.shape[1], q.shape[2], k_rounded.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    v_offset = key_offset if v_exact is k_exact else value_offset  # a shared latent: one offset
    k_exact, v_exact = (_heads(_held(x, o), heads).to(q.dtype) for x, o in ((k_exact, key_offset),
                                                                             (v_exact, v_offset)))
    k_rounded, v_rounded = (_heads(x, heads).to(q.dtype) for x in (k_rounded, v_rounded))
    qpos = torch.arange(n - t, n, device=q.device)[:, None]
    kpos = torch.arange(n, device=q.device)[None, :]
    exact = (kpos < sinks) | (qpos - kpos < recent)  # [T, N]
    s = torch.where(exact, q @ k_exact.transpose(-1, -2), q @ k_rounded.transpose(-1, -2)) * scale
    if is_causal:
        s = s.masked_fill(kpos > qpos, float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    zero = p.new_zeros(())
    return torch.where(exact, p, zero) @ v_exact + torch.where(exact, zero, p) @ v_rounded


def replace_sdpa(g: fx.Graph, site, k_exact: fx.Node, v_exact: fx.Node, key_offset, value_offset, sinks: int,
                 recent: int) -> None:
    """The site's SDPA (already over rounded latents) -> `attention` with the exact latents beside them."""
    args, sdpa = gu.sdpa_args(site.sdpa), site.sdpa
    offsets = {k: o for k, o in (("key_offset", key_offset), ("value_offset", value_offset)) if o is not None}
    with g.inserting_before(sdpa):
        new = g.call_function(attention, (args["query"], k_exact, v_exact, args["key"], args["value"]),
                              dict(attn_mask=args.get("attn_mask"), is_causal=bool(args.get("is_causal")),
                                   scale=args.get("scale"), sinks=sinks, recent=recent, **offsets))
    sdpa.replace_all_uses_with(new)
    g.erase_node(sdpa)
    site.sdpa = new
    counters["kvfx"]["exact_window"] += 1

"""Pass 2, second form — expand: attention over many query rows reads a joint latent expanded back to its heads.

The rank-space form SDPA(q·B, c, c)·Dᵀ makes every query head read the whole latent c (`layer` / `kv`
granularity: one latent of width R for all h kv heads). Per query row and cached token that costs H·(R_k + R_v)
multiply-adds against the original's H·2d — 5.6× for a 360-wide shared latent of SmolLM2 (H = 9, d = 64). In a
decode step (one query row) that is the price of reading R numbers instead of 2·h·d. With L query rows (prefill, a
chunk, a draft) the latent can instead be expanded once per cached token, as MLA implementations do in prefill:

    k̂ = c·Bᵀ  [b, h, N, d]     v̂ = c·Dᵀ  [b, h, N, d]     out = SDPA(q, k̂, v̂, enable_gqa)          (no ·Dᵀ after)

(each one matrix product by the heads side by side, [R, h·d], viewed as heads the way the original views its
k / v projections; a shared latent's keys and values in one product by [R, 2·h·d])

which costs h·d·(R_k + R_v) per cached token plus the original's attention. Exact in real arithmetic (q·(c·Bᵀ)ᵀ =
(q·B)·cᵀ). Expanding is cheaper when

    L · H · (R_k + R_v − 2d)  >  h · d · (R_k + R_v)            (independent of N)

— L ≥ 26 for SmolLM2's shared 360-wide latent. With a symbolic query length the comparison is a shape guard
(Dynamo recompiles once for the other side of it), so prefill expands and short chunks stay in rank space.
The caches are untouched: they still hold the latents; only how this call reads them changes (counter `expanded`).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..projections import SiteProjection
from . import graph_utils as gu
from .counters import counters
from .match import AttentionSite


def min_query_rows(heads: int, kv_heads: int, head_dim: int, key_rank: int, value_rank: int) -> float:
    """Query rows above which a joint latent read expanded costs fewer multiply-adds than read in rank space
    (inf when rank space is never dearer: R_k + R_v <= 2d)."""
    extra = heads * (key_rank + value_rank - 2 * head_dim)  # rank-space multiply-adds per query row and token
    return kv_heads * head_dim * (key_rank + value_rank) / extra if extra > 0 else float("inf")


def worth_expanding(site: AttentionSite, proj: SiteProjection, query: fx.Node) -> bool:
    """Is reading this joint latent expanded cheaper than reading it in rank space, for this call's query rows?"""
    if not proj.joint or site.query_len == 1:
        return False
    shape = gu.shape_of(query)
    if shape is None or len(shape) != 4:
        return False
    h, d, rk = proj.key_up.shape
    rows = min_query_rows(site.num_heads, h, d, rk, proj.value_up.shape[-1])
    if rows == float("inf"):
        return False
    try:  # a SymInt comparison here records a guard: the graph holds for the query lengths on this side of it
        return bool(shape[2] > rows)
    except Exception:  # noqa: BLE001  (a user's dynamic-shape constraint forbids the guard: keep rank space)
        return False


def _heads_matrix(up: torch.Tensor) -> torch.Tensor:
    """[h, d, R] (B or D per kv head) -> [R, h·d]: column block i is head i's Bᵢᵀ, so c·M is every head's c·Bᵢᵀ side
    by side — one matrix product instead of h thin ones."""
    return up.permute(2, 0, 1).reshape(up.shape[-1], -1)


def _per_head(g: fx.Graph, flat: fx.Node, h: int, d: int) -> fx.Node:
    """[b, 1, N, h·d] -> [b, h, N, d] (the original's view + transpose of its k / v projections)."""
    x = g.call_method("unflatten", (g.call_method("squeeze", (flat, 1)), -1, (h, d)))
    return g.call_method("transpose", (x, 1, 2))


def expand_site(rw, site: AttentionSite, proj: SiteProjection, query: fx.Node, key: fx.Node, value: fx.Node) -> None:
    """Rewrite the site's SDPA to read `key` / `value` (the latents, possibly repeated per query head) expanded to
    the kv heads: SDPA(q, c_k·Bᵀ, c_v·Dᵀ), each a single matrix product by [R, h·d] (a shared latent: both in one,
    by [R, 2·h·d]). `rw` is the RankSpaceRewrite (its constants and graph)."""
    g, sdpa = rw.g, site.sdpa
    ck, cv = gu.unrepeat(key), gu.unrepeat(value)
    h, d, _ = proj.key_up.shape
    with g.inserting_before(sdpa):
        if ck is cv:  # one latent read as key and value: c·[B₀ᵀ … | D₀ᵀ …]
            both = lambda: torch.cat([_heads_matrix(proj.key_up), _heads_matrix(proj.value_up)], -1)  # noqa: E731
            kv = g.call_function(torch.matmul, (ck, rw._const(site, "kv_heads", both, query)))
            halves = g.call_method("split", (kv, h * d, -1))
            k_flat, v_flat = (g.call_function(operator.getitem, (halves, i)) for i in (0, 1))
        else:
            keys = lambda: _heads_matrix(proj.key_up)        # noqa: E731
            values = lambda: _heads_matrix(proj.value_up)    # noqa: E731
            k_flat = g.call_function(torch.matmul, (ck, rw._const(site, "key_heads", keys, query)))
            v_flat = g.call_function(torch.matmul, (cv, rw._const(site, "value_heads", values, query)))
        k_hat, v_hat = _per_head(g, k_flat, h, d), _per_head(g, v_flat, h, d)
    gqa = site.num_heads != h
    gu.set_sdpa_args(sdpa, query=query, key=k_hat, value=v_hat, scale=site.scale, enable_gqa=gqa)
    for n in dict.fromkeys((key, value)):
        if n is not ck and n is not cv:
            gu.erase_dead_layout(g, n)
    counters["kvfx"]["expanded"] += 1

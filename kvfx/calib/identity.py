"""Identity: the cache's own coordinates, no fitting — the reference for quantisation alone.

Per kv head A = B = the first R unit vectors (C = D likewise for values). At rank 1.0 the projection is the
identity and the rewrite computes exact attention, so `kvfx.compress(model, identity_projections,
quantize="int4")` is a plain per-token low-bit KV cache (KIVI-like, without the low rank): the baseline a
low-rank method must beat at equal bytes. Below full rank it drops the last channels, which no real method does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import finish, ranks, register_calibrator
from .stats import SiteStats


def _first(heads: int, width: int, rank: int) -> torch.Tensor:
    return torch.eye(width, rank, dtype=torch.float64).expand(heads, width, rank)


@register_calibrator("identity")
@dataclass
class Identity:
    name = "identity"
    nested = True  # the rank-r fit is the leading r columns of the full-rank fit

    def fit(self, stats: SiteStats, key_rank, value_rank):
        rk, rv = ranks(stats, key_rank, value_rank)
        a, c = (_first(stats.kv_heads, stats.head_dim, r) for r in (rk, rv))
        return finish(stats, a, a, c, c)

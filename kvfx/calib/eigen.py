"""Eigen Attention: one orthonormal basis for keys and queries, found from their trace-normalised Grams.

Per kv head: A = B = top-R eigenvectors of G_K/tr(G_K) + G_Q/tr(G_Q) (a subspace good for both sides of
q·kᵀ, each side weighted equally); values as in Eigen Attention use V alone: C = D = top-R eigenvectors
of G_V. P = A Bᵀ is an orthogonal projector.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import register_calibrator, symmetric_fit
from .stats import SiteStats


def normalised(g: torch.Tensor) -> torch.Tensor:
    tr = g.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
    return torch.where(tr > 0, g / tr.clamp_min(1e-300), torch.zeros_like(g))


@register_calibrator("eigen")
@dataclass
class Eigen:
    name = "eigen"
    nested = True  # the rank-r fit is the leading r columns of the full-rank fit

    def fit(self, stats: SiteStats, key_rank, value_rank):
        return symmetric_fit(stats, normalised(stats.key) + normalised(stats.query), key_rank, value_rank)

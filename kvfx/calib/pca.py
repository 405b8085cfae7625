"""PCA (K-only / V-only SVD): keep the top-R principal directions of the cached keys and values.

Per kv head: A = B = top-R eigenvectors of G_K = KᵀK, C = D = top-R eigenvectors of G_V = VᵀV, so
P = A Bᵀ is the orthogonal projector minimising ‖K − K P‖²_F (queries and W_O are ignored).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import register_calibrator, symmetric_fit
from .stats import SiteStats


@register_calibrator("pca")
@dataclass
class PCA:
    name = "pca"
    nested = True  # the rank-r fit is the leading r columns of the full-rank fit

    def fit(self, stats: SiteStats, key_rank, value_rank):
        return symmetric_fit(stats, stats.key, key_rank, value_rank)

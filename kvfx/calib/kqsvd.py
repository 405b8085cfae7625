"""KQ-SVD: the rank-R key/query (and value/output) factorisation that is optimal for the attention logits.

Keys, per kv head g: minimise Σ_{i∈g} ‖K A Bᵀ Q_iᵀ − K Q_iᵀ‖²_F = tr((P−I)ᵀ G_K (P−I) G_Q), P = A Bᵀ.
With G_K = V S² Vᵀ and M = S Vᵀ G_Q V S, Eckart–Young gives A = V S⁻¹ W, B = V S W (W = top-R
eigenvectors of M); the relative error is 1 − Σ top-R eig(M) / tr(G_K G_Q). Values are the same with
(G_V, G_O): C = V_V S⁻¹ W, D = V_V S W, optimal for ‖V C Dᵀ W_O − V W_O‖.

`query="per_head"` (default) uses G_Q = Σ_i Q_iᵀQ_i: the per-head GQA objective above (sum outside the
norm). `query="summed"` uses the Gram of Σ_i Q_i (the seed's variant: ‖K(P−I)(Σ_i Q_i)ᵀ‖, sum inside the
norm); it is never better on the per-head objective, which the report always measures.

Columns of A and B (C and D) are then rescaled so ‖A_j‖ = ‖B_j‖ (P unchanged, no fp16 overflow in q·B).

Report extras: `eps` = Σ_g [Σ top-R eig(M_g) − Σ_{j≤R} (M_g)_jj], the energy by which the K-only SVD
(PCA) falls short of kqsvd on the fitted objective (≥ 0; with per-head queries eps / key_total equals
key_err(pca) − key_err(kqsvd)); `eps_rel` = eps / tr(G_K G_Q) of the fitted objective; `value_eps`
likewise for values.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import finish, ranks, register_calibrator
from .linalg import kqsvd, or_identity
from .stats import SiteStats

_QUERY = ("per_head", "summed")


@register_calibrator("kqsvd")
@dataclass
class KQSVD:
    query: str = "per_head"
    floor: float = 1e-6   # singular values of K (V) below floor·S_max are clamped before inverting
    name = "kqsvd"
    nested = True         # rank r = the top-r eigenvectors of M: the leading columns of the full-rank fit

    def __post_init__(self):
        if self.query not in _QUERY:
            raise ValueError(f"kqsvd: query must be one of {_QUERY}, got {self.query!r}.")
        if not 0.0 < self.floor < 1.0:
            raise ValueError(f"kqsvd: floor must be in (0, 1), got {self.floor!r}.")

    def fit(self, stats: SiteStats, key_rank, value_rank):
        rk, rv = ranks(stats, key_rank, value_rank)
        g_q = stats.query if self.query == "per_head" else stats.query_sum
        a, b, eps, _ = kqsvd(stats.key, or_identity(g_q), rk, self.floor)
        c, d, veps, _ = kqsvd(stats.value, or_identity(stats.output), rv, self.floor)
        fit_total = float((stats.key @ g_q).diagonal(dim1=-2, dim2=-1).sum())  # tr(G_K G_Q) of the fitted objective
        return finish(stats, a, b, c, d, eps=eps.sum(), value_eps=veps.sum(),
                      eps_rel=float(eps.sum()) / fit_total if fit_total > 0 else 0.0)

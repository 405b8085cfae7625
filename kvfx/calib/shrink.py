"""Gram shrinkage: calibration statistics pulled toward a scaled identity, so that a fit leans less on the directions
only the calibration text exercises (Ledoit–Wolf's form with a fixed weight α; issue 18's "what makes the low-rank
part hold off-domain").

Every token-summed second moment G (keys, queries, values; per kv head and the cross-head Grams) becomes
    G' = (1 − α)·G + α·(tr G_g / d)·I      on the block of each kv head g (tr G_g / d: that head's mean variance)
and the key-value cross Gram G_KV' = (1 − α)·G_KV (the target has no cross terms). A head's own Gram and the
diagonal block of the joint Gram stay equal, so per-head, joint and shared fits see the same shrunk statistics. The
W_O Grams (weights, not tokens), the token count, the means and the kept samples are unchanged; the calibrators that
train on samples (stiefel, matryoshka) use the shrunk Grams only where they read Grams.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .stats import SiteStats


def _toward(g: torch.Tensor, scales: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 − α)·g + α·diag(scales), g [n, n], scales [n]."""
    return (1 - alpha) * g + alpha * torch.diag(scales)


def _per_head(g: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """g [h, d, d] shrunk head by head, and each head's scale tr(g_h)/d repeated d times ([h·d])."""
    d = g.shape[-1]
    scale = g.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    eye = torch.eye(d, dtype=g.dtype)
    return (1 - alpha) * g + alpha * scale[:, None, None] * eye, scale.repeat_interleave(d)


def shrink_site(st: SiteStats, alpha: float) -> SiteStats:
    """One site's statistics with every token Gram shrunk by `alpha` (see the module)."""
    key, key_diag = _per_head(st.key, alpha)
    value, value_diag = _per_head(st.value, alpha)
    query, _ = _per_head(st.query, alpha)
    query_sum, _ = _per_head(st.query_sum, alpha)
    joint = {}
    if st.key_joint is not None:
        joint = {"key_joint": _toward(st.key_joint, key_diag, alpha),
                 "value_joint": _toward(st.value_joint, value_diag, alpha),
                 "kv_joint": None if st.kv_joint is None else (1 - alpha) * st.kv_joint}
    return replace(st, key=key, value=value, query=query, query_sum=query_sum, memo={}, **joint)


def shrink(stats: dict[str, SiteStats], alpha: float) -> dict[str, SiteStats]:
    """Statistics (from kvfx.calib.collect.collect_stats) with every token Gram shrunk toward a scaled identity by
    `alpha` in [0, 1): 0 leaves them as measured, larger values trust the calibration text's correlations less.
    Returns new statistics; `stats` is not changed."""
    if not (isinstance(alpha, (int, float)) and 0 <= alpha < 1):
        raise ValueError(f"shrinkage must be a number in [0, 1) (the weight of the scaled identity; 0: none), "
                         f"got {alpha!r}.")
    return {name: shrink_site(st, float(alpha)) for name, st in stats.items()}

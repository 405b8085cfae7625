"""The shared K+V latent (`granularity="kv"`): one rank-R latent per token and layer for keys AND values.

Like DeepSeek's MLA c_KV, every token stores c = X·A with X = [k_1 … k_h, v_1 … v_h] (post-RoPE keys and values
of all kv heads, 2·h·d wide) and attention reads c as both key and value: k̂_g = c·B_K,gᵀ, v̂_g = c·B_V,gᵀ, so
SDPA(q·B_K, c, c)·B_Vᵀ. Separate key and value latents (ranks R_k + R_v = R) are the special case of a
block-diagonal A; the shared latent may also spend a direction on what keys and values have in common.

Calibration is the single-site problem on the stacked data X, solved by any Gram-only calibrator (pca, eigen,
kqsvd) on a "stacked view" of the statistics:
    G_in  = [[G_K, G_KV], [G_VK, G_V]]                            (needs the cross Gram kv_joint)
    G_out = blockdiag(λ·G_Q / tr(G_K G_Q), G_O / tr(G_V G_O))     (G_Q, G_O block-diagonal over kv heads)
so kqsvd minimises λ·(relative key-logit error) + (relative value-output error) over one latent. λ
(`key_weight`) trades key accuracy for value accuracy; the view is rescaled by W = blockdiag(√(λ/tr G_K)·I,
√(1/tr G_V)·I) — X' = X·W, P' = W⁻¹PW, which leaves kqsvd's objective unchanged and makes pca the PCA of
[√λ·K/‖K‖, V/‖V‖] — and the fitted factors are mapped back (A = W·A', B = W⁻¹·B').
"""
from __future__ import annotations

import torch

from ..projections import SiteProjection, SiteShape, split_joint
from .linalg import balance, proj_error
from .stats import SiteStats

DEFAULT_KEY_WEIGHT = 4.0


def _blocks(st: SiteStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G_in [2hd, 2hd], G_Q block-diagonal [hd, hd], G_O block-diagonal [hd, hd])."""
    if st.kv_joint is None or st.key_joint is None:
        raise ValueError("granularity='kv' needs the key-value cross Gram; collect the statistics with this kvfx.")
    g_in = torch.cat([torch.cat([st.key_joint, st.kv_joint], 1), torch.cat([st.kv_joint.T, st.value_joint], 1)], 0)
    return g_in, torch.block_diag(*st.query), torch.block_diag(*st.output)


def _scales(st: SiteStats, key_weight: float) -> torch.Tensor:
    """The diagonal of W (2hd,)."""
    hd = st.kv_heads * st.head_dim
    tk, tv = float(st.key_joint.trace()), float(st.value_joint.trace())
    wk, wv = (key_weight / tk) ** 0.5 if tk > 0 else 1.0, (1.0 / tv) ** 0.5 if tv > 0 else 1.0
    return torch.cat([torch.full((hd,), wk), torch.full((hd,), wv)]).to(torch.float64)


def shared_view(st: SiteStats, key_weight: float = DEFAULT_KEY_WEIGHT) -> SiteStats:
    """The stacked statistics as ONE head of width 2·h·d (key and value fields alike), rescaled by W."""
    if not key_weight > 0:
        raise ValueError(f"key_weight must be > 0 (the weight of key-logit error against value error), got {key_weight!r}.")
    g_in, g_q, g_o = _blocks(st)
    hd = st.kv_heads * st.head_dim
    tk = float((st.key_joint @ g_q).trace())
    tv = float((st.value_joint @ g_o).trace())
    g_out = torch.block_diag(key_weight * g_q / tk if tk > 0 else g_q, g_o / tv if tv > 0 else g_o)
    w = _scales(st, key_weight)
    gi = w[:, None] * g_in * w[None, :]
    go = g_out / w[:, None] / w[None, :]
    view = SiteStats(st.heads, 1, 2 * hd, gi[None], go[None], go[None].clone(), gi[None].clone(), go[None].clone(),
                     tokens=st.tokens)
    view.memo["kvfx_shared_scale"] = w
    view.memo["kvfx_shared_source"] = st
    return view


def unstack(view: SiteStats, proj: SiteProjection) -> SiteProjection:
    """The stacked view's key factors (A', B' [1, 2hd, R]) as a shared SiteProjection of the original site."""
    w, st = view.memo["kvfx_shared_scale"], view.memo["kvfx_shared_source"]
    a = proj.key_down[0].to(torch.float64) * w[:, None]
    b = proj.key_up[0].to(torch.float64) / w[:, None]
    a, b = balance(a[None], b[None])
    a, b = a[0].float(), b[0].float()
    hd = st.kv_heads * st.head_dim
    shape = SiteShape(st.heads, st.kv_heads, st.head_dim)
    return SiteProjection(a[:hd][None].contiguous(), split_joint(b[:hd][None], shape).contiguous(),
                          a[hd:][None].contiguous(), split_joint(b[hd:][None], shape).contiguous(), shared=True)


def shared_errors(st: SiteStats, proj: SiteProjection) -> dict[str, float]:
    """Relative key-logit and value-output errors of a shared latent (cross terms included: keys are also
    rebuilt from the values' share of the latent and vice versa), in the keys of `calib.base.site_errors`."""
    g_in, g_q, g_o = _blocks(st)
    a = torch.cat([proj.key_down[0], proj.value_down[0]], 0).to(torch.float64)
    hd = a.shape[0] // 2
    b = torch.cat([proj.key_up.reshape(hd, -1), proj.value_up.reshape(hd, -1)], 0).to(torch.float64)
    p = a @ b.T
    out = {}
    for kind, cols, g_out in (("key", slice(0, hd), g_q), ("value", slice(hd, 2 * hd), g_o)):
        full = torch.zeros(2 * hd, 2 * hd, dtype=torch.float64)
        full[cols, cols] = g_out
        # error of X·P against X restricted to this side's columns: weight the other side's outputs by 0
        err, total = proj_error(p[None], g_in[None], full[None])
        t = float(total)
        out[f"{kind}_err"] = float(err) / t if t > 0 else 0.0
        out[f"{kind}_total"] = t
    return out


def fit_shared(cal, st: SiteStats, rank: int, key_weight: float = DEFAULT_KEY_WEIGHT) -> tuple[SiteProjection, dict]:
    """Fit calibrator `cal` (Gram-only: pca, eigen, kqsvd) to the stacked view at latent rank `rank`."""
    if getattr(cal, "samples_needed", 0):
        raise ValueError(f"granularity='kv' (shared K+V latent) takes the closed-form calibrators (pca, eigen, kqsvd); "
                         f"{cal.name!r} trains on whole sequences per head. Train a shared latent end to end with "
                         "kvfx.refine from a kqsvd start instead.")
    view = shared_view(st, key_weight)
    proj, rep = cal.fit(view, rank, 1)  # the value half of the view is unused (one latent)
    out = unstack(view, proj)
    report = {k: v for k, v in rep.items() if not k.startswith(("key_", "value_"))}
    return out, report | shared_errors(st, out) | {"key_weight": key_weight}

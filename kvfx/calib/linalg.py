"""Batched float64 linear algebra shared by the calibrators (every tensor here is [kv_heads, d, ·]).

Notation for one kv head: a "site objective" pairs an input Gram G_in = XᵀX (keys K or values V, tokens × d)
with an output Gram G_out = YᵀY-like matrix (G_Q = Σ_i Q_iᵀQ_i for keys, G_O = Σ_i W_O,i W_O,iᵀ for values).
A rank-R map P = A·Bᵀ replaces X·Yᵀ by X·P·Yᵀ; its squared error is

    ‖X(P − I)Yᵀ‖²_F = tr((P − I)ᵀ G_in (P − I) G_out)          (valid for oblique P too)

and the reference energy is ‖XYᵀ‖²_F = tr(G_in G_out).
"""
from __future__ import annotations

import torch


def sym(g: torch.Tensor) -> torch.Tensor:
    return 0.5 * (g + g.transpose(-1, -2))


def top_eigh(g: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r eigenpairs of symmetric [h, d, d] matrices: values [h, r] descending, vectors [h, d, r].

    Signs are fixed (largest-magnitude entry of each vector positive) so results are reproducible.
    """
    vals, vecs = torch.linalg.eigh(sym(g.to(torch.float64)))
    vals, vecs = vals.flip(-1)[..., :r], vecs.flip(-1)[..., :r]
    idx = vecs.abs().argmax(-2, keepdim=True)
    sign = torch.sign(torch.gather(vecs, -2, idx))
    return vals, vecs * torch.where(sign == 0, torch.ones_like(sign), sign)


def or_identity(g: torch.Tensor) -> torch.Tensor:
    """Replace all-zero Grams (no data, e.g. W_O never set) by the identity: the objective falls back to
    plain reconstruction of X, so the calibrators degrade to PCA instead of returning an arbitrary subspace."""
    eye = torch.eye(g.shape[-1], dtype=g.dtype).expand_as(g)
    empty = (g.diagonal(dim1=-2, dim2=-1).sum(-1) <= 0)[:, None, None]
    return torch.where(empty, eye, g)


def proj_error(p: torch.Tensor, g_in: torch.Tensor, g_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: (tr((P−I)ᵀ G_in (P−I) G_out), tr(G_in G_out)), both [h] float64."""
    e = p.to(torch.float64) - torch.eye(p.shape[-1], dtype=torch.float64)
    err = (e.transpose(-1, -2) @ g_in @ e @ g_out).diagonal(dim1=-2, dim2=-1).sum(-1)
    total = (g_in @ g_out).diagonal(dim1=-2, dim2=-1).sum(-1)
    return err, total


def balance(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale column j of A by c_j and of B by 1/c_j so ‖A_j‖ = ‖B_j‖ (P = ABᵀ unchanged).

    Whitened factors otherwise scale like 1/√tokens (A) and √tokens (B), which overflows fp16 for q·B.
    """
    na, nb = a.norm(dim=-2, keepdim=True), b.norm(dim=-2, keepdim=True)
    c = torch.where((na > 0) & (nb > 0), (nb / na.clamp_min(1e-300)).sqrt(), torch.ones_like(na))
    return a * c, b / c


def kqsvd(g_in: torch.Tensor, g_out: torch.Tensor, r: int, floor: float = 1e-6):
    """Optimal rank-r P = A·Bᵀ for min ‖X(P − I)Yᵀ‖²_F (Eckart–Young on X·Yᵀ, computed from Grams only).

    With X = U S Vᵀ (so G_in = V S² Vᵀ), X·Yᵀ = U·(S Vᵀ Yᵀ) and ‖U·Z‖ = ‖Z‖, so the best rank-r
    approximation projects Z = S Vᵀ Yᵀ onto the top-r eigenvectors W of M = Z Zᵀ = S Vᵀ G_out V S:
        A = V S⁻¹ W,   B = V S W,   P = V S⁻¹ W Wᵀ S Vᵀ,   X·P = U W Wᵀ S Vᵀ,
    captured = Σ top-r eig(M) and error = tr(M) − captured = tr(G_in G_out) − captured. S is clamped to
    ≥ floor·S_max before inverting (those directions carry ≤ floor² of X's energy); at r = d, P = I.

    Gap: the X-only SVD (A = B = V_r, i.e. PCA) captures Σ_{j≤r} M_jj (M in the V basis sorted by
    descending S), so ε = captured − Σ_{j≤r} M_jj = err(PCA) − err(kqsvd) ≥ 0 (Ky Fan).
    Returns A, B [h, d, r] (column-balanced), ε [h], captured [h].
    """
    s2, v = top_eigh(g_in, g_in.shape[-1])
    s = s2.clamp_min(0).sqrt()
    smax = s[..., :1]
    s = torch.maximum(s, torch.where(smax > 0, floor * smax, torch.ones_like(smax)))
    vs = v * s[..., None, :]                               # V S
    m = sym(vs.transpose(-1, -2) @ g_out @ vs)            # S Vᵀ G_out V S
    lam, w = top_eigh(m, r)
    captured = lam.sum(-1)
    eps = captured - m.diagonal(dim1=-2, dim2=-1)[..., :r].sum(-1)
    a = (v / s[..., None, :]) @ w
    b = vs @ w
    a, b = balance(a, b)
    return a, b, eps, captured

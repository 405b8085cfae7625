"""StiefAttention-style learned projections: orthonormal bases trained against the attention output error.

Per site, A = B (keys/queries) and C = D (values) are kept orthonormal (points on the Stiefel manifold,
parametrised as the Q factor of an unconstrained matrix — a QR retraction applied inside the forward), and
trained with Adam to minimise the relative error of the attention block's output through softmax, value
mixing and W_O on a few calibration sequences:

    loss = ‖Σ_i (Ô_i − O_i)·W_O,i‖² / ‖Σ_i O_i·W_O,i‖²,   Ô_i = softmax((q_i A)(K A)ᵀ/√d + causal)·(V C)·Cᵀ

Initialised from `eigen` (keys) and `pca` (values); the residual stream and MLP after W_O are not part of
the objective (a local, per-layer loss). Deterministic for a given seed. A loss that turns NaN/inf falls
back to the initial bases (reported as `fallback: 1`) — never a silently wrong projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import finish, ranks, register_calibrator
from .linalg import top_eigh
from .stats import SiteStats


def _attention(q, k, v, scale):
    g = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _orth(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x).Q


@register_calibrator("stiefel")
@dataclass
class Stiefel:
    steps: int = 60
    lr: float = 5e-3
    seed: int = 0
    samples_needed: int = 2  # calibration sequences kept per site for the loss
    name = "stiefel"

    def _init(self, stats: SiteStats, rk: int, rv: int):
        gk = stats.key / stats.key.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None].clamp_min(1e-30)
        gq = stats.query / stats.query.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None].clamp_min(1e-30)
        _, a = top_eigh(gk + gq, rk)
        _, c = top_eigh(stats.value, rv)
        return a.float(), c.float()

    def loss(self, stats: SiteStats, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        g = stats.group
        scale = stats.head_dim ** -0.5
        w = stats.w_rows                                   # [H, d, hidden]
        num = den = 0.0
        for q, k, v in stats.samples:                      # q [H, n, d], k/v [h, n, d]
            ref = torch.einsum("hnd,hdo->no", _attention(q, k, v, scale), w)
            ab = a.repeat_interleave(g, 0)
            o = _attention(q @ ab, k @ a, v @ c, scale) @ c.repeat_interleave(g, 0).transpose(1, 2)
            num = num + (torch.einsum("hnd,hdo->no", o, w) - ref).pow(2).sum()
            den = den + ref.pow(2).sum()
        return num / den

    def fit(self, stats: SiteStats, key_rank, value_rank):
        if not stats.samples or stats.w_rows is None:
            raise ValueError("stiefel needs calibration sequences and W_O: calibrate with method='stiefel' "
                             "(kvfx.calibrate keeps them) and granularity='head'.")
        rk, rv = ranks(stats, key_rank, value_rank)
        torch.manual_seed(self.seed)
        a0, c0 = self._init(stats, rk, rv)
        xa, xc = a0.clone().requires_grad_(True), c0.clone().requires_grad_(True)
        opt = torch.optim.Adam([xa, xc], lr=self.lr)
        with torch.no_grad():
            first = float(self.loss(stats, a0, c0))
        best, best_ac = first, (a0, c0)
        with torch.enable_grad():
            for _ in range(self.steps):
                opt.zero_grad()
                a, c = _orth(xa), _orth(xc)
                loss = self.loss(stats, a, c)
                if not torch.isfinite(loss):
                    break
                if loss.item() < best:
                    best, best_ac = loss.item(), (a.detach(), c.detach())
                loss.backward()
                opt.step()
        a, c = (t.double() for t in best_ac)
        fallback = not torch.isfinite(torch.tensor(best)) or best_ac[0] is a0
        return finish(stats, a, a, c, c, init_loss=first, final_loss=best, fallback=float(fallback))

"""Shared machinery of the learned calibrators (`stiefel`, `matryoshka`): orthonormal bases trained by
distillation against the uncompressed attention output of one site.

Objective, on the calibration sequences kept in `SiteStats.samples` (q [H, n, d], k/v [h, n, d]) and the
rows W_O,i of the output projection that read query head i (`SiteStats.w_rows`):

    loss(A, C) = Σ_s ‖Ô_s − O_s‖² / Σ_s ‖O_s‖²
    O_s = Σ_i softmax(q_i kᵀ·s + causal) v · W_O,i                     (computed once per site, memoised)
    Ô_s = Σ_i softmax((q_i A)(K A)ᵀ·s + causal)(V C) · (Cᵀ W_O,i)      (A = B, C = D orthonormal)

with s = 1/√d. Bases stay orthonormal through a QR retraction inside the forward (the parameter is an
unconstrained matrix X, the basis is Q of X = QR) and are trained with Adam (`adam_orthonormal`), which stops
at the first non-finite loss so the caller can fall back to its closed-form initialisation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .eigen import normalised
from .linalg import top_eigh
from .stats import SiteStats

log = logging.getLogger("kvfx.calib")

_REF = "distill.reference"  # key of the memoised reference outputs in SiteStats.memo


@dataclass
class Distilled:
    """Options and objective shared by the learned calibrators (subclasses add their own fields)."""
    steps: int = 60
    lr: float = 5e-3
    seed: int = 0
    samples_needed: int = 2  # calibration sequences kept per site for the loss (kvfx.calibrate reads this)
    query_rows: int = 128    # query positions per sample and step in the training loss (0: all of them)

    def loss(self, stats: SiteStats, a: torch.Tensor, c: torch.Tensor, rows: list | None = None) -> torch.Tensor:
        return output_loss(stats, a, c, rows)


def require_samples(stats: SiteStats, method: str) -> None:
    if not stats.samples or stats.w_rows is None:
        raise ValueError(f"{method} needs calibration sequences and W_O: calibrate with method={method!r} "
                         "(kvfx.calibrate keeps them; with collect_stats pass samples=N) and granularity='head' "
                         "(the joint cross-head latent, granularity='layer', is not supported by the per-site learned calibrators: "
                         "calibrate it with pca/kqsvd and train it end to end with kvfx.refine).")


def attention(q, k, v, scale, rows=None):
    """Causal GQA attention; with `rows` (sorted query positions), q holds only those rows."""
    g = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    if rows is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = torch.arange(k.shape[1]) <= rows[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def orth(x: torch.Tensor) -> torch.Tensor:
    """Q of X = QR with diag(R) > 0 (unique; an orthonormal X maps to itself). Column j of Q depends on the
    first j columns of X only, so leading sub-bases stay nested."""
    q, r = torch.linalg.qr(x)
    return q * torch.sign(r.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)


def init_bases(stats: SiteStats, rk: int, rv: int, key: str = "eigen") -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 orthonormal starting bases [h, d, r], columns sorted by eigenvalue: keys from `eigen`
    (G_K/tr + G_Q/tr) or `pca` (G_K), values from `pca` (G_V)."""
    g_key = stats.key if key == "pca" else normalised(stats.key) + normalised(stats.query)
    _, a = top_eigh(g_key, rk)
    _, c = top_eigh(stats.value, rv)
    return a.float(), c.float()


def reference(stats: SiteStats) -> list[torch.Tensor]:
    """Uncompressed attention outputs through W_O, [n, hidden] per sample (memoised on the stats)."""
    if _REF not in stats.memo:
        scale, w = stats.head_dim ** -0.5, stats.w_rows
        with torch.no_grad():
            stats.memo[_REF] = [torch.einsum("hnd,hdo->no", attention(q, k, v, scale), w) for q, k, v in stats.samples]
    return stats.memo[_REF]


def output_loss(stats: SiteStats, a: torch.Tensor, c: torch.Tensor, rows: list | None = None,
                b: torch.Tensor | None = None, d: torch.Tensor | None = None) -> torch.Tensor:
    """Relative attention-output error of keys/queries in basis a [h, d, Rk] and values in c [h, d, Rv];
    with `rows` (one sorted index tensor or None per sample) only on those query positions. Oblique
    projections pass their other factors too: b (query side, default a) and d (output side, default c)."""
    g, scale = stats.group, stats.head_dim ** -0.5
    b, d = a if b is None else b, c if d is None else d
    ab = b.repeat_interleave(g, 0)
    cw = d.repeat_interleave(g, 0).transpose(1, 2) @ stats.w_rows      # [H, Rv, hidden]: Dᵀ W_O,i
    num = den = 0.0
    for i, ((q, k, v), ref) in enumerate(zip(stats.samples, reference(stats))):
        r = None if rows is None else rows[i]
        if r is not None:
            q, ref = q[:, r], ref[r]
        o = torch.einsum("hnr,hro->no", attention(q @ ab, k @ a, v @ c, scale, r), cw)
        num = num + (o - ref).pow(2).sum()
        den = den + ref.pow(2).sum()
    return num / den


def random_rows(stats: SiteStats, count: int, gen: torch.Generator) -> list | None:
    """`count` query positions per sample drawn without replacement (sorted); None: all of them."""
    if count <= 0:
        return None
    return [None if q.shape[1] <= count else torch.randperm(q.shape[1], generator=gen)[:count].sort().values
            for q, _, _ in stats.samples]


def adam_orthonormal(starts: list[torch.Tensor], step_loss: Callable[[int, list[torch.Tensor]], torch.Tensor],
                     steps: int, lr: float, on_step: Callable[[float, list[torch.Tensor]], None] | None = None
                     ) -> list[torch.Tensor] | None:
    """Adam on unconstrained matrices started at the orthonormal `starts`; `step_loss(i, bases)` gets the
    QR-retracted bases of step i. Returns the final bases (detached), or None as soon as a loss is not finite
    (logged). `on_step(loss, bases)` sees every finite loss with the bases it was taken at."""
    xs = [s.clone().requires_grad_(True) for s in starts]
    opt = torch.optim.Adam(xs, lr=lr)
    with torch.enable_grad():
        for i in range(steps):
            opt.zero_grad()
            bases = [orth(x) for x in xs]
            loss = step_loss(i, bases)
            if not torch.isfinite(loss):
                log.warning("kvfx: non-finite distillation loss at step %d of %d; training stopped", i, steps)
                return None
            if on_step is not None:
                on_step(loss.item(), [b.detach() for b in bases])
            loss.backward()
            opt.step()
    with torch.no_grad():
        return [orth(x) for x in xs]

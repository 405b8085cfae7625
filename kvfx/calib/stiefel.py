"""StiefAttention-style learned projections: orthonormal bases trained against the attention output error.

Per site, A = B (keys/queries) and C = D (values) are kept orthonormal (points on the Stiefel manifold,
parametrised as the Q factor of an unconstrained matrix — a QR retraction applied inside the forward), and
trained with Adam to minimise the relative error of the attention block's output through softmax, value
mixing and W_O on a few calibration sequences:

    loss = ‖Σ_i (Ô_i − O_i)·W_O,i‖² / ‖Σ_i O_i·W_O,i‖²,   Ô_i = softmax((q_i A)(K A)ᵀ/√d + causal)·(V C)·Cᵀ

Initialised from `eigen` (keys) and `pca` (values); the residual stream and MLP after W_O are not part of
the objective (a local, per-layer loss). Each step takes the loss on `query_rows` random query positions per
sequence; the result is kept only if the loss on all positions beat the initial bases. Deterministic for a
given seed. A loss that turns NaN/inf (or no improvement) falls
back to the initial bases (reported as `fallback: 1`) — never a silently wrong projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import finish, ranks, register_calibrator
from .distill import Distilled, adam_orthonormal, init_bases, random_rows, require_samples
from .stats import SiteStats


@register_calibrator("stiefel")
@dataclass
class Stiefel(Distilled):
    """Options: steps, lr, seed, samples_needed, query_rows (see `Distilled`).

    Under a `Budget`, ranks are allocated from kqsvd's error-rank profiles (`profile_proxy`): profiling stiefel
    itself would train once per candidate rank; the bases are then trained at the allocated ranks only."""
    name = "stiefel"
    profile_proxy = "kqsvd"

    def fit(self, stats: SiteStats, key_rank, value_rank):
        require_samples(stats, "stiefel")
        rk, rv = ranks(stats, key_rank, value_rank)
        a0, c0 = init_bases(stats, rk, rv, key="eigen")
        gen = torch.Generator().manual_seed(self.seed)

        def full_loss(a, c):
            with torch.no_grad():
                return float(self.loss(stats, a, c))
        first = full_loss(a0, c0)
        trained = adam_orthonormal([a0, c0], lambda _, b: self.loss(stats, *b, random_rows(stats, self.query_rows, gen)),
                                   self.steps, self.lr)
        final = full_loss(*trained) if trained is not None else float("nan")
        fallback = not final < first   # NaN (training diverged) or no improvement: keep the initial bases
        a, c = (t.double() for t in ((a0, c0) if fallback else trained))
        return finish(stats, a, a, c, c, init_loss=first, final_loss=first if fallback else final,
                      fallback=float(fallback))

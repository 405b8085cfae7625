"""MatryoshkaKV (arXiv 2410.14731): one orthonormal basis per kv head whose every leading sub-basis is a good
rank-r projection, so a single trained artefact serves every compression level.

Per site and kv head, keys/queries share a full orthonormal d×d basis U_K (A = B = U_K[:, :R_k]) and values a
basis U_V (C = D = U_V[:, :R_v]). Both start from PCA (eigenvectors of G_K and G_V sorted by eigenvalue, so
the start is exactly `pca` at every rank; `key_init="eigen"` starts keys from `eigen` instead) and are tuned by
distillation against the uncompressed attention output through softmax and W_O — the objective of `stiefel`
(see distill.py) on the stored calibration sequences — with the Matryoshka strategy: every Adam step draws a
key rank and, independently, a value rank from the nested set `rank_set` (default d·{1/8, …, 7/8}), truncates
the bases to their leading columns and takes the loss there (on `query_rows` random query positions per
calibration sequence — all keys before them still attend — which keeps a step cheap on CPU; the reported
losses use every position). The QR retraction keeps span(U[:, :r]) a function of the first r parameter
columns only, so projections at rank r are the leading columns of those at r' > r.

Training happens once per site: the trained bases are memoised on the `SiteStats` object (`stats.memo`, keyed
by the calibrator's options, emptied when the statistics change), so `fit(stats, "matryoshka", r)` for several
ranks — a benchmark's keep 0.75 / 0.5 / 0.25, or the error-rank profiles `Budget` allocation takes at every
rank (key_err / value_err of the truncated trained basis, as for every calibrator) — trains once and only
slices afterwards. To keep the artefact on disk, save `fit(stats, "matryoshka", 1.0)` (the full bases) and
slice it later with `truncate(projections, rank)`.

This calibrator distils each site on its own (the local objective above, cheap). MatryoshkaKV's end-to-end
objective — the KL of the whole compressed model's next-token distribution, every site trained together with a
nested rank drawn per site each step — is `kvfx.refine(model, projections, windows, Refine(rank_set=...))`
started from full-rank projections (these, or pca / kqsvd at rank 1.0); see refine.py.

Report: `init_loss` / `final_loss` = the distillation loss averaged over the rank set (keys and values at the
same rank) for the PCA start and the returned bases; `fallback: 1` when the PCA start is returned instead of
the trained bases — training met a NaN/inf loss (logged, training stops there) or did not improve the mean
loss. Deterministic for a given seed (the rank draws use their own generator).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..projections import Projections, resolve_rank
from ..rotate import check_unrotated
from .base import finish, ranks, register_calibrator
from .distill import Distilled, adam_orthonormal, init_bases, log, random_rows, require_samples
from .stats import SiteStats

_KEY_INIT = ("pca", "eigen")


@register_calibrator("matryoshka")
@dataclass
class Matryoshka(Distilled):
    """Options: steps, lr, seed, samples_needed (see `Distilled`), rank_set, key_init, query_rows."""
    lr: float = 1e-2
    rank_set: tuple = (1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8)  # fractions of d in (0, 1] or int ranks
    key_init: str = "pca"
    name = "matryoshka"
    nested = True

    def __post_init__(self):
        self.rank_set = tuple(self.rank_set)
        if not self.rank_set:
            raise ValueError("matryoshka: rank_set is empty; give fractions of head_dim in (0, 1] or int ranks.")
        for r in self.rank_set:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or math.isnan(r) or r <= 0:
                raise ValueError(f"matryoshka: rank_set entry {r!r} is outside (0, d]; give fractions of head_dim "
                                 "in (0, 1] or int ranks in 1..d.")
        if self.key_init not in _KEY_INIT:
            raise ValueError(f"matryoshka: key_init must be one of {_KEY_INIT}, got {self.key_init!r}.")
        if not isinstance(self.steps, int) or self.steps < 0 or not self.lr > 0 or self.query_rows < 0:
            raise ValueError(f"matryoshka: steps and query_rows must be ints >= 0 and lr > 0, got "
                             f"{self.steps!r}, {self.query_rows!r}, {self.lr!r}.")

    def ranks_for(self, d: int) -> list[int]:
        """The nested rank set as sorted int ranks for head_dim d."""
        try:
            return sorted({resolve_rank(r, d) for r in self.rank_set})
        except ValueError as e:
            raise ValueError(f"matryoshka: rank_set {self.rank_set} is not inside (0, d={d}]: {e}") from e

    def bases(self, stats: SiteStats) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The full trained bases U_K, U_V [h, d, d] (float32) and the training report, trained on first use
        and memoised on `stats`."""
        key = ("matryoshka",) + dataclasses.astuple(self)
        if key not in stats.memo:
            stats.memo[key] = self._train(stats)
        return stats.memo[key]

    def _train(self, stats: SiteStats):
        require_samples(stats, "matryoshka")
        rs = self.ranks_for(stats.head_dim)
        d = stats.head_dim
        u0 = init_bases(stats, d, d, key=self.key_init)
        gen = torch.Generator().manual_seed(self.seed)
        draws = torch.randint(len(rs), (self.steps, 2), generator=gen).tolist()

        def step_loss(i, bases):
            (uk, uv), (ik, iv) = bases, draws[i]
            return self.loss(stats, uk[..., :rs[ik]], uv[..., :rs[iv]], random_rows(stats, self.query_rows, gen))

        def mean_loss(uk, uv):
            with torch.no_grad():
                return sum(float(self.loss(stats, uk[..., :r], uv[..., :r])) for r in rs) / len(rs)

        trained = adam_orthonormal(list(u0), step_loss, self.steps, self.lr) if self.steps else u0
        first = mean_loss(*u0)
        final = mean_loss(*trained) if trained is not None else float("nan")
        fallback = not final <= first
        if fallback:
            log.warning("kvfx matryoshka: %s (site with %d kv heads, head_dim %d); using the PCA start instead",
                        "training loss became NaN/inf" if trained is None else
                        f"training did not lower the mean loss ({final:.4g} vs {first:.4g} at the start)",
                        stats.kv_heads, d)
        uk, uv = u0 if fallback else trained
        return uk, uv, {"init_loss": first, "final_loss": first if fallback else final,
                        "fallback": float(fallback), "steps": self.steps}

    def fit(self, stats: SiteStats, key_rank, value_rank):
        rk, rv = ranks(stats, key_rank, value_rank)
        uk, uv, report = self.bases(stats)
        a, c = uk[..., :rk].double(), uv[..., :rv].double()
        return finish(stats, a, a, c, c, **report)


def truncate(projections: Projections, rank: int | float | dict, value_rank: int | float | None = None) -> Projections:
    """Nested projections (matryoshka, saved at a high rank such as 1.0) cut to their leading columns.

    rank: keep fraction of head_dim or int (keys; values use `value_rank` or the same), or a dict site ->
    rank or (key_rank, value_rank). Exact for matryoshka (and pca / eigen, whose bases are nested too); for
    other methods the leading columns are not the projection those methods would fit at the lower rank.
    Rotated projections (kvfx.rotate_latents) are refused: cut first, then rotate."""
    check_unrotated(projections, "truncate")
    sites = {}
    for name, p in projections.sites.items():
        r = rank.get(name) if isinstance(rank, dict) else rank
        if r is None:
            raise ValueError(f"rank mapping has no entry for site '{name}'.")
        if p.shared:  # one latent for keys and values: one rank, a fraction of 2·h·d (the KV-byte fraction)
            if isinstance(r, (tuple, list)) or value_rank is not None:
                raise ValueError(f"site '{name}' is a shared K+V latent (granularity='kv'): give one rank, not "
                                 f"separate key and value ranks ({r!r}, value_rank={value_rank!r}).")
            rk = rv = resolve_rank(r, p.input_width)
        else:
            rk, rv = r if isinstance(r, (tuple, list)) else (r, value_rank if value_rank is not None else r)
            rk, rv = resolve_rank(rk, p.key_down.shape[1]), resolve_rank(rv, p.value_down.shape[1])
        if rk > p.key_rank or rv > p.value_rank:
            raise ValueError(f"site '{name}': cannot truncate ranks ({p.key_rank}, {p.value_rank}) up to ({rk}, {rv}).")
        sites[name] = p.like(key_down=p.key_down[..., :rk], key_up=p.key_up[..., :rk],
                             value_down=p.value_down[..., :rv], value_up=p.value_up[..., :rv])
    report = {k: v for k, v in projections.report.items() if k != "sites"} | {"truncated": True}
    return Projections(sites, dict(projections.shapes), projections.method, report)

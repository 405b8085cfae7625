"""Rank allocation under a KV-cache budget: per site and separately for keys and values.

`Budget(kv_fraction=0.5)` asks for cached bytes = 0.5 × the uncompressed cache (keys and values of every
site together); `Budget(max_error=0.02)` instead asks for the smallest cache whose mean relative error (over
sites, keys and values) stays within 0.02. From each site's error-vs-rank profile (the calibrator's own relative key-logit and
value-output errors, fitted at every rank), ranks are lowered greedily: each step removes the rank unit
with the smallest increase of error per cached number saved, until the budget is met. Keys and values
compete for the same bytes, so the cheaper side (keys, on SmolLM2) is compressed further.
"""
from __future__ import annotations

import heapq
import math

import torch
from dataclasses import dataclass

from .. import quant
from ..projections import SiteProjection
from .base import Calibrator, get_calibrator, site_errors
from .stats import SiteStats


@dataclass(frozen=True)
class Budget:
    """What the allocation must meet: a KV-bytes fraction, or an error budget, not both.

    kv_fraction: cached numbers after / before, keys and values of all sites together (e.g. 0.5).
    max_error: the mean, over sites and over keys/values, of the calibrator's relative error (key-logit error
        for keys, value-output error for values) may not exceed this; the cache is made as small as the greedy
        order allows within it.
    """
    kv_fraction: float | None = None
    multiple: int = 1           # ranks stay multiples of this (e.g. 8 or 16 for GPU kernels)
    min_rank: int = 1
    max_error: float | None = None
    # "calibrator": each side's own relative error (key-logit error for keys, value-output error for values);
    # "output": one currency for both, the relative attention-output error through softmax and W_O on the
    # calibration sequences with only that side projected (needs samples: kvfx.calibrate keeps them)
    measure: str = "calibrator"
    # None: kv_fraction counts cached numbers; "int8" / "int5" / "int4" / "int3" / "int2": kv_fraction counts bytes of a
    # low-bit latent cache (kvfx.compress(..., quantize=...); kvfx.quant.row_bytes per row) against an uncompressed
    # 16-bit cache
    quantize: str | None = None

    def __post_init__(self):
        if (self.kv_fraction is None) == (self.max_error is None):
            raise ValueError("Budget needs exactly one of kv_fraction (e.g. Budget(0.5)) or max_error "
                             "(e.g. Budget(max_error=0.02)).")
        if self.kv_fraction is not None and (not isinstance(self.kv_fraction, (int, float)) or
                                             math.isnan(self.kv_fraction) or not 0.0 < self.kv_fraction <= 1.0):
            raise ValueError(f"Budget kv_fraction must be in (0, 1], got {self.kv_fraction!r}.")
        if self.max_error is not None and (not isinstance(self.max_error, (int, float)) or
                                           math.isnan(self.max_error) or self.max_error < 0):
            raise ValueError(f"Budget max_error must be a number >= 0, got {self.max_error!r}.")
        if self.measure not in ("calibrator", "output"):
            raise ValueError(f"Budget measure must be 'calibrator' or 'output', got {self.measure!r}.")
        quant.check(self.quantize, "Budget quantize")
        if not (self.quantize is None or self.quantize in quant.FORMATS):
            raise ValueError("Budget quantize prices ranks in one whole-row format (None, 'int8', 'int5', 'int4', "
                             f"'int3', 'int2'), got {self.quantize!r}; bits per direction come from kvfx.allocate_bits instead.")
        if self.multiple < 1 or self.min_rank < 1:
            raise ValueError("Budget multiple and min_rank must be >= 1.")


def fits_at(cal: Calibrator, st: SiteStats, ranks: list[int]):
    """(rank, projection, report) for each rank (K and V at that rank). A `nested` calibrator fits once at
    full rank and is sliced (report: key_err / value_err of the slice); others fit at every rank."""
    if not getattr(cal, "nested", False):
        for r in ranks:
            yield (r, *cal.fit(st, r, r))
        return
    full, _ = cal.fit(st, st.head_dim, st.head_dim)
    for r in ranks:
        p = SiteProjection(*(t[..., :r] for t in (full.key_down, full.key_up, full.value_down, full.value_up)))
        yield r, p, site_errors(st, p)


def output_profiles(cal: Calibrator, stats: dict[str, SiteStats], ranks: list[int]) -> dict:
    """Like `profiles`, measured as relative attention-output error (distill.output_loss) with only keys
    (values) projected at each rank: keys and values, and all layers, in one currency."""
    from .distill import output_loss, require_samples
    out = {}
    for name, st in stats.items():
        require_samples(st, "Budget(measure='output')")
        eye = torch.eye(st.head_dim).expand(st.kv_heads, -1, -1)
        with torch.no_grad():
            for r, p, _ in fits_at(cal, st, ranks):
                out.setdefault((name, "key"), {})[r] = float(output_loss(st, p.key_down, eye, b=p.key_up))
                out.setdefault((name, "value"), {})[r] = float(output_loss(st, eye, p.value_down, d=p.value_up))
    return out


def profiles(cal: Calibrator, stats: dict[str, SiteStats], ranks: list[int]) -> dict:
    """{(site, 'key'|'value'): {rank: relative error}} from fitting the calibrator at each rank.

    A calibrator whose fit is expensive per rank (a trained one) may name a closed-form `profile_proxy`
    calibrator whose profiles stand in for its own."""
    out = {}
    for name, st in stats.items():
        for r, _, rep in fits_at(cal, st, ranks):
            out.setdefault((name, "key"), {})[r] = float(rep["key_err"])
            out.setdefault((name, "value"), {})[r] = float(rep["value_err"])
    return out


def allocate_ranks(cal: Calibrator, stats: dict[str, SiteStats], budget: Budget) -> tuple[dict, dict]:
    """({site: (key_rank, value_rank)}, report) meeting `budget` from closed-form error profiles of the calibration
    statistics (inside kvfx.calibrate(rank=Budget(...))). Not kvfx.allocate, which re-allocates calibrated
    projections from a measured model-output sensitivity profile (calib/sensitivity.py)."""
    width = {n: st.head_dim for n, st in stats.items()}
    heads = {n: st.kv_heads for n, st in stats.items()}
    d = max(width.values())
    step = budget.multiple
    grid = sorted({r for r in range(step, d + 1, step)} | {min(w, d) for w in width.values()} |
                  {budget.min_rank})
    if getattr(cal, "profile_proxy", None):   # e.g. stiefel: one training per candidate rank would be too slow
        cal = get_calibrator(cal.profile_proxy)
    prof = (output_profiles if budget.measure == "output" else profiles)(cal, stats, [r for r in grid if r <= d])
    ranks, used, total_err = greedy(prof, width, heads, budget, scale=1.0 / len(prof))
    err = {n: (prof[(n, "key")][ranks[n][0]], prof[(n, "value")][ranks[n][1]]) for n in width}
    return ranks, {"budget": budget.kv_fraction, "max_error": budget.max_error, "measure": budget.measure,
                   "achieved": used, "mean_err": total_err / len(prof), "multiple": step, "predicted_err": err}


def greedy(prof: dict, width: dict, heads: dict, budget: Budget, scale: float = 1.0, base: float = 0.0):
    """Lower ranks from the top of each profile, one profile step at a time, cheapest error increase per cached
    number first.

    prof: {(site, 'key'|'value'|'latent'): {rank: error}} ('latent': one shared K+V latent, one rank out; starting from its highest rank, at most the site's width);
    width / heads: per site, the uncompressed cache (the KV fraction's denominator). Stops when the KV fraction
    reaches budget.kv_fraction, or before base + scale·(summed error) would pass budget.max_error.
    Returns ({site: (key_rank, value_rank), or the latent rank}, KV fraction kept, summed error)."""
    rank = {key: max(p) for key, p in prof.items()}
    total = sum(heads[n] * 2 * width[n] for n in width)

    def cost(key, r):  # 16-bit numbers' worth of bytes the rows of (site, side) take at rank r
        return heads[key[0]] * quant.row_bytes(budget.quantize, r) / 2

    used = sum(cost(key, r) for key, r in rank.items())
    err = sum(p[rank[key]] for key, p in prof.items())

    def next_step(key):  # the next lower profile rank that saves bytes, and its error increase per number saved
        r = rank[key]
        lower = [x for x in prof[key] if budget.min_rank <= x < r and cost(key, x) < cost(key, r)]
        if not lower:
            return None
        r2 = max(lower)
        return (prof[key][r2] - prof[key][r]) / (cost(key, r) - cost(key, r2)), r2

    def more(key, r2) -> bool:
        if budget.kv_fraction is not None:
            return used > budget.kv_fraction * total + 1e-9
        return base + scale * (err + prof[key][r2] - prof[key][rank[key]]) <= budget.max_error + 1e-12

    heap = []
    for key in prof:
        nxt = next_step(key)
        if nxt:
            heapq.heappush(heap, (nxt[0], key, nxt[1]))
    while heap and more(heap[0][1], heap[0][2]):
        _, key, r2 = heapq.heappop(heap)
        err += prof[key][r2] - prof[key][rank[key]]
        used -= cost(key, rank[key]) - cost(key, r2)
        rank[key] = r2
        nxt = next_step(key)
        if nxt:
            heapq.heappush(heap, (nxt[0], key, nxt[1]))
    if budget.kv_fraction is not None and used > budget.kv_fraction * total + 1e-9:
        raise ValueError(f"cannot meet a KV budget of {budget.kv_fraction}: even rank {budget.min_rank} "
                         f"everywhere keeps {used / total:.3f} of the cache. Raise the budget or lower min_rank.")
    return ({n: rank[(n, "latent")] if (n, "latent") in rank else (rank[(n, "key")], rank[(n, "value")])
             for n in width}, used / total, err)


def allocate(cal: Calibrator, stats: dict[str, SiteStats], budget: Budget) -> tuple[dict, dict]:
    """Deprecated name of `allocate_ranks` (kept one version; kvfx.allocate is the sensitivity-based one)."""
    import warnings
    warnings.warn("kvfx.calib.allocate.allocate is renamed allocate_ranks (kvfx.allocate is a different function: "
                  "sensitivity-based re-allocation).", DeprecationWarning, stacklevel=2)
    return allocate_ranks(cal, stats, budget)

"""Measured sensitivity and the ranks it buys: how much the *model's* output moves when one site is cut.

Local errors (a site's key-logit or attention-output error) do not see how errors compound through the
layers above, and budgets allocated from them lose to uniform ranks on SmolLM2 (benchmarks/RESULTS.md). Here
each site's keys — then its values — are cut alone to every rank of a grid, with every other site at full
width, and the model's next-token KL against the uncompressed model is measured on calibration windows:

    profile[site][side][r] = KL(p_original ‖ p_kvfx),  only `side` of `site` cut to rank r

(kvfx's live mode: one graph, columns beyond r masked, so nothing recompiles). `allocate` then spends a KV
budget greedily on the smallest predicted KL increase per cached number saved (KL increases add up to first
order) and truncates the projections — MatryoshkaKV's per-layer rate search, for any nested projections
(pca, eigen, kqsvd, matryoshka, nested `refine` artefacts, fitted at full rank).

    full = kvfx.calibrate(model, windows, "kqsvd", rank=1.0, granularity="layer")
    prof = kvfx.sensitivity(model, full, windows[:2])
    proj = kvfx.allocate(full, prof, kvfx.Budget(0.5))
"""
from __future__ import annotations

import time
from typing import Iterable

import torch
from tqdm.auto import tqdm

from .. import quant
from ..projections import Projections, resolve_rank
from ..rotate import check_unrotated
from .allocate import Budget, greedy
from ..passes.compile import original_module
from .live import LiveModel, Student, frozen, sequences
from .matryoshka import truncate


def default_grid(width: int, steps: int = 8) -> list[int]:
    """Ranks probed for a site of this width: multiples of width/steps below the width."""
    return sorted({max(1, round(width * i / steps)) for i in range(1, steps)} - {width})


def sensitivity(model: torch.nn.Module, projections: Projections, batches: Iterable, steps: int = 8,
                ranks: tuple | None = None, progress: bool = True, quantize: str | None = None) -> dict:
    """{"base": KL with every site at its top rank, "sites": {site: {"key": {rank: KL}, "value": {rank: KL}}},
    "tokens", "seconds"} — a shared K+V latent (granularity="kv") has one entry, {"latent": {rank: KL}}, its
    ranks fractions of 2·h·d — measured on `batches` (a few windows; each probe runs one forward per window).

    projections: nested projections (their leading columns are the lower-rank projection), usually fitted at
    rank 1.0. ranks: the ranks to probe (fractions of the site's input width or ints); the highest is the top
    every other site stays at (= "base") and the most `allocate` may give. Default: the `rank_set` a nested
    `refine` artefact was trained on (its other widths were never trained), else `default_grid(width, steps)`
    plus the full width. quantize ("int8", "int4"): probe through the latents' rounding as that cache stores
    them (kvfx.quant), so the profile prices precision too; a cut column is a zero, which rounds exactly as a
    narrower row. Cost: 2 × sites × (grid points − 1) forwards per window (1 × for shared latents)."""
    module = original_module(model, "sensitivity")
    if not isinstance(projections, Projections):
        raise TypeError(f"sensitivity needs kvfx.Projections (e.g. kvfx.calibrate(..., rank=1.0)), "
                        f"got {type(projections).__name__}.")
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"sensitivity: steps (grid points per site) must be an int >= 2, got {steps!r}.")
    quant.check(quantize, "sensitivity: quantize")
    projections.validate()
    check_unrotated(projections, "sensitivity")
    ranks = ranks or (projections.report.get("refine") or {}).get("rank_set")
    grids = {n: _grid(n, p, ranks, steps) for n, p in projections.sites.items()}
    seqs = sequences(batches, "sensitivity")
    idx = list(range(len(seqs)))
    t0 = time.time()
    with frozen(module):
        p0 = next(module.parameters(), None)
        student = Student(projections, False, p0.device if p0 is not None else torch.device("cpu"))
        live = LiveModel(module, student, seqs, quantize=quantize)
        top = {n: (g[-1], g[-1]) for n, g in grids.items()}
        student.set_ranks(top)
        base = live.mean_kl(idx)
        probes = [(n, side, r) for n, g in grids.items() for side in sides(projections.sites[n]) for r in g[:-1]]
        sites = {n: {side: {g[-1]: base} for side in sides(projections.sites[n])} for n, g in grids.items()}
        for name, side, r in tqdm(probes, desc="kvfx sensitivity", disable=not progress):
            t = top[name][0]
            student.set_ranks(top | {name: {"key": (r, t), "value": (t, r)}.get(side, (r, r))})
            sites[name][side][r] = live.mean_kl(idx)
        student.set_ranks(None)
    return {"base": base, "sites": sites, "tokens": int(seqs.numel()), "seconds": round(time.time() - t0, 1),
            "quantize": quantize}


def sides(p) -> tuple[str, ...]:
    """What a site's profile probes: keys and values apart, or the one latent of a shared K+V latent."""
    return ("latent",) if p.shared else ("key", "value")


def _grid(name: str, p, ranks, steps: int) -> list[int]:
    if p.key_rank != p.value_rank:
        raise ValueError(f"sensitivity: site '{name}' has key rank {p.key_rank} and value rank {p.value_rank}; "
                         "start from projections at one width for keys and values (e.g. rank=1.0).")
    width = p.input_width
    if ranks is None:
        return default_grid(p.key_rank, steps) + [p.key_rank]
    grid = sorted({resolve_rank(r, width) for r in ranks})
    if grid[-1] > p.key_rank:
        raise ValueError(f"sensitivity: rank {grid[-1]} asked for site '{name}', whose projections have "
                         f"{p.key_rank} columns; fit them at a higher rank (e.g. rank=1.0) or lower the ranks.")
    return grid


def allocate(projections: Projections, profile: dict, budget: Budget) -> Projections:
    """`projections` truncated per site and per side to meet `budget` (kv_fraction of the uncompressed cache,
    or max_error = predicted model KL in nats), from a `sensitivity` profile of the same projections.

    The allocation (ranks, predicted KL, achieved fraction) is recorded in report["allocation"]."""
    if not isinstance(budget, Budget):
        raise TypeError(f"allocate needs a kvfx.Budget (e.g. kvfx.Budget(0.5)), got {type(budget).__name__}.")
    sites = profile.get("sites") if isinstance(profile, dict) else None
    if not sites or set(sites) != set(projections.sites):
        raise ValueError("allocate: the profile does not cover these projections' sites; measure it with "
                         "kvfx.sensitivity(model, projections, windows) on the same projections.")
    prof, width, heads = {}, {}, {}
    for name, p in projections.sites.items():
        width[name], heads[name] = p.key_down.shape[1], p.key_down.shape[0]
        for side in sides(p):
            if side not in sites[name]:
                raise ValueError(f"allocate: the profile of site '{name}' has no '{side}' entry (it was measured on "
                                 "projections of another form); measure it on these projections.")
            points = {int(r): float(v) for r, v in sites[name][side].items()}
            if max(points) > min(p.key_rank, p.value_rank):
                raise ValueError(f"allocate: the profile of site '{name}' reaches rank {max(points)}, these "
                                 f"projections have {min(p.key_rank, p.value_rank)} columns; measure it on them.")
            prof[(name, side)] = points
    if budget.max_error is not None and float(profile["base"]) > budget.max_error:
        raise ValueError(f"allocate: the profile's top ranks already give KL {float(profile['base']):.4g} > "
                         f"max_error {budget.max_error}; raise max_error or probe higher ranks.")
    ranks, achieved, total = greedy(prof, width, heads, budget, base=float(profile["base"]) * (1 - len(prof)))
    out = truncate(projections, ranks)
    out.report["allocation"] = {
        "budget": budget.kv_fraction, "max_error": budget.max_error, "measure": "model KL", "achieved": achieved,
        "predicted_kl": float(profile["base"]) * (1 - len(prof)) + total,
        "profile_tokens": profile.get("tokens"), "quantize": budget.quantize, "probed": profile.get("quantize"),
        "ranks": {n: list(r) if isinstance(r, tuple) else r for n, r in ranks.items()}}
    return out

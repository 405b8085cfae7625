"""`kvfx.allocate_bits`: rank and precision as one allocation — bits per latent direction under a byte budget.

A cached shared K+V latent row is a transform code: kqsvd picks the directions and orders them. Direction i of a
site carries variance var_i = a_iᵀ G_in a_i and costs w_i = b_iᵀ G_out b_i per unit of squared error (the
weighted key-logit + value-output objective of kvfx.calib.shared); its importance is λ_i = var_i · w_i. Three
steps, all folded into the projections (no runtime cost):

1. **Balance** each direction to var_i = w_i ∝ √λ_i (A_i·t_i, B_i / t_i: attention unchanged). A band of
   directions rounded together then costs (Σ √λ_i)² / n per unit of the format's relative error — the least any
   per-column scaling gives (Cauchy–Schwarz) — where the cut-balanced factors (‖A_i‖ = ‖B_i‖) cost (Σ var)(Σ w) / n.
2. **Bands**: leading directions in int8, then int5, int4, int3, int2, the rest dropped (0 bits) — reverse
   water-filling over λ, chosen per site by exhaustive search over the band edges (multiples of 16 columns)
   minimising the predicted error Σ_bands ε_b (Σ_band √λ)² / n_band + Σ_dropped λ within the site's share of the
   budget. ε_b is the measured relative error of kvfx.quant's format on Gaussian rows (int8 ~4e-5, int5 ~2.0e-3, int4
   ~1.1e-2, int3 ~3.3e-2, int2 ~0.13: each bit between 2 and 5 buys ~3.4-5x less error, so int3 and int5 fill the
   steps a water-filling wants between int2, int4 and int8; int5 cut the predicted error of SmolLM2's layers by 30 %
   at 25 % of the bytes and 9 % at 12.5 %, RESULTS.md "domains-int5").
   levels=(8, 5, 4, 3, "e8") takes kvfx.quant's E8 lattice codes (2 bits a number, ε ~0.096) in int2's place.
3. **Rotate within each band** by a seeded random orthogonal matrix (kvfx.rotate's reason: a token's energy spread
   over the band's columns, so its group scales round less).

The projections record their formats ({site: "int8x64+int4x224+int2x64"}, kvfx.quant bands), so
`kvfx.compress(model, projections)` stores exactly those bytes. Measured on SmolLM2 through the cache on four text
domains: benchmarks/RESULTS.md, section "domains".
"""
from __future__ import annotations

import functools
import itertools
import math

import torch

from .. import quant
from ..projections import Projections
from ..rotate import check_unrotated, random_orthogonal, rotation_seeds
from .shared import DEFAULT_KEY_WEIGHT, _blocks

BITS = (8, 5, 4, 3, 2)   # the band formats, most precise first (0 bits: dropped)
LEVELS = (8, 5, 4, 3, "e8", 2)  # what `levels` may name, most precise first ("e8": kvfx.quant's lattice codes)
STEP = 16          # band edges at multiples of this many columns


def format_name(level) -> str:
    """kvfx.quant's name of a level: 4 -> "int4", "e8" -> "e8"."""
    return level if isinstance(level, str) else f"int{level}"


def with_lattice(levels) -> tuple:
    """`levels` with e8 lattice codes in int2's place: (8, 5, 4, 3, 2) -> (8, 5, 4, 3, "e8")."""
    return tuple("e8" if b == 2 else b for b in levels)


@functools.lru_cache(maxsize=None)
def format_error(bits) -> float:
    """Relative squared error of kvfx.quant's `int{bits}` rows (or "e8"'s) on iid Gaussian numbers (64 wide; seeded)."""
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    return float(((quant.fake_quant(x, format_name(bits)) - x) ** 2).mean() / (x ** 2).mean())


def spectrum(st, proj, key_weight: float = DEFAULT_KEY_WEIGHT) -> tuple[torch.Tensor, torch.Tensor]:
    """(var_i, w_i) of a shared latent's directions: its variance over the calibration tokens and its weight in
    the fit's objective (relative key-logit error × key_weight + relative value-output error), float64."""
    g_in, g_q, g_o = _blocks(st)
    tk, tv = float((st.key_joint @ g_q).trace()), float((st.value_joint @ g_o).trace())
    g_out = torch.block_diag(key_weight * g_q / tk if tk > 0 else g_q, g_o / tv if tv > 0 else g_o)
    hd = st.kv_heads * st.head_dim
    a = torch.cat([proj.key_down[0], proj.value_down[0]], 0).double()
    b = torch.cat([proj.key_up.reshape(hd, -1), proj.value_up.reshape(hd, -1)], 0).double()
    return torch.einsum("ir,ij,jr->r", a, g_in, a), torch.einsum("ir,ij,jr->r", b, g_out, b)


def frontier(lam: torch.Tensor, bits=BITS, step: int = STEP,
             rounding_weight: float = 1.0) -> list[tuple[int, float, tuple]]:
    """Every band choice worth having for importances `lam` (descending): (row bytes, predicted error in units of
    lam, ((bits, columns), …)), bytes ascending and error strictly descending (the Pareto front over the band
    edges, multiples of `step` columns; error ρ·Σ_bands ε_b (Σ_band √λ)² / n_band + Σ_dropped λ, ρ =
    `rounding_weight`: the price of a unit of rounding error against a unit of dropped-direction error)."""
    lam = lam.double().clamp_min(0)
    n = lam.numel()
    root = torch.cat([lam.new_zeros(1), lam.sqrt().cumsum(0)]).tolist()
    cum = torch.cat([lam.new_zeros(1), lam.cumsum(0)]).tolist()
    edges = sorted(set(range(0, n + 1, step)) | {n})
    row_bytes = {(b, w): quant.row_bytes(format_name(b), w) for b in bits for w in range(1, n + 1)
                 if not (b == "e8" and w % 8)}  # e8: whole lattice points of 8 columns
    points = {}
    for cuts in itertools.combinations_with_replacement(edges, len(bits)):
        nbytes, err, lo, bands = 0, 0.0, 0, []
        for b, hi in zip(bits, cuts):
            if hi > lo:
                if (b, hi - lo) not in row_bytes:
                    break
                nbytes += row_bytes[b, hi - lo]
                err += rounding_weight * format_error(b) * (root[hi] - root[lo]) ** 2 / (hi - lo)
                bands.append((b, hi - lo))
            lo = hi
        else:
            err += cum[n] - cum[lo]
            if bands and err < points.get(nbytes, (float("inf"),))[0]:
                points[nbytes] = (err, tuple(bands))
    front, best = [], float("inf")
    for nbytes in sorted(points):
        err, bands = points[nbytes]
        if err < best:
            front.append((nbytes, err, bands))
            best = err
    return front


def choose_bands(lam: torch.Tensor, budget_bytes: float, bits=BITS, step: int = STEP):
    """Band edges for importances `lam` (descending): ((bits, columns), …) of least predicted error whose row
    fits `budget_bytes`, and that error (relative to Σ lam). Raises if not even one column fits."""
    front = frontier(lam, bits, step)
    fits = [pt for pt in front if pt[0] <= budget_bytes]
    if not fits:
        raise ValueError(f"a budget of {budget_bytes:.1f} bytes per token and site is below the smallest band "
                         f"({front[0][0]} bytes: {front[0][2][0][1]} columns at {format_name(front[0][2][0][0])}); raise the "
                         "budget.")
    total = float(lam.double().clamp_min(0).sum())
    return fits[-1][2], fits[-1][1] / total if total > 0 else 0.0


def spend(fronts: dict, weights: dict, total_bytes: float) -> dict:
    """One point of each site's frontier, {site: (bytes, error, bands)}, of least Σ weight·error with Σ bytes ≤
    total_bytes — exactly: a multiple-choice knapsack over whole bytes (dynamic programming, one pass per site over
    every byte count). Raises if the cheapest points do not fit."""
    cap = int(math.floor(total_bytes + 1e-9))
    floor = sum(f[0][0] for f in fronts.values())
    if floor > cap:
        raise ValueError(f"the byte budget ({total_bytes:.0f} bytes per token) is below the cheapest bands of "
                         f"every site ({floor} bytes: {min(step_cols(f) for f in fronts.values())} columns of "
                         "int2 each); raise the budget.")
    best = torch.zeros(cap + 1, dtype=torch.float64)  # least cost of the sites so far within b bytes
    choices = []
    for name, front in fronts.items():
        new = torch.full_like(best, math.inf)
        arg = torch.full((cap + 1,), -1, dtype=torch.long)
        for i, (nbytes, err, _) in enumerate(front):
            if nbytes > cap:
                break
            cand = torch.full_like(best, math.inf)
            cand[nbytes:] = best[:cap + 1 - nbytes] + weights[name] * err
            better = cand < new
            new, arg = torch.where(better, cand, new), torch.where(better, i, arg)
        best = new
        choices.append((name, arg))
    chosen, b = {}, cap
    for name, arg in reversed(choices):
        pt = fronts[name][int(arg[b])]
        chosen[name], b = pt, b - pt[0]
    return {name: chosen[name] for name in fronts}


def step_cols(front) -> int:
    return sum(n for _, n in front[0][2])


def allocate_bits(stats: dict, projections: Projections, budget: float, seed: int = 0,
                  key_weight: float = DEFAULT_KEY_WEIGHT, profile: dict | None = None,
                  levels: tuple[int, ...] = BITS, exact: tuple[int, int] = (0, 0),
                  context: int | None = None, rounding_weight: float = 1.0) -> Projections:
    """Shared K+V latents (fit(stats, "kqsvd", rank=1.0, granularity="kv")) cut, balanced, banded and rotated so
    that the cached rows take `budget` × the bytes of the sites' 16-bit keys and values (module docstring).
    stats: the collect_stats result the projections were fitted to. profile: a kvfx.sensitivity profile of the
    same projections; with it, bytes move between sites (layers) to where the model's output loses least, each
    site's predicted error priced by its measured KL per unit of error; without it, every site gets the same share
    of its bytes. levels: the band formats to choose from (bits, a subset of LEVELS; (8, 4, 3, 2) is the allocation
    before int5 existed, (8, 4, 2) before int3; "e8" for int2: lattice codes). exact=(sinks, recent): the formats also keep the latents of the first `sinks` and the last
    `recent` tokens in 16 bits ("…|sinks4|recent32", kvfx.quant.exact_of); their bytes, a fixed amount a cache,
    are charged to each band choice at `context` tokens (16 bits × its width × the slots / context, rounded up to
    whole bytes a token), so a cache of `context` tokens holds no more than the budget. rounding_weight (ρ, in
    (0, 1]): the price of a unit of rounding error against a unit of dropped-direction error in the band choice;
    below 1 the allocation keeps more directions in coarser bands (at 12.5 % on SmolLM2 0.5 measured better on
    every domain than 1, RESULTS.md "domains-rounding"; kvfx.best_config passes its ROUNDING_WEIGHT). The result
    records its formats (report["quantize"], a dict {site: bands}) and the predicted relative error (of the
    ρ-priced objective) and bytes per site (report["bits"])."""
    if not isinstance(projections, Projections):
        raise TypeError(f"allocate_bits needs kvfx.Projections, got {type(projections).__name__}.")
    if not (isinstance(budget, (int, float)) and 0 < budget < 1):
        raise ValueError(f"budget must be a fraction of the 16-bit KV-cache bytes in (0, 1), got {budget!r}.")
    check_levels(levels)
    if (isinstance(rounding_weight, bool) or not isinstance(rounding_weight, (int, float))
            or not 0 < rounding_weight <= 1):
        raise ValueError("rounding_weight must be in (0, 1] (the price of rounding error against dropped-direction "
                         f"error; 1 prices them alike), got {rounding_weight!r}.")
    check_unrotated(projections, "allocate_bits")
    not_shared = [n for n, p in projections.sites.items() if not p.shared]
    if not_shared:
        raise ValueError(f"allocate_bits takes shared K+V latents (fit(..., granularity='kv')); {not_shared[0]} and "
                         f"{len(not_shared) - 1} more sites are not.")
    missing = [n for n in projections.sites if n not in stats]
    if missing:
        raise ValueError(f"allocate_bits needs the statistics of every site; {missing[0]} has none (pass the "
                         "collect_stats result the projections were fitted to).")
    suffix, cost = _exact_cost(exact, context)
    spectra = {n: spectrum(stats[n], p, key_weight) for n, p in projections.sites.items()}
    weights = None if profile is None else kl_per_error(projections, spectra, profile)
    plan = _plan(projections, spectra, budget, weights, tuple(levels), cost,  # every site before any is built
                 float(rounding_weight))
    gen = torch.Generator().manual_seed(seed)
    sites = {}
    for name, p in projections.sites.items():
        var, w = spectra[name]
        bands = plan[name][2]
        keep = torch.argsort(var * w, descending=True)[: sum(n for _, n in bands)]
        t = (w[keep] / var[keep].clamp_min(1e-300)).clamp_min(1e-300) ** 0.25
        t = t * (var[keep].sum() / (var[keep] * t * t).sum()).sqrt()  # the latent's total variance kept
        rot = torch.block_diag(*[random_orthogonal(n, gen) for _, n in bands])
        turn = lambda x, s: ((x.double()[..., keep] * s) @ rot).to(x.dtype).contiguous()  # noqa: E731
        sites[name] = p.like(key_down=turn(p.key_down, t), value_down=turn(p.value_down, t),
                             key_up=turn(p.key_up, 1 / t), value_up=turn(p.value_up, 1 / t))
    lam_total = {n: float((v * w).clamp_min(0).sum()) for n, (v, w) in spectra.items()}
    report = dict(projections.report) | {
        "quantize": {n: "+".join(f"{format_name(b)}x{c}" for b, c in plan[n][2]) + suffix for n in plan},
        "rotation": {"seeds": rotation_seeds(projections) + [seed]},
        "bits": {"budget": budget, "formats": list(levels), "step": STEP,
                 "across_sites": "measured KL per unit of error" if weights else None,
                 "rounding_weight": float(rounding_weight),
                 "row_bytes": {n: plan[n][0] - cost(_width(plan[n][2])) for n in plan},
                 "exact": {"sinks": exact[0], "recent": exact[1], "context": context,
                           "bytes_per_token": {n: cost(_width(plan[n][2])) for n in plan}},
                 "predicted_error": {n: plan[n][1] / lam_total[n] if lam_total[n] > 0 else 0.0 for n in plan}}}
    return Projections(sites, dict(projections.shapes), projections.method, report)


def _width(bands) -> int:
    return sum(n for _, n in bands)


def _exact_cost(exact, context):
    """The format suffix of `exact` = (sinks, recent) and the bytes a token its rows cost a latent of `width`
    columns at `context` tokens (whole bytes, rounded up)."""
    if not (isinstance(exact, (tuple, list)) and len(exact) == 2 and all(isinstance(x, int) and x >= 0 for x in exact)):
        raise ValueError(f"exact must be (sinks, recent), two token counts >= 0, got {exact!r}.")
    if not sum(exact):
        return "", lambda width: 0
    if not isinstance(context, int) or context < 1:
        raise ValueError("exact rows take a fixed number of bytes a cache: give the context (tokens) the budget is "
                         f"counted at, e.g. context=512; got {context!r}.")
    suffix = quant.exact_suffix(*exact)
    return suffix, lambda width: math.ceil(quant.exact_bytes(suffix, width) / context - 1e-9)


def check_levels(levels) -> None:
    """Refuse band formats allocate_bits cannot choose from (distinct, from LEVELS, most precise first)."""
    if not (isinstance(levels, (tuple, list)) and levels and all(b in LEVELS for b in levels)
            and list(levels) == sorted(set(levels), key=LEVELS.index)):
        raise ValueError(f"levels must be distinct band formats from {LEVELS}, most precise first, e.g. (8, 4, 2) or "
                         f"(8, 5, 4, 3, 'e8'); got {levels!r}.")


def _plan(projections: Projections, spectra: dict, budget: float, weights: dict | None, levels=BITS,
          cost=lambda width: 0, rounding_weight: float = 1.0) -> dict:
    """{site: (row bytes, predicted error in λ units, bands)} within budget × the sites' 16-bit row bytes; `cost`:
    bytes a token that come with a latent of that width (exact rows), added to each band choice's row bytes."""
    shares = {n: budget * 4 * s.kv_heads * s.head_dim for n, s in projections.shapes.items()}
    fronts = {n: [(b + cost(_width(bands)), e, bands)
                  for b, e, bands in frontier(torch.sort(v * w, descending=True).values, levels,
                                                rounding_weight=rounding_weight)]
              for n, (v, w) in spectra.items()}
    if weights is None:
        plan = {}
        for n, f in fronts.items():
            fits = [pt for pt in f if pt[0] <= shares[n]]
            if not fits:
                exact = cost(step_cols(f))
                raise ValueError(f"a budget of {budget:g} gives site {n} {shares[n]:.1f} bytes per token, below the "
                                 f"smallest band ({f[0][0]} bytes: {step_cols(f)} columns of {format_name(f[0][2][0][0])}"
                                 + (f", {exact} of them its exact rows'" if exact else "") +
                                 "); raise the budget" + (", keep fewer exact rows or count them at a longer context."
                                                          if exact else "."))
            plan[n] = fits[-1]
        return plan
    return spend(fronts, weights, sum(shares.values()))


KL_NOISE = 1e-6  # nats a token: KL differences below this are float round-off (they differ by CPU), not measured


def kl_per_error(projections: Projections, spectra: dict, profile: dict) -> dict:
    """{site: model KL per unit of predicted error} from a kvfx.sensitivity profile of these projections: the KL
    of the two least-cut probes over the importance λ they dropped (columns in the projections' order)."""
    sites = profile.get("sites") if isinstance(profile, dict) else None
    if not sites or set(sites) != set(projections.sites):
        raise ValueError("allocate_bits: the profile does not cover these projections' sites; measure it with "
                         "kvfx.sensitivity(model, projections, windows) on the same projections.")
    base, out = float(profile.get("base", 0.0)), {}
    for name, (var, w) in spectra.items():
        lam = (var * w).clamp_min(0)
        points = {int(r): float(v) for r, v in sites[name].get("latent", {}).items() if int(r) < lam.numel()}
        if not points:
            raise ValueError(f"allocate_bits: the profile of site '{name}' has no cut latent ranks (it was measured "
                             "on projections of another form); measure it on these projections.")
        top = sorted(points)[-2:]
        dropped = sum(float(lam[r:].sum()) for r in top)
        kl = sum(points[r] - base for r in top)
        out[name] = kl / dropped if kl > KL_NOISE and dropped > 0 else 0.0
    if not any(out.values()):
        raise ValueError("allocate_bits: the profile measures no KL at its two least-cut ranks (the directions they "
                         "drop carry nothing); probe lower ranks, e.g. kvfx.sensitivity(..., ranks=(0.5, 0.75, 1.0)).")
    floor = min(v for v in out.values() if v > 0) * 1e-3  # a site never measured to matter still costs a little
    return {n: max(v, floor) for n, v in out.items()}

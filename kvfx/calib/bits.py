"""`kvfx.allocate_bits`: rank and precision as one allocation — bits per latent direction under a byte budget.

A cached shared K+V latent row is a transform code: kqsvd picks the directions and orders them. Direction i of a
site carries variance var_i = a_iᵀ G_in a_i and costs w_i = b_iᵀ G_out b_i per unit of squared error (the
weighted key-logit + value-output objective of kvfx.calib.shared); its importance is λ_i = var_i · w_i. Three
steps, all folded into the projections (no runtime cost):

1. **Balance** each direction to var_i = w_i ∝ √λ_i (A_i·t_i, B_i / t_i: attention unchanged). A band of
   directions rounded together then costs (Σ √λ_i)² / n per unit of the format's relative error — the least any
   per-column scaling gives (Cauchy–Schwarz) — where the cut-balanced factors (‖A_i‖ = ‖B_i‖) cost (Σ var)(Σ w) / n.
2. **Bands**: leading directions in int8, then int4, then int2, the rest dropped (0 bits) — reverse water-filling
   over λ, chosen per site by exhaustive search over the band edges (multiples of 16 columns) minimising the
   predicted error Σ_bands ε_b (Σ_band √λ)² / n_band + Σ_dropped λ within the site's share of the budget. ε_b is the
   measured relative error of kvfx.quant's format on Gaussian rows (int8 ~3e-5, int4 ~9e-3, int2 ~0.13).
3. **Rotate within each band** by a seeded random orthogonal matrix (kvfx.rotate's reason: a token's energy spread
   over the band's columns, so its group scales round less).

The projections record their formats ({site: "int8x64+int4x224+int2x64"}, kvfx.quant bands), so
`kvfx.compress(model, projections)` stores exactly those bytes. Measured on SmolLM2 through the cache on four text
domains: benchmarks/RESULTS.md, section "domains".
"""
from __future__ import annotations

import functools
import itertools

import torch

from .. import quant
from ..projections import Projections
from ..rotate import check_unrotated, random_orthogonal, rotation_seeds
from .shared import DEFAULT_KEY_WEIGHT, _blocks

BITS = (8, 4, 2)   # the band formats, most precise first (0 bits: dropped)
STEP = 16          # band edges at multiples of this many columns


@functools.lru_cache(maxsize=None)
def format_error(bits: int) -> float:
    """Relative squared error of kvfx.quant's `int{bits}` rows on iid Gaussian numbers (64 wide; seeded)."""
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    return float(((quant.fake_quant(x, f"int{bits}") - x) ** 2).mean() / (x ** 2).mean())


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


def choose_bands(lam: torch.Tensor, budget_bytes: float, bits=BITS, step: int = STEP):
    """Band edges for importances `lam` (descending): ((bits, columns), …) of least predicted error whose row
    fits `budget_bytes`, and that error (relative to Σ lam). Raises if not even one column fits."""
    lam = lam.double().clamp_min(0)
    n = lam.numel()
    root = torch.cat([lam.new_zeros(1), lam.sqrt().cumsum(0)]).tolist()
    cum = torch.cat([lam.new_zeros(1), lam.cumsum(0)]).tolist()
    edges = sorted(set(range(0, n + 1, step)) | {n})
    best, best_bands = float("inf"), None
    for cuts in itertools.combinations_with_replacement(edges, len(bits)):
        nbytes, err, lo, bands = 0, 0.0, 0, []
        for b, hi in zip(bits, cuts):
            if hi > lo:
                nbytes += quant.row_bytes(f"int{b}", hi - lo)
                err += format_error(b) * (root[hi] - root[lo]) ** 2 / (hi - lo)
                bands.append((b, hi - lo))
            lo = hi
        if nbytes > budget_bytes or not bands:
            continue
        err += cum[n] - cum[lo]
        if err < best:
            best, best_bands = err, tuple(bands)
    if best_bands is None:
        smallest = min(quant.row_bytes(f"int{b}", min(step, n)) for b in bits)
        raise ValueError(f"a budget of {budget_bytes:.1f} bytes per token and site is below the smallest band "
                         f"({smallest} bytes: {min(step, n)} columns at int{min(bits)}); raise the budget.")
    return best_bands, best / cum[n] if cum[n] > 0 else 0.0


def allocate_bits(stats: dict, projections: Projections, budget: float, seed: int = 0,
                  key_weight: float = DEFAULT_KEY_WEIGHT) -> Projections:
    """Shared K+V latents (fit(stats, "kqsvd", rank=1.0, granularity="kv")) cut, balanced, banded and rotated so
    that each site's cached row takes `budget` × the bytes of its 16-bit keys and values (module docstring).
    stats: the collect_stats result the projections were fitted to. The result records its formats
    (report["quantize"], a dict {site: bands}) and the predicted relative error per site (report["bits"])."""
    if not isinstance(projections, Projections):
        raise TypeError(f"allocate_bits needs kvfx.Projections, got {type(projections).__name__}.")
    if not (isinstance(budget, (int, float)) and 0 < budget < 1):
        raise ValueError(f"budget must be a fraction of the 16-bit KV-cache bytes in (0, 1), got {budget!r}.")
    check_unrotated(projections, "allocate_bits")
    not_shared = [n for n, p in projections.sites.items() if not p.shared]
    if not_shared:
        raise ValueError(f"allocate_bits takes shared K+V latents (fit(..., granularity='kv')); {not_shared[0]} and "
                         f"{len(not_shared) - 1} more sites are not.")
    missing = [n for n in projections.sites if n not in stats]
    if missing:
        raise ValueError(f"allocate_bits needs the statistics of every site; {missing[0]} has none (pass the "
                         "collect_stats result the projections were fitted to).")
    gen = torch.Generator().manual_seed(seed)
    sites, formats, predicted = {}, {}, {}
    for name, p in projections.sites.items():  # plan every site before building any (errors leave nothing made)
        var, w = spectrum(stats[name], p, key_weight)
        lam = var * w
        order = torch.argsort(lam, descending=True)
        shape = projections.shapes[name]
        bands, err = choose_bands(lam[order], budget * 4 * shape.kv_heads * shape.head_dim)
        formats[name] = "+".join(f"int{b}x{n}" for b, n in bands)
        predicted[name] = err
        keep = order[: sum(n for _, n in bands)]
        t = (w[keep] / var[keep].clamp_min(1e-300)).clamp_min(1e-300) ** 0.25
        t = t * (var[keep].sum() / (var[keep] * t * t).sum()).sqrt()  # the latent's total variance kept
        rot = torch.block_diag(*[random_orthogonal(n, gen) for _, n in bands])
        turn = lambda x, s: ((x.double()[..., keep] * s) @ rot).to(x.dtype).contiguous()  # noqa: E731
        sites[name] = p.like(key_down=turn(p.key_down, t), value_down=turn(p.value_down, t),
                             key_up=turn(p.key_up, 1 / t), value_up=turn(p.value_up, 1 / t))
    report = dict(projections.report) | {
        "quantize": formats, "rotation": {"seeds": rotation_seeds(projections) + [seed]},
        "bits": {"budget": budget, "formats": list(BITS), "step": STEP, "predicted_error": predicted}}
    return Projections(sites, dict(projections.shapes), projections.method, report)

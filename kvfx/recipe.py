"""`kvfx.best_config`: the best known configuration for a byte budget, in one call.

The recipe is what benchmarks/RESULTS.md measured best on SmolLM2 (sections "Shared K+V latent", "Low-bit
latents", "domains" and "domains-bits"):

1. statistics once, closed-form kqsvd fit of ONE shared K+V latent per layer (`granularity="kv"`);
2. the latent format: below 37.5 % of the bytes bits per latent direction (`kvfx.allocate_bits`: balanced
   directions in int8 / int5 / int4 / int3 / int2 bands, the rest dropped, rotated within bands; through the cache on
   four text domains at 25 % 1.013-1.021 × the original where the uniform int4 latent is 1.021-1.048, at 12.5 %
   1.22-1.35 × where the uniform int4 latent at 13.3 % was 1.34-1.68, before steps 5-6 and int5 bands; with them
   1.006-1.010 and 1.08-1.16, RESULTS.md "domains-int5"; decoded on the AMX integer path like int4, int3 / int5 bands
   transcoded first, RESULTS.md "speed-bands" and "speed-transcode"), or with `per_direction=False` int4 at the widest rank that fits, rotated; from 37.5 % up, int8
   at the widest rank that fits (at 37.5 % its latent keeps 287 of SmolLM2's 384 K+V numbers: 37.75 WikiText-2 perplexity, at 50.8 % int8 is
   lossless, 36.13), then `kvfx.rotate_latents`; a budget of 1 keeps the 16-bit cache at full width (exact);
3. `measured=True`: the model's measured sensitivity (kvfx.sensitivity) prices each layer's error, so bytes move
   between layers (allocate_bits' `profile`; int8: kvfx.allocate's ranks, 12.5 % int4: 60.45 → 58.12);
4. optionally `kvfx.refine` through the rounding (12.5 % int4, measured ranks: 58.12 → 43.92 in 80 steps);
5. below 25 % of the bytes, bits per direction round around the calibration mean (SiteProjection.latent_offsets:
   12.5 % 1.254 worst domain where around zero 1.271, "domains-centred"); with plain Grams from 25 % up they round
   around zero (at 25 % centring measured no better there: 1.020 worst against 1.015);
6. with bits per direction, the calibration Grams weight each token by the attention it receives:
   `collect_stats(..., attention_weight=0.5)`, kvfx.calib.weights ("domains-weighted": worst domain 1.254 → 1.192
   at 12.5 %, 1.015 → 1.012 at 25 %). With weighted Grams rounding around the mean pays at 25 % too (1.017 around
   zero), so then bits per direction always round around the mean;
7. up to 12.5 % of the bytes, bits per direction take e8 lattice codes (kvfx.lattice: 8 numbers a point of E8, 2 bits
   a number at 0.72× int2's error) in int2's place ("domains-e8": at 6.25 % every domain better, worst 3.04 → 2.69;
   at 12.5 % worst 1.166 → 1.155 calibrated on 32 windows, 1.159 → 1.130 on 128 ("domains-calib128"), fiction
   worse in both (1.078 → 1.095, 1.072 → 1.085); the 12.5 % step 1.05× slower, step_ab.py, float32 16k);
8. between 6.25 % and 25 % of the bytes (exclusive), the band choice prices rounding error at ROUNDING_WEIGHT × a
   dropped direction's (allocate_bits' rounding_weight), so it keeps more directions in coarser bands ("domains-
   rounding": at 12.5 % calibrated on 32 windows every domain better, worst 1.155 → 1.132, on 128 1.130 → 1.119;
   at 25 % no gain and at 6.25 % worse, so there the price stays 1; the 12.5 % step 1.07× slower). Not before
   refine at REFINE_LR: from that allocation 480 steps did not lower the held-out KL (refine fell back to its start,
   1.120 worst domain, "domains-rounding-refine64") where from the plain one they reach 1.078 ("domains-e8-refine64-
   eighth"): at 2e-4 training first undoes its start and relearns to the same place from either; at 5e-5 it keeps
   the wider allocation's start and improves on it (120 steps: worst 1.066, "domains-refine-curve"; one run, so the
   recipe's refine path is unchanged).

The chosen formats are recorded (`projections.quantize`: one format, or {site: bands}), so
`kvfx.compress(model, projections)` applies them, and the projections are stamped with their provenance
(kvfx.provenance).
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Iterable

import torch

from . import quant
from .calib.live import lm_logits, takes_use_cache
from .projections import Projections
from .provenance import stamp

METHOD, GRANULARITY = "kqsvd", "kv"
INT8_FROM = 0.375         # step 2: below this budget, bits per latent direction (kvfx.allocate_bits)
LATTICE_UP_TO = 0.125     # step 7: at and below this budget, e8 lattice codes in int2's place
ROUNDING_WEIGHT = 0.5     # step 8: allocate_bits' rounding_weight strictly between these budgets (RESULTS.md
ROUNDING_BETWEEN = (0.0625, 0.25)  # "domains-rounding": measured better at 12.5 %, not at 6.25 % nor 25 %)
CENTRE_BELOW = 0.25       # bits per direction below this budget round around the calibration mean (RESULTS.md
                          # "domains-centred": 12.5 % 1.271 -> 1.254 worst domain, every domain better; at 25 % no gain)
                          # with plain Grams; with attention-weighted ones at every budget (step 6)
REFINE_LR = 2e-4          # shared latents diverge at 1e-3 (RESULTS.md); every measured refine row used 2e-4
SENSITIVITY_STEPS = 8     # the ⅛ grid of the measured int8 rows
PROBE_RANKS = (0.75, 0.875, 1.0)  # allocate_bits prices each layer from its two least-cut probes
ATTENTION_WEIGHT = 0.5    # step 6: γ of the attention-aware token weights with bits per direction (RESULTS.md
                          # "domains-weighted"); int8 / int4 / 16-bit latents keep plain Grams (not measured there)


def widest(quantize: str | None, budget: float, width: int) -> int:
    """The widest latent (≤ width = 2·h·d) whose row fits `budget` × the bytes of a 16-bit K+V row; 0 if none."""
    limit = budget * 2 * width + 1e-9
    fits = [r for r in range(1, width + 1) if quant.row_bytes(quantize, r) <= limit]
    return max(fits, default=0)


def check_budget(budget) -> None:
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or math.isnan(budget) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction of the 16-bit KV-cache bytes in (0, 1], got {budget!r}.")


def levels_for(budget: float) -> tuple:
    """allocate_bits' band formats at `budget` (step 7): e8 lattice codes for int2 up to LATTICE_UP_TO."""
    from .calib.bits import BITS, with_lattice
    return with_lattice(BITS) if budget <= LATTICE_UP_TO + 1e-9 else BITS


def rounding_weight_for(budget: float, refining: bool = False) -> float:
    """allocate_bits' rounding_weight at `budget` (step 8): ROUNDING_WEIGHT strictly inside ROUNDING_BETWEEN when
    not refining, else 1."""
    low, high = ROUNDING_BETWEEN
    return ROUNDING_WEIGHT if not refining and low + 1e-9 < budget < high - 1e-9 else 1.0


def choose_format(budget: float, width: int, per_direction: bool = True) -> str | None:
    """Step 2 of the recipe, for a layer of K+V width `width`: None (16-bit, full width), "int8", "bits"
    (kvfx.allocate_bits' bands) or, with per_direction=False, "int4" (one format for the whole row)."""
    check_budget(budget)
    if budget >= 1:
        return None
    if budget >= INT8_FROM:
        return "int8"
    if not per_direction:
        if widest("int4", budget, width) < 1:
            raise ValueError(f"budget {budget} is below what one int4 number per token and layer takes "
                             f"({quant.row_bytes('int4', 1) / (2 * width):.4f} of the bytes); raise the budget.")
        return "int4"
    smallest = quant.row_bytes("int2", min(16, width)) / (2 * width)
    if budget < smallest:
        raise ValueError(f"budget {budget} is below what the smallest band takes ({min(16, width)} int2 numbers per "
                         f"token and layer: {smallest:.4f} of the bytes); raise the budget.")
    return "bits"


def _say(progress: bool):
    return (lambda msg: print(f"kvfx: {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)


def _forward_seconds(model, window: torch.Tensor) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        lm_logits(model, window[None], takes_use_cache(model))
    return time.perf_counter() - t0


def _minutes(seconds: float) -> str:
    return f"~{seconds / 60:.0f} min" if seconds >= 90 else f"~{seconds:.0f} s"


def best_config(model: torch.nn.Module, batches: Iterable, budget: float, refine_steps: int = 0,
                measured: bool | None = None, progress: bool = True, data: str | None = None,
                log: Callable[[str], None] | None = None, per_direction: bool = True, exact: tuple[int, int] = (0, 0),
                context: int | None = None, attention_weight: float | None = None) -> Projections:
    """Projections for `model` whose cache takes `budget` × the bytes of an uncompressed 16-bit cache, by the
    best recipe measured so far (module docstring). batches: calibration windows (LongTensor [n, T] or a list
    of them). refine_steps: end-to-end training steps (0: closed form only; ~13 s per 512-token step for
    SmolLM2 on 2 CPU cores). measured: price each layer by the model's measured sensitivity (2 CPU cores, SmolLM2,
    one window: bands ~1 min, int4 / int8 ranks ~15 min); None: only when refining. data: a description of the
    calibration text, for the provenance. per_direction (default True): below 37.5 %, bits per latent direction
    (kvfx.allocate_bits' bands), better per byte than one int4 format at the widest rank that fits (RESULTS.md
    "domains-bits") and decoded on the same AMX integer path at about its speed ("speed-bands"); False: that int4
    format. exact=(sinks, recent), context: with bits per direction, also hold the first `sinks` and the last
    `recent` tokens' latents in 16 bits, their bytes charged at `context` tokens (kvfx.allocate_bits; off by default:
    at 512-token contexts they cost more codes than they gain, RESULTS.md "domains-exact"). attention_weight: γ
    of the calibration Grams' attention-aware token weights (kvfx.calib.weights); None: the recipe's (step 6)."""
    from .calib.collect import collect_stats, fit
    from .calib.refine import Refine, refine
    from .calib.sensitivity import allocate, sensitivity
    from .calib.allocate import Budget
    from .calib.bits import _exact_cost, allocate_bits, format_name
    from .calib.weights import check_attention_weight
    from .passes.compile import options_of
    from .rotate import rotate_latents

    say = log or _say(progress)
    module, _ = options_of(model)
    if getattr(module, "_kvfx", None) is not None:
        raise ValueError("best_config needs the original model, not one already compressed by kvfx.")
    if not isinstance(refine_steps, int) or refine_steps < 0:
        raise ValueError(f"refine_steps must be an int >= 0, got {refine_steps!r}.")
    windows = torch.cat([b.reshape(-1, b.shape[-1]) for b in batches]) if not isinstance(batches, torch.Tensor) \
        else batches.reshape(-1, batches.shape[-1])
    check_budget(budget)  # before any work
    _exact_cost(exact, context)
    if sum(exact) and not (per_direction and budget < INT8_FROM):
        raise ValueError(f"exact rows come with bits per latent direction (a budget below {INT8_FROM:g}, "
                         f"per_direction=True); budget {budget:g} takes "
                         f"{'int8 or 16-bit latents' if budget >= INT8_FROM else 'one int4 format'}.")
    measured = refine_steps > 0 if measured is None else measured
    if attention_weight is None:
        attention_weight = ATTENTION_WEIGHT if per_direction and budget < INT8_FROM else 0.0
    check_attention_weight(attention_weight)

    t0 = time.perf_counter()
    say(f"calibration statistics over {windows.shape[0]} window(s) of {windows.shape[1]} tokens"
        + (f", tokens weighted by attention^{attention_weight:g}" if attention_weight else ""))
    stats = collect_stats(module, windows.split(1), progress=progress, attention_weight=attention_weight)
    width = {n: 2 * st.kv_heads * st.head_dim for n, st in stats.items()}
    fmt = choose_format(budget, max(width.values()), per_direction)
    bands = " / ".join(format_name(b) for b in levels_for(budget))
    say(f"latent format: {bands + ' bands per direction' if fmt == 'bits' else fmt or '16-bit'} "
        f"({time.perf_counter() - t0:.0f} s so far)")

    rounding = rounding_weight_for(budget, refine_steps > 0) if fmt == "bits" else None
    if fmt == "bits":
        full = fit(stats, METHOD, rank=1.0, granularity=GRANULARITY)
        profile = None
        if measured:
            probes = len(stats) * (len(PROBE_RANKS) - 1)
            say(f"measured sensitivity: {probes} forwards of one window, "
                f"{_minutes(probes * _forward_seconds(module, windows[0]))} (estimate)")
            profile = sensitivity(module, full, windows[:1], ranks=PROBE_RANKS, progress=progress)
        projections = allocate_bits(stats, full, budget, profile=profile, exact=tuple(exact), context=context,
                                    levels=levels_for(budget), rounding_weight=rounding)
    elif measured and budget < 1:
        full = fit(stats, METHOD, rank=1.0, granularity=GRANULARITY)
        probes = sum(len(range(1, SENSITIVITY_STEPS)) for _ in stats)
        say(f"measured sensitivity: {probes} forwards of one window, "
            f"{_minutes(probes * _forward_seconds(module, windows[0]))} (estimate)")
        profile = sensitivity(module, full, windows[:1], steps=SENSITIVITY_STEPS, progress=progress)
        projections = allocate(full, profile, Budget(budget, quantize=fmt))
    else:
        ranks = {n: widest(fmt, budget, w) for n, w in width.items()}
        projections = fit(stats, METHOD, rank=ranks, granularity=GRANULARITY)
    if fmt is not None and fmt != "bits":
        projections = rotate_latents(projections)
    fmt = projections.quantize if fmt == "bits" else fmt
    centred = fmt is not None and per_direction and (budget < CENTRE_BELOW or attention_weight > 0)
    if not centred:  # elsewhere rounding around the mean measured no better (or was not measured): as before
        projections = projections.uncentred()

    if refine_steps:
        step = 3 * _forward_seconds(module, windows[0])
        say(f"refine: {refine_steps} steps, {_minutes(refine_steps * step + windows.shape[0] * step / 3)} (estimate)")
        projections = refine(module, projections, windows, Refine(steps=refine_steps, lr=REFINE_LR, quantize=fmt),
                             progress=progress)

    projections.report["quantize"] = fmt
    achieved = projections.kv_fraction(fmt, context if sum(exact) else None)
    say(f"done in {time.perf_counter() - t0:.0f} s: {achieved:.3f} of the 16-bit cache bytes")
    return stamp(projections, module, method=f"{METHOD}@{GRANULARITY}", budget=budget, quantize=fmt,
                 kv_fraction=achieved, data={"description": data or "token windows", "windows": int(windows.shape[0]),
                                             "window": int(windows.shape[1]), "tokens": int(windows.numel())},
                 recipe={"measured": bool(measured and budget < 1), "rotated": fmt is not None, "centred": centred,
                         "attention_weight": attention_weight,
                         "rounding_weight": rounding,
                         "refine_steps": refine_steps, "refine_lr": REFINE_LR if refine_steps else None}
                 | ({"exact": {"sinks": exact[0], "recent": exact[1], "context": context}} if sum(exact) else {}))

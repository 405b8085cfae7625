"""`kvfx.best_config`: the best known configuration for a byte budget, in one call.

The recipe is what benchmarks/RESULTS.md measured best on SmolLM2 (sections "Shared K+V latent" and
"Low-bit latents"):

1. statistics once, closed-form kqsvd fit of ONE shared K+V latent per layer (`granularity="kv"`);
2. the latent format: int8 from 37.5 % of the bytes up (there its latent keeps 287 of SmolLM2's 384 K+V numbers:
   37.75; at 50.8 % int8 is lossless, 36.13), int4 below (at 25 % int4 keeps 360 numbers: 38.00, where int8 keeps
   191: 51.33; at 12.5 % int4 60.45 vs int8 156.56; int4 cannot use more than 26.6 %, its full width); a budget
   of 1 keeps the 16-bit cache at full width (exact);
3. ranks: the widest latent that fits the budget at every layer, or — `measured=True` — ranks from the
   model's measured sensitivity (kvfx.sensitivity + kvfx.allocate; 12.5 % int4: 60.45 → 58.12);
4. `kvfx.rotate_latents` for a low-bit latent (25 % int4: 45.88 → 38.00);
5. optionally `kvfx.refine` through the rounding (12.5 % int4, measured ranks: 58.12 → 43.92 in 80 steps).

The chosen format is recorded (`projections.quantize`), so `kvfx.compress(model, projections)` applies it, and the
projections are stamped with their provenance (kvfx.provenance).
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
INT8_FROM = 0.375         # step 2: the smallest budget at which int8 was measured to beat int4
REFINE_LR = 2e-4          # shared latents diverge at 1e-3 (RESULTS.md); every measured refine row used 2e-4
SENSITIVITY_STEPS = 8     # the ⅛ grid of the measured low-bit rows


def widest(quantize: str | None, budget: float, width: int) -> int:
    """The widest latent (≤ width = 2·h·d) whose row fits `budget` × the bytes of a 16-bit K+V row; 0 if none."""
    limit = budget * 2 * width + 1e-9
    fits = [r for r in range(1, width + 1) if quant.row_bytes(quantize, r) <= limit]
    return max(fits, default=0)


def check_budget(budget) -> None:
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or math.isnan(budget) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction of the 16-bit KV-cache bytes in (0, 1], got {budget!r}.")


def choose_format(budget: float, width: int) -> str | None:
    """Step 2 of the recipe, for a layer of K+V width `width`."""
    check_budget(budget)
    if budget >= 1:
        return None
    if budget >= INT8_FROM:
        return "int8"
    if widest("int4", budget, width) < 1:
        raise ValueError(f"budget {budget} is below what one int4 number per token and layer takes "
                         f"({quant.row_bytes('int4', 1) / (2 * width):.4f} of the bytes); raise the budget.")
    return "int4"


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
                log: Callable[[str], None] | None = None) -> Projections:
    """Projections for `model` whose cache takes `budget` × the bytes of an uncompressed 16-bit cache, by the
    best recipe measured so far (module docstring). batches: calibration windows (LongTensor [n, T] or a list
    of them). refine_steps: end-to-end training steps (0: closed form only; ~13 s per 512-token step for
    SmolLM2 on 2 CPU cores). measured: ranks from measured sensitivity (2 CPU cores, SmolLM2: ~15 min for one
    window); None: only when refining. data: a description of the calibration text, for the provenance."""
    from .calib.collect import collect_stats, fit
    from .calib.refine import Refine, refine
    from .calib.sensitivity import allocate, sensitivity
    from .calib.allocate import Budget
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
    measured = refine_steps > 0 if measured is None else measured

    t0 = time.perf_counter()
    say(f"calibration statistics over {windows.shape[0]} window(s) of {windows.shape[1]} tokens")
    stats = collect_stats(module, windows.split(1), progress=progress)
    width = {n: 2 * st.kv_heads * st.head_dim for n, st in stats.items()}
    fmt = choose_format(budget, max(width.values()))
    say(f"latent format: {fmt or '16-bit'} ({time.perf_counter() - t0:.0f} s so far)")

    if measured and budget < 1:
        full = fit(stats, METHOD, rank=1.0, granularity=GRANULARITY)
        probes = sum(len(range(1, SENSITIVITY_STEPS)) for _ in stats)
        say(f"measured sensitivity: {probes} forwards of one window, "
            f"{_minutes(probes * _forward_seconds(module, windows[0]))} (estimate)")
        profile = sensitivity(module, full, windows[:1], steps=SENSITIVITY_STEPS, progress=progress)
        projections = allocate(full, profile, Budget(budget, quantize=fmt))
    else:
        ranks = {n: widest(fmt, budget, w) for n, w in width.items()}
        projections = fit(stats, METHOD, rank=ranks, granularity=GRANULARITY)
    if fmt is not None:
        projections = rotate_latents(projections)

    if refine_steps:
        step = 3 * _forward_seconds(module, windows[0])
        say(f"refine: {refine_steps} steps, {_minutes(refine_steps * step + windows.shape[0] * step / 3)} (estimate)")
        projections = refine(module, projections, windows, Refine(steps=refine_steps, lr=REFINE_LR, quantize=fmt),
                             progress=progress)

    projections.report["quantize"] = fmt
    achieved = projections.kv_fraction(fmt)
    say(f"done in {time.perf_counter() - t0:.0f} s: {achieved:.3f} of the 16-bit cache bytes")
    return stamp(projections, module, method=f"{METHOD}@{GRANULARITY}", budget=budget, quantize=fmt,
                 kv_fraction=achieved, data={"description": data or "token windows", "windows": int(windows.shape[0]),
                                             "window": int(windows.shape[1]), "tokens": int(windows.numel())},
                 recipe={"measured": bool(measured and budget < 1), "rotated": fmt is not None,
                         "refine_steps": refine_steps, "refine_lr": REFINE_LR if refine_steps else None})

"""`kvfx calibrate MODEL --budget 0.25 -o P.safetensors`: the best known configuration for a byte budget.

Thin over kvfx.best_config (kvfx/recipe.py): shared K+V latent (kqsvd), the latent formats that fit the budget
(bits per latent direction below 37.5 %, int8 above), rotation, optionally measured sensitivity and end-to-end
refinement. The file records its format (`kvfx compress`
applies it) and its provenance (model fingerprint, data, recipe), and is written whole or not at all.
"""
from __future__ import annotations

import argparse

from .. import quant
from .common import add_data_args, add_model_args, budget, check_output, model_and_windows, say


def attention_weight(text: str) -> float:
    try:
        g = float(text)
    except ValueError:
        g = -1.0
    if not 0 <= g <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in [0, 1] (0: plain Grams, 0.5: the recipe's)")
    return g


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("--budget", type=budget, required=True, metavar="FRACTION",
                   help="bytes the cache may keep, as a fraction of an uncompressed 16-bit cache, in (0, 1] "
                        "(0.25: 4x smaller)")
    p.add_argument("-o", "--output", required=True, metavar="P.safetensors", help="projections file to write")
    add_data_args(p, windows=32, what="calibrate on")
    p.add_argument("--refine", type=int, default=0, metavar="STEPS",
                   help="end-to-end training steps after the closed form (default 0; ~13 s per 512-token step "
                        "for SmolLM2 on 2 CPU cores; 80 is what the measured rows used)")
    p.add_argument("--measured", action=argparse.BooleanOptionalAction, default=None,
                   help="price each layer by the model's measured sensitivity (2 forwards per layer below 37.5 %% "
                        "of the bytes, 7 above); default: on when refining")
    p.add_argument("--per-direction", action=argparse.BooleanOptionalAction, default=True,
                   help="below 37.5 %% of the bytes, bits per latent direction (int8/int5/int4/int3/int2 bands, up to "
                        "12.5 %% e8 lattice codes for int2; the default: best per byte, decoded on the integer "
                        "path); --no-per-direction: one int4 format for "
                        "every row")
    p.add_argument("--sinks", type=int, default=0, metavar="S",
                   help="with bits per direction: also hold the first S tokens' latents in 16 bits (attention sinks)")
    p.add_argument("--recent", type=int, default=0, metavar="W",
                   help="with bits per direction: also hold the last W tokens' latents in 16 bits")
    p.add_argument("--attention-weight", type=attention_weight, default=None, metavar="G",
                   help="weight each calibration token by the attention it receives, to the power G in [0, 1] "
                        "(0: every token once); default: 0.5 with bits per direction, 0 otherwise")
    p.add_argument("--context", type=int, default=None, metavar="TOKENS",
                   help="the context the budget counts --sinks / --recent rows at (their bytes are fixed a cache)")


def run(args) -> int:
    import kvfx
    from .common import CliError
    if args.refine < 0:
        raise CliError(f"--refine {args.refine}: give a number of training steps >= 0")
    out = check_output(args.output)
    model, _, windows, description = model_and_windows(args, "calibration")
    try:
        projections = kvfx.best_config(model, windows, args.budget, refine_steps=args.refine,
                                       measured=args.measured, data=description, per_direction=args.per_direction,
                                       exact=(args.sinks, args.recent), context=args.context,
                                       attention_weight=args.attention_weight)
    except ValueError as e:
        if isinstance(e, kvfx.ProjectionError) or not str(e).startswith(("unsupported", "budget", "exact")):
            raise
        raise CliError(str(e)) from None
    projections.save(out)
    fmt = quant.describe(projections.quantize)
    print(f"wrote {out}: {len(projections.sites)} attention sites, {fmt} latents, "
          f"{projections.kv_fraction(projections.quantize, args.context):.3f} of the 16-bit KV-cache bytes"
          + (f" at {args.context} tokens" if args.context else ""))
    say(f"next: kvfx eval {args.model} {out}   (or kvfx info {out})")
    return 0

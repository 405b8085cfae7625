"""`kvfx eval MODEL P.safetensors`: perplexity of the original and the compressed model, side by side.

Forward over whole windows, and through the cache (prefill the first half of each window, feed the rest in
chunks of 16 through the cache, score the second half; kvfx/evaluate.py), on the builtin WikiText-2 test text
or the user's text file.
"""
from __future__ import annotations

from .. import quant
from .common import CliError, add_backend_arg, add_data_args, add_model_args, model_and_windows, say


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("projections", metavar="P.safetensors", help="projections file (kvfx calibrate -o ...)")
    add_data_args(p, windows=4, what="evaluate on")
    p.add_argument("--chunk", type=int, default=16, help="tokens fed through the cache per call (default 16)")
    add_backend_arg(p)


def table(rows: list[tuple[str, int, dict]]) -> str:
    lines = ["| model | KV bytes/token (16-bit = 2 B/number) | ppl forward | ppl forward, 2nd half | "
             "ppl through the cache, 2nd half |", "|---|---|---|---|---|"]
    for name, nbytes, ppl in rows:
        lines.append(f"| {name} | {nbytes} | {ppl['forward']:.2f} | {ppl['forward_second_half']:.2f} | "
                     f"{ppl['cached_second_half']:.2f} |")
    return "\n".join(lines)


def run(args) -> int:
    import torch
    from transformers import DynamicCache

    import kvfx
    from ..evaluate import cache_perplexities
    from .common import load_projections
    if args.chunk < 1:
        raise CliError(f"--chunk {args.chunk}: give a number of tokens >= 1")
    projections = load_projections(args.projections)
    model, _, windows, description = model_and_windows(args, "test", projections)
    if windows.shape[1] < 4:
        raise CliError(f"--window {windows.shape[1]} is too short to split into halves; use at least 4 tokens")
    say(f"evaluating on {windows.shape[0]} window(s) of {windows.shape[1]} tokens of {description}")
    original_bytes = sum(4 * s.kv_heads * s.head_dim for s in projections.shapes.values())
    base = cache_perplexities(model, windows, lambda: DynamicCache(config=model.config), args.chunk,
                              desc="original")
    fmt = projections.quantize
    compressed = kvfx.compress(torch.compile(model, backend=args.backend), projections)
    ppl = cache_perplexities(compressed, windows, lambda: kvfx.make_cache(compressed, max_cache_len=windows.shape[1]),
                             args.chunk, desc="kvfx")
    after = sum(p.cached_bytes(quant.site(fmt, n)) for n, p in projections.sites.items())
    print(f"{description}: {windows.shape[0]} window(s) of {windows.shape[1]} tokens")
    print(table([("original", original_bytes, base),
                 (f"kvfx {projections.method}, {quant.describe(fmt)} latents", after, ppl)]))
    ratio = ppl["cached_second_half"] / base["cached_second_half"]
    print(f"cache: {after / original_bytes:.3f} of the 16-bit bytes; perplexity through the cache {ratio:.3f}x the "
          "original's")
    return 0

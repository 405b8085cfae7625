"""`kvfx generate MODEL P.safetensors --prompt ...`: text from the compressed model beside the original's.

Both decode greedily. The original runs as transformers ships it (eager, DynamicCache); the compressed model
runs through torch.compile and kvfx's low-rank cache, timed after a short warm-up run that compiles its graphs.
"""
from __future__ import annotations

import time

from .. import quant
from .common import CliError, add_backend_arg, add_model_args, check_applicable, load_model, positive_int, say

WARMUP_TOKENS = 3  # a prefill, a static decode step and a symbolic one: the graphs generate compiles


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("projections", metavar="P.safetensors", help="projections file (kvfx calibrate -o ...)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N", help="tokens to generate (default 64)")
    add_backend_arg(p)


def _prompt_ids(tokenizer, prompt: str, chat: bool):
    if not prompt.strip():
        raise CliError("--prompt is empty; give some text to continue")
    if not chat:
        return tokenizer(prompt, return_tensors="pt").input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise CliError("this model's tokenizer has no chat template; drop --chat")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt")
    return ids if not hasattr(ids, "keys") else ids["input_ids"]


def _generate(model, ids, cache, new_tokens: int, tokenizer, kw: str):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=pad, **{kw: cache})
    seconds = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), n, n / seconds


def run(args) -> int:
    import torch
    from transformers import DynamicCache

    import kvfx
    from ..cache import cache_nbytes
    from ..compress import cache_kwarg
    from .common import load_projections
    projections = load_projections(args.projections)
    model, tokenizer = load_model(args.model, args.dtype)
    check_applicable(model, projections)
    ids = _prompt_ids(tokenizer, args.prompt, args.chat)
    kw = cache_kwarg(model)
    total = ids.shape[1] + args.max_new_tokens
    with torch.no_grad():
        say("generating with the original model")
        cache = DynamicCache(config=model.config)
        text0, n0, speed0 = _generate(model, ids, cache, args.max_new_tokens, tokenizer, kw)
        bytes0, tokens0 = cache_nbytes(cache), cache.get_seq_length()
        compressed = kvfx.compress(torch.compile(model, backend=args.backend), projections)
        say(f"compiling the compressed model ({args.backend}; a warm-up run of {WARMUP_TOKENS} tokens)")
        _generate(compressed, ids, kvfx.make_cache(compressed, max_cache_len=ids.shape[1] + WARMUP_TOKENS),
                  WARMUP_TOKENS, tokenizer, kw)
        cache = kvfx.make_cache(compressed, max_cache_len=total)
        text1, n1, speed1 = _generate(compressed, ids, cache, args.max_new_tokens, tokenizer, kw)
        bytes1, tokens1 = cache_nbytes(cache), cache.get_seq_length()
    fmt = quant.describe(projections.quantize)
    print(f"prompt: {args.prompt}\n")
    print(f"original:\n{text0}\n")
    print(f"kvfx ({projections.method}, {fmt} latents):\n{text1}\n")
    print("| model | cache bytes held | cached tokens | bytes/token | new tokens | tokens/s |\n"
          "|---|---|---|---|---|---|")
    for name, nbytes, tokens, n, speed in (
            (f"original (eager, DynamicCache, {args.dtype})", bytes0, tokens0, n0, speed0),
            (f"kvfx (torch.compile {args.backend}, LowRankCache, {fmt})", bytes1, tokens1, n1, speed1)):
        print(f"| {name} | {nbytes} | {tokens} | {nbytes / max(tokens, 1):.0f} | {n} | {speed:.1f} |")
    return 0

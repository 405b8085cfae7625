"""`kvfx explain MODEL`: the attention sites kvfx finds in the model's graph and what it can compress."""
from __future__ import annotations

from .common import CliError, add_model_args, load_model, say

PROMPT = "The capital of France is"


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("--prompt", default=PROMPT, help="text the model is traced on (default: a short sentence)")


def run(args) -> int:
    import kvfx
    model, tokenizer = load_model(args.model, args.dtype)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    if ids.shape[1] < 2:
        raise CliError("--prompt tokenizes to fewer than 2 tokens; give a longer prompt")
    say(f"tracing {type(model).__name__} on {ids.shape[1]} tokens")
    result = kvfx.explain(model, ids, use_cache=False, print_table=False)
    print(result)
    ok = sum(r.status == "ok" for r in result.rows)
    if not ok:
        raise CliError(f"{args.model}: no attention site kvfx can compress (see the table above); kvfx needs "
                       "attention through torch's scaled_dot_product_attention (attn_implementation='sdpa')")
    print(f"{ok} of {len(result.rows)} attention sites can be compressed; next: "
          f"kvfx calibrate {args.model} --budget 0.25 -o projections.safetensors")
    return 0

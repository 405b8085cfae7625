"""Two speed.py configurations' decode steps (or prefills), interleaved in one process: A, B, A, B, … — the ratio
of their medians.

    python benchmarks/step_ab.py kvfx-head-0.5-int4 kvfx-head-0.5-int4-bmm --dtype bfloat16 --context 16384
    python benchmarks/step_ab.py original-dynamic kvfx-kv-0.9375-int4 --prefill 1024 --steps 9

speed.py times its configurations one after another; on a VM whose speed drifts within minutes (this project's:
the same step 30-42 ms in one run) that cannot resolve a 1-5 % change. Here both are built first (two copies of the
model, each compiled with its configuration's switches set, speed_setup.SWITCHES), their caches filled alike, and
their steps alternate, each with only its own switches set, so a drift moves both medians alike. Prints one line:
both medians and A / B (> 1: B is faster). With --prefill N each run is a prompt of N random tokens (batch 1) into
a fresh cache instead, after one warm-up prompt each (speed.py's prefill, interleaved).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed_setup as ss  # noqa: E402


def _switch(config: ss.Config) -> None:
    """Set exactly `config`'s environment switches (the others removed)."""
    for flag, env in ss.SWITCHES.items():
        if getattr(config, flag):
            os.environ[env] = "1"
        else:
            os.environ.pop(env, None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="a speed.py configuration, e.g. kvfx-head-0.5-int4")
    ap.add_argument("b", help="another, e.g. kvfx-head-0.5-int4-bmm")
    ap.add_argument("--model", default="smollm2", choices=ss.MODELS)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--context", type=int, default=16384, help="cached tokens (random contents)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30, help="timed steps of each, after 3 warm-up steps")
    ap.add_argument("--prefill", type=int, default=0, help="time prompts of this many tokens instead of steps")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.prefill < 0 or args.steps < 1:
        ap.error(f"need --prefill >= 0 (0: decode steps) and --steps >= 1, got {args.prefill} and {args.steps}")
    try:
        configs = [ss.parse_config(args.a), ss.parse_config(args.b)]
    except ValueError as e:
        ap.error(str(e))
    if any(c.family == "peer" for c in configs):
        ap.error("peer configurations take transformers' QuantizedCache; use speed.py for them")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    dtype, device = getattr(torch, args.dtype), torch.device("cpu")
    memo, built = {}, []
    for config in configs:
        _switch(config)  # only its own switches while it is built (its cache reads some when it is made)
        model = ss.load_model(args.model, ss.model_config(args.model, 2), dtype, device)
        shape = ss.model_shape(model.config)
        app = ss.Applied(model, config, config.kinds(["dynamic"])[0], {}, memo, {})
        cache = None if args.prefill else app.make_cache(args.context + args.steps + 8)
        if cache is not None:
            ss.fill_cache(cache, shape, args.batch, args.context, dtype, device)
        built.append((config, app, cache))
    if args.prefill:
        return _prefills(args, built, shape)
    ids = torch.randint(3, 100, (args.batch, 1))
    times: list[list[float]] = [[], []]
    for i in range(args.steps + 3):
        for k, (config, app, cache) in enumerate(built):
            _switch(config)  # compiles (first steps) and runs with only its own switches
            pos = torch.full((args.batch, 1), args.context + i)
            t = time.perf_counter()
            app.model(input_ids=ids, position_ids=pos, use_cache=True, **{app.cache_kwarg: cache})
            if i >= 3:
                times[k].append(time.perf_counter() - t)
    _switch(ss.Config("none", "original"))
    a, b = (statistics.median(t) * 1e3 for t in times)
    print(f"{args.model} {args.dtype} batch {args.batch} × {args.context} tokens, {args.steps} steps each, "
          f"interleaved: {args.a} {a:.2f} ms, {args.b} {b:.2f} ms, A / B {a / b:.3f}")
    return 0


def _prefills(args, built, shape) -> int:
    """--prefill: A's and B's prompts alternate, each into a fresh cache; one warm-up prompt each (compiles)."""
    ids = torch.randint(3, shape.vocab, (1, args.prefill))
    pos = torch.arange(args.prefill)[None]
    times: list[list[float]] = [[], []]
    for i in range(args.steps + 1):
        for k, (config, app, _) in enumerate(built):
            _switch(config)
            cache = app.make_cache(args.prefill)
            t = time.perf_counter()
            app.model(input_ids=ids, position_ids=pos, use_cache=True, **{app.cache_kwarg: cache})
            if i >= 1:
                times[k].append(time.perf_counter() - t)
            del cache
    _switch(ss.Config("none", "original"))
    a, b = (statistics.median(t) * 1e3 for t in times)
    print(f"{args.model} {args.dtype} prefill of {args.prefill} tokens (batch 1), {args.steps} runs each, "
          f"interleaved: {args.a} {a:.1f} ms, {args.b} {b:.1f} ms, A / B {a / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode speed benchmark: kvfx's low-rank caches vs the original model and transformers' quantized cache.

Side by side in one process, per model × dtype × configuration × cache kind × batch × context N: the cache is
filled with random full-width keys/values through `cache.update` (no 16k-token prefill: speed does not depend on
the values), then one token per step is decoded through the torch.compile'd forward; the median step latency of
--steps steps after --warmup steps (compiles) is reported with ratios against original-dynamic and
original-static of the same (model, dtype, batch, N), the bytes-ideal ratio and the fraction of the read-bandwidth
bound (the read bandwidth probed again before and after each row, the higher of the two: a VM's slow spells move
both, and the higher bandwidth gives the lower bound). Prefill is timed separately at --prefill-len; the longest
context that fits --memory-budget is extrapolated from the measured bytes per cached token and memory overhead.

Configurations: original-dynamic / original-static (transformers' DynamicCache / StaticCache under
`model.forward = torch.compile(model.forward)`); kvfx-{head|layer|kv}-RANK[-int8|-int4]
(kvfx.compress(torch.compile(model), P, cache=kind, quantize=...) and kvfx.make_cache, for each --cache-kinds;
P from kvfx.calibrate(kqsvd) on one batch of random tokens, rotated when quantized); kvfx-identity (full rank:
must cost what the original costs); peer-quanto-int4 / -int2 (transformers' QuantizedCache, backend quanto, under
the same compiled forward; eager if it cannot compile, said so in the row).

transformers 5.24: Cache.update(k, v, layer_idx) takes no cache_kwargs (static layers write at their own
cumulative length) and LlamaModel.forward has no cache_position, so each decode step passes position_ids = N + i
and the cache under the name kvfx.compress.cache_kwarg(model) gives (`cache`).

    python benchmarks/speed.py --quick                      # smoke: tiny random llama, N=256, eager backend (~30 s)
    python benchmarks/speed.py                              # everything (hours on 2 CPU cores)
    python benchmarks/speed.py --render out/bench/fp32.json # a saved --json run's tables and issue 15's targets
    python benchmarks/speed.py --models smollm2 --dtype bfloat16 --contexts 1024,4096 --batches 1 \\
        --configs original-dynamic,original-static,kvfx-kv-0.5,peer-quanto-int4 --write --plot speed.png
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kvfx  # noqa: E402
from speed_setup import (DEFAULT_CONFIGS, DTYPES, GiB, MAX_CONTEXT, MODELS, MiB, Applied, Memory,  # noqa: E402
                         allocated_bytes, cache_bytes, dynamo_counts, estimate_bytes, fill_cache, fit_extra,
                         load_model, longest_fitting, model_config, model_label, model_shape, parse_bytes,
                         parse_config, read_bandwidth, release_memory, synchronizer, weight_bytes)
from speed_report import RESULTS, header, machine, plot, tables, write_results  # noqa: E402

QUICK = dict(models=["llama-tiny"], dtypes=["float32"], contexts=[256], batches="1", steps=3, warmup=3,
             configs=["original-dynamic", "original-static", "kvfx-kv-0.5", "peer-quanto-int4"],
             cache_kinds=["dynamic", "static"], prefill_len=32, prefill_runs=1, bandwidth_gib=0.25, backend="eager",
             threads=1)  # tiny tensors: one thread (two OpenMP threads on a busy 2-core machine spin-wait)
DEFAULTS = dict(models=["smollm2", "llama-rand"], dtypes=["float32", "bfloat16"], contexts=[1024, 4096, 16384],
                batches="1,4@16384", steps=20, warmup=3, configs=DEFAULT_CONFIGS, cache_kinds=["dynamic", "static"],
                prefill_len=1024, prefill_runs=3, bandwidth_gib=1.0, backend="inductor", threads=os.cpu_count())


# ---------------------------------------------------------------------------------------------- plan
def combos(args) -> list[tuple[int, int]]:
    """(batch, N) pairs: "B" runs batch B at every context, "B@N" only at context N."""
    out = []
    for spec in args.batches.split(","):
        b, _, n = spec.partition("@")
        for tokens in ([int(n)] if n else args.contexts):
            if (int(b), tokens) not in out:
                out.append((int(b), tokens))
    return out


def plan(args, parser, mem: Memory) -> list[dict]:
    """Per model × dtype: its shape and the (batch, N) it runs. Estimates memory before anything is allocated: skips
    default combinations that would not fit in RAM (printed); refuses explicit ones that do not fit --memory-budget."""
    available = mem.available()
    limit = min(args.memory_budget, available) if args.explicit else available
    what = (f"--memory-budget {args.memory_budget / GiB:.1f} GiB" +
            (f" (available {available / GiB:.1f} GiB)" if available < args.memory_budget else "")
            if args.explicit else f"available memory {available / GiB:.1f} GiB")
    out = []
    for name in args.models:
        try:
            config = model_config(name, args.llama_layers)
        except FileNotFoundError as e:
            parser.error(f"{name}: {e}")
        shape = model_shape(config)
        for dt in args.dtypes:
            runs = []
            for batch, n in combos(args):
                need = estimate_bytes(shape, DTYPES[dt], batch, n)
                if need <= limit:
                    runs.append((batch, n))
                    continue
                fits = longest_fitting(shape, DTYPES[dt], batch, limit)
                msg = (f"{name} {dt} batch {batch} × N {n} needs ~{need / GiB:.1f} GiB (weights "
                       f"{shape.weight_bytes(DTYPES[dt]) / GiB:.2f} GiB + 2 × full-width cache "
                       f"{shape.full_cache_bytes(batch, n, DTYPES[dt]) / GiB:.2f} GiB + margin) > {what}; at batch "
                       f"{batch} N ≤ {fits} fits")
                if args.explicit:
                    parser.error(msg + ": drop it or raise --memory-budget")
                print(f"skip: {msg}", flush=True)
            out.append(dict(name=name, config=config, shape=shape, dtype=dt, runs=runs))
    return out


# ---------------------------------------------------------------------------------------------- measurements
def decode(applied: Applied, shape, dtype, batch: int, tokens: int, args, mem: Memory, device) -> dict:
    sync = synchronizer(device)
    release_memory()
    bw_before = read_bandwidth(device, args.bandwidth_gib)  # beside the row: a VM's slow and fast spells move both
    start = mem.current()
    mem.reset_peak()
    max_len = tokens + args.warmup + args.steps
    cache = applied.make_cache(max_len)
    fill_cache(cache, shape, batch, tokens, dtype, device, args.fill_chunk)
    nbytes, held = cache_bytes(cache), allocated_bytes(cache)
    residual = _residual(cache)
    ids = torch.randint(3, shape.vocab, (batch, 1), device=device)
    times, row_peak, graphs = [], 0, None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:  # timed steps: their own peak, and whether anything still compiles
            graphs = dynamo_counts()[0]
            row_peak = mem.peak()
            release_memory()
            before = mem.current()
            mem.reset_peak()
        pos = torch.full((batch, 1), tokens + i, device=device)
        sync()
        t = time.perf_counter()
        try:
            out = applied.model(input_ids=ids, position_ids=pos, use_cache=True, **{applied.cache_kwarg: cache})
        except Exception as e:  # noqa: BLE001  the peer's cache may not compile: run it eager, say so
            if applied.config.family != "peer" or i >= args.warmup or applied.note:
                raise
            applied.run_eager(f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
            return decode(applied, shape, dtype, batch, tokens, args, mem, device)
        sync()
        times.append(time.perf_counter() - t)
        del out
    peak = mem.peak()
    note = [applied.note] if applied.note else []
    if held > 1.05 * nbytes:
        note.append(f"its tensors' storage holds {held / MiB:.1f} MiB")
    if dynamo_counts()[0] != graphs:
        note.append("recompiled while timed")
    if residual is not None:  # QuantizedLayer: a step whose residual reaches residual_length requantises everything
        timed, c = 0, residual
        for i in range(args.warmup + args.steps):
            c = 0 if c + 1 >= args.peer_residual else c + 1
            timed += c == 0 and i >= args.warmup
        note.append(f"{residual} residual tokens after filling; re-quantises the whole cache every "
                    f"{args.peer_residual} steps ({timed} of the timed steps)")
    step = statistics.median(times[args.warmup:])
    del cache
    release_memory()
    bw_after = read_bandwidth(device, args.bandwidth_gib)
    return dict(step_ms=step * 1e3, tokens_per_s=batch / step, cache_bytes=nbytes, cache_allocated=held,
                rss_delta=max(row_peak, peak) - start, step_extra=max(0, peak - before), peak_timed=peak,
                read_bw=max(bw_before, bw_after), read_bw_probes=(bw_before, bw_after), note="; ".join(note))


def _residual(cache):
    """Full-precision residual tokens of a transformers QuantizedCache layer (None for other caches)."""
    layer = cache.layers[0]
    if not hasattr(layer, "residual_length"):
        return None
    return layer.keys.shape[-2] if layer.keys is not None and layer.keys.dim() == 4 else 0


def prefill(applied: Applied, shape, args, device) -> float:
    """Median seconds of a --prefill-len prompt (batch 1) into a fresh cache, after one warm-up run."""
    sync = synchronizer(device)
    n = args.prefill_len
    ids = torch.randint(3, shape.vocab, (1, n), device=device)
    pos = torch.arange(n, device=device)[None]
    times = []
    for _ in range(1 + args.prefill_runs):
        cache = applied.make_cache(n)
        sync()
        t = time.perf_counter()
        out = applied.model(input_ids=ids, position_ids=pos, use_cache=True, **{applied.cache_kwarg: cache})
        sync()
        times.append(time.perf_counter() - t)
        del out, cache
    return statistics.median(times[1:])


def run(args, parser) -> dict:
    device = torch.device(args.device)
    mem = Memory(device)
    work = plan(args, parser, mem)
    bw = read_bandwidth(device, args.bandwidth_gib)
    print(f"read bandwidth (torch.sum over {args.bandwidth_gib:g} GiB float32): {bw / 1e9:.1f} GB/s", flush=True)
    compile_opts = {"backend": args.backend} | ({"mode": args.mode} if args.mode else {})
    peer_opts = dict(q_group_size=args.peer_group_size, residual_length=args.peer_residual)
    rows, prefills, weights = [], [], {}
    for w in work:
        if not w["runs"]:
            continue
        dtype = DTYPES[w["dtype"]]
        t0 = time.time()
        model = load_model(w["name"], w["config"], dtype, device)
        label, W = model_label(w["name"], w["shape"]), weight_bytes(model)
        weights[(label, w["dtype"])] = W
        release_memory()
        base = mem.current()
        print(f"{label} {w['dtype']}: weights {W / MiB:.0f} MiB, loaded in {time.time() - t0:.0f}s", flush=True)
        memo = {}
        with torch.no_grad():
            for cfg in args.configs:
                for kind in cfg.kinds(args.cache_kinds):
                    release_memory()
                    start = mem.current()  # the extra memory of a config is counted from here
                    applied = Applied(model, cfg, kind, compile_opts, memo, peer_opts)
                    try:
                        run_config(applied, w, label, W, start, args, mem, device, rows, prefills)
                    finally:
                        applied.undo()
                    release_memory()
                    print(f"  RSS after undoing it: {(mem.current() - base) / MiB:+.0f} MiB vs after loading the model",
                          flush=True)
        del model
        release_memory()
    ratios(rows, prefills, bw)
    return dict(bandwidth=bw, rows=rows, prefill=prefills, longest=longest(rows, weights, args.memory_budget))


def run_config(applied: Applied, w: dict, label: str, W: int, base: int, args, mem: Memory, device, rows: list,
               prefills: list) -> None:
    """Every (batch, N) of one model × dtype under one applied configuration, then its prefill."""
    t0, cfg, kind, dtype = time.time(), applied.config, applied.kind, DTYPES[w["dtype"]]
    kvfx.counters.clear()
    graphs0, breaks0 = dynamo_counts()
    mine = []
    for batch, n in w["runs"]:
        r = decode(applied, w["shape"], dtype, batch, n, args, mem, device)
        r |= dict(model=label, dtype=w["dtype"], config=cfg.name, cache=kind, batch=batch, N=n, weight_bytes=W,
                  resident_extra=max(0, r["peak_timed"] - base - r["cache_bytes"]))
        mine.append(r)
        print(f"  {cfg.name:20s} {kind:9s} b{batch} N{n:<6d} {r['step_ms']:9.2f} ms/step  "
              f"cache {r['cache_bytes'] / MiB:9.1f} MiB  {r['note']}", flush=True)
    graphs, breaks = dynamo_counts()
    counts = dict(kvfx.counters["kvfx"])
    for r in mine:  # decode only (graphs compiled, graph breaks, kvfx rewrites), over all (batch, N) of the config
        r |= dict(graphs=graphs - graphs0, graph_breaks=breaks - breaks0, kvfx_counters=counts)
        if breaks > breaks0:
            r["note"] = "; ".join(filter(None, [r["note"], f"{breaks - breaks0} graph breaks"]))
    rows += mine
    print(f"  {cfg.name} {kind}: decode compiled {graphs - graphs0} graphs, {breaks - breaks0} graph breaks, "
          f"kvfx {counts or '-'}", flush=True)
    if args.prefill_len:
        s = prefill(applied, w["shape"], args, device)
        more = dynamo_counts()[1] - breaks
        note = "; ".join(filter(None, [applied.note, f"{more} graph breaks" if more else ""]))
        prefills.append(dict(model=label, dtype=w["dtype"], config=cfg.name, cache=kind, tokens=args.prefill_len,
                             ms=s * 1e3, note=note))
        print(f"  {cfg.name:20s} {kind:9s} prefill {args.prefill_len}: {s * 1e3:.1f} ms {note}", flush=True)
    print(f"  ({time.time() - t0:.0f}s)", flush=True)


def ratios(rows: list[dict], prefills: list[dict], bw: float) -> None:
    ref = {(r["model"], r["dtype"], r["batch"], r["N"], r["config"]): r for r in rows}
    for r in rows:
        key = (r["model"], r["dtype"], r["batch"], r["N"])
        dyn, sta = ref.get(key + ("original-dynamic",)), ref.get(key + ("original-static",))
        r["vs_dynamic"] = dyn["step_ms"] / r["step_ms"] if dyn else None
        r["vs_static"] = sta["step_ms"] / r["step_ms"] if sta else None
        W = r["weight_bytes"]
        r["bytes_ideal"] = (W + dyn["cache_bytes"]) / (W + r["cache_bytes"]) if dyn else None
        r["bw_fraction"] = (W + r["cache_bytes"]) / r.get("read_bw", bw) / (r["step_ms"] / 1e3)
    pref = {(p["model"], p["dtype"]): p for p in prefills if p["config"] == "original-dynamic"}
    for p in prefills:
        o = pref.get((p["model"], p["dtype"]))
        p["vs_dynamic"] = o["ms"] / p["ms"] if o else None


def longest(rows: list[dict], weights: dict, budget: int) -> list[dict]:
    """Longest context in `budget`: weights + bytes held per cached token × T (the larger of cache bytes and the
    storage behind them, at the largest batch · N measured; a static cache's spare steps included) + per-step
    working memory (fixed + per token, fitted over the rows of the configuration: peak during the timed steps −
    RSS just before them)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["dtype"], r["config"], r["cache"]), []).append(r)
    out = []
    for (model, dtype, config, kind), rs in groups.items():
        big = max(rs, key=lambda r: r["batch"] * r["N"])
        per_token = max(big["cache_bytes"], big["cache_allocated"]) / (big["batch"] * big["N"])
        fit = fit_extra([(r["batch"] * r["N"], r["step_extra"]) for r in rs])
        tokens = max(0, int((budget - weights[(model, dtype)] - fit.fixed) / (per_token + fit.per_token)))
        out.append(dict(model=model, dtype=dtype, config=config, cache=kind, bytes_per_token=per_token,
                        extra_fixed=fit.fixed, extra_per_token=fit.per_token, tokens=tokens))
    ref = {(o["model"], o["dtype"]): o["tokens"] for o in out if o["config"] == "original-dynamic"}
    for o in out:
        o["vs_dynamic"] = o["tokens"] / ref[(o["model"], o["dtype"])] if ref.get((o["model"], o["dtype"])) else None
    return out


# ---------------------------------------------------------------------------------------------- cli
def _list(kind=str):
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"smoke setting: {QUICK} (options given explicitly win)")
    p.add_argument("--models", type=_list(), help=f"of {', '.join(MODELS)} (default smollm2,llama-rand)")
    p.add_argument("--dtype", dest="dtypes", type=_list(),
                   help="of float32, bfloat16, float16 (default float32,bfloat16)")
    p.add_argument("--llama-layers", type=int, default=4, help="layers of llama-rand (stated in the table)")
    p.add_argument("--configs", type=_list(), help="comma list or all (default): " + ", ".join(DEFAULT_CONFIGS) +
                   ", or any kvfx-{head|layer|kv}-RANK[-int8|-int4]")
    p.add_argument("--cache-kinds", type=_list(), help="kvfx configs run with each of dynamic, static (default both)")
    p.add_argument("--contexts", type=_list(int), help=f"cached tokens N (default 1024,4096,16384; ≤ {MAX_CONTEXT})")
    p.add_argument("--batches", help="B (at every context) or B@N (only at N), comma list (default 1,4@16384)")
    p.add_argument("--steps", type=int, help="timed decode steps (default 20)")
    p.add_argument("--warmup", type=int, help="warm-up (compiling) decode steps, at least 3 (default 3)")
    p.add_argument("--prefill-len", type=int, help="prefill prompt length; 0 skips prefill (default 1024)")
    p.add_argument("--prefill-runs", type=int, help="timed prefill runs (default 3)")
    p.add_argument("--memory-budget", type=parse_bytes, default=parse_bytes("8GiB"),
                   help="for the longest-context table, and the limit explicit --contexts/--batches must fit (8GiB)")
    p.add_argument("--fill-chunk", type=int, default=8192, help="tokens per cache.update while filling")
    p.add_argument("--peer-group-size", type=int, default=64, help="QuantizedCache q_group_size")
    p.add_argument("--peer-residual", type=int, default=128, help="QuantizedCache residual_length")
    p.add_argument("--backend", help="torch.compile backend, kvfx compiles through it (default inductor; --quick: "
                   "eager, i.e. Dynamo capture + kvfx's passes without Inductor's minute of codegen)")
    p.add_argument("--mode", default=None, help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--bandwidth-gib", type=float, help="size of the bandwidth probe (default 1)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores; --quick: 1)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--plot", default=None, help="write decode ms vs context (log x) to this PNG")
    p.add_argument("--json", default=None, help="also write every measured row to this JSON file")
    p.add_argument("--write", action="store_true", help='record the tables in --results ("## Decode speed" section)')
    p.add_argument("--results", type=Path, default=RESULTS, help="the file --write edits (benchmarks/RESULTS.md)")
    p.add_argument("--section", default="speed", help="the marked section --write replaces (one per setting)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="measure nothing: print (and with --write record) the tables of a run's --json file, with "
                        "this version's tables and targets, under the command and machine it records")
    args = p.parse_args(argv)
    if args.render:
        return p, args
    if args.configs == ["all"]:
        args.configs = DEFAULT_CONFIGS
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.explicit = args.contexts is not None or args.batches is not None
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK.get(key, value) if args.quick else value)
    try:
        args.configs = [parse_config(c) for c in dict.fromkeys(args.configs)]
        for spec in args.batches.split(","):
            b, _, n = spec.partition("@")
            if int(b) < 1 or (n and int(n) < 1):
                raise ValueError(f"--batches {spec!r}: batch and context must be positive")
            if n and int(n) > MAX_CONTEXT:
                raise ValueError(f"--batches {spec!r}: contexts up to {MAX_CONTEXT}")
    except ValueError as e:
        p.error(str(e))
    bad = ([m for m in args.models if m not in MODELS] + [d for d in args.dtypes if d not in DTYPES]
           + [k for k in args.cache_kinds if k not in ("dynamic", "static")])
    if bad:
        p.error(f"unknown {bad[0]!r}: models {MODELS}, dtypes {tuple(DTYPES)}, cache kinds (dynamic, static)")
    if not args.contexts or any(not 1 <= n <= MAX_CONTEXT for n in args.contexts):
        p.error(f"--contexts must be between 1 and {MAX_CONTEXT} tokens, got {args.contexts}")
    if args.warmup < 3 or args.steps < 1 or args.prefill_len < 0 or args.prefill_runs < 1:
        p.error("need --warmup ≥ 3 (compiles), --steps ≥ 1, --prefill-len ≥ 0, --prefill-runs ≥ 1")
    if args.memory_budget <= 0 or args.threads < 1:
        p.error("--memory-budget and --threads must be positive")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[bench]')")
    peers = [c.name for c in args.configs if c.family == "peer"]
    if peers and not _has_quanto():
        print(f"skip: {', '.join(peers)}: optimum-quanto is not installed (pip install -e '.[bench]')", flush=True)
        args.configs = [c for c in args.configs if c.family != "peer"]
    return p, args


def _has_quanto() -> bool:
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return False
    return True


def render(args) -> dict:
    """The tables of a saved run (--render JSON): its rows, command and machine; nothing measured."""
    try:
        res = json.loads(args.render.read_text())
        _, run_args = parse_args(res["command"])
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--render {args.render}: not a speed.py --json file ({e})") from None
    text = header(res, run_args) + "\n" + tables(res, run_args)
    print("\n" + text)
    if args.write:
        write_results(text, args.results, args.section)
    return res


def main(argv=None) -> dict:
    parser, args = parse_args(argv)
    if args.render:
        return render(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False (no GPU or a CPU-only torch build)",
              file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    from transformers.utils import logging
    logging.set_verbosity_error()
    res = run(args, parser)
    text = header(res, args) + "\n" + tables(res, args)
    print("\n" + text)
    if args.write:  # first: a failure writing the extras below leaves the measured table recorded
        write_results(text, args.results, args.section)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            res | {"command": args.argv, "machine": machine(args), "threads": torch.get_num_threads()}, indent=1))
    if args.plot:
        plot(res, args.plot)
    return res


if __name__ == "__main__":
    main()

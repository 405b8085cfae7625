"""Cache perplexity on every domain: kvfx against the cache quantizers a user would pick instead.

Protocol (kvfx.cache_perplexities): each window of 512 tokens is prefilled for its first half into a fresh cache,
the rest is fed through that cache in chunks of 16 tokens (teacher forced), and perplexity is taken on the second
half. Every configuration runs through its own cache: the original through transformers' DynamicCache, kvfx through
its LowRankCache (compiled, `kvfx.compress(torch.compile(model), projections)`), the peers through transformers'
QuantizedCache (optimum-quanto / HQQ backends, eager). Numbers are cache perplexity × the original's, per domain
(kvfx.data.DOMAINS: WikiText-2 test, Python source, the Python reference, Moby-Dick), on each domain's test text.

KV bytes: what the cache holds after the last window, against 2 bytes per number of the original's keys and values
for the same tokens. kvfx: its cache tensors as stored (codes and scale bytes; a float32 model's unrounded latents
count 4 bytes a number). Peers: b-bit codes, a 16-bit scale and a 16-bit zero point per group, and the tokens their
full-precision residual window holds, at 16 bits (the mean it held over the second half's steps: it fills and is
flushed into the codes as chunks arrive).

Configurations (--configs, comma-separated):
    METHOD[@GRAN]:RANK[:int8|int4][:rot][:calib=DOMAIN]   kvfx: calibrator, granularity (head/layer/kv), rank
                                                          fraction of the latent's width, storage, rotation, and
                                                          the calibration text (default --calib; DOMAIN,
                                                          mix, or mix-DOMAIN: the mix without that domain); any kvfx
                                                          configuration takes :uncentred (low-bit latents rounded
                                                          around zero, not the calibration mean: an ablation) and
                                                          :shrink=A (the calibration Grams shrunk toward a scaled
                                                          identity by A before fitting, kvfx.calib.shrink); @kv
                                                          configurations take :kw=W (the shared fit's key_weight,
                                                          key-logit against value error; default 4); any kvfx
                                                          configuration takes :aw=G (the calibration Grams' tokens
                                                          weighted by attention, f_t^G, 0 < G <= 1:
                                                          kvfx.calib.weights; :aw=G:vw weights value rows by
                                                          their own u_t^G, u_t = Σ_q p_qt²)
    METHOD@kv:BUDGET:bits[:e8][:rw=R][:measured[=N]][:refine=STEPS[:lr=LR]][:sinks=S][:recent=W][:calib=DOMAIN]
                                                          kvfx.allocate_bits: bits per latent direction (int8 /
                                                          int4 / int3 / int2 bands, --bit-levels) in BUDGET ×
                                                          the 16-bit bytes; e8: e8 lattice codes (kvfx.lattice)
                                                          in int2's place; rw: rounding error priced R × a
                                                          dropped direction's (allocate_bits' rounding_weight;
                                                          default 1);
                                                          sinks / recent: the first S and last W tokens' latents
                                                          also held in 16 bits (their bytes reserved from BUDGET
                                                          at --window tokens);
                                                          measured: bytes between layers priced by a
                                                          kvfx.sensitivity profile (N calibration windows,
                                                          default 2);
                                                          refine: then STEPS of kvfx.refine through the bands
                                                          (lr 2e-4 or LR, the calibration windows, last 2 held
                                                          out; its training curve is printed)
    quanto|hqq:BITS:gGROUP:rRESIDUAL                      transformers' QuantizedCache

    python benchmarks/domains.py                               # default configurations (~40 min)
    python benchmarks/domains.py --windows 2 --configs kqsvd@kv:0.9375:int4:rot,quanto:4:g64:r128   # quick
"""
from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kvfx  # noqa: E402
from kvfx.calib.bits import check_levels, format_name, with_lattice  # noqa: E402
from kvfx.calib.collect import collect_stats, fit  # noqa: E402
from kvfx.calib.shrink import shrink  # noqa: E402
from kvfx.data import DOMAINS, calibration_mix, domain_windows  # noqa: E402
from kvfx.models import load_default_model  # noqa: E402

from results_file import RESULTS, write_section  # noqa: E402

# in the order they run: the configurations that answer most first (a run writes its table after each one)
DEFAULT = ["kqsvd@kv:0.9375:int4:rot", "quanto:4:g64:r128", "kqsvd@kv:0.9375:int4:rot:calib=wikitext", "hqq:3:g32:r32",
           "kqsvd@kv:0.5:int4:rot", "quanto:2:g64:r128", "kqsvd@kv:0.5", "kqsvd@kv:0.5:calib=wikitext",
           "quanto:4:g32:r32", "hqq:4:g64:r128", "kqsvd@kv:0.5:int8:rot", "identity:1.0:int4:rot", "quanto:2:g32:r32",
           "hqq:2:g32:r32", "kqsvd@kv:0.25:int4:rot"]


REFINE_LR = kvfx.recipe.REFINE_LR  # the rate every earlier refine row used, best_config's


@dataclass
class Config:
    spec: str
    peer: str | None = None          # "quanto" / "hqq"
    bits: int = 0
    group: int = 0
    residual: int = 0
    method: str = ""
    granularity: str = "head"
    rank: float = 1.0
    quantize: str | None = None
    rotate: bool = False
    per_direction: bool = False      # kvfx.allocate_bits: RANK is the byte budget, bits per direction
    lattice: bool = False            # :e8 — e8 lattice codes in int2's place among the levels
    rounding_weight: float = 1.0     # :rw=R — allocate_bits' rounding_weight
    measured: int = 0                # allocate_bits with a kvfx.sensitivity profile on this many calibration windows
    refine: int = 0                  # kvfx.refine steps through the bands after allocate_bits
    refine_lr: float = REFINE_LR     # :lr=LR — kvfx.refine's learning rate
    exact: tuple = (0, 0)            # allocate_bits' (sinks, recent): tokens whose latents are held in 16 bits
    calib: str | None = None
    uncentred: bool = False          # Projections.uncentred(): latents rounded around zero (an ablation)
    shrink: float = 0.0              # kvfx.calib.shrink.shrink: Grams pulled toward a scaled identity before fitting
    levels: tuple = (8, 4, 3, 2)     # allocate_bits' band formats (--bit-levels)
    key_weight: float | None = None  # the shared fit's key_weight (key-logit against value error; None: kvfx's 4)
    attention_weight: float = 0.0    # collect_stats' attention_weight: γ of the attention-aware token weights
    own_value_weight: bool = False   # collect_stats' own_value_weight: values weighted by Σ_q p² (:aw=G:vw)
    refine_fell_back: bool = False   # kvfx.refine returned its start (held-out KL not lowered, or NaN)
    ratios: dict = field(default_factory=dict)
    kv_bytes: float = math.nan


SOURCES = (*DOMAINS, "mix", *(f"mix-{d}" for d in DOMAINS))  # mix-D: the mix without domain D (D never seen)


def mixed(source: str) -> tuple[str, ...]:
    """The domains calibration source "mix" or "mix-D" draws from."""
    return tuple(d for d in DOMAINS if source != f"mix-{d}")


def source_label(source: str) -> str:
    return f"the mix without {source[4:]}" if source.startswith("mix-") else source


def parse(spec: str) -> Config:
    parts = spec.split(":")
    try:
        if parts[0] in ("quanto", "hqq"):
            if len(parts) != 4 or parts[2][0] != "g" or parts[3][0] != "r":
                raise ValueError
            return Config(spec, peer=parts[0], bits=int(parts[1]), group=int(parts[2][1:]),
                          residual=int(parts[3][1:]))
        method, gran = parts[0].split("@") if "@" in parts[0] else (parts[0], "head")
        cfg = Config(spec, method=method, granularity=gran, rank=float(parts[1]))
        for opt in parts[2:]:
            if opt in ("int8", "int4"):
                cfg.quantize = opt
            elif opt == "rot":
                cfg.rotate = True
            elif opt == "bits" and gran == "kv":
                cfg.per_direction = True
            elif opt == "e8" and cfg.per_direction:
                cfg.lattice = True
            elif opt.startswith("rw=") and cfg.per_direction and 0 < float(opt[3:]) <= 1:
                cfg.rounding_weight = float(opt[3:])
            elif opt == "measured" and cfg.per_direction:
                cfg.measured = 2
            elif opt.startswith("measured=") and cfg.per_direction and int(opt[9:]) > 0:
                cfg.measured = int(opt[9:])
            elif opt.startswith("refine=") and cfg.per_direction and int(opt[7:]) > 0:
                cfg.refine = int(opt[7:])
            elif opt.startswith("lr=") and cfg.refine and float(opt[3:]) > 0:
                cfg.refine_lr = float(opt[3:])
            elif opt.startswith(("sinks=", "recent=")) and cfg.per_direction:
                n = int(opt.split("=")[1])
                cfg.exact = (n, cfg.exact[1]) if opt[0] == "s" else (cfg.exact[0], n)
            elif opt == "uncentred":
                cfg.uncentred = True
            elif opt.startswith("shrink=") and 0 < float(opt[7:]) < 1:
                cfg.shrink = float(opt[7:])
            elif opt.startswith("kw=") and gran == "kv" and float(opt[3:]) > 0:
                cfg.key_weight = float(opt[3:])
            elif opt.startswith("aw=") and 0 < float(opt[3:]) <= 1:
                cfg.attention_weight = float(opt[3:])
            elif opt == "vw" and cfg.attention_weight:
                cfg.own_value_weight = True
            elif opt.startswith("calib=") and opt[6:] in SOURCES:
                cfg.calib = opt[6:]
            else:
                raise ValueError
        return cfg
    except (ValueError, IndexError):
        raise SystemExit(f"bad configuration {spec!r}: expected METHOD[@GRAN]:RANK[:int8|int4][:rot][:calib=DOMAIN]"
                         "[:uncentred][:shrink=A][:kw=W][:aw=G[:vw]], "
                         f"METHOD@kv:BUDGET:bits[:e8][:rw=R][:measured[=N]][:refine=STEPS[:lr=LR]][:sinks=S][:recent=W][:calib=DOMAIN][:uncentred][:shrink=A][:aw=G[:vw]] "
                         f"or quanto|hqq:BITS:gGROUP:rRESIDUAL (domains: {', '.join(DOMAINS)}, mix)") from None


class Recorder:
    """make_cache for cache_perplexities that keeps the last cache it made (its bytes are read after the run) and,
    for a QuantizedCache, the full-precision tokens its first layer holds after every update of the second half."""

    def __init__(self, make):
        self.make, self.last, self.residuals = make, None, []

    def __call__(self):
        self.last = cache = self.make()
        layer = cache.layers[0]
        if hasattr(layer, "residual_length"):
            update = layer.update

            def tracked(*a, **k):
                out = update(*a, **k)
                if layer.cumulative_length > a[0].shape[-2]:  # after the prefill
                    self.residuals.append(layer.keys.shape[-2] if layer.keys.dim() == 4 else 0)
                return out
            layer.update = tracked
        return cache


def peer_bytes(cache, residuals: list[int], cfg: Config) -> float:
    """Bytes a QuantizedCache holds / a 16-bit cache's, at the last window's full context: b-bit codes and a 16-bit
    scale + zero point per group for its quantized tokens, 16 bits for the tokens of its full-precision window,
    counted as the mean the window held over the second half's steps (it fills and empties as chunks arrive)."""
    seen = cache.layers[0].cumulative_length
    residual = sum(residuals) / max(len(residuals), 1)
    return ((seen - residual) * (cfg.bits + 32 / cfg.group) / 16 + residual) / seen


def kvfx_bytes(cache, kv_heads: int, head_dim: int) -> float:
    """Bytes kvfx's cache holds / a 16-bit cache's for the same sequences and tokens."""
    batch, tokens = cache.layers[0].keys.shape[0], cache.get_seq_length()
    return cache.nbytes() / (len(cache.layers) * batch * 2 * kv_heads * head_dim * tokens * 2)


def run(args) -> str:
    torch.manual_seed(0)
    t0 = time.time()
    model, tok = load_default_model(torch.float32)
    mcfg = model.config
    kv_heads, head_dim = mcfg.num_key_value_heads, mcfg.hidden_size // mcfg.num_attention_heads
    tests = {d: domain_windows(tok, d, "test", args.windows, args.window) for d in args.domains}
    print(f"loaded model + {len(tests)} domains × {args.windows} windows in {time.time() - t0:.0f}s", flush=True)
    from transformers import DynamicCache, QuantizedCache

    def ppl(m, windows, make, desc, batch=True):
        rec = Recorder(make)
        out = kvfx.cache_perplexities(m, windows, rec, chunk=args.chunk, progress=False, desc=desc,
                                      batch_size=args.batch if batch else 1)
        return out, rec

    base = {}
    for d, w in tests.items():
        out, _ = ppl(model, w, lambda: DynamicCache(config=mcfg), d)
        base[d] = out["cached_second_half"]
        print(f"original {d}: cache ppl {base[d]:.3f} (forward, 2nd half {out['forward_second_half']:.3f})", flush=True)
    stats_memo: dict = {}
    configs = [replace(c, levels=with_lattice(args.bit_levels) if c.lattice else args.bit_levels)
               for c in (parse(s) for s in args.configs)]
    for cfg in configs:
        t1 = time.time()
        if cfg.peer:
            def make(cfg=cfg):
                return QuantizedCache(backend=cfg.peer, config=mcfg, nbits=cfg.bits, q_group_size=cfg.group,
                                      residual_length=cfg.residual)
            for d, w in tests.items():
                out, rec = ppl(model, w, make, d, batch=cfg.peer != "hqq")  # HQQ's groups span the batch
                cfg.ratios[d] = out["cached_second_half"] / base[d]
            cfg.kv_bytes = peer_bytes(rec.last, rec.residuals, cfg)
        else:
            proj = projections(model, tok, cfg, args, stats_memo)
            cfg.refine_fell_back = bool(proj.report.get("refine", {}).get("fallback"))
            if cfg.per_direction:
                err = proj.report["bits"]["predicted_error"]
                print(f"{cfg.spec}: mean predicted error {sum(err.values()) / len(err):.4g} of the layers' objective",
                      flush=True)
            compressed = kvfx.compress(torch.compile(model, backend=args.backend), proj,
                                      quantize=proj.quantize if cfg.per_direction else cfg.quantize)
            try:
                for d, w in tests.items():
                    out, rec = ppl(compressed, w, lambda: kvfx.make_cache(compressed), d)
                    cfg.ratios[d] = out["cached_second_half"] / base[d]
                cfg.kv_bytes = kvfx_bytes(rec.last, kv_heads, head_dim)
            finally:
                kvfx.decompress(compressed)
                torch._dynamo.reset()
        print(f"{cfg.spec:40s} KV bytes {cfg.kv_bytes:.3f}  " +
              "  ".join(f"{d} {r:.3f}" for d, r in cfg.ratios.items()) + f"  ({time.time() - t1:.0f}s)", flush=True)
        if args.write and cfg is not configs[-1]:  # a long run keeps what it measured so far, marked partial
            write(table([c for c in configs if c.ratios], base, args, partial=len(configs)), args)
    return table(configs, base, args)


def projections(model, tok, cfg: Config, args, memo: dict):
    source = cfg.calib or args.calib
    if (source, "windows") not in memo:
        memo[source, "windows"] = (calibration_mix(tok, args.calib_windows, args.window, mixed(source))
                                   if source.startswith("mix") else
                                   domain_windows(tok, source, "calib", args.calib_windows, args.window))
    key = (source, "stats", cfg.attention_weight, cfg.own_value_weight)
    if key not in memo:
        samples = max(getattr(kvfx.calib.get_calibrator(cfg.method), "samples_needed", 0), 0)
        memo[key] = collect_stats(model, memo[source, "windows"].split(1), progress=False, samples=samples,
                                  attention_weight=cfg.attention_weight, own_value_weight=cfg.own_value_weight)
    stats = memo[key]
    if cfg.shrink:
        if key + ("shrink", cfg.shrink) not in memo:
            memo[key + ("shrink", cfg.shrink)] = shrink(stats, cfg.shrink)
        stats = memo[key + ("shrink", cfg.shrink)]
    kw = {} if cfg.key_weight is None else {"key_weight": cfg.key_weight}
    if cfg.per_direction:  # RANK is the budget: bits per latent direction over the full-width fit
        full = fit(stats, cfg.method, 1.0, granularity=cfg.granularity, **kw)
        full = full.uncentred() if cfg.uncentred else full  # before allocating and refining: all of it uncentred
        profile = (source, "profile", cfg.shrink, cfg.measured, cfg.key_weight, cfg.attention_weight,
                   cfg.own_value_weight)
        if cfg.measured and profile not in memo:
            memo[profile] = kvfx.sensitivity(model, full, memo[source, "windows"][:cfg.measured].split(1),
                                             ranks=(0.75, 0.875, 1.0), progress=False)
        proj = kvfx.allocate_bits(stats, full, cfg.rank, levels=cfg.levels,
                                  profile=memo[profile] if cfg.measured else None,
                                  exact=cfg.exact, context=args.window, rounding_weight=cfg.rounding_weight, **kw)
        if cfg.refine:
            proj = kvfx.refine(model, proj, memo[source, "windows"],
                               kvfx.Refine(steps=cfg.refine, lr=cfg.refine_lr, quantize=proj.quantize), progress=False)
            r = proj.report["refine"]
            print(f"{cfg.spec}: refine training KL by tenths of the steps " + " ".join(f"{x:.4f}" for x in r["train_kl"])
                  + f"; held-out KL {r['kl_before']:.4f} before, {r['kl_trained']:.4f} trained",
                  flush=True)
        return proj
    proj = fit(stats, cfg.method, cfg.rank, granularity=cfg.granularity, **kw)
    proj = proj.uncentred() if cfg.uncentred else proj
    return kvfx.rotate_latents(proj) if cfg.rotate else proj


def label(cfg: Config) -> str:
    if cfg.peer:
        return f"QuantizedCache {cfg.peer} int{cfg.bits}, group {cfg.group}, window {cfg.residual}"
    gran = "" if cfg.granularity == "head" else f"@{cfg.granularity}"
    if cfg.per_direction:
        bands = "/".join(format_name(b) for b in cfg.levels)
        return (f"kvfx {cfg.method}{gran}, bits per direction ({bands} bands) in {cfg.rank:g} of the bytes"
                + (f", rounding priced {cfg.rounding_weight:g} × a dropped direction" if cfg.rounding_weight != 1 else "")
                + (", layers priced by measured sensitivity" if cfg.measured else "")
                + (f" on {cfg.measured} windows" if cfg.measured not in (0, 2) else "")
                + (f", first {cfg.exact[0]} and last {cfg.exact[1]} tokens in 16 bits" if sum(cfg.exact) else "")
                + (f", refined {cfg.refine} steps" if cfg.refine else "")
                + (f" at lr {cfg.refine_lr:g}" if cfg.refine and cfg.refine_lr != REFINE_LR else "")
                + (" (fell back to its start: held-out KL not lowered)" if cfg.refine_fell_back else "")
                + (f", calibrated on {source_label(cfg.calib)}" if cfg.calib else "")
                + (", rounded around zero (uncentred)" if cfg.uncentred else "") + _grams(cfg) + _weighted(cfg))
    store = f", {cfg.quantize}" if cfg.quantize else ", float32 latents"
    calib = f", calibrated on {source_label(cfg.calib)}" if cfg.calib else ""
    return (f"kvfx {cfg.method}{gran} rank {cfg.rank:g}{store}{', rotated' if cfg.rotate else ''}{calib}"
            + (", rounded around zero (uncentred)" if cfg.uncentred else "") + _grams(cfg) + _weighted(cfg))


def _weighted(cfg: Config) -> str:
    return f", key weight {cfg.key_weight:g}" if cfg.key_weight is not None else ""


def _grams(cfg: Config) -> str:
    """How the calibration Grams were changed: shrunk, tokens weighted."""
    return (f", Grams shrunk by {cfg.shrink:g}" if cfg.shrink else "") + \
        (f", tokens weighted by attention^{cfg.attention_weight:g}" if cfg.attention_weight else "") + \
        (" (values by their own weight)" if cfg.own_value_weight else "")


def table(configs, base, args, partial: int = 0) -> str:
    domains = list(base)
    lines = [f"| configuration | KV bytes | {' | '.join(domains)} | worst |",
             "|---|---|" + "---|" * (len(domains) + 1),
             f"| original (DynamicCache), cache ppl | 1.000 | {' | '.join(f'{base[d]:.2f}' for d in domains)} | - |"]
    for cfg in sorted(configs, key=lambda c: -c.kv_bytes):
        worst = max(cfg.ratios.values())
        lines.append(f"| {label(cfg)} | {cfg.kv_bytes:.3f} | "
                     + " | ".join(f"{cfg.ratios[d]:.3f}" for d in domains) + f" | {worst:.3f} |")
    head = (f"Command: `python benchmarks/domains.py {shlex.join(sys.argv[1:])}` (SmolLM2-135M-Instruct float32; "
            f"{args.windows} windows × {args.window} tokens per domain, prefill half, chunks of {args.chunk}; "
            f"kvfx calibrated on {args.calib_windows} windows of {args.calib} calibration text; "
            f"cells: cache perplexity × the original's)\n"
            f"Machine: {platform.machine()} CPU ×{torch.get_num_threads()} threads; torch {torch.__version__}, "
            f"transformers {__import__('transformers').__version__}, Python {platform.python_version()}\n"
            + (f"**Partial: {len(configs)} of {partial} configurations measured so far.**\n" if partial else ""))
    return head + "\n" + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=lambda s: s.split(","), default=DEFAULT)
    p.add_argument("--domains", type=lambda s: s.split(","), default=list(DOMAINS))
    p.add_argument("--windows", type=int, default=8, help="evaluation windows per domain")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--chunk", type=int, default=16, help="tokens per cached step after the prefill")
    p.add_argument("--batch", type=int, default=8,
                   help="windows run side by side (the same numbers; HQQ, whose groups span the batch, runs one)")
    p.add_argument("--calib", default="mix", choices=SOURCES, help="kvfx's calibration text")
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--bit-levels", type=lambda s: tuple(b if b == "e8" else int(b) for b in s.split(",")),
                   default=(8, 4, 3, 2),
                   help="band formats of the :bits configurations (8,4,2: as before int3 existed, session 16)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend under kvfx's passes")
    p.add_argument("--section", default="domains", help="RESULTS.md section the table is written to")
    p.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    unknown = [d for d in args.domains if d not in DOMAINS]
    if unknown:
        raise SystemExit(f"unknown domains {unknown}; known: {', '.join(DOMAINS)}")
    for cfg in map(parse, args.configs):  # every spec checked before the model loads
        if cfg.measured > args.calib_windows:
            raise SystemExit(f"{cfg.spec}: a profile on {cfg.measured} windows needs as many calibration windows; "
                             f"--calib-windows is {args.calib_windows}.")
    try:
        check_levels(args.bit_levels)
    except ValueError as e:
        raise SystemExit(f"--bit-levels: {e}") from None
    text = run(args)
    print(text)
    if args.write:
        write(text, args)


def write(text: str, args) -> None:
    write_section(text, args.section, f"{args.section}: cache perplexity on every domain, kvfx and peers", RESULTS)


if __name__ == "__main__":
    main()

"""Quality benchmark: WikiText-2 perplexity of SmolLM2-135M under kvfx, every calibrator × keep fraction.

Protocol (DESIGN-NOTES): calibrate on the first 8 windows of 512 tokens of wiki.valid.tokens; evaluate on
the first 16 windows of 512 tokens of wiki.test.raw; K and V at the same rank (plus keys-only / values-only rows).
Methods: per-head pca / eigen / kqsvd / kqsvd-summed (the seed's summed-query variant) and joint cross-head
latents ('@layer', one rank-R latent per layer shared by all query heads; keep is then a fraction of h·d) and shared K+V
latents ('@kv', one latent per layer read as keys and values; keep is the KV-byte fraction). Every compressed row runs
through `kvfx.compress(torch.compile(model), projections)` — the product path, Inductor included.

    python benchmarks/quality.py                      # full table (prints markdown)
    python benchmarks/quality.py --write              # ... and records it in benchmarks/RESULTS.md
    python benchmarks/quality.py --eval-windows 2 --calib-windows 2 --keep 0.5 --methods kqsvd   # quick
"""
from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kvfx  # noqa: E402
from kvfx.calib.collect import collect_stats, fit  # noqa: E402
from kvfx.data import perplexity, wikitext_calibration_windows, wikitext_test_windows  # noqa: E402
from kvfx.models import load_default_model  # noqa: E402
from kvfx.quant import row_bytes  # noqa: E402
from kvfx.rotate import rotation_seeds  # noqa: E402

from results_file import RESULTS, write_section  # noqa: E402  (benchmarks/ is the script's own folder)


def evaluate(model, windows) -> float:
    return perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits, windows, progress=False)


def run(args) -> str:
    torch.manual_seed(0)
    t0 = time.time()
    model, tok = load_default_model(torch.float32)
    calib = wikitext_calibration_windows(tok, args.calib_windows, args.window)
    test = wikitext_test_windows(tok, args.eval_windows, args.window)
    print(f"loaded model + data in {time.time() - t0:.0f}s", flush=True)

    t0 = time.time()
    names = {m.split("@")[0].replace("kqsvd-summed", "kqsvd")
             for m in args.methods + args.split_methods + args.budget_methods + args.refine_methods + args.measured_methods
             if not m.endswith(".safetensors")}
    samples = max((getattr(kvfx.calib.get_calibrator(n), "samples_needed", 0) for n in names), default=0)
    samples = max(samples, 2 if args.budget_methods and args.budget_measure == "output" else 0)
    stats = collect_stats(model, calib.split(1), samples=samples) if names else None  # saved artefacts only: none
    print(f"calibration statistics over {calib.numel() if names else 0} tokens in {time.time() - t0:.0f}s", flush=True)

    rows = []
    t0 = time.time()
    base = evaluate(torch.compile(model, backend=args.backend), test)
    torch._dynamo.reset()
    rows.append(("baseline (torch.compile)", "1.00", "1.000", "-", base, time.time() - t0))
    print(f"baseline ppl {base:.2f}", flush=True)
    configs = [(m, keep, None if share == 0.5 else share) for m in args.methods for keep in args.keep
               for share in args.key_shares]
    configs += [(m, keep, part) for m in args.split_methods for keep in args.split_keep for part in ("keys", "values")]
    configs += [(m, keep, "budget") for m in args.budget_methods for keep in args.keep]
    for method, keep, part in configs:
        name, gran = method.split("@") if "@" in method else (method, "head")
        name, opts = (name, {}) if name != "kqsvd-summed" else ("kqsvd", {"query": "summed"})
        t0 = time.time()
        if isinstance(part, float):  # keys get `part` of the kept bytes, values the rest
            rk, rv = split_keep(keep, part)
        else:
            rk, rv = {None: (keep, keep), "keys": (keep, 1.0), "values": (1.0, keep),
                      "budget": (kvfx.Budget(keep, measure=args.budget_measure, quantize=args.quantize), None)}[part]
        proj = fit_keep(stats, name, gran, *bytes_keep(stats, gran, rk, rv, args), args, **opts)
        label = method + ({None: "", "keys": " (keys only)", "values": " (values only)",
                           "budget": f" + budget ({args.budget_measure} error)"}[part]
                          if not isinstance(part, float) else f" (keys {part:.0%} of kept bytes)")
        rows.append(_row(label, keep, proj, _evaluate_projections(args, model, proj, test), time.time() - t0))
    rows += refine_rows(args, model, tok, stats, test)
    rows += measured_rows(args, model, tok, stats, test)
    return table(rows, args)


def bytes_keep(stats, gran, rk, rv, args):
    """(key, value) rank fractions whose cache keeps fractions rk, rv of the bytes: the same with latents in the
    model's dtype; with --quantize int8 / int4, of a 16-bit cache's bytes: the widest rows (codes + scale bytes,
    kvfx.quant.row_bytes) that fit, capped at full width."""
    if not args.quantize or isinstance(rk, kvfx.Budget):
        return rk, rv
    st = next(iter(stats.values()))
    width = {"head": st.head_dim, "layer": st.kv_heads * st.head_dim, "kv": 2 * st.kv_heads * st.head_dim}[gran]

    def widest(x):
        return max([r for r in range(1, width + 1) if row_bytes(args.quantize, r) <= 2 * x * width] or [1])
    return tuple(widest(x) / width for x in (rk, rv))


def fit_keep(stats, name, gran, rk, rv, args, **opts):
    """fit() at (key, value) keep; a shared K+V latent ('@kv') has one rank: the KV-byte fraction itself."""
    if gran == "kv":
        if rv is None or isinstance(rk, kvfx.Budget) or rk != rv:
            raise SystemExit(f"{name}@kv: one shared latent per layer; only equal K/V keep rows apply (no budget/split)")
        return fit(stats, name, rk, granularity="kv", key_weight=args.key_weight, **opts)
    return fit(stats, name, rk, value_rank=rv, granularity=gran, **opts)


def split_keep(keep: float, key_share: float) -> tuple[float, float]:
    """(key keep, value keep) spending `keep` of the KV bytes with `key_share` of them on keys."""
    rk, rv = 2 * keep * key_share, 2 * keep * (1 - key_share)
    if not (0 < rk <= 1 and 0 < rv <= 1):
        raise SystemExit(f"key share {key_share} cannot split keep {keep}: keys {rk:.2f}, values {rv:.2f} of d")
    return rk, rv


QUANTIZE = None  # --quantize: how the cache stores latents (kv_fraction's pricing, compress's option)
ROTATE = False   # --rotate: turn every latent by a random orthogonal matrix before it is evaluated or refined


def _rotated(proj):
    return kvfx.rotate_latents(proj) if ROTATE and not rotation_seeds(proj) else proj


def _row(label, keep, proj, ppl, seconds):
    sites = proj.report.get("sites", {})  # refined projections keep no per-site calibration error
    err = f"{sum(r['key_err'] for r in sites.values()) / len(sites):.3f}" if sites else "-"
    label += f" [{QUANTIZE} latents{', rotated' if ROTATE else ''}]" if QUANTIZE else (" [rotated]" if ROTATE else "")
    frac = proj.kv_fraction(QUANTIZE)
    print(f"{label:28s} keep {keep:.2f}: ppl {ppl:8.2f}  (KV bytes {frac:.3f}, {seconds:.0f}s)", flush=True)
    return (label, f"{keep:.2f}", f"{frac:.3f}", err, ppl, seconds)


def _evaluate_projections(args, model, proj, test) -> float:
    model_c = kvfx.compress(torch.compile(model, backend=args.backend), _rotated(proj), quantize=args.quantize)
    ppl = evaluate(model_c, test)
    kvfx.decompress(model_c)
    torch._dynamo.reset()
    return ppl


def refine_rows(args, model, tok, stats, test) -> list:
    """End-to-end distilled projections (kvfx.refine): per keep, or once nested over every keep (Matryoshka)."""
    if not args.refine_methods:
        return []
    from kvfx.calib.matryoshka import truncate
    windows = wikitext_calibration_windows(tok, args.refine_windows, args.window)
    rows = []
    for method in args.refine_methods:
        t0 = time.time()
        if method.endswith(".safetensors"):  # a saved artefact (e.g. an earlier refine): trained further as it is
            start, tag = kvfx.Projections.load(method), Path(method).stem
            rows.append(_refined_row(args, model, start, windows, test, f"{tag}+{args.refine_steps}", tag,
                                     round(start.kv_fraction(args.quantize), 2), t0))
            continue
        name, gran = method.split("@") if "@" in method else (method, "head")
        if args.refine_nested:
            start = fit(stats, name, 1.0, granularity=gran)
            cfg = kvfx.Refine(steps=args.refine_steps, lr=args.refine_lr, rank_set=tuple(args.keep),
                               quantize=args.quantize)
            trained = kvfx.refine(model, start, windows, cfg)
            train_s = time.time() - t0
            _keep_artefact(trained, f"{method}-nested")
            for keep in args.keep:
                t1 = time.time()
                proj = truncate(trained, keep)
                label = f"{method} + refine nested ({_refine_note(trained)})"
                rows.append(_row(label, keep, proj, _evaluate_projections(args, model, proj, test),
                                 train_s + time.time() - t1))
            continue
        for keep in args.keep:
            t0 = time.time()
            rk, rv = (keep, keep) if gran == "kv" else split_keep(keep, args.refine_key_share)
            start = fit_keep(stats, name, gran, *bytes_keep(stats, gran, rk, rv, args), args)
            rows.append(_refined_row(args, model, start, windows, test, f"{method}-{keep}", method, keep, t0))
    return rows


def _refined_row(args, model, start, windows, test, tag, label, keep, t0, steps=None) -> tuple:
    """Refine `start` (kvfx.refine, --refine-lr), save the artefact, evaluate: one table row."""
    cfg = kvfx.Refine(steps=steps or args.refine_steps, lr=args.refine_lr, quantize=args.quantize)
    proj = kvfx.refine(model, _rotated(start), windows, cfg)
    _keep_artefact(proj, tag)
    return _row(f"{label} + refine ({_refine_note(proj)})", keep, proj,
                _evaluate_projections(args, model, proj, test), time.time() - t0)


def measured_rows(args, model, tok, stats, test) -> list:
    """Ranks per site and K/V from measured model-KL profiles (kvfx.sensitivity → kvfx.allocate), for a method
    fitted at full rank or a saved nested artefact (e.g. a nested refine); optionally refined from there."""
    if not args.measured_methods:
        return []
    import json
    windows = wikitext_calibration_windows(tok, args.sensitivity_windows, args.window)
    rows = []
    for method in args.measured_methods:
        t0 = time.time()
        if method.endswith(".safetensors"):
            full, tag = kvfx.Projections.load(method), Path(method).stem
        else:
            name, gran = method.split("@") if "@" in method else (method, "head")
            full, tag = fit_keep(stats, name, gran, 1.0, 1.0, args), method
        probe_q = args.quantize if args.probe_quantized else None
        path = RESULTS.parent / "results" / f"sensitivity-{tag}{'-' + probe_q if probe_q else ''}.json"
        setting = {"windows": args.sensitivity_windows, "window": args.window, "steps": args.sensitivity_steps}
        setting |= {"quantize": probe_q} if probe_q else {}
        saved = json.loads(path.read_text()) if args.reuse_profiles and path.exists() else {}
        if saved.get("setting") == setting:
            prof = saved
            print(f"sensitivity of {tag}: reusing {path}", flush=True)
        else:
            prof = kvfx.sensitivity(model, full, windows, steps=args.sensitivity_steps, quantize=probe_q) | {
                "setting": setting}
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(prof, indent=1))
            print(f"sensitivity of {tag}: {prof['tokens']} tokens, {prof['seconds']:.0f}s -> {path}", flush=True)
        profile_s = time.time() - t0
        for keep in args.keep:
            t1 = time.time()
            proj = kvfx.allocate(full, prof, kvfx.Budget(keep, quantize=args.quantize))
            rank_set = (full.report.get("refine") or {}).get("rank_set")
            grid = f"ranks {'/'.join(f'{r:g}' for r in rank_set)}" if rank_set else f"grid 1/{args.sensitivity_steps}"
            label = f"{tag} + measured budget ({args.sensitivity_windows}×{args.window} tokens, {grid}" + (
                f", probed {probe_q})" if probe_q else ")")
            rows.append(_row(label, keep, proj, _evaluate_projections(args, model, proj, test),
                             profile_s + time.time() - t1))
            if args.measured_refine_steps:
                rows.append(_refined_row(args, model, proj, wikitext_calibration_windows(tok, args.refine_windows, args.window),
                                         test, f"{tag}-measured-{keep}", label, keep, time.time() - profile_s,
                                         steps=args.measured_refine_steps))
    return rows


def _keep_artefact(proj, tag: str) -> None:
    """Save trained projections (benchmarks/results/, git-ignored) and print their training report."""
    tag += f"-{QUANTIZE}" if QUANTIZE and f"-{QUANTIZE}" not in tag else ""
    tag += "-rot" if ROTATE and "-rot" not in tag else ""
    path = RESULTS.parent / "results" / f"refine-{tag}.safetensors"
    path.parent.mkdir(exist_ok=True)
    proj.save(path)
    print(f"refined {tag}: {proj.report['refine']} -> {path}", flush=True)


def _refine_note(proj) -> str:
    r = proj.report["refine"]
    return (f"{r['steps']} steps, {r['train_tokens']} tokens, KL {r['kl_before']:.3f}→{r['kl_after']:.3f}"
            + (", fell back" if r["fallback"] else ""))


def table(rows, args) -> str:
    keep = "keep (bytes vs a 16-bit cache)" if QUANTIZE else "keep (R/d)"
    lines = [f"| method | {keep} | KV bytes vs baseline | mean rel. key-logit error | ppl | time (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {k} | {f} | {e} | {p:.2f} | {t:.0f} |" for m, k, f, e, p, t in rows]
    head = (f"Command: `python benchmarks/quality.py {shlex.join(sys.argv[1:])}` "
            f"(eval {args.eval_windows}×{args.window} tokens of wiki.test.raw, calibration "
            f"{args.calib_windows}×{args.window} tokens of wiki.valid.tokens, K and V at the same rank unless marked)\n"
            f"Machine: {platform.machine()} CPU ×{torch.get_num_threads()} threads; torch {torch.__version__}, "
            f"transformers {__import__('transformers').__version__}, Python {platform.python_version()}\n")
    return head + "\n" + "\n".join(lines) + "\n"


def write_results(text: str, section: str = "quality") -> None:
    write_section(text, section, f"{section}: SmolLM2-135M-Instruct, WikiText-2 perplexity", RESULTS)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", type=lambda s: s.split(",") if s else [],
                   default=["pca", "eigen", "kqsvd", "kqsvd-summed", "pca@layer", "kqsvd@layer", "kqsvd@kv"],
                   help="calibrators; '@layer' = joint cross-head latent (granularity='layer'), '@kv' = one latent "
                        "shared by keys and values (granularity='kv')")
    p.add_argument("--key-weight", type=float, default=4.0,
                   help="'@kv' rows: weight of relative key-logit error against value-output error")
    p.add_argument("--split-methods", type=lambda s: s.split(",") if s else [], default=["kqsvd@layer"],
                   help="also run these with only keys / only values compressed")
    p.add_argument("--budget-methods", type=lambda s: s.split(",") if s else [], default=[],
                   help="also run these with ranks allocated per layer and K/V under a KV-bytes budget = keep")
    p.add_argument("--budget-measure", default="calibrator", choices=["calibrator", "output"],
                   help="error-rank profiles the budget allocation compares (see kvfx.Budget)")
    p.add_argument("--refine-methods", type=lambda s: s.split(",") if s else [], default=[],
                   help="also run these refined end to end (kvfx.refine: logit-KL distillation through the model); "
                        "a saved .safetensors artefact is trained further as it is")
    p.add_argument("--refine-steps", type=int, default=60)
    p.add_argument("--refine-lr", type=float, default=1e-3)
    p.add_argument("--refine-windows", type=int, default=16, help="calibration windows refine trains on (last 2 held out)")
    p.add_argument("--refine-key-share", type=float, default=0.5, help="share of the kept bytes spent on keys")
    p.add_argument("--refine-nested", action="store_true",
                   help="train once at full rank over the nested set --keep (Matryoshka), then truncate per keep")
    p.add_argument("--measured-methods", type=lambda s: s.split(",") if s else [], default=[],
                   help="also run these (methods fitted at full rank, or saved nested .safetensors artefacts) with ranks "
                        "allocated per site and K/V from measured model-KL profiles (kvfx.sensitivity + kvfx.allocate)")
    p.add_argument("--sensitivity-windows", type=int, default=2, help="calibration windows the profiles are measured on")
    p.add_argument("--sensitivity-steps", type=int, default=8, help="rank grid per site: multiples of width/steps")
    p.add_argument("--probe-quantized", action="store_true",
                   help="measure the sensitivity profiles through the --quantize rounding (kvfx.sensitivity(quantize=))")
    p.add_argument("--reuse-profiles", action="store_true",
                   help="load a profile saved by an earlier run (benchmarks/results/sensitivity-*.json, same setting)")
    p.add_argument("--measured-refine-steps", type=int, default=0,
                   help="also refine each measured allocation this many steps (kvfx.refine, --refine-lr/--refine-windows)")
    p.add_argument("--section", default="quality", help="RESULTS.md section the table is written to")
    p.add_argument("--key-shares", type=lambda s: [float(x) for x in s.split(",")], default=[0.5],
                   help="for --methods rows: share of the kept KV bytes spent on keys (0.5: K and V at the same rank)")
    p.add_argument("--split-keep", type=lambda s: [float(x) for x in s.split(",")], default=[0.5])
    p.add_argument("--keep", type=lambda s: [float(x) for x in s.split(",")], default=[0.75, 0.5, 0.25])
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend under kvfx's passes ('eager' skips Inductor's ~1 min compile per row; "
                        "the rewritten graph is the same)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="store latents as int8 / int4 (kvfx.compress(..., quantize=...)); keep and 'KV bytes' are then "
                        "fractions of an uncompressed 16-bit cache's bytes (codes + scale bytes, kvfx.quant)")
    p.add_argument("--rotate", action="store_true",
                   help="turn each latent by a random orthogonal matrix (kvfx.rotate_latents) before evaluating or "
                        "refining it: exact, and a low-bit cache rounds it with less error")
    p.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    global QUANTIZE, ROTATE
    QUANTIZE, ROTATE = args.quantize, args.rotate
    text = run(args)
    print(text)
    if args.write:
        write_results(text, args.section)


if __name__ == "__main__":
    main()

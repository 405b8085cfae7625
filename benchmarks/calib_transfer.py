"""How far a calibration carries to text it never saw: the fitted latents' objective on every domain's test text.

For each calibration source — one domain, the mix of all four, the mix without one domain (that domain never seen),
each optionally with its Grams shrunk toward a scaled identity (kvfx.calib.shrink) — fit the shared K+V latent
(`kqsvd`, granularity "kv", 16-bit) at each rank, and report its relative calibration objective (λ·key-logit error +
value-output error, λ = the fit's key weight, averaged over the model's attention sites) measured on the statistics
of each domain's TEST windows (never fitted). This is the quantity the fit minimises, on held-out text: it moves with
cache perplexity (benchmarks/domains.py) and takes minutes, not an hour, so it can compare many sources.

    python benchmarks/calib_transfer.py                      # 8 + 8 windows a domain, ranks 0.5 and 0.25 (~5 min)
    python benchmarks/calib_transfer.py --windows 2 --ranks 0.5 --shrink 0.1   # quick
"""
from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvfx.calib.collect import collect_stats, fit  # noqa: E402
from kvfx.calib.shared import DEFAULT_KEY_WEIGHT, shared_errors  # noqa: E402
from kvfx.calib.shrink import shrink  # noqa: E402
from kvfx.calib.stats import _SUMMED  # noqa: E402
from kvfx.data import DOMAINS, domain_windows  # noqa: E402
from kvfx.models import load_default_model  # noqa: E402

from results_file import RESULTS, write_section  # noqa: E402

TITLE = "calib-transfer: the calibration objective on every domain's test text, by calibration source"


def summed(parts: list[dict]) -> dict:
    """Statistics of several calibration texts together (token Grams, sums and counts added; W_O Grams shared)."""
    out = {}
    for name, first in parts[0].items():
        fields = {f: sum(p[name].__dict__[f] for p in parts) for f in _SUMMED if first.__dict__[f] is not None}
        out[name] = replace(first, tokens=sum(p[name].tokens for p in parts), memo={}, **fields)
    return out


def objective(proj, stats: dict) -> float:
    """λ·key_err + value_err of the shared latents, averaged over sites, on `stats`."""
    errs = [shared_errors(st, proj.sites[name]) for name, st in stats.items()]
    return sum(DEFAULT_KEY_WEIGHT * e["key_err"] + e["value_err"] for e in errs) / len(errs)


def sources(calib: dict, shrinks: list[float]) -> list[tuple[str, dict, tuple[str, ...]]]:
    """(label, statistics, the domains they saw) for every calibration source compared."""
    rows = [(d, calib[d], (d,)) for d in DOMAINS]
    rows += [("mix", summed(list(calib.values())), tuple(DOMAINS))]
    for d in DOMAINS:
        seen = tuple(e for e in DOMAINS if e != d)
        rows += [(f"mix without {d}", summed([calib[e] for e in seen]), seen)]
    for alpha in shrinks:
        rows += [(f"{name}, Grams shrunk by {alpha:g}", shrink(st, alpha), seen)
                 for name, st, seen in rows[:len(DOMAINS) + 1]]
    return rows


def run(args) -> str:
    model, tok = load_default_model()
    collect = lambda d, split: collect_stats(  # noqa: E731
        model, domain_windows(tok, d, split, args.windows, args.window).split(1), progress=False)
    calib = {d: collect(d, "calib") for d in DOMAINS}
    test = {d: collect(d, "test") for d in DOMAINS}
    lines = []
    for rank in args.ranks:
        lines += [f"\nRank {rank:g} of the 2·h·d-wide K+V row (16-bit latents: {rank:g} of the cache's bytes); cells: "
                  "relative objective on the domain's test windows (lower is better; * the source saw that domain's "
                  "calibration text)\n",
                  "| calibration source | " + " | ".join(DOMAINS) + " | worst unseen |",
                  "|---|" + "---|" * (len(DOMAINS) + 1)]
        for name, st, seen in sources(calib, args.shrink):
            proj = fit(st, "kqsvd", rank, granularity="kv")
            cells = {d: objective(proj, test[d]) for d in DOMAINS}
            unseen = [cells[d] for d in DOMAINS if d not in seen]
            lines.append(f"| {name} | " + " | ".join(f"{cells[d]:.4f}" + "*" * (d in seen) for d in DOMAINS)
                         + (f" | {max(unseen):.4f} |" if unseen else " | - |"))
            print(lines[-1], flush=True)
    cmd = " ".join(["python benchmarks/calib_transfer.py", *args.argv])
    head = (f"Command: `{cmd}` (SmolLM2-135M-Instruct float32; statistics of {args.windows} windows × {args.window} "
            f"tokens of each domain's calibration text (fits) and of its test text (cells); kqsvd, granularity kv, "
            f"key weight {DEFAULT_KEY_WEIGHT:g})\nMachine: {platform.machine()} CPU ×{torch.get_num_threads()} "
            f"threads; torch {torch.__version__}, transformers {__import__('transformers').__version__}, Python "
            f"{platform.python_version()}\n")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=8, help="windows a domain, of calibration and of test text")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--ranks", type=lambda s: [float(r) for r in s.split(",")], default=[0.5, 0.25])
    p.add_argument("--shrink", type=lambda s: [float(a) for a in s.split(",")], default=[0.01, 0.1],
                   help="shrinkage weights tried on each domain and on the mix (kvfx.calib.shrink)")
    p.add_argument("--section", default="calib-transfer", help="RESULTS.md section the table is written to")
    p.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--write"]
    bad = [a for a in args.shrink if not 0 < a < 1] + [r for r in args.ranks if not 0 < r <= 1]
    if bad:
        raise SystemExit(f"--shrink weights must be in (0, 1) and --ranks in (0, 1], got {bad}")
    text = run(args)
    print(text)
    if args.write:
        write_section(text, args.section, TITLE, RESULTS)


if __name__ == "__main__":
    main()

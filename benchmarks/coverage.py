"""Architecture coverage: every entry of tests/coverage/archs.py through kvfx, as one markdown table.

For each architecture (tiny random-weight transformers configs and hand-written modules, float32, CPU):
explain (attention sites found, RoPE); calibrate (kqsvd, rank 4 of head_dim 8) -> compress(torch.compile(model,
backend="eager")) -> forward, checked like tests/coverage/test_archs.py: full-rank identity projections must
reproduce the model (rel err <= 1e-5) and rank-4 projections must equal an independent low-rank reference
(rel err <= 1e-4) while really changing the output; for decoders, the compressed model's generate must equal
eager generate of the uncompressed model with kvfx.LowRankCache (tokens, and logits to 1e-4). Architectures
kvfx cannot rewrite must fail clearly (explain finds no rewritable site and calibrate raises "unsupported: ...");
the reason is shown. (tests/coverage/test_archs.py also checks the compressed forward's error.)

    python benchmarks/coverage.py            # prints the table
    python benchmarks/coverage.py --write    # ... and replaces the coverage block of docs/coverage.md

Exits with status 1 if any architecture does not behave as archs.py says it should.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "coverage"))

import archs  # noqa: E402
import kvfx  # noqa: E402

README = ROOT / "docs" / "coverage.md"  # the table moved out of the README
BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"
IDENTITY_TOL, LOWRANK_TOL, MIN_CHANGE, LOGITS_TOL = 1e-5, 1e-4, 1e-3, 1e-4


def _reason(message: str) -> str:
    """The first clause of an 'unsupported: ...' message."""
    text = message[message.find("unsupported:"):] if "unsupported:" in message else message
    return text.split(",")[0].split(";")[0].split(" (")[0].strip().rstrip(".")


def _num(x: float) -> str:
    return f"{x:.0e}" if x else "0"


def _fresh() -> None:
    torch._dynamo.reset()
    kvfx.counters.clear()


def check(arch: archs.Arch) -> dict:
    """One table row; `ok` says whether the architecture behaved as archs.py expects."""
    row = dict(arch=arch.name, form=arch.what, sites="-", rope="-", folded="-", forward="-", generate="-")
    model = arch.model()
    _fresh()
    _, exp = archs.explain_text(model)
    row["sites"] = str(len(exp.rows))
    bad = [r for r in exp.rows if r.status != "ok"]
    if exp.rows:
        row["rope"] = "yes" if any(r.rope for r in exp.rows) else "no"
    if not exp.rows or bad:
        reason = bad[0].status if bad else _reason(str(exp))
        refused = False
        try:  # calibrate must refuse too, with an "unsupported: ..." message
            archs.calibrate(arch, model)
        except ValueError as e:
            refused = "unsupported" in str(e) or "cannot calibrate" in str(e)
        row["status"] = reason
        row["ok"] = (not arch.supported) and refused
        if arch.supported:
            row["status"] = f"FAIL (expected supported): {reason}"
        return row

    _fresh()
    P = archs.calibrate(arch, model)
    ident = archs.check_identity(arch, model, P)
    _fresh()
    err, change = archs.check_lowrank(arch, model, P)
    c = kvfx.counters["kvfx"]
    row["folded"] = "".join(x for x in "qkvo" if c[f"folded_{x}"]) or "-"
    forward_ok = ident <= IDENTITY_TOL and err <= LOWRANK_TOL and change > MIN_CHANGE
    row["forward"] = f"{'ok' if forward_ok else 'FAIL'} ({_num(ident)} / {_num(err)})"
    generate_ok = True
    if arch.decoder:
        _fresh()
        got, expected = archs.check_generate(arch, model, P, output_logits=True, return_dict_in_generate=True)
        logits = max(archs.rel_err(a, b) for a, b in zip(got.logits, expected.logits))
        c = kvfx.counters["kvfx"]
        generate_ok = (torch.equal(got.sequences, expected.sequences) and logits <= LOGITS_TOL
                       and c["reassociated"] == c["rewritten"] > 0)
        row["generate"] = f"{'ok' if generate_ok else 'FAIL'} ({_num(logits)})"
    else:
        row["generate"] = "n/a (no KV cache)"
    row["ok"] = arch.supported and forward_ok and generate_ok
    row["status"] = "ok" if row["ok"] else ("FAIL" if arch.supported else "FAIL (expected unsupported)")
    return row


COLUMNS = [("arch", "arch"), ("form", "attention form"), ("sites", "sites found"), ("rope", "RoPE"),
           ("folded", "folded (no cache)"), ("forward", "forward: identity / rank 4 vs reference"),
           ("generate", "generate vs LowRankCache (max logit err)"), ("status", "status / unsupported reason")]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[k]).replace("|", "\\|") for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_readme(text: str) -> None:
    body = README.read_text()
    if BEGIN not in body or END not in body:
        raise SystemExit(f"{README} has no {BEGIN} ... {END} block to replace.")
    pre, rest = body.split(BEGIN, 1)
    _, post = rest.split(END, 1)
    README.write_text(f"{pre}{BEGIN}\n{text}{END}{post}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", choices=list(archs.BY_NAME), help="only these (repeatable)")
    p.add_argument("--write", action="store_true", help="replace the coverage block of docs/coverage.md")
    args = p.parse_args()
    from transformers.utils import logging
    logging.set_verbosity_error()
    torch.set_num_threads(1)  # tiny tensors: more intra-op threads only add synchronisation
    rows = []
    for arch in [archs.BY_NAME[n] for n in args.arch] if args.arch else archs.ARCHS:
        t0 = time.time()
        try:
            row = check(arch)
        except Exception as e:  # a crash is a row too, not the end of the table
            traceback.print_exc()
            row = dict(arch=arch.name, form=arch.what, sites="-", rope="-", folded="-", forward="-", generate="-",
                       status=f"FAIL: {type(e).__name__}: {_reason(str(e))}", ok=False)
        print(f"{arch.name}: {row['status']} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
        rows.append(row)
    n_ok = sum(r["ok"] and r["status"] == "ok" for r in rows)
    n_unsup = sum(r["ok"] and r["status"] != "ok" for r in rows)
    text = table(rows) + (f"\n{n_ok} supported and checked, {n_unsup} unsupported and refused clearly, "
                          f"{len(rows) - n_ok - n_unsup} failing (torch {torch.__version__.split('+')[0]}, "
                          f"transformers {__import__('transformers').__version__}).\n")
    print(text)
    if args.write:
        if args.arch:
            raise SystemExit("--write records the full table: run it without --arch.")
        write_readme(text)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""What bits per latent direction lose, split: the directions dropped against the rounding of the kept ones.

`kvfx.best_config` at each budget (bits per direction: int8 / int5 / int4 / int3 / int2 bands, the rest dropped)
calibrated on the mix, then on each domain's test windows, through the rewrite pass (full forward, `use_cache=False`):

* perplexity × the original's of the configuration as the cache stores it (bands rounded);
* the same projections with every kept direction in 16 bits (`quantize=None`): only the dropped directions lose;
* each band's measured rounding error on the real latents (Σ‖round(x) − x‖² / Σ‖x‖² over every site and token,
  around the calibration mean where the recipe centres) beside the constant kvfx.allocate_bits prices it with (the
  format's error on Gaussian rows).

    python benchmarks/band_error.py                                  # 12.5 % and 25 %, 32 calibration windows (~20 min)
    python benchmarks/band_error.py --budgets 0.125 --calib-windows 4 --windows 1    # quick
"""
from __future__ import annotations

import argparse
import collections
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kvfx  # noqa: E402
from kvfx import data, quant  # noqa: E402
from kvfx.calib.bits import format_error  # noqa: E402
from kvfx.data import DOMAINS, calibration_mix, domain_windows  # noqa: E402
from kvfx.models import load_default_model  # noqa: E402

from results_file import RESULTS, write_section  # noqa: E402

TITLE = "band-error: bits per direction, the loss split between dropped directions and rounding"


class BandErrors:
    """Wraps kvfx.quant.fake_quant (what the rewrite pass rounds latents with) and sums each band format's rounding
    error and energy: {bits: [Σ error², Σ x², numbers]}."""

    __name__ = "fake_quant"  # an FX node's name comes from its target's

    def __init__(self):
        self.sums = collections.defaultdict(lambda: [0.0, 0.0, 0])
        self.inner = quant.fake_quant

    def __call__(self, x, kind="int8", offset=None):
        y = self.inner(x, kind, offset)
        xs, ys = (x, y) if offset is None else (x - offset, y - offset)
        lo = 0
        for fmt, w in quant.layout(kind, x.shape[-1]):
            a, b = xs[..., lo:lo + w].float(), ys[..., lo:lo + w].float()
            s = self.sums[fmt.bits]
            s[0] += float(((b - a) ** 2).sum())
            s[1] += float((a ** 2).sum())
            s[2] += a.numel()
            lo += w
        return y


def run(args) -> str:
    model, tok = load_default_model(torch.float32)
    calib = calibration_mix(tok, args.calib_windows, args.window)
    return "".join(budget_table(model, tok, calib, budget, args) for budget in args.budgets)


def budget_table(model, tok, calib, budget: float, args) -> str:
    proj = kvfx.best_config(model, calib, budget, progress=False)
    spy = BandErrors()

    def ppl(quantize, windows):
        quant.fake_quant = spy  # the rewrite pass inserts quant.fake_quant as found when it compiles (first call)
        cm = kvfx.compress(torch.compile(model, backend="eager"), proj, quantize=quantize)
        try:
            return data.perplexity(lambda ids: cm(input_ids=ids, use_cache=False).logits, windows, progress=False)
        finally:
            quant.fake_quant = spy.inner
            kvfx.decompress(cm)
            torch._dynamo.reset()

    rows, bands = [], {}
    for d in args.domains:
        windows = domain_windows(tok, d, "test", args.windows, args.window)
        base = data.perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits, windows, progress=False)
        spy.sums.clear()
        rounded = ppl("auto", windows)
        bands[d] = {b: (e / n, c) for b, (e, n, c) in spy.sums.items()}
        kept = ppl(None, windows)
        rows.append((d, base, rounded / base, kept / base))
        print(rows[-1], bands[d], flush=True)

    fmt = proj.quantize
    kept_cols = sorted({quant.width_of(f) for f in fmt.values()}) if isinstance(fmt, dict) else [quant.width_of(fmt)]
    lines = ["| domain | original ppl | bands (as stored) | kept directions in 16 bits | rounding's share of the loss |",
             "|---|---|---|---|---|"]
    for d, base, r, k in rows:
        share = (r - k) / (r - 1) if r > 1 else float("nan")
        lines.append(f"| {d} | {base:.2f} | {r:.3f} | {k:.3f} | {share:.2f} |")
    all_bits = sorted({b for v in bands.values() for b in v}, reverse=True)
    lines += ["", "Rounding error of each band on the real latents (every site and token of the domain's windows) "
                  "against the constant allocate_bits prices the format with (Gaussian rows):", "",
              "| band | numbers a window (all sites) | Gaussian constant | " + " | ".join(args.domains) + " |",
              "|---|---|---|" + "---|" * len(args.domains)]
    for b in all_bits:
        count = next(v[b][1] for v in bands.values() if b in v) // args.windows
        lines.append(f"| int{b} | {count} | {format_error(b):.4f} | "
                     + " | ".join(f"{bands[d][b][0]:.4f}" if b in bands[d] else "-" for d in args.domains) + " |")
    head = (f"\n**{budget:g} of a 16-bit cache's bytes** ({proj.kv_fraction(fmt):.3f} held; {min(kept_cols)}-"
            f"{max(kept_cols)} of {2 * max(s.kv_heads * s.head_dim for s in proj.shapes.values())} K+V directions "
            "kept a layer):\n\n")
    return head + "\n".join(lines) + "\n"


def header(args) -> str:
    cmd = " ".join(["python benchmarks/band_error.py", *args.argv])
    return (f"Command: `{cmd}` (SmolLM2-135M-Instruct float32; kvfx.best_config calibrated on {args.calib_windows} "
            f"windows of the mix; {args.windows} test windows × {args.window} tokens a domain, full forward through the "
            f"rewrite pass; cells: perplexity × the original's)\nMachine: {platform.machine()} CPU "
            f"×{torch.get_num_threads()} threads; torch {torch.__version__}, transformers "
            f"{__import__('transformers').__version__}, Python {platform.python_version()}\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=lambda v: [float(b) for b in v.split(",")], default=[0.125, 0.25],
                   help="fractions of a 16-bit cache's bytes (below 0.375: bits per direction)")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--windows", type=int, default=4, help="test windows a domain")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--domains", type=lambda s: s.split(","), default=list(DOMAINS))
    p.add_argument("--section", default="band-error", help="RESULTS.md section the table is written to")
    p.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as run, --write included (the sweep runner adds it)
    unknown = [d for d in args.domains if d not in DOMAINS]
    if unknown or not all(0 < b < 0.375 for b in args.budgets):
        raise SystemExit(f"--domains must be among {', '.join(DOMAINS)} (got {unknown}) and --budgets in (0, 0.375), "
                         f"where best_config takes bits per direction (got {args.budgets})")
    text = header(args) + run(args)
    print(text)
    if args.write:
        write_section(text, args.section, TITLE, RESULTS)


if __name__ == "__main__":
    main()

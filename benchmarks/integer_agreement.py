"""What the decode kernel's integer path does to a real model's outputs: against its float path, same cache.

For each configuration (SmolLM2, shared latents, calibrated on 4 windows of the shipped calibration mix) and each
domain (kvfx.data.DOMAINS), a greedy generation from a 256-token prompt of the domain's test text runs twice through
the compiled model: with the integer path this CPU has (AMX, AVX-512 VNNI, or AVX2 with KVFX_AVX2_INTEGER=1) and with
KVFX_NO_AMX=1 (rows decoded to float32: the reference's numbers). Reported: how many generated tokens agree before
the first difference, the largest logit difference before it, and — on the attention calls of the integer run's
steps, each re-run through the float path — the kernel's output difference relative to the output's largest |x|
(median and largest over layers and steps). The steps go through the Python op `kvfx::decode_attention`
(KVFX_NO_DECODE_KERNEL=1, set here: the same kernel and numbers), whose calls the recorder sees; compiled CPU graphs
otherwise call the C++ op `attend` directly.

    python benchmarks/integer_agreement.py                # ~10 min on 2 cores
    python benchmarks/integer_agreement.py --new-tokens 8 --domains wikitext    # quick
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kvfx  # noqa: E402
from kvfx.calib.collect import collect_stats, fit  # noqa: E402
from kvfx.data import DOMAINS, calibration_mix, domain_windows  # noqa: E402
from kvfx.models import load_default_model  # noqa: E402
from kvfx.ops import lowbit_attention as la  # noqa: E402

from results_file import RESULTS, write_section  # noqa: E402

CONFIGS = ("kv-0.9375-int4", "kv-bits-0.125")


class Recorder:
    """Stands in for the compiled kernel module: records every decode_attention call's arguments, then runs it."""

    def __init__(self, ext):
        self.ext, self.calls = ext, []

    def __getattr__(self, name):
        return getattr(self.ext, name)

    def decode_attention(self, *args):
        self.calls.append([a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        return self.ext.decode_attention(*args)


SWITCHES = ("KVFX_NO_AMX", "KVFX_AVX2_INTEGER")  # the kernel reads them at every call
INTEGER, FLOAT = {"KVFX_AVX2_INTEGER": "1"}, {"KVFX_NO_AMX": "1"}


def under(env: dict, fn, *args):
    """fn(*args) with the kernel's switches set to `env` (the others unset), then restored."""
    saved = {k: os.environ.pop(k, None) for k in SWITCHES}
    os.environ.update(env)
    try:
        return fn(*args)
    finally:
        for k in SWITCHES:
            os.environ.pop(k, None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def generate(model, ids, new_tokens):
    with torch.no_grad():
        return model.generate(ids, do_sample=False, max_new_tokens=new_tokens, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)


def projections(name, stats):
    if name == "kv-0.9375-int4":
        return kvfx.rotate_latents(fit(stats, "kqsvd", 0.9375, granularity="kv")), "int4"
    proj = kvfx.allocate_bits(stats, fit(stats, "kqsvd", 1.0, granularity="kv"), 0.125)
    return proj, proj.quantize


def run(args) -> str:
    torch.manual_seed(0)
    model, tok = load_default_model(torch.float32)
    stats = collect_stats(model, calibration_mix(tok, 4, 512).split(1), progress=False)
    ext = la._extension()
    rounding = under(INTEGER, la.integer_rounding, "cpu")
    if rounding is None:
        raise SystemExit("no integer path on this CPU (AMX-INT8, or AVX2 without AVX-512): nothing to compare")
    rows = []
    for name in args.configs:
        proj, quantize = projections(name, stats)
        compressed = kvfx.compress(torch.compile(model), proj, quantize=quantize)
        try:
            for d in args.domains:
                ids = domain_windows(tok, d, "test", 1, args.prompt)
                rec = Recorder(ext)
                la._EXT["module"] = rec
                try:
                    fast = under(INTEGER, generate, compressed, ids, args.new_tokens)
                finally:
                    la._EXT["module"] = ext
                ref = under(FLOAT, generate, compressed, ids, args.new_tokens)
                new_fast, new_ref = fast.sequences[0, ids.shape[1]:], ref.sequences[0, ids.shape[1]:]
                differ = (new_fast != new_ref).nonzero()
                same = int(differ[0, 0]) if len(differ) else len(new_ref)
                upto = max(1, min(same + 1, len(fast.logits)))  # the steps up to the first difference
                logit = (torch.stack(fast.logits[:upto]) - torch.stack(ref.logits[:upto])).abs().max().item()
                rel = []
                for call in rec.calls:  # the same inputs through both paths
                    exact, got = under(FLOAT, ext.decode_attention, *call), under(INTEGER, ext.decode_attention, *call)
                    rel.append(((got - exact).abs().max() / exact.abs().max().clamp_min(1e-12)).item())
                rows.append((name, quantize if isinstance(quantize, str) else "bands", d, same, len(new_ref), logit,
                             statistics.median(rel) if rel else float("nan"), max(rel, default=float("nan"))))
                print(f"{name} {d}: tokens equal before the first difference {same}/{len(new_ref)}, "
                      f"max |logit diff| {logit:.3f}, kernel output rel. diff median {rows[-1][6]:.2e} "
                      f"max {rows[-1][7]:.2e} ({len(rel)} calls)", flush=True)
        finally:
            kvfx.decompress(compressed)
            torch._dynamo.reset()
    cmd = "python benchmarks/integer_agreement.py " + " ".join(shlex.quote(a) for a in (args.argv or []))
    lines = [f"Command: `{cmd.strip()}`",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; torch "
             f"{torch.__version__}; integer path: {rounding}; prompt {args.prompt} tokens of each domain's test text, "
             f"{args.new_tokens} greedy tokens, float path = KVFX_NO_AMX=1", "",
             "| config | domain | tokens equal before the first difference | max abs logit diff up to it | "
             "kernel output rel. diff, median | max |", "|---|---|---|---|---|---|"]
    for name, _, d, same, n, logit, med, mx in rows:
        lines.append(f"| {name} | {d} | {same} / {n} | {logit:.3f} | {med:.2e} | {mx:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=lambda s: s.split(","), default=list(CONFIGS))
    p.add_argument("--domains", type=lambda s: s.split(","), default=list(DOMAINS))
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--section", default="integer-agreement")
    p.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    os.environ["KVFX_NO_DECODE_KERNEL"] = "1"  # steps through the Python op, so the Recorder sees every call
    bad = [c for c in args.configs if c not in CONFIGS] + [d for d in args.domains if d not in DOMAINS]
    if bad:
        p.error(f"unknown configuration(s) / domain(s) {', '.join(bad)}: configs {', '.join(CONFIGS)}; domains "
                f"{', '.join(DOMAINS)}")
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--write",)]
    if "--section" in args.argv:
        i = args.argv.index("--section")
        del args.argv[i:i + 2]
    text = run(args)
    print(text)
    if args.write:
        write_section(text, args.section, f"{args.section}: integer path against the float path, a real model's outputs",
                      RESULTS)


if __name__ == "__main__":
    main()

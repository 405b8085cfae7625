"""Output of benchmarks/speed.py: markdown tables, the RESULTS.md section, the plot."""
from __future__ import annotations

import os
import platform
import shlex
from pathlib import Path

import torch

from results_file import RESULTS, write_section
from speed_setup import GiB, MiB
from speed_targets import targets



def _x(v, fmt="{:.2f}×"):
    return "-" if v is None else fmt.format(v)


def tables(res: dict, args) -> str:
    lines = ["| model | dtype | config | cache | batch | N | cache MiB | ΔRSS peak MiB | step memory MiB | step ms | "
             "tokens/s | vs orig-dynamic | vs orig-static | bytes-ideal | read GB/s | bandwidth bound | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['config']} | {r['cache']} | {r['batch']} | {r['N']} | "
                     f"{r['cache_bytes'] / MiB:.1f} | {r['rss_delta'] / MiB:.0f} | {r['step_extra'] / MiB:.0f} | "
                     f"{r['step_ms']:.2f} | {r['tokens_per_s']:.1f} | {_x(r['vs_dynamic'])} | {_x(r['vs_static'])} | "
                     f"{_x(r['bytes_ideal'])} | {r.get('read_bw', res['bandwidth']) / 1e9:.1f} | "
                     f"{r['bw_fraction']:.2f} | {r['note'] or ''} |")
    if res["prefill"]:
        lines += ["", f"Prefill ({args.prefill_len} tokens, batch 1, fresh cache, median of {args.prefill_runs} "
                  "after one warm-up):", "",
                  "| model | dtype | config | cache | prefill ms | vs orig-dynamic | notes |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {p['model']} | {p['dtype']} | {p['config']} | {p['cache']} | {p['ms']:.1f} | "
                  f"{_x(p['vs_dynamic'])} | {p['note']} |" for p in res["prefill"]]
    if res["longest"]:
        lines += ["", f"Longest context in --memory-budget {args.memory_budget / GiB:.2f} GiB: weights + bytes "
                  "held per cached token × T (cache bytes, or the storage behind them where larger, at the largest "
                  "batch × N measured) + per-step working memory (fixed + per token, fitted to the peak during the "
                  "timed steps − RSS just before them; compiled code and allocator slack are not counted, see "
                  "ΔRSS); T counts batch × tokens:", "",
                  "| model | dtype | config | cache | bytes/token | step memory fixed MiB | step memory bytes/token | "
                  "longest context | vs orig-dynamic |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {o['model']} | {o['dtype']} | {o['config']} | {o['cache']} | {o['bytes_per_token']:.0f} | "
                  f"{o['extra_fixed'] / MiB:.0f} | {o['extra_per_token']:.0f} | {o['tokens']} | "
                  f"{_x(o['vs_dynamic'])} |" for o in res["longest"]]
    goals = targets(res)
    return "\n".join(lines) + "\n" + ("\n" + goals if goals else "")


def machine(args) -> str:
    if args.device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores"


def header(res: dict, args) -> str:
    """The section's command and setting lines (a rendered run: the machine and threads its JSON recorded)."""
    return (f"Command: `python benchmarks/speed.py {shlex.join(args.argv)}`\n"
            f"Machine: {res.get('machine') or machine(args)}; {res.get('threads') or torch.get_num_threads()} torch "
            f"threads; torch {torch.__version__}, "
            f"transformers {__import__('transformers').__version__}, Python {platform.python_version()}; compile "
            f"backend {args.backend}{', mode ' + args.mode if args.mode else ''}\n"
            f"Read bandwidth (torch.sum over {args.bandwidth_gib:g} GiB float32): {res['bandwidth'] / 1e9:.1f} GB/s at "
            "the start, and again before and after each row (read GB/s: the higher of the two, its bandwidth bound's); "
            f"decode: median of {args.steps} steps after {args.warmup} warm-up steps; cache filled with random "
            "full-width keys/values through cache.update; bytes-ideal = (weights + original-dynamic cache) / "
            "(weights + this cache); bandwidth bound = ((weights + cache) / the row's read bandwidth) / step time; "
            "ΔRSS peak = "
            "peak RSS of the row (fill, warm-up with its compiling, timed steps) − RSS at its start (the first row "
            "of a configuration carries its compilation); step memory = peak RSS during the timed steps − RSS just "
            f"before them{' (CUDA: torch.cuda allocated memory, not RSS)' if args.device == 'cuda' else ''}\n")


def write_results(text: str, path: Path = RESULTS, section: str = "speed") -> None:
    """Replace a "Decode speed" section of RESULTS.md (between its markers), or append it."""
    write_section(text, section, "Decode speed" + ("" if section == "speed" else f" ({section})"), path)
    print(f"wrote the Decode speed section of {path}")


def plot(res: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[bench]')") from None
    groups = sorted({(r["model"], r["dtype"]) for r in res["rows"]})
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 5), squeeze=False)
    for ax, (model, dtype) in zip(axes[0], groups):
        lines = {}
        for r in res["rows"]:
            if (r["model"], r["dtype"], r["batch"]) == (model, dtype, 1):
                lines.setdefault(f"{r['config']} ({r['cache']})", []).append((r["N"], r["step_ms"]))
        for name, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set(title=f"{model} {dtype}, batch 1", xlabel="context N (tokens)", ylabel="decode step (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")

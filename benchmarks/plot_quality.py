"""Plot perplexity vs KV-cache bytes kept, one line per method, from the quality tables that
`benchmarks/quality.py --write` records in benchmarks/RESULTS.md.

    python benchmarks/plot_quality.py            # -> benchmarks/quality.png
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_rows(text: str) -> tuple[float | None, dict[str, list[tuple[float, float]]]]:
    """(baseline ppl, {method label: [(KV bytes fraction, ppl), ...]}) from the quality tables in RESULTS.md
    (every table quality.py wrote; the KV-bytes column, when absent, is the keep fraction)."""
    base, lines = None, defaultdict(list)
    header = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if not cells:
            header = None
            continue
        if cells[0] == "method":
            header = cells
            continue
        if header is None or set(cells[0]) <= set("-"):
            continue
        row = dict(zip(header, cells))
        ppl = float(row["ppl"])
        if row["method"].startswith("baseline"):
            base = ppl
            continue
        frac = float(row.get("KV bytes vs baseline") or row["keep (R/d)"])
        label = re.sub(r" \(\d+ steps[^)]*\)", "", row["method"])  # refine rows: one line whatever the KL note
        if (frac, ppl) not in lines[label]:
            lines[label].append((frac, ppl))
    return base, lines


def plot(results: Path, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    base, lines = load_rows(results.read_text())
    fig, ax = plt.subplots(figsize=(12, max(6.0, 0.16 * len(lines) + 1.5)))  # room for the legend
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for label, pts in sorted(lines.items()):
        if len({x for x, _ in pts}) < len(pts) or len(pts) < 2:  # single points / variants at one size: markers
            ax.scatter(*zip(*pts), marker="x", label=label)
            continue
        pts.sort()
        ax.plot(*zip(*pts), marker="o", label=label)
    if base is not None:
        ax.axhline(base, color="k", lw=1, label=f"baseline {base:.1f}")
        ax.axhline(1.10 * base, color="k", lw=0.8, ls="--", label="1.10 × baseline")
        ax.axhline(1.5 * base, color="k", lw=0.8, ls=":", label="1.5 × baseline")
    ax.set_yscale("log")
    ax.set_xlabel("KV-cache bytes kept (fraction of baseline; [int8/int4 latents] rows: of a 16-bit cache)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title("SmolLM2-135M-Instruct under kvfx: perplexity vs KV-cache size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main(argv=None) -> None:
    from results_file import plot_main
    plot_main(__doc__, plot, HERE / "quality.png", argv)


if __name__ == "__main__":
    main()

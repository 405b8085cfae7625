"""Plot perplexity vs KV-cache bytes kept, one line per method, from the JSON rows that
`benchmarks/quality.py --write` leaves in benchmarks/results/quality-*.json.

    python benchmarks/plot_quality.py            # -> benchmarks/quality.png
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_rows(paths: list[Path]) -> tuple[float | None, dict[str, list[tuple[float, float]]]]:
    """(baseline ppl, {method label: [(KV bytes fraction, ppl), ...]}) over all result files."""
    base, lines = None, defaultdict(list)
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            if row["method"].startswith("baseline"):
                base = row["ppl"]
                continue
            lines[row["method"]].append((float(row["kv_fraction"]), float(row["ppl"])))
    return base, lines


def plot(paths: list[Path], out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    base, lines = load_rows(paths)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for label, pts in sorted(lines.items()):
        if len(pts) < 2:      # single-point rows (keys-only / values-only) as markers
            ax.scatter(*zip(*pts), marker="x", label=label)
            continue
        pts.sort()
        ax.plot(*zip(*pts), marker="o", label=label)
    if base is not None:
        ax.axhline(base, color="k", lw=1, label=f"baseline {base:.1f}")
        ax.axhline(1.10 * base, color="k", lw=0.8, ls="--", label="1.10 × baseline")
        ax.axhline(1.5 * base, color="k", lw=0.8, ls=":", label="1.5 × baseline")
    ax.set_yscale("log")
    ax.set_xlabel("KV-cache bytes kept (fraction of baseline)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title("SmolLM2-135M-Instruct under kvfx: perplexity vs KV-cache size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path, help="result JSON files (default: benchmarks/results/quality-*.json)")
    p.add_argument("--out", type=Path, default=HERE / "quality.png")
    args = p.parse_args(argv)
    files = args.files or sorted((HERE / "results").glob("quality-*.json"))
    if not files:
        raise SystemExit("no results: run `python benchmarks/quality.py --write` first")
    print(plot(files, args.out))


if __name__ == "__main__":
    main()

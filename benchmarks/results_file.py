"""benchmarks/RESULTS.md: one marked section per benchmark, replaced in place when the benchmark reruns."""
from __future__ import annotations

import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(text: str, section: str, title: str, path: Path = RESULTS) -> None:
    """Replace the text between `<!-- {section}:begin -->` and `<!-- {section}:end -->`, or append it under `## title`."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    sweep = os.environ.get("KVFX_SWEEP")
    if sweep:  # run by benchmarks/sweep.py: the one command that regenerates this table
        text = f"Sweep: `python benchmarks/sweep.py {sweep}` (benchmarks/sweeps.toml)\n" + text
    body = path.read_text() if path.exists() else "# kvfx benchmark results\n"
    block = f"{begin}\n{text}{end}"
    if begin in body:
        pre, rest = body.split(begin, 1)
        body = pre + block + rest.split(end, 1)[1]
    else:
        body = body.rstrip() + f"\n\n## {title}\n\n" + block + "\n"
    path.write_text(body)


def plot_main(doc: str, plot, out: Path, argv=None) -> None:
    """A plotting script's command line: --results (this file) and --out (`out`), then print what plot() wrote."""
    import argparse
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--out", type=Path, default=out)
    args = p.parse_args(argv)
    print(plot(args.results, args.out))

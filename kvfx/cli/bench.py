"""`kvfx bench`: the quick decode-speed benchmark, benchmarks/speed.py --quick, from a source checkout.

The benchmark scripts live in the repository, not in the package; this runs the script next to the package
(an editable install or a checkout) as a subprocess and passes any further arguments on.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .common import CliError, say


def script() -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"


def add_arguments(p) -> None:
    p.add_argument("extra", nargs=argparse.REMAINDER, metavar="...",
                   help="more options for benchmarks/speed.py (after --quick; options given explicitly win)")


def run(args) -> int:
    path = script()
    if not path.is_file():
        raise CliError(f"{path} not found: `kvfx bench` runs the benchmark script of a source checkout; clone the "
                       "kvfx repository and install it with `pip install -e .`")
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    command = [sys.executable, str(path), "--quick", *extra]
    say(" ".join(command))
    return subprocess.call(command)

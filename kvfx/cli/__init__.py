"""The `kvfx` command (also `python -m kvfx`): one module per subcommand, thin over the library.

    kvfx explain MODEL                              attention sites and what can be compressed
    kvfx calibrate MODEL --budget 0.25 -o P.safetensors   the best known configuration for a byte budget
    kvfx eval MODEL P.safetensors                   perplexity, original vs compressed (forward and cached)
    kvfx generate MODEL P.safetensors --prompt ...  text, cache bytes and tokens/s beside the original's
    kvfx bench                                      benchmarks/speed.py --quick (source checkouts)
    kvfx info P.safetensors                         ranks, formats, bytes per token, allocation, provenance

User mistakes print one line (`kvfx <command>: error: <problem>; <fix>`) and exit with code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .common import CliError

COMMANDS = {  # name -> (module, one-line help)
    "explain": ("explain", "list the model's attention sites and what kvfx can compress"),
    "calibrate": ("calibrate", "make projections for a KV-cache byte budget (the best known recipe)"),
    "eval": ("evaluate", "perplexity of the original vs the compressed model, forward and through the cache"),
    "generate": ("generate", "generate text with the compressed model, with cache bytes and tokens/s"),
    "bench": ("bench", "run the quick decode-speed benchmark (benchmarks/speed.py --quick)"),
    "info": ("info", "describe a projections file: ranks, formats, bytes per token, provenance"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with where to find help) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = _Parser(prog="kvfx", description="Low-rank, low-bit KV caches for torch.compile'd transformers.")
    parser.add_argument("--version", action="version", version=f"kvfx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(module=module)
        importlib.import_module(f".{module}", __name__).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..projections import ProjectionError
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return importlib.import_module(f".{args.module}", __name__).run(args) or 0
    except (CliError, ProjectionError) as e:
        message = " ".join(str(e).split())
        print(f"kvfx {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kvfx {args.command}: interrupted", file=sys.stderr)
        return 130

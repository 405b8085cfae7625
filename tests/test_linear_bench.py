"""benchmarks/linear.py: one short run prints both ops for each dtype asked (the timings themselves are a command,
not a test)."""
from __future__ import annotations

import re
import sys

import pytest

from helpers import bench_module
from kvfx.ops import decode_linear as dl


@pytest.mark.skipif(dl.op() is None, reason="no C++ compiler: no kvfx linear op here")
def test_prints_both_ops_per_dtype(monkeypatch, capsys):
    bench = bench_module("linear.py")
    monkeypatch.setattr(sys, "argv", ["linear.py", "--layers", "1", "--steps", "1", "--dtype", "float32",
                                      "--dtype", "bfloat16"])
    bench.main()
    rows = [re.fullmatch(r"(\w+)\s+(F\.linear|kvfx linear)\s+([0-9.]+) ms a step\s+([0-9.]+) GB/s", line.strip())
            for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(m[1], m[2]) for m in rows] == [("float32", "F.linear"), ("float32", "kvfx linear"),
                                           ("bfloat16", "F.linear"), ("bfloat16", "kvfx linear")]
    assert all(float(m[3]) > 0 and float(m[4]) > 0 for m in rows)

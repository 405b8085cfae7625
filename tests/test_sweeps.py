"""benchmarks/sweeps.toml + sweep.py: every RESULTS.md table has a named sweep, and a sweep runs the sweeps writing
the artefacts it needs first."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("tomllib")  # the runner reads sweeps.toml with Python 3.11's tomllib


def _sweep_module():
    spec = importlib.util.spec_from_file_location("sweep", ROOT / "benchmarks" / "sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_results_table_has_its_sweep():
    sweeps = _sweep_module().load()
    sections = re.findall(r"<!-- ([a-z0-9-]+):begin -->", (ROOT / "benchmarks" / "RESULTS.md").read_text())
    assert sorted(sections) == sorted(sweeps)


def test_needs_run_first_and_only_when_missing(tmp_path):
    sw = _sweep_module()
    sweeps = sw.load()
    plan = sw.order(["shared-25-third"], sweeps, tmp_path, all_needed=False)  # nothing exists under tmp_path
    assert plan == ["shared-measured-refine-other", "shared-measured-refine-25-continued", "shared-25-third"]
    art = tmp_path / "benchmarks/results/refine-refine-kqsvd@kv-measured-0.25+120.safetensors"
    art.parent.mkdir(parents=True)
    art.touch()
    assert sw.order(["shared-25-third"], sweeps, tmp_path, all_needed=False) == ["shared-25-third"]
    everything = sw.order(list(sweeps), sweeps, tmp_path, all_needed=True)
    assert sorted(everything) == sorted(sweeps)
    for name in everything:
        for producer in sweeps[name].get("needs", {}).values():
            assert everything.index(producer) < everything.index(name)


def test_dry_run_prints_the_command_with_its_section():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sweep.py"), "int4-uniform-rotated", "--dry-run"],
                         capture_output=True, text=True, check=True).stdout
    assert "quality.py --methods kqsvd@kv" in out and out.rstrip().endswith("--section int4-uniform-rotated --write")


def test_unknown_sweep_is_refused():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sweep.py"), "no-such-sweep"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "unknown sweep(s) no-such-sweep" in r.stderr

"""benchmarks/band_error.py: its rounding-error tally and its refusals (the table itself is a command, sweep
`band-error`, not a test)."""
from __future__ import annotations

import pytest
import torch

from helpers import bench_module
from kvfx import quant


@pytest.fixture(scope="module")
def bench():
    return bench_module("band_error.py")


def test_tally_rounds_as_fake_quant_and_sums_each_band(bench):
    spy = bench.BandErrors()
    gen = torch.Generator().manual_seed(0)
    x, offset = torch.randn(3, 5, 80, generator=gen), torch.randn(80, generator=gen)
    kind = "int8x16+int4x32+int2x32"
    assert torch.equal(spy(x, kind, offset), quant.fake_quant(x, kind, offset))  # what the pass computes, unchanged
    centred = x - offset
    err = quant.fake_quant(centred, kind) - centred
    for bits, (lo, hi) in {8: (0, 16), 4: (16, 48), 2: (48, 80)}.items():
        e2, x2, n = spy.sums[bits]
        assert n == 15 * (hi - lo)
        assert e2 == pytest.approx(float((err[..., lo:hi] ** 2).sum()), rel=1e-5)
        assert x2 == pytest.approx(float((centred[..., lo:hi] ** 2).sum()), rel=1e-5)
    assert spy.sums[2][0] / spy.sums[2][1] > spy.sums[4][0] / spy.sums[4][1] > spy.sums[8][0] / spy.sums[8][1]


@pytest.mark.parametrize("argv", [["--budgets", "0.5"], ["--budgets", "0.125,0"], ["--domains", "wikitext,poetry"]])
def test_bad_arguments_refused_before_loading(bench, argv, monkeypatch):
    monkeypatch.setattr(bench, "load_default_model", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit, match="--domains must be among"):
        bench.main(argv)

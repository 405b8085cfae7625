"""kvfx.lattice: the E8 codebook of the "e8" format, its nearest-point rounding and indices."""
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from archs import _e8_point
from kvfx import lattice


def test_codebook_is_the_e8_ball():
    u, keys = lattice.codebook()
    assert u.shape == (lattice.SIZE, 8) and u.dtype == torch.int8
    u = u.long()
    even = (u % 2 == 0).all(1)
    assert (even | (u % 2 == 1).all(1)).all()                  # D8 doubled, or D8 + ½ doubled
    assert (u.sum(1) % 4 == 0).all() and ((u * u).sum(1) <= 4 * lattice.RADIUS2).all()
    assert (keys[1:] > keys[:-1]).all()                         # the index order: keys ascending, no repeats
    # the theta series of E8: 1 + 240 + 2160 + 6720 + 17520 + 30240 points of norm² 0, 2, 4, 6, 8, 10
    norms = torch.bincount((u * u).sum(1) // 4)
    assert norms.tolist() == [1, 0, 240, 0, 2160, 0, 6720, 0, 17520, 0, 30240]


def test_nearest_is_the_nearest_codebook_point_inside_the_ball():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(600, 8, generator=g, dtype=torch.float64) * 0.6
    y = y[y.norm(dim=1) <= 2.15]  # within √10 − 1: the lattice's nearest point (covering radius 1) is in the ball
    q = lattice.nearest(y)
    book = lattice.codebook()[0].double() * 0.5
    best = torch.cdist(y, book).min(1).values
    assert torch.allclose((q - y).norm(dim=1), best, atol=1e-12)
    assert torch.equal(lattice.points(lattice.index(q)).double(), q)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-9, 9, allow_nan=False), min_size=8, max_size=8))
def test_nearest_matches_the_written_out_rule_and_stays_in_the_ball(y):
    q = lattice.nearest(torch.tensor([y], dtype=torch.float64))[0]
    assert float((q * q).sum()) <= lattice.RADIUS2
    plain = _e8_point(y)
    if sum(t * t for t in plain) <= lattice.RADIUS2:  # inside: the lattice's nearest point itself
        assert q.tolist() == plain
    lattice.index(q[None])  # a codebook point


def test_ties_and_index_errors():
    assert lattice.nearest(torch.zeros(1, 8, dtype=torch.float64)).tolist() == [[0.0] * 8]
    # all coordinates ½ from two integers: D8's point (rounded half to even: 0s, an even sum) ties with D8 + ½'s
    y = torch.full((1, 8), 0.25, dtype=torch.float64)
    assert lattice.nearest(y).tolist() in ([[0.0] * 8], [[0.5] * 8])
    with pytest.raises(ValueError, match="not a point of the codebook"):
        lattice.index(torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0]]))  # odd sum: not in E8


def test_every_index_decodes_to_its_point():
    idx = torch.arange(lattice.SIZE)
    assert torch.equal(lattice.index(lattice.points(idx)), idx)
    small = [p for p in itertools.product((-1, 0, 1), repeat=8) if sum(p) % 2 == 0 and sum(t * t for t in p) == 2]
    assert len(small) == 112  # the integer minimal vectors; with the 128 of D8 + ½ the 240 of norm² 2

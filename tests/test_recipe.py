"""kvfx.best_config (kvfx/recipe.py): the format and width chosen per budget, and the one call end to end on a tiny
model — closed form, and measured ranks + refinement."""
from __future__ import annotations

import pytest
import torch

import kvfx
from helpers import tiny_llama
from kvfx.projections import Projections
from kvfx.recipe import choose_format, widest

pytestmark = pytest.mark.usefixtures("one_thread")


def windows(n: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 64, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("budget,fmt", [(1.0, None), (0.75, "int8"), (0.5, "int8"), (0.375, "int8"),
                                        (0.25, "bits"), (0.125, "bits"), (0.0625, "bits"), (0.007, "bits")])
def test_choose_format(budget, fmt):
    assert choose_format(budget, 384, per_direction=True) == fmt


def test_budget_below_one_band_is_refused():
    with pytest.raises(ValueError, match="below what the smallest band takes .* raise the budget"):
        choose_format(0.005, 384, per_direction=True)  # 16 int2 numbers (5 bytes) of a 768-byte row: 0.0065


def test_widest_matches_measured_rows():
    """RESULTS.md: int4 at 25 % keeps 360 of SmolLM2's 384 K+V numbers, int8 at 37.5 % keeps 287."""
    assert widest("int4", 0.25, 384) == 360 and widest("int8", 0.375, 384) == 287 and widest(None, 1.0, 384) == 384


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), "0.5", True])
def test_budget_range(bad):
    with pytest.raises(ValueError, match=r"budget must be a fraction .* in \(0, 1\]"):
        kvfx.best_config(tiny_llama(1), windows(), bad, progress=False)


def test_best_config_meets_budget_and_compress_applies_its_format(tmp_path):
    m = tiny_llama(2)
    P = kvfx.best_config(m, windows(), 0.25, progress=False, data="random tokens")  # default: bits
    assert isinstance(P.quantize, dict) and set(P.quantize) == set(P.sites)  # bands per site (allocate_bits)
    assert P.kv_fraction(P.quantize) <= 0.25 and P.report["rotation"]["seeds"] == [0]
    assert P.report["bits"]["budget"] == 0.25 and P.report["bits"]["across_sites"] is None
    assert all(p.shared for p in P.sites.values())
    prov = P.provenance
    assert prov["budget"] == 0.25 and prov["quantize"] == P.quantize and prov["method"] == "kqsvd@kv"
    assert prov["data"] == {"description": "random tokens", "windows": 2, "window": 16, "tokens": 32}
    assert prov["recipe"]["rotated"] and not prov["recipe"]["measured"]
    assert prov["recipe"]["centred"] and prov["recipe"]["attention_weight"] == 0.5  # 25 %, weighted: around the mean
    assert all(p.means() for p in P.sites.values())
    plain = kvfx.best_config(m, windows(), 0.25, progress=False, attention_weight=0.0)
    assert not plain.provenance["recipe"]["centred"] and not any(p.means() for p in plain.sites.values())
    path = tmp_path / "p.safetensors"
    P.save(path)
    cm = kvfx.compress(torch.compile(m, backend="eager"), Projections.load(path))
    assert cm._kvfx.quantize == P.quantize  # from the file, no argument
    kvfx.decompress(cm)
    cm = kvfx.compress(torch.compile(m, backend="eager"), P, quantize=None)  # an explicit None wins
    assert cm._kvfx.quantize is None
    kvfx.decompress(cm)


def test_measured_and_refined():
    m = tiny_llama(2)
    P = kvfx.best_config(m, windows(3), 0.125, refine_steps=2, progress=False, per_direction=True)
    assert isinstance(P.quantize, dict) and P.kv_fraction(P.quantize) <= 0.125
    assert P.report["bits"]["across_sites"] == "measured KL per unit of error"  # layers priced by the model's KL
    assert P.report["refine"]["steps"] == 2 and P.report["refine"]["quantize"] == P.quantize
    assert P.provenance["recipe"] == {"measured": True, "rotated": True, "centred": True, "attention_weight": 0.5,
                                      "rounding_weight": 1.0, "refine_steps": 2, "refine_lr": 2e-4}
    assert all(p.means() for p in P.sites.values())  # 12.5 %: rounded around the calibration means, after refine too
    assert P.method.endswith("+refine")


def test_uniform_int4_on_request():
    m = tiny_llama(1)
    P = kvfx.best_config(m, windows(), 0.25, progress=False, per_direction=False)
    assert P.quantize == "int4" and P.kv_fraction("int4") <= 0.25 and P.report["rotation"]["seeds"] == [0]
    assert choose_format(0.25, 384, per_direction=False) == "int4"


def test_int8_range_keeps_uniform_rotated_int8():
    m = tiny_llama(1)
    P = kvfx.best_config(m, windows(), 0.5, progress=False)
    assert P.quantize == "int8" and P.kv_fraction("int8") <= 0.5 and P.report["rotation"]["seeds"] == [0]
    assert P.provenance["recipe"]["attention_weight"] == 0.0  # plain Grams outside bits per direction


def test_budget_one_is_exact_16_bit():
    m = tiny_llama(1)
    P = kvfx.best_config(m, windows(), 1.0, progress=False)
    assert P.quantize is None and P.kv_fraction() == 1.0 and "rotation" not in P.report


def test_exact_rows_on_request():
    """exact=(sinks, recent) with bits per direction: every site's format carries them, their bytes counted at
    `context`; refused with another format or without a context, before any work."""
    m = tiny_llama(2)
    P = kvfx.best_config(m, windows(), 0.25, progress=False, exact=(1, 2), context=64)
    assert all(f.endswith("|sinks1|recent2") for f in P.quantize.values())
    assert P.kv_fraction(P.quantize, 64) <= 0.25 and P.provenance["recipe"]["exact"] == {"sinks": 1, "recent": 2,
                                                                                          "context": 64}
    with pytest.raises(ValueError, match="exact rows come with bits per latent direction"):
        kvfx.best_config(m, windows(), 0.5, progress=False, exact=(4, 0), context=64)
    with pytest.raises(ValueError, match="give the context"):
        kvfx.best_config(m, windows(), 0.25, progress=False, exact=(4, 0))


def test_lattice_codes_up_to_an_eighth():
    """Step 7: up to 12.5 % of the bytes, e8 lattice codes in int2's place (RESULTS.md "domains-e8",
    "domains-calib128"); above, int2."""
    from kvfx.recipe import levels_for
    assert levels_for(0.0625) == levels_for(0.125) == (8, 5, 4, 3, "e8")
    assert levels_for(0.13) == levels_for(0.25) == (8, 5, 4, 3, 2)
    m = tiny_llama(2, head_dim=32)
    low = kvfx.best_config(m, windows(), 0.0625, progress=False)
    assert low.report["bits"]["formats"] == [8, 5, 4, 3, "e8"] and low.kv_fraction(low.quantize) <= 0.0625
    assert all("int2" not in f for f in low.quantize.values()) and any("e8x" in f for f in low.quantize.values())
    assert kvfx.best_config(m, windows(), 0.125, progress=False).report["bits"]["formats"] == [8, 5, 4, 3, "e8"]
    assert kvfx.best_config(m, windows(), 0.25, progress=False).report["bits"]["formats"] == [8, 5, 4, 3, 2]


def test_rounding_priced_below_dropping_at_an_eighth():
    """Step 8: strictly between 6.25 % and 25 % of the bytes the band choice prices rounding at ROUNDING_WEIGHT × a
    dropped direction (RESULTS.md "domains-rounding"); at and outside those budgets, and before refine, alike (1)."""
    from kvfx.recipe import ROUNDING_WEIGHT, rounding_weight_for
    assert rounding_weight_for(0.125) == rounding_weight_for(0.1) == ROUNDING_WEIGHT == 0.5
    assert rounding_weight_for(0.0625) == rounding_weight_for(0.25) == rounding_weight_for(0.05) == 1.0
    assert rounding_weight_for(0.125, refining=True) == 1.0
    m = tiny_llama(2, head_dim=32)
    eighth = kvfx.best_config(m, windows(), 0.125, progress=False)
    assert eighth.report["bits"]["rounding_weight"] == 0.5 and eighth.provenance["recipe"]["rounding_weight"] == 0.5
    assert eighth.kv_fraction(eighth.quantize) <= 0.125
    quarter = kvfx.best_config(m, windows(), 0.25, progress=False)
    assert quarter.report["bits"]["rounding_weight"] == 1.0
    assert kvfx.best_config(m, windows(), 0.5, progress=False).provenance["recipe"]["rounding_weight"] is None

"""kvfx.sensitivity / kvfx.allocate: per-site model-KL profiles measured through the live rewrite, and ranks
allocated from them under a KV budget — each profile point is the KL of the ordinarily compressed model with
just that cut, the budget is met, the allocation beats uniform ranks, and bad input is refused."""
import pytest
import torch

import kvfx
from kvfx.calib.matryoshka import truncate
from kvfx.calib.sensitivity import default_grid

from helpers import compressed_kl, tiny_llama
from test_refine import _text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    m = tiny_llama(layers=3, seed=3)
    with torch.no_grad():
        m.lm_head.weight.mul_(12)
    ids = _text(12, 24)
    full = kvfx.calibrate(m, ids[:8].split(1), method="kqsvd", rank=1.0, granularity="layer", progress=False)
    prof = kvfx.sensitivity(m, full, ids[8:], steps=4, progress=False)
    return m, ids, full, prof


def test_grid():
    assert default_grid(64) == [8, 16, 24, 32, 40, 48, 56]
    assert default_grid(16, steps=4) == [4, 8, 12] and default_grid(3, steps=8) == [1, 2]


def test_profile_points_are_the_compressed_models_kl(setup):
    m, ids, full, prof = setup
    assert set(prof["sites"]) == set(full.sites) and prof["tokens"] == 4 * 24
    assert 0 <= prof["base"] < 1e-4  # full-width kqsvd is exact
    name = sorted(full.sites)[1]
    for side, cut in (("key", (4, 16)), ("value", (16, 4))):
        assert sorted(prof["sites"][name][side]) == [4, 8, 12, 16]
        ranks = {n: cut if n == name else (16, 16) for n in full.sites}
        assert compressed_kl(m, truncate(full, ranks), ids[8:]) == pytest.approx(prof["sites"][name][side][4], rel=2e-3)
    assert all(p[side][4] > p[side][12] for p in prof["sites"].values() for side in ("key", "value"))


def test_allocation_meets_the_budget_and_beats_uniform(setup):
    m, ids, full, prof = setup
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = kvfx.allocate(full, prof, kvfx.Budget(0.5))
    alloc = out.report["allocation"]
    assert out.kv_fraction() == pytest.approx(alloc["achieved"]) and 0.45 < out.kv_fraction() <= 0.5
    assert {n: list(r) for n, r in out.ranks.items()} == alloc["ranks"]
    measured = compressed_kl(m, out, ids[8:])
    uniform = compressed_kl(m, truncate(full, 0.5), ids[8:])
    assert measured < uniform
    assert alloc["predicted_kl"] > 0 and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert all(p.requires_grad for p in m.parameters())


def test_error_budget_bounds_the_predicted_kl(setup):
    _, _, full, prof = setup
    tight, loose = (kvfx.allocate(full, prof, kvfx.Budget(max_error=e)) for e in (0.05, 0.5))
    assert tight.report["allocation"]["predicted_kl"] <= 0.05 and loose.report["allocation"]["predicted_kl"] <= 0.5
    assert loose.kv_fraction() < tight.kv_fraction() < 1.0


def test_greedy_spends_bytes_where_the_model_is_least_sensitive():
    """A hand-made profile: site b's keys are fragile, site a's values too; the budget goes to the others."""
    from kvfx.projections import Projections, SiteProjection, SiteShape
    eye = torch.eye(4)[None]
    sites = {n: SiteProjection(eye, eye, eye, eye) for n in ("a", "b")}
    full = Projections(sites, {n: SiteShape(1, 1, 4) for n in sites}, "hand")
    cheap, fragile = {4: 0.0, 2: 0.01, 1: 0.02}, {4: 0.0, 2: 1.0, 1: 5.0}
    prof = {"base": 0.0, "sites": {"a": {"key": cheap, "value": fragile}, "b": {"key": fragile, "value": cheap}}}
    out = kvfx.allocate(full, prof, kvfx.Budget(0.625))
    assert out.ranks == {"a": [1, 4], "b": [4, 1]}
    assert out.report["allocation"]["predicted_kl"] == pytest.approx(0.04)


def test_probing_below_a_top_rank(setup):
    """ranks=(...): every other site stays at the highest of them, and the allocation never exceeds it —
    for nested artefacts whose wider columns were never trained (a refine's rank_set is the default)."""
    m, ids, full, _ = setup
    prof = kvfx.sensitivity(m, full, ids[8:10], ranks=(0.25, 0.5, 0.75), progress=False)
    assert all(sorted(p[side]) == [4, 8, 12] for p in prof["sites"].values() for side in ("key", "value"))
    assert compressed_kl(m, truncate(full, 0.75), ids[8:10]) == pytest.approx(prof["base"], rel=2e-3)
    out = kvfx.allocate(full, prof, kvfx.Budget(0.5))
    assert out.kv_fraction() <= 0.5 and all(max(r) <= 12 for r in out.ranks.values())
    assert kvfx.allocate(full, prof, kvfx.Budget(0.75)).ranks == truncate(full, 0.75).ranks  # nothing to cut
    full.report["refine"] = {"rank_set": [0.5, 0.75]}
    try:
        again = kvfx.sensitivity(m, full, ids[8:9], progress=False)
    finally:
        del full.report["refine"]
    assert all(sorted(p["key"]) == [8, 12] for p in again["sites"].values())


def test_bad_input(setup):
    m, ids, full, prof = setup
    with pytest.raises(ValueError, match="cannot meet a KV budget"):
        kvfx.allocate(full, prof, kvfx.Budget(0.1, min_rank=8))
    with pytest.raises(ValueError, match="already give KL"):
        kvfx.allocate(full, prof | {"base": 0.5}, kvfx.Budget(max_error=0.1))
    with pytest.raises(TypeError, match="kvfx.Budget"):
        kvfx.allocate(full, prof, 0.5)
    with pytest.raises(ValueError, match="does not cover"):
        kvfx.allocate(full, {"sites": {}}, kvfx.Budget(0.5))
    with pytest.raises(ValueError, match="reaches rank"):
        kvfx.allocate(truncate(full, 0.5), prof, kvfx.Budget(0.25))
    with pytest.raises(ValueError, match="columns; fit them at a higher rank"):
        kvfx.sensitivity(m, truncate(full, 0.5), ids[8:], ranks=(0.75,), progress=False)
    with pytest.raises(ValueError, match="one width for keys and values"):
        kvfx.sensitivity(m, truncate(full, 0.5, 0.25), ids[8:], progress=False)
    with pytest.raises(ValueError, match="steps"):
        kvfx.sensitivity(m, full, ids[8:], steps=1, progress=False)
    with pytest.raises(TypeError, match="kvfx.Projections"):
        kvfx.sensitivity(m, {"a": 1}, ids[8:], progress=False)
    mc = kvfx.compress(torch.compile(m, backend="eager"), full)
    try:
        with pytest.raises(ValueError, match="already compressed"):
            kvfx.sensitivity(mc, full, ids[8:], progress=False)
    finally:
        kvfx.decompress(mc)


def test_shared_latent_has_one_profile_per_site(setup):
    """granularity='kv': one latent per site is probed (fractions of 2·h·d) and allocated; it stays shared."""
    m, ids, _, _ = setup
    full = kvfx.calibrate(m, ids[:8].split(1), method="kqsvd", rank=1.0, granularity="kv", progress=False)
    prof = kvfx.sensitivity(m, full, ids[8:10], steps=4, progress=False)
    name = sorted(full.sites)[1]
    assert all(list(p) == ["latent"] and sorted(p["latent"]) == [8, 16, 24, 32] for p in prof["sites"].values())
    cut = truncate(full, {n: 8 if n == name else 32 for n in full.sites})
    assert compressed_kl(m, cut, ids[8:10]) == pytest.approx(prof["sites"][name]["latent"][8], rel=2e-3)
    out = kvfx.allocate(full, prof, kvfx.Budget(0.5))
    assert all(p.shared for p in out.sites.values()) and 0.45 < out.kv_fraction() <= 0.5
    assert out.report["allocation"]["ranks"] == {n: p.key_rank for n, p in out.sites.items()}
    assert compressed_kl(m, out, ids[8:10]) < compressed_kl(m, truncate(full, 0.5), ids[8:10])
    with pytest.raises(ValueError, match="no 'key' entry"):
        kvfx.allocate(kvfx.calibrate(m, ids[:8].split(1), method="kqsvd", rank=1.0, progress=False), prof,
                      kvfx.Budget(0.5))


def test_quantized_probes_price_the_rounding(setup):
    """sensitivity(..., quantize="int4") probes through the int4 latents: each point is the KL of the model
    compressed with that cut AND quantize="int4", and an int4-priced budget is met in int4 bytes."""
    m, ids, _, _ = setup
    full = kvfx.calibrate(m, ids[:8].split(1), method="kqsvd", rank=1.0, granularity="kv", progress=False)
    plain = kvfx.sensitivity(m, full, ids[8:10], steps=4, progress=False)
    prof = kvfx.sensitivity(m, full, ids[8:10], steps=4, progress=False, quantize="int4")
    assert prof["quantize"] == "int4" and prof["base"] > plain["base"] + 1e-4  # rounding costs KL at full width
    name = sorted(full.sites)[1]
    cut = truncate(full, {n: 8 if n == name else 32 for n in full.sites})
    assert compressed_kl(m, cut, ids[8:10], quantize="int4") == pytest.approx(prof["sites"][name]["latent"][8], rel=2e-3)
    out = kvfx.allocate(full, prof, kvfx.Budget(0.25, quantize="int4"))
    assert 0.2 < out.kv_fraction("int4") <= 0.25 and out.kv_fraction() > 0.25  # int4 rows fit more numbers
    assert out.report["allocation"]["probed"] == out.report["allocation"]["quantize"] == "int4"
    with pytest.raises(ValueError, match="sensitivity: quantize must be"):
        kvfx.sensitivity(m, full, ids[8:10], steps=4, progress=False, quantize="int6")


class _PlainLM(torch.nn.Module):
    """Any module that maps token ids to logits: forward(self, ids), no keyword arguments, a tensor out."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits


def test_windows_call_any_language_model_positionally(setup):
    """sensitivity's windows go in as the first positional argument (no input_ids= / use_cache= a plain module would
    refuse), and a tensor output is the logits: the same profile as the transformers model's."""
    m, ids, full, prof = setup
    plain = _PlainLM(m)
    full_plain = kvfx.Projections({f"lm.{n}": p for n, p in full.sites.items()},
                                  {f"lm.{n}": s for n, s in full.shapes.items()}, method=full.method)
    got = kvfx.sensitivity(plain, full_plain, ids[8:], steps=4, progress=False)
    name = sorted(full.sites)[1]
    assert got["sites"][f"lm.{name}"]["key"][4] == pytest.approx(prof["sites"][name]["key"][4], rel=1e-4)

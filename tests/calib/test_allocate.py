"""Budgeted rank allocation: meets the budget, spends bytes where error is cheapest, rejects bad budgets."""
import pytest
import torch

from kvfx.calib.allocate import Budget, allocate_ranks, profiles
from kvfx.calib.base import get_calibrator
from kvfx.calib.collect import fit
from kvfx.calib.stats import SiteStats


def _stats(seed, heads=4, kv=2, d=8, n=64, key_decay=2.0, value_decay=0.3):
    g = torch.Generator().manual_seed(seed)
    st = SiteStats.empty(heads, kv, d)
    scale_k = torch.exp(-key_decay * torch.arange(d, dtype=torch.float32))  # keys: low effective rank
    scale_v = torch.exp(-value_decay * torch.arange(d, dtype=torch.float32))  # values: spread out
    k = torch.randn(1, kv, n, d, generator=g) * scale_k
    v = torch.randn(1, kv, n, d, generator=g) * scale_v
    q = torch.randn(1, heads, n, d, generator=g)
    st.add(q, k, v)
    st.set_output_weight(torch.randn(heads, d, 16, generator=g))
    return st


@pytest.fixture
def stats():
    return {f"layer{i}": _stats(i) for i in range(3)}


@pytest.mark.parametrize("fraction", [0.75, 0.5, 0.25])
def test_budget_met_and_recorded(stats, fraction):
    proj = fit(stats, "kqsvd", Budget(fraction))
    assert proj.kv_fraction() <= fraction + 1e-9
    assert proj.kv_fraction() > fraction - 2 * 2 / (2 * 2 * 8 * 3)  # within one rank unit of the target
    assert proj.report["allocation"]["budget"] == fraction


def test_keys_compressed_more_than_values_when_cheaper(stats):
    proj = fit(stats, "kqsvd", Budget(0.5))
    ks = sum(r[0] for r in proj.ranks.values())
    vs = sum(r[1] for r in proj.ranks.values())
    assert ks < vs  # keys have a fast-decaying spectrum here


def test_greedy_beats_uniform_on_predicted_error(stats):
    cal = get_calibrator("kqsvd")
    ranks, rep = allocate_ranks(cal, stats, Budget(0.5))
    uniform = profiles(cal, stats, [4])
    uni_err = sum(p[4] for p in uniform.values())
    greedy_err = sum(k + v for k, v in rep["predicted_err"].values())
    assert greedy_err <= uni_err + 1e-12


def test_multiple_and_bad_budgets(stats):
    proj = fit(stats, "pca", Budget(0.5, multiple=2))
    assert all(r % 2 == 0 for pair in proj.ranks.values() for r in pair)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="kv_fraction"):
            Budget(bad)
    with pytest.raises(ValueError, match="cannot meet"):
        fit(stats, "pca", Budget(0.05, min_rank=2))


def test_joint_view_budget(stats):
    proj = fit(stats, "kqsvd", Budget(0.5), granularity="layer")
    assert proj.kv_fraction() <= 0.5 + 1e-9
    p = next(iter(proj.sites.values()))
    assert p.joint and p.key_down.shape[:2] == (1, 16) and p.key_up.shape[:2] == (2, 8)


@pytest.mark.parametrize("max_error", [0.0, 0.01, 0.05, 0.2])
def test_error_budget_met_and_smallest_cache_grows_with_it(stats, max_error):
    proj = fit(stats, "kqsvd", Budget(max_error=max_error))
    rep = proj.report["allocation"]
    errs = [e for pair in rep["predicted_err"].values() for e in pair]
    assert sum(errs) / len(errs) <= max_error + 1e-9
    assert rep["mean_err"] == pytest.approx(sum(errs) / len(errs))
    assert rep["max_error"] == max_error and rep["budget"] is None
    if max_error == 0.0:
        assert proj.kv_fraction() > 0.5     # only lossless cuts (rank-deficient directions) are allowed
    looser = fit(stats, "kqsvd", Budget(max_error=max_error + 0.05))
    assert looser.kv_fraction() <= proj.kv_fraction()


def test_budget_needs_exactly_one_target():
    with pytest.raises(ValueError, match="exactly one"):
        Budget()
    with pytest.raises(ValueError, match="exactly one"):
        Budget(0.5, max_error=0.1)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="max_error"):
            Budget(max_error=bad)


def _sampled(seed):
    g = torch.Generator().manual_seed(seed)
    st = SiteStats.empty(4, 2, 8)
    st.sample_limit = 2
    for _ in range(2):
        q = torch.randn(1, 4, 16, 8, generator=g)
        k = torch.randn(1, 2, 16, 8, generator=g) * torch.exp(-2.0 * torch.arange(8.0))
        v = torch.randn(1, 2, 16, 8, generator=g) * torch.exp(-0.3 * torch.arange(8.0))
        st.add(q, k, v)
    st.set_output_weight(torch.randn(4, 8, 16, generator=g))
    return st


def test_output_measure_profiles_and_budget():
    """measure='output': keys and values priced by the same attention-output error; zero at full rank."""
    from kvfx.calib.allocate import output_profiles
    stats = {f"layer{i}": _sampled(i) for i in range(2)}
    prof = output_profiles(get_calibrator("kqsvd"), stats, [2, 4, 8])
    for p in prof.values():
        assert p[8] == pytest.approx(0.0, abs=1e-6) and p[2] >= p[4] >= p[8]
    proj = fit(stats, "kqsvd", Budget(0.5, measure="output"))
    assert proj.kv_fraction() <= 0.5 + 1e-9 and proj.report["allocation"]["measure"] == "output"
    with pytest.raises(ValueError, match="calibration sequences"):
        fit({"x": _stats(0)}, "kqsvd", Budget(0.5, measure="output"))
    with pytest.raises(ValueError, match="measure"):
        Budget(0.5, measure="ppl")


@pytest.mark.parametrize("method", ["pca", "eigen", "kqsvd"])
def test_nested_profiles_equal_fitting_every_rank(stats, method):
    """Nested calibrators profile from one full-rank fit; the slices give the errors of a fit at each rank."""
    cal = get_calibrator(method)
    assert cal.nested
    fast = profiles(cal, stats, [1, 3, 5, 8])
    for (name, side), prof in fast.items():
        for r, err in prof.items():
            assert err == pytest.approx(cal.fit(stats[name], r, r)[1][f"{side}_err"], rel=1e-6, abs=1e-9)

"""Calibrators on synthetic GQA statistics (pure tensors, no model)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfx.calib import CALIBRATORS, Calibrator, SiteStats, get_calibrator, register_calibrator
from kvfx.projections import SiteProjection

METHODS = ("pca", "eigen", "kqsvd")
H, HKV, D = 6, 2, 16


def _mix(gen, d, decay):
    """A random d×d mixing with a decaying spectrum, so the data is correlated and anisotropic."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * decay ** torch.arange(d, dtype=torch.float64) @ torch.linalg.qr(
        torch.randn(d, d, generator=gen, dtype=torch.float64))[0]


def make_data(heads=H, kv_heads=HKV, d=D, b=2, n=64, seed=0, out_weight=True, decay=0.85):
    """Random q [b, heads, n, d], k/v [b, kv_heads, n, d] (keys and queries in different subspaces),
    W_O rows [heads, d, hidden], and the SiteStats accumulated from them in two batches."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    k = rnd(b, kv_heads, n, d) @ _mix(gen, d, decay)
    v = rnd(b, kv_heads, n, d) @ _mix(gen, d, decay)
    shared = rnd(b, kv_heads, 1, n, d).expand(b, kv_heads, heads // kv_heads, n, d)
    mix_q = torch.stack([_mix(gen, d, decay) for _ in range(heads)])  # each query head its own subspace
    q = (shared + 0.7 * rnd(b, kv_heads, heads // kv_heads, n, d)).reshape(b, heads, n, d) @ mix_q
    w = rnd(heads, d, 3 * d) * torch.linspace(0.2, 2.0, d, dtype=torch.float64)[:, None]
    stats = SiteStats.empty(heads, kv_heads, d)
    stats.add(q[:1], k[:1], v[:1])
    stats.add(q[1:], k[1:], v[1:])
    if out_weight:
        stats.set_output_weight(w)
    return q, k, v, w, stats


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def fits(data):
    stats = data[-1]
    return {m: get_calibrator(m).fit(stats, 5, 6) for m in METHODS}


def brute_force(q, k, v, w, proj: SiteProjection):
    """Relative logit / output errors straight from the activations (all batches' tokens pooled, as in the Grams)."""
    h, d = k.shape[1], k.shape[-1]
    grp = q.shape[1] // h
    num_k = den_k = num_v = den_v = 0.0
    for i in range(q.shape[1]):
        g = i // grp
        kg, vg = k[:, g].reshape(-1, d), v[:, g].reshape(-1, d)
        qi = q[:, i].reshape(-1, d)
        pk = (proj.key_down[g] @ proj.key_up[g].T).double()
        pv = (proj.value_down[g] @ proj.value_up[g].T).double()
        num_k += ((kg @ pk @ qi.T - kg @ qi.T) ** 2).sum().item()
        den_k += ((kg @ qi.T) ** 2).sum().item()
        num_v += ((vg @ pv @ w[i] - vg @ w[i]) ** 2).sum().item()
        den_v += ((vg @ w[i]) ** 2).sum().item()
    return num_k / den_k, num_v / den_v


# ------------------------------------------------------------------ math
@pytest.mark.parametrize("method", METHODS)
def test_full_rank_is_identity(data, method):
    proj, report = get_calibrator(method).fit(data[-1], D, D)
    eye = torch.eye(D)
    for down, up in ((proj.key_down, proj.key_up), (proj.value_down, proj.value_up)):
        torch.testing.assert_close(down @ up.transpose(-1, -2), eye.expand(HKV, D, D), atol=1e-6, rtol=0)
    assert report["key_err"] < 1e-9 and report["value_err"] < 1e-9


@pytest.mark.parametrize("method", METHODS)
def test_shapes_dtype_and_fraction_ranks(data, method):
    proj, report = get_calibrator(method).fit(data[-1], 5, 0.5)
    assert proj.key_down.shape == proj.key_up.shape == (HKV, D, 5)
    assert proj.value_down.shape == proj.value_up.shape == (HKV, D, 8)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in proj.tensors().values())
    assert {"key_err", "value_err", "key_total", "value_total"} <= set(report)
    assert all(isinstance(x, float) for x in report.values())


@pytest.mark.parametrize("method", ["pca", "eigen"])
def test_orthonormal_methods(fits, method):
    proj = fits[method][0]
    for a, b in ((proj.key_down, proj.key_up), (proj.value_down, proj.value_up)):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.transpose(-1, -2) @ a, torch.eye(a.shape[-1]).expand(HKV, -1, -1), atol=1e-5, rtol=0)


def test_kqsvd_is_optimal(fits):
    k = fits["kqsvd"][1]
    for other in ("pca", "eigen"):
        assert k["key_err"] <= fits[other][1]["key_err"] + 1e-6
        assert k["value_err"] <= fits[other][1]["value_err"] + 1e-6
    assert k["key_err"] < fits["pca"][1]["key_err"] - 1e-3  # queries live elsewhere: a real gap


def test_kqsvd_error_matches_captured_energy(data):
    """key_err (general formula, float32 factors) == 1 − Σ top-R eig(M) / tr(G_K G_Q) (float64 theory)."""
    from kvfx.calib.linalg import kqsvd
    stats = data[-1]
    _, report = get_calibrator("kqsvd").fit(stats, 5, 6)
    for g_in, g_out, r, key in ((stats.key, stats.query, 5, "key"), (stats.value, stats.output, 6, "value")):
        *_, captured = kqsvd(g_in, g_out, r)
        assert report[f"{key}_err"] == pytest.approx(1 - captured.sum().item() / report[f"{key}_total"], abs=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_report_matches_brute_force(data, fits, method):
    q, k, v, w, _ = data
    proj, report = fits[method]
    key_err, value_err = brute_force(q, k, v, w, proj)
    assert report["key_err"] == pytest.approx(key_err, rel=1e-6)
    assert report["value_err"] == pytest.approx(value_err, rel=1e-6)


def test_gap_theorem(fits):
    """ε ≥ 0 and ε / total == err(K-only SVD) − err(kqsvd), for keys and values."""
    k, p = fits["kqsvd"][1], fits["pca"][1]
    assert k["eps"] >= -1e-9 * k["key_total"] and k["value_eps"] >= -1e-9 * k["value_total"]
    assert k["eps"] / k["key_total"] == pytest.approx(p["key_err"] - k["key_err"], abs=1e-6)
    assert k["eps_rel"] == pytest.approx(p["key_err"] - k["key_err"], abs=1e-6)
    assert k["value_eps"] / k["value_total"] == pytest.approx(p["value_err"] - k["value_err"], abs=1e-6)


def test_summed_query_not_better_on_per_head_objective(data):
    stats = data[-1]
    for r in (2, 5, 10):
        per_head = get_calibrator("kqsvd").fit(stats, r, r)[1]["key_err"]
        summed = get_calibrator("kqsvd", query="summed").fit(stats, r, r)[1]["key_err"]
        assert per_head <= summed + 1e-6
        if r == 5:
            assert per_head < summed - 1e-3  # heads of a group look in different directions: a real gap


def test_missing_output_weight_falls_back_to_pca_values():
    stats = make_data(out_weight=False)[-1]
    pv = lambda p: p.value_down @ p.value_up.transpose(-1, -2)  # noqa: E731
    kq, pca = get_calibrator("kqsvd").fit(stats, 4, 4)[0], get_calibrator("pca").fit(stats, 4, 4)[0]
    torch.testing.assert_close(pv(kq), pv(pca), atol=1e-4, rtol=0)


@settings(max_examples=25, deadline=None, database=None)
@given(kv_heads=st.integers(1, 3), group=st.integers(1, 3), d=st.integers(2, 12), n=st.integers(1, 24),
       data=st.data(), seed=st.integers(0, 2**16))
def test_property_random_shapes_and_ranks(kv_heads, group, d, n, data, seed):
    """Any shapes (including fewer tokens than head_dim: rank-deficient Grams) give finite factors of the
    right shape, rank(P) ≤ R, and kqsvd no worse than pca on the logit objective."""
    rk, rv = data.draw(st.integers(1, d)), data.draw(st.integers(1, d))
    *_, stats = make_data(kv_heads * group, kv_heads, d, b=1, n=n, seed=seed)
    reports = {}
    for m in METHODS:
        proj, reports[m] = get_calibrator(m).fit(stats, rk, rv)
        for (a, b), r in (((proj.key_down, proj.key_up), rk), ((proj.value_down, proj.value_up), rv)):
            assert a.shape == b.shape == (kv_heads, d, r)
            assert torch.isfinite(a).all() and torch.isfinite(b).all()
            assert (torch.linalg.matrix_rank(a.double() @ b.double().transpose(-1, -2)) <= r).all()
    assert -1e-6 <= reports["kqsvd"]["key_err"] <= reports["pca"]["key_err"] + 1e-5
    assert reports["kqsvd"]["eps"] >= -1e-9 * max(reports["kqsvd"]["key_total"], 1.0)


# ------------------------------------------------------------------ registry
def test_registry_lists_builtins_and_rejects_unknown():
    assert set(METHODS) <= set(CALIBRATORS)
    for m in METHODS:
        c = get_calibrator(m)
        assert isinstance(c, Calibrator) and c.name == m
    with pytest.raises(ValueError, match="Unknown calibration method 'nope'") as e:
        get_calibrator("nope")
    assert all(m in str(e.value) for m in METHODS)


def test_registry_bad_options():
    with pytest.raises(ValueError, match="query"):
        get_calibrator("kqsvd", query="bogus")
    with pytest.raises(ValueError, match="does not accept"):
        get_calibrator("pca", foo=1)
    with pytest.raises(ValueError, match="already registered"):
        register_calibrator("pca")(type("Other", (), {"fit": lambda self, s, k, v: None}))


def test_user_registered_calibrator(data):
    @register_calibrator("test_identity")
    class IdentityCal:
        def __init__(self, scale=1.0):
            self.scale = scale

        def fit(self, stats, key_rank, value_rank):
            p = SiteProjection.identity(stats.kv_heads, stats.head_dim)
            return p, {"scale": self.scale}

    try:
        assert CALIBRATORS["test_identity"] is IdentityCal
        cal = get_calibrator("test_identity", scale=2.0)
        assert cal.name == "test_identity" and isinstance(cal, Calibrator)
        proj, report = cal.fit(data[-1], D, D)
        assert report == {"scale": 2.0} and proj.key_rank == D
        assert get_calibrator(cal) is cal  # an instance passes through
        assert get_calibrator(IdentityCal, scale=3.0).scale == 3.0  # so does a (possibly unregistered) class
    finally:
        CALIBRATORS.pop("test_identity", None)


def test_identity_keeps_the_first_channels(data):
    """'identity': the cache's own coordinates (the quantisation-only reference); exact at full rank."""
    stats = data[-1]
    full, rep = get_calibrator("identity").fit(stats, 1.0, 1.0)
    eye = torch.eye(D).expand(HKV, D, D)
    assert all(torch.equal(t, eye) for t in full.tensors().values())
    assert rep["key_err"] == pytest.approx(0, abs=1e-12) and rep["value_err"] == pytest.approx(0, abs=1e-12)
    cut, rep = get_calibrator("identity").fit(stats, 5, 6)
    assert torch.equal(cut.key_down, eye[..., :5]) and torch.equal(cut.value_up, eye[..., :6])
    assert rep["key_err"] > 0 and rep["value_err"] > 0

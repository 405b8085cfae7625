"""Shared K+V latent (granularity="kv"): the stacked statistics, exactness at full width, the error report,
and why it exists — at equal cached bytes it fits better than separate key and value latents."""
import pytest
import torch

from kvfx.calib.collect import fit
from kvfx.calib.shared import shared_view
from kvfx.calib.stats import SiteStats
from kvfx.projections import ProjectionError


def _stats(heads=6, kv=3, d=8, n=160, seed=0):
    """Keys and values driven by one low-dimensional hidden state (as in a transformer: both are linear in x)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, 16, generator=g)
    k = (x @ torch.randn(16, kv * d, generator=g)).view(1, n, kv, d).transpose(1, 2)
    v = (x @ torch.randn(16, kv * d, generator=g)).view(1, n, kv, d).transpose(1, 2)
    q = torch.randn(1, heads, n, d, generator=g)
    st = SiteStats.empty(heads, kv, d)
    st.add(q, k, v)
    st.set_output_weight(torch.randn(heads, d, 12, generator=g))
    return st, q, k, v


def _rebuild(p, k, v):
    """(k̂, v̂) [1, h, n, d] from the shared latent c = [k]·A + [v]·C, in float64."""
    kj, vj = (t.transpose(1, 2).flatten(2).double() for t in (k, v))
    c = kj @ p.key_down[0].double() + vj @ p.value_down[0].double()          # [1, n, R]
    kh = torch.einsum("bnr,hdr->bhnd", c, p.key_up.double())
    vh = torch.einsum("bnr,hdr->bhnd", c, p.value_up.double())
    return kh, vh


def test_cross_gram_and_view():
    st, q, k, v = _stats()
    kj, vj = (t.transpose(1, 2).reshape(-1, 24).double() for t in (k, v))
    assert torch.allclose(st.kv_joint, kj.T @ vj)
    view = shared_view(st, key_weight=2.0)
    assert view.kv_heads == 1 and view.head_dim == 48
    # the view is [K·w_K, V·w_V] with w_K² = 2/tr(G_K), w_V² = 1/tr(G_V): its Gram has trace 2 + 1
    assert view.key[0].trace().item() == pytest.approx(3.0)


def test_full_width_is_exact():
    st, q, k, v = _stats()
    p = fit({"s": st}, "kqsvd", 1.0, granularity="kv").sites["s"]
    assert p.shared and p.key_rank == 48 and p.cached_per_token == 48
    kh, vh = _rebuild(p, k, v)
    assert torch.allclose(kh, k.double(), atol=1e-6) and torch.allclose(vh, v.double(), atol=1e-6)


@pytest.mark.parametrize("method", ["kqsvd", "pca"])
def test_reported_errors_are_the_real_errors(method):
    st, q, k, v = _stats()
    proj = fit({"s": st}, method, 16, granularity="kv")
    p, rep = proj.sites["s"], proj.report["sites"]["s"]
    kh, vh = _rebuild(p, k, v)
    qd = q.double().view(1, 3, 2, -1, 8)
    logit_err = sum((qd[:, g, i] @ (kh[:, g] - k[:, g].double()).transpose(-1, -2)).pow(2).sum()
                    for g in range(3) for i in range(2))
    logit_tot = sum((qd[:, g, i] @ k[:, g].double().transpose(-1, -2)).pow(2).sum() for g in range(3) for i in range(2))
    w = st.w_rows.double().view(3, 2, 8, 12)
    out_err = sum(((vh[:, g] - v[:, g].double()) @ w[g, i]).pow(2).sum() for g in range(3) for i in range(2))
    out_tot = sum((v[:, g].double() @ w[g, i]).pow(2).sum() for g in range(3) for i in range(2))
    assert rep["key_err"] == pytest.approx(float(logit_err / logit_tot), rel=1e-6)
    assert rep["value_err"] == pytest.approx(float(out_err / out_tot), rel=1e-6)


def test_shared_beats_separate_latents_at_equal_bytes():
    st, *_ = _stats()
    shared = fit({"s": st}, "kqsvd", 16, granularity="kv", key_weight=1.0)       # 16 numbers per token
    separate = fit({"s": st}, "kqsvd", 8, granularity="layer")                   # 8 + 8
    assert shared.kv_fraction() == separate.kv_fraction() == 16 / 48
    s, p = shared.report["sites"]["s"], separate.report["sites"]["s"]
    # keys and values are both linear in a 16-wide x: one 16-wide latent holds both, two 8-wide ones cannot
    assert p["key_err"] > 0.01 and p["value_err"] > 0.01
    assert s["key_err"] < 1e-9 and s["value_err"] < 1e-9


def test_key_weight_trades_keys_for_values():
    st, *_ = _stats(seed=3)
    lo = fit({"s": st}, "kqsvd", 10, granularity="kv", key_weight=0.25).report["sites"]["s"]
    hi = fit({"s": st}, "kqsvd", 10, granularity="kv", key_weight=8.0).report["sites"]["s"]
    assert hi["key_err"] < lo["key_err"] and hi["value_err"] > lo["value_err"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="kqsvd", rank=0.5, value_rank=0.5), "one latent"),
    (dict(method="matryoshka", rank=0.5), "closed-form calibrators"),
    (dict(method="kqsvd", rank=0.5, key_weight=0.0), "key_weight must be > 0"),
    (dict(method="kqsvd", rank={"s": (8, 8)}), "one latent rank"),
    (dict(method="kqsvd", rank=49), "outside 1..48"),
])
def test_bad_input(kwargs, match):
    st, *_ = _stats()
    with pytest.raises((ValueError, ProjectionError), match=match):
        fit({"s": st}, granularity="kv", **kwargs)


def test_budget_refused():
    import kvfx
    st, *_ = _stats()
    with pytest.raises(ValueError, match="not a Budget"):
        fit({"s": st}, "kqsvd", kvfx.Budget(0.5), granularity="kv")


def test_truncate_keeps_one_shared_rank():
    from kvfx.calib.matryoshka import truncate
    st, *_ = _stats()
    full = fit({"s": st}, "pca", 1.0, granularity="kv")
    cut = truncate(full, 0.25)  # a quarter of 2·h·d = 12 numbers per token
    p = cut.sites["s"]
    assert p.shared and p.key_rank == p.value_rank == 12 and cut.kv_fraction() == 0.25
    with pytest.raises(ValueError, match="one rank"):
        truncate(full, {"s": (12, 6)})
    with pytest.raises(ValueError, match="one rank"):
        truncate(full, 12, value_rank=6)

"""MatryoshkaKV calibrator: nested orthonormal bases, trained once per site, seeded, NaN-safe, Budget-ready."""
import logging

import pytest
import torch

import kvfx
from kvfx.calib import CALIBRATORS, get_calibrator
from kvfx.calib.collect import fit
from kvfx.calib.distill import init_bases
from kvfx.calib.matryoshka import Matryoshka, truncate
from kvfx.calib.stats import SiteStats

D = 8
FAST = {"steps": 25, "lr": 2e-2}


def make_stats(seed=0, heads=4, kv_heads=2, d=D, n=24):
    g = torch.Generator().manual_seed(seed)
    st = SiteStats.empty(heads, kv_heads, d)
    st.sample_limit = 2
    for _ in range(2):
        q = torch.randn(1, heads, n, d, generator=g) * torch.linspace(1.5, 0.5, d)
        k = torch.randn(1, kv_heads, n, d, generator=g) * torch.linspace(2, 0.2, d)
        v = torch.randn(1, kv_heads, n, d, generator=g) * torch.linspace(1, 0.5, d)
        st.add(q, k, v)
    st.set_output_weight(torch.randn(heads, d, 16, generator=g))
    return st


@pytest.fixture(scope="module")
def stats():
    return make_stats()


def _orthonormal(x):
    eye = torch.eye(x.shape[-1]).expand(x.shape[0], -1, -1)
    return torch.allclose(x.transpose(1, 2) @ x, eye, atol=1e-5)


def test_registered():
    assert CALIBRATORS["matryoshka"] is Matryoshka
    cal = get_calibrator("matryoshka", steps=3, rank_set=(2, 4))
    assert isinstance(cal, Matryoshka) and cal.samples_needed > 0  # kvfx.calibrate keeps sample sequences


def test_orthonormal_and_symmetric(stats):
    proj, rep = Matryoshka(**FAST).fit(stats, 3, 5)
    assert (proj.key_rank, proj.value_rank) == (3, 5)
    assert torch.equal(proj.key_down, proj.key_up) and torch.equal(proj.value_down, proj.value_up)
    assert _orthonormal(proj.key_down) and _orthonormal(proj.value_down)
    assert rep["fallback"] == 0.0 and rep["final_loss"] < rep["init_loss"]


def test_nested_leading_columns(stats):
    cal = Matryoshka(**FAST)
    big, _ = cal.fit(stats, 7, 6)
    for rk, rv in ((1, 1), (2, 5), (4, 4), (6, 2)):
        small, _ = cal.fit(stats, rk, rv)
        assert torch.equal(small.key_down, big.key_down[..., :rk])
        assert torch.equal(small.value_down, big.value_down[..., :rv])


def test_trains_once_per_site_and_retrains_when_stats_change(monkeypatch):
    st = make_stats(1)
    calls = []
    real = Matryoshka._train
    monkeypatch.setattr(Matryoshka, "_train", lambda self, s: calls.append(1) or real(self, s))
    for keep in (0.75, 0.5, 0.25):
        fit({"s": st}, "matryoshka", keep, **FAST)
    assert len(calls) == 1
    fit({"s": st}, "matryoshka", 0.5, steps=3)          # other options: another artefact
    assert len(calls) == 2
    st.add(*(t[None] for t in st.samples[0]))           # new statistics invalidate the memo
    fit({"s": st}, "matryoshka", 0.5, **FAST)
    assert len(calls) == 3


def test_seeded_reproducible():
    a = Matryoshka(**FAST, seed=3).fit(make_stats(), 4, 4)[0]
    b = Matryoshka(**FAST, seed=3).fit(make_stats(), 4, 4)[0]   # fresh stats: no memo shared
    c = Matryoshka(**FAST, seed=4).fit(make_stats(), 4, 4)[0]
    for k, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[k])
    assert not torch.equal(a.key_down, c.key_down)


@pytest.mark.parametrize("r", [2, 4, 6])
def test_loss_not_above_pca_init(stats, r):
    cal = Matryoshka(**FAST)
    uk, uv, _ = cal.bases(stats)
    k0, v0 = init_bases(stats, D, D, key="pca")
    with torch.no_grad():
        trained = cal.loss(stats, uk[..., :r], uv[..., :r])
        start = cal.loss(stats, k0[..., :r], v0[..., :r])
    assert trained <= start
    # and training moved the bases (a fallback to the PCA start would pass the comparison above)
    assert not torch.allclose(uk.to(k0.dtype), k0, atol=1e-4) or not torch.allclose(uv.to(v0.dtype), v0, atol=1e-4)


def test_pca_start_is_pca(stats):
    # with no training the artefact is exactly the pca calibrator at every rank
    for r in (2, 5):
        m, rep = Matryoshka(steps=0).fit(stats, r, r)
        p, _ = get_calibrator("pca").fit(stats, r, r)
        assert torch.equal(m.key_down, p.key_down) and torch.equal(m.value_down, p.value_down)
        assert rep["final_loss"] == rep["init_loss"] and rep["fallback"] == 0.0


def test_nan_loss_falls_back_to_pca_init(monkeypatch, caplog):
    real = Matryoshka.loss

    def flaky(self, st, a, c, rows=None):  # NaN only while training (gradients on)
        return torch.tensor(float("nan"), requires_grad=True) if torch.is_grad_enabled() else real(self, st, a, c, rows)
    monkeypatch.setattr(Matryoshka, "loss", flaky)
    st = make_stats(2)
    with caplog.at_level(logging.WARNING, logger="kvfx.calib"):
        proj, rep = Matryoshka(**FAST).fit(st, 4, 4)
    assert rep["fallback"] == 1.0 and "NaN" in caplog.text
    pca, _ = get_calibrator("pca").fit(st, 4, 4)
    assert torch.equal(proj.key_down, pca.key_down) and torch.equal(proj.value_down, pca.value_down)


@pytest.mark.parametrize("bad", [(), (0.5, 0), (-2,), (float("nan"),), (True,)])
def test_bad_rank_set_rejected(bad):
    with pytest.raises(ValueError, match="rank_set"):
        Matryoshka(rank_set=bad)


@pytest.mark.parametrize("bad", [(D + 1,), (0.5, 1.5)])
def test_rank_set_beyond_head_dim_rejected(stats, bad):
    with pytest.raises(ValueError, match=r"outside \(0, d=8\]|not inside \(0, d=8\]"):
        Matryoshka(rank_set=bad).fit(stats, 4, 4)


def test_bad_options_and_missing_samples():
    with pytest.raises(ValueError, match="key_init"):
        Matryoshka(key_init="kqsvd")
    with pytest.raises(ValueError, match="steps"):
        Matryoshka(steps=-1)
    with pytest.raises(ValueError, match="calibration sequences"):
        Matryoshka().fit(SiteStats.empty(4, 2, 8), 4, 4)


def test_layer_granularity_refused(stats):
    with pytest.raises(ValueError, match="granularity='layer'.*not supported"):
        fit({"s": stats}, "matryoshka", 0.5, granularity="layer", **FAST)


def test_budget_allocation_uses_one_trained_basis(monkeypatch):
    sts = {f"layer{i}": make_stats(10 + i) for i in range(3)}
    calls = []
    real = Matryoshka._train
    monkeypatch.setattr(Matryoshka, "_train", lambda self, s: calls.append(1) or real(self, s))
    opts = {"steps": 8, "lr": 2e-2}
    proj = fit(sts, "matryoshka", kvfx.Budget(0.5), **opts)
    assert len(calls) == 3                              # profiles at every rank + the final fit: one training per site
    assert 0.5 - 2 * 2 / (2 * 2 * D * 3) < proj.kv_fraction() <= 0.5 + 1e-9
    full = fit(sts, "matryoshka", 1.0, **opts)
    for name, (rk, rv) in proj.ranks.items():            # the allocated projection is the trained basis, truncated
        assert torch.equal(proj.sites[name].key_down, full.sites[name].key_down[..., :rk])
        assert torch.equal(proj.sites[name].value_down, full.sites[name].value_down[..., :rv])
        errs = proj.report["allocation"]["predicted_err"][name]
        assert errs == pytest.approx((proj.report["sites"][name]["key_err"], proj.report["sites"][name]["value_err"]))


def test_truncate_saved_full_artefact(stats, tmp_path):
    full = fit({"s": stats}, "matryoshka", 1.0, **FAST)
    full.save(tmp_path / "m.safetensors")
    loaded = kvfx.Projections.load(tmp_path / "m.safetensors")
    cut = truncate(loaded, 0.5, value_rank=3)
    direct = fit({"s": stats}, "matryoshka", 0.5, value_rank=3, **FAST)
    assert cut.ranks == direct.ranks == {"s": [4, 3]}
    for k, t in cut.sites["s"].tensors().items():
        assert torch.equal(t, direct.sites["s"].tensors()[k])
    with pytest.raises(ValueError, match="cannot truncate"):
        truncate(cut, 0.75)


def test_calibrate_end_to_end_tiny_llama():
    from helpers import VOCAB, tiny_llama
    model = tiny_llama()
    batches = torch.randint(3, VOCAB, (2, 1, 16), generator=torch.Generator().manual_seed(0))
    proj = kvfx.calibrate(model, list(batches), method="matryoshka", rank=0.5, progress=False, steps=5)
    assert proj.method == "matryoshka" and set(map(tuple, proj.ranks.values())) == {(4, 4)}
    assert all(r["fallback"] == 0.0 for r in proj.report["sites"].values())

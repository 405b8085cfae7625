"""StiefAttention-style calibrator: orthonormal, lowers its own objective, deterministic, NaN-safe."""
import pytest
import torch

from kvfx.calib.allocate import Budget, allocate_ranks
from kvfx.calib.base import get_calibrator
from kvfx.calib.collect import fit
from kvfx.calib.stats import SiteStats
from kvfx.calib.stiefel import Stiefel


def _site(seed: int) -> SiteStats:
    g = torch.Generator().manual_seed(seed)
    st = SiteStats.empty(4, 2, 8)
    st.sample_limit = 2
    for _ in range(2):
        q = torch.randn(1, 4, 24, 8, generator=g)
        k = torch.randn(1, 2, 24, 8, generator=g) * torch.linspace(2, 0.2, 8)
        v = torch.randn(1, 2, 24, 8, generator=g) * torch.linspace(1, 0.5, 8)
        st.add(q, k, v)
    st.set_output_weight(torch.randn(4, 8, 16, generator=g))
    return st


@pytest.fixture(scope="module")
def stats():
    return _site(0)


def test_orthonormal_and_improves(stats):
    proj, rep = Stiefel(steps=30, lr=2e-2).fit(stats, 4, 4)
    eye = torch.eye(4).expand(2, 4, 4)
    assert torch.allclose(proj.key_down.transpose(1, 2) @ proj.key_down, eye, atol=1e-5)
    assert torch.equal(proj.key_down, proj.key_up) and torch.equal(proj.value_down, proj.value_up)
    assert rep["final_loss"] < rep["init_loss"] and rep["fallback"] == 0.0
    # the reported loss is the loss of the returned projection
    assert Stiefel().loss(stats, proj.key_down, proj.value_down).item() == pytest.approx(rep["final_loss"], rel=1e-4)


def test_deterministic(stats):
    a = Stiefel(steps=5).fit(stats, 3, 3)[0]
    b = Stiefel(steps=5).fit(stats, 3, 3)[0]
    assert torch.equal(a.key_down, b.key_down)


def test_nan_loss_falls_back_to_init(stats, monkeypatch):
    calls = {"n": 0}
    real = Stiefel.loss

    def flaky(self, st, a, c, rows=None):
        calls["n"] += 1
        return real(self, st, a, c, rows) if calls["n"] == 1 else torch.tensor(float("nan"), requires_grad=True)
    monkeypatch.setattr(Stiefel, "loss", flaky)
    proj, rep = Stiefel(steps=5).fit(stats, 4, 4)
    assert rep["fallback"] == 1.0 and torch.isfinite(proj.key_down).all()


def test_needs_samples():
    st = SiteStats.empty(4, 2, 8)
    with pytest.raises(ValueError, match="calibration sequences"):
        Stiefel().fit(st, 4, 4)


def test_budget_allocates_from_proxy_profiles_then_trains_at_those_ranks():
    """Under a Budget, stiefel takes kqsvd's error-rank profiles (not one training per candidate rank)."""
    stats = {"a": _site(0), "b": _site(1)}
    ranks_s, _ = allocate_ranks(get_calibrator("stiefel", steps=2), stats, Budget(0.5))
    ranks_k, _ = allocate_ranks(get_calibrator("kqsvd"), stats, Budget(0.5))
    assert ranks_s == ranks_k
    proj = fit(stats, "stiefel", Budget(0.5), steps=2)
    assert {n: tuple(r) for n, r in proj.ranks.items()} == ranks_k and proj.kv_fraction() <= 0.5 + 1e-9

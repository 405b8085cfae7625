"""Joint cross-head latent: the stats view, full-rank exactness, and better error than per-head at equal bytes."""
import torch

from kvfx.calib.collect import fit
from kvfx.calib.stats import SiteStats


def _stats(heads=6, kv=3, d=8, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(kv * d, kv * d, generator=g)  # correlate keys ACROSS heads
    k = (torch.randn(1, n, kv * d, generator=g) @ mix).view(1, n, kv, d).transpose(1, 2)
    v = (torch.randn(1, n, kv * d, generator=g) @ mix).view(1, n, kv, d).transpose(1, 2)
    q = torch.randn(1, heads, n, d, generator=g)
    st = SiteStats.empty(heads, kv, d)
    st.add(q, k, v)
    st.set_output_weight(torch.randn(heads, d, 12, generator=g))
    return st, q, k, v


def test_joint_view_grams():
    st, q, k, v = _stats()
    j = st.joint()
    kj = k.transpose(1, 2).reshape(-1, 24).double()
    assert torch.allclose(j.key[0], kj.T @ kj)
    assert j.kv_heads == 1 and j.head_dim == 24
    assert torch.allclose(j.query[0][:8, :8], st.query[0]) and j.query[0][:8, 8:].abs().max() == 0


def test_joint_full_rank_is_exact_and_beats_per_head():
    st, q, k, v = _stats()
    full = fit({"s": st}, "kqsvd", 1.0, granularity="layer").sites["s"]
    a, b = full.key_down[0].double(), full.key_up.double()            # [24, 24], [3, 8, 24]
    kj = k.transpose(1, 2).reshape(1, -1, 24).double()
    lat = kj @ a                                                         # [1, n, 24]
    for i in range(6):
        logits = q[:, i].double() @ k[:, i // 2].double().transpose(-1, -2)
        approx = (q[:, i].double() @ b[i // 2]) @ lat.transpose(-1, -2)
        assert torch.allclose(logits, approx, rtol=1e-4, atol=1e-4)
    joint = fit({"s": st}, "kqsvd", 12, granularity="layer")     # 12 cached numbers / token for keys
    head = fit({"s": st}, "kqsvd", 4)                            # 3 heads × 4 = 12 as well
    assert joint.kv_fraction() == head.kv_fraction()
    assert joint.report["sites"]["s"]["key_err"] < head.report["sites"]["s"]["key_err"]

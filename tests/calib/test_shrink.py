"""Gram shrinkage (kvfx.calib.shrink): each token Gram pulled toward its head's scaled identity, the cross Gram
toward zero, the rest of the statistics untouched; the statistics given are not changed."""
import pytest
import torch

from kvfx.calib.base import site_errors
from kvfx.calib.collect import fit
from kvfx.calib.shrink import shrink
from kvfx.calib.stats import SiteStats


def _stats(heads=4, kv=2, d=8, n=64, seed=0) -> dict[str, SiteStats]:
    g = torch.Generator().manual_seed(seed)
    st = SiteStats.empty(heads, kv, d)
    x = torch.randn(1, n, 6, generator=g)  # keys and values of rank 6 per kv head: a shrunk Gram becomes full rank
    k = (x @ torch.randn(6, kv * d, generator=g)).view(1, n, kv, d).transpose(1, 2)
    v = (x @ torch.randn(6, kv * d, generator=g)).view(1, n, kv, d).transpose(1, 2)
    st.add(torch.randn(1, heads, n, d, generator=g), k, v)
    st.set_output_weight(torch.randn(heads, d, 12, generator=g))
    return {"layers.0": st}


def test_each_gram_moves_toward_its_heads_scaled_identity():
    stats = _stats()
    before = {f: getattr(stats["layers.0"], f).clone() for f in ("key", "key_joint", "kv_joint", "output")}
    st = shrink(stats, 0.25)["layers.0"]
    d = st.head_dim
    for g, g0 in zip(st.key, before["key"]):
        torch.testing.assert_close(g, 0.75 * g0 + 0.25 * g0.trace() / d * torch.eye(d, dtype=g.dtype))
    for h in range(st.kv_heads):  # the joint Gram's diagonal blocks are the heads' own shrunk Grams
        block = slice(h * d, (h + 1) * d)
        torch.testing.assert_close(st.key_joint[block, block], st.key[h])
    torch.testing.assert_close(st.key_joint[:d, d:], 0.75 * before["key_joint"][:d, d:])  # cross-head: toward 0
    torch.testing.assert_close(st.kv_joint, 0.75 * before["kv_joint"])
    torch.testing.assert_close(st.output, before["output"])                   # W_O Grams are weights, not tokens
    assert st.tokens == stats["layers.0"].tokens and st.means() is not None
    torch.testing.assert_close(st.means()[0], stats["layers.0"].means()[0])
    torch.testing.assert_close(stats["layers.0"].key, before["key"])          # the statistics given are unchanged
    assert torch.linalg.matrix_rank(before["key"][0]) == 6 and torch.linalg.matrix_rank(st.key[0]) == d


def test_zero_shrinkage_fits_what_the_measured_statistics_fit():
    stats = _stats()
    for gran in ("head", "kv"):
        a = fit(stats, "kqsvd", 0.5, granularity=gran)
        b = fit(shrink(stats, 0.0), "kqsvd", 0.5, granularity=gran)
        torch.testing.assert_close(a.sites["layers.0"].key_up, b.sites["layers.0"].key_up)


def test_shrinkage_changes_what_a_fit_keeps():
    """Rank-6 keys: at rank 6 kqsvd fits the measured Grams exactly; shrunk ones weigh all d directions, so that fit
    misses the measured statistics (what trusting the calibration text less costs). PCA of one head is unchanged:
    a scaled identity added to a Gram keeps its eigenvectors."""
    stats = _stats()
    exact = fit(stats, "kqsvd", 6).report["sites"]["layers.0"]["key_err"]
    shrunk = fit(shrink(stats, 0.5), "kqsvd", 6)
    assert exact < 1e-6 and site_errors(stats["layers.0"], shrunk.sites["layers.0"])["key_err"] > 1e-3
    pca, pca_shrunk = fit(stats, "pca", 4), fit(shrink(stats, 0.5), "pca", 4)
    torch.testing.assert_close(pca.sites["layers.0"].key_up.abs(), pca_shrunk.sites["layers.0"].key_up.abs())


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5, "0.1", float("nan")])
def test_bad_weight_is_refused(alpha):
    with pytest.raises(ValueError, match=r"shrinkage must be a number in \[0, 1\)"):
        shrink(_stats(), alpha)

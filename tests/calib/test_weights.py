"""Attention-aware token weights (kvfx.calib.weights): against a per-query reference, and in the Grams."""
import math

import pytest
import torch

from kvfx.calib import weights as W
from kvfx.calib.stats import SiteStats


def reference(q, k, v, gamma, mask=None, causal=False, scale=None, value=False):
    """f_t = Σ_heads Σ_q p_qt² ‖v_t − o_q‖² (value: u_t = Σ_heads Σ_q p_qt²), one query and head at a time,
    float64."""
    b, H, n, d = q.shape
    h, N = k.shape[1], k.shape[2]
    f = torch.zeros(b, N, dtype=torch.float64)
    scale = 1 / math.sqrt(d) if scale is None else scale
    for bi in range(b):
        for hi in range(H):
            kk, vv = k[bi, hi // (H // h)].double(), v[bi, hi // (H // h)].double()
            for qi in range(n):
                s = kk @ q[bi, hi, qi].double() * scale
                if causal:
                    s[qi + 1:] = -math.inf
                if mask is not None:
                    m = mask.expand(b, H, n, N)[bi, hi, qi]
                    s = s.masked_fill(~m, -math.inf) if m.dtype == torch.bool else s + m.double()
                p = s.softmax(0).nan_to_num(0)
                o = p @ vv
                f[bi] += p ** 2 if value else p ** 2 * ((vv - o) ** 2).sum(-1)
    w = (f / f.mean(-1, keepdim=True)).clamp_min(1e-8) ** gamma
    return w / w.mean(-1, keepdim=True)


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_weights_match_the_per_query_reference(monkeypatch, gamma):
    """GQA (4 query heads on 2 kv heads), causal, a boolean and an additive mask, an explicit scale; queries in
    blocks smaller than the window (the blocking must not change the sums)."""
    monkeypatch.setattr(W, "QUERY_BLOCK", 3)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731 (float32 scores inside)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    close(W.token_weights(q, k, v, gamma, is_causal=True), reference(q, k, v, gamma, causal=True))
    keep = torch.rand(2, 1, 7, 7, generator=g) > 0.3
    keep[..., 0] = True
    close(W.token_weights(q, k, v, gamma, attn_mask=keep, scale=0.2),
                               reference(q, k, v, gamma, mask=keep, scale=0.2))
    add = torch.randn(1, 4, 7, 7, generator=g)
    close(W.token_weights(q, k, v, gamma, attn_mask=add), reference(q, k, v, gamma, mask=add))
    key, value = W.attention_weights(q, k, v, gamma, attn_mask=keep, scale=0.2)
    close(key, reference(q, k, v, gamma, mask=keep, scale=0.2))
    close(value, reference(q, k, v, gamma, mask=keep, scale=0.2, value=True))


def test_a_token_no_query_reads_weighs_nothing_and_gamma_zero_is_plain():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 1, 5, 4, generator=g), torch.randn(1, 1, 5, 4, generator=g)
    keep = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    keep[..., 3] = False
    w = W.token_weights(q, k, v, 1.0, attn_mask=keep)
    assert w[0, 3] < 1e-6 and abs(float(w.mean()) - 1) < 1e-12
    assert torch.equal(W.token_weights(q, k, v, 0.0), torch.ones(1, 5, dtype=torch.float64))
    for bad in (-0.5, 1.5, True, "half"):
        with pytest.raises(ValueError, match="attention_weight must be a number in \\[0, 1\\]"):
            W.token_weights(q, k, v, bad)


def test_weighted_grams_count_each_token_by_its_weight_and_keep_plain_means():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    plain, weighted = SiteStats.empty(4, 2, 8), SiteStats.empty(4, 2, 8)
    weighted.attention_weight = 0.5
    plain.add(q, k, v, None, True, None)
    weighted.add(q, k, v, None, True, None)
    w = W.token_weights(q, k, v, 0.5, is_causal=True)[0]
    kj = k[0].transpose(0, 1).reshape(6, 16).double()
    vj = v[0].transpose(0, 1).reshape(6, 16).double()
    torch.testing.assert_close(weighted.key_joint, kj.T @ (w[:, None] * kj))
    torch.testing.assert_close(weighted.kv_joint, kj.T @ (w[:, None] * vj))
    torch.testing.assert_close(weighted.query, plain.query)
    assert torch.equal(weighted.key_sum, plain.key_sum) and weighted.tokens == plain.tokens
    assert not torch.allclose(weighted.key_joint, plain.key_joint)
    own = SiteStats.empty(4, 2, 8)     # values weighted by their own u_t^γ: the cross Gram by √(w_t u_t)
    own.attention_weight, own.own_value_weight = 0.5, True
    own.add(q, k, v, None, True, None)
    u = W.attention_weights(q, k, v, 0.5, is_causal=True)[1][0]
    torch.testing.assert_close(own.key_joint, weighted.key_joint)
    torch.testing.assert_close(own.value_joint, vj.T @ (u[:, None] * vj))
    torch.testing.assert_close(own.kv_joint, kj.T @ ((w * u).sqrt()[:, None] * vj))


def test_collect_stats_weights_by_the_sites_own_attention():
    """Through the observer pass on a tiny Llama: each site's SDPA mask arguments reach SiteStats.add (the weights
    they give are the causal ones), the weighted Grams differ from the plain ones, the means do not; a bad γ is
    refused before any work."""
    import kvfx
    from helpers import VOCAB, tiny_llama
    from kvfx.calib.collect import collect_stats
    model = tiny_llama()
    ids = [torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))]
    seen, add = [], SiteStats.add

    def spy(self, *args):
        seen.append(args)
        add(self, *args)
    plain = collect_stats(model, ids, progress=False)
    SiteStats.add = spy
    try:
        weighted = collect_stats(model, ids, progress=False, attention_weight=1.0)
    finally:
        SiteStats.add = add
    for q, k, v, *mask_args in seen:
        torch.testing.assert_close(W.token_weights(q, k, v, 1.0, *mask_args), W.token_weights(q, k, v, 1.0, is_causal=True))
    for name in plain:
        assert weighted[name].attention_weight == 1.0
        assert torch.equal(weighted[name].key_sum, plain[name].key_sum)
        assert not torch.allclose(weighted[name].key_joint, plain[name].key_joint)
    with pytest.raises(ValueError, match="attention_weight must be"):
        kvfx.calibrate(model, ids, attention_weight=2.0, progress=False)
    with pytest.raises(ValueError, match="own_value_weight=True .* needs attention_weight > 0"):
        collect_stats(model, ids, progress=False, own_value_weight=True)

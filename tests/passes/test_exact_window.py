"""passes/exact_window.py: each query attends the exact latents of the sink keys and of the keys within its window,
the rounded ones elsewhere — checked against a loop over queries that builds each query's keys explicitly."""
import pytest
import torch

from kvfx.passes import exact_window


def _loop(q, ke, ve, kr, vr, mask, scale, sinks, recent):
    """Per query: its own key / value rows (exact or rounded by distance), then plain softmax attention."""
    b, heads, t, _ = q.shape
    n = kr.shape[2]
    rep = heads // kr.shape[1]
    ke, ve, kr, vr = (x.repeat_interleave(rep, 1) for x in (ke, ve, kr, vr))
    ke, ve = ke.half().float(), ve.half().float()  # held in 16 bits, as the cache holds them
    out = torch.empty(b, heads, t, vr.shape[-1])
    for i in range(t):
        pos = n - t + i
        use = torch.tensor([j < sinks or pos - j < recent for j in range(n)])[:, None]
        k, v = torch.where(use, ke, kr), torch.where(use, ve, vr)
        s = scale * q[:, :, i:i + 1] @ k.transpose(-1, -2)
        s = s.masked_fill(torch.arange(n) > pos, float("-inf"))
        if mask is not None:
            s = s + mask[..., i:i + 1, :]
        out[:, :, i:i + 1] = torch.softmax(s, -1) @ v
    return out


@pytest.mark.parametrize("sinks,recent,t,n", [(2, 3, 7, 7), (0, 4, 3, 9), (4, 0, 1, 12), (1, 1, 5, 5)])
def test_attention_matches_the_per_query_loop(sinks, recent, t, n):
    g = torch.Generator().manual_seed(sinks * 10 + recent)
    q = torch.randn(2, 4, t, 6, generator=g)
    ke, ve = torch.randn(2, 2, n, 6, generator=g), torch.randn(2, 2, n, 5, generator=g)
    kr, vr = ke + 0.3 * torch.randn(ke.shape, generator=g), ve + 0.3 * torch.randn(ve.shape, generator=g)
    mask = torch.randn(1, 1, t, n, generator=g)
    out = exact_window.attention(q, ke, ve, kr, vr, attn_mask=mask, is_causal=True, scale=0.4, sinks=sinks,
                                 recent=recent)
    torch.testing.assert_close(out, _loop(q, ke, ve, kr, vr, mask, 0.4, sinks, recent), rtol=1e-5, atol=1e-5)
    bool_mask = torch.ones(1, 1, t, n, dtype=torch.bool).tril(n - t)  # a causal bool mask instead of is_causal
    torch.testing.assert_close(exact_window.attention(q, ke, ve, kr, vr, attn_mask=bool_mask, scale=0.4, sinks=sinks,
                                                      recent=recent),
                               _loop(q, ke, ve, kr, vr, None, 0.4, sinks, recent), rtol=1e-5, atol=1e-5)


def test_gradients_reach_both_latents_straight_through():
    """refine trains through it: the 16-bit rounding of the exact rows passes gradients unchanged."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 6, 4, generator=g)
    ke, ve, kr, vr = (torch.randn(1, 2, 6, 4, generator=g).requires_grad_() for _ in range(4))
    exact_window.attention(q, ke, ve, kr, vr, is_causal=True, sinks=1, recent=2).sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (ke, ve, kr, vr))
    x = torch.randn(5, requires_grad=True)
    exact_window.held_exact(x).mul(torch.arange(5.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(5.0))

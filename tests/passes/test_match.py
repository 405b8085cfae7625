"""Pass 1 (match): what find_sites reports on real Dynamo graphs. It must never change the graph."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kvfx
from helpers import (HandAttention, capture_graphs, forward_of, hand_model, model_inputs, random_projections, tiny_gpt2,
                     tiny_llama)
from kvfx.passes import graph_utils as gu
from kvfx.passes.match import find_sites


def _find(gm, example_inputs):
    """find_sites, plus the module paths / source names that only exist while the backend runs."""
    before = gm.code
    sites = find_sites(gm)
    assert gm.code == before, "find_sites changed the graph"
    for s in sites:
        srcs = {"q": s.q.source, "k": s.k.source, "v": s.v.source, "o": s.out_source}
        s.paths = {k: gu.module_path(src.weight) if src else None for k, src in srcs.items()}
        s.tags = {k: (gu.source_name(p.up), gu.source_name(p.down.args[1])) for k, p in (("k", s.k), ("v", s.v))
                  if p.cache == "lowrank"}
    return sites


def sites_of(model, *args, **kwargs):
    (sites,) = capture_graphs(forward_of(model), *args, on_graph=_find, **kwargs)
    return None, sites


def test_llama_sites():
    m = tiny_llama(2)
    _, sites = sites_of(m, model_inputs(m), use_cache=False)
    assert [s.name for s in sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for s in sites:
        assert s.status == "ok", s.status
        assert (s.num_heads, s.num_kv_heads, s.head_dim, s.value_dim, s.group) == (4, 2, 8, 8, 2)
        assert s.scale == pytest.approx(1 / math.sqrt(8))
        assert s.q.rope and s.k.rope and not s.v.rope
        assert not s.q.foldable and not s.k.foldable  # RoPE between the linear and SDPA
        assert s.k.cache == s.v.cache == "none"
        assert s.k.repeat_kv is not None and s.v.repeat_kv is not None  # masked prefill: repeat_kv, not enable_gqa
        assert s.paths == {x: f"{s.name}.{x}_proj" for x in "qkvo"}
        assert not s.out_source.transposed and s.q.source.split is None
        assert gu.shape_of(s.k.base) == (1, 2, 6, 8)  # keys before repeat_kv: kv heads (what calibration reads)


def test_llama_dynamic_cache_prefill():
    """With transformers' DynamicCache the prefill concatenates onto an empty tensor: still no cache content."""
    m = tiny_llama(1)
    _, (s,) = sites_of(m, model_inputs(m))
    assert s.status == "ok" and s.k.cache == "none" and s.k.rope
    assert s.paths["v"] == "model.layers.0.self_attn.v_proj"


def test_gpt2_fused_qkv():
    m = tiny_gpt2(2)
    _, sites = sites_of(m, model_inputs(m), use_cache=False)
    assert [s.name for s in sites] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    for s in sites:
        assert s.status == "ok"
        assert (s.num_heads, s.num_kv_heads, s.head_dim) == (4, 4, 8)
        assert not s.rope
        srcs = [s.q.source, s.k.source, s.v.source]
        assert all(p.foldable for p in (s.q, s.k, s.v))
        assert all(src.transposed for src in srcs)             # Conv1D: addmm with W [in, out]
        assert len({src.node for src in srcs}) == 1            # one fused c_attn ...
        assert [src.split_index for src in srcs] == [0, 1, 2]  # ... split into q, k, v
        assert s.paths == {"q": f"{s.name}.c_attn", "k": f"{s.name}.c_attn", "v": f"{s.name}.c_attn",
                           "o": f"{s.name}.c_proj"}
        assert s.out_source.transposed
        assert s.q.source.bias is not None


def test_hand_written_module():
    m = hand_model(2)
    _, sites = sites_of(m, model_inputs(m, batch=2))
    assert [s.name for s in sites] == ["layers.0.attn", "layers.1.attn"]
    s = sites[0]
    assert s.status == "ok" and s.notes == []
    assert (s.num_heads, s.num_kv_heads, s.head_dim) == (4, 4, 8)
    assert all(p.foldable and p.source.bias is not None for p in (s.q, s.k, s.v))
    assert s.scale == pytest.approx(1 / math.sqrt(8))


def test_unnamed_site_falls_back_to_index():
    """A bare attention module: q_proj and o_proj share no prefix, so the site is called sdpa{index}."""
    m = HandAttention().eval()
    _, (s,) = sites_of(m, torch.randn(1, 5, 32))
    assert s.name == "sdpa0" and s.status == "ok"


def test_explicit_scale_is_kept():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = HandAttention()

        def forward(self, x):
            a = self.attn
            q, k, v = (p(x).view(1, 5, 4, 8).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
            o = F.scaled_dot_product_attention(q, k, v, scale=0.125)
            return a.o_proj(o.transpose(1, 2).reshape(1, 5, 32))

    _, (s,) = sites_of(Scaled().eval(), torch.randn(1, 5, 32))
    assert s.scale == 0.125


def test_raw_inputs_are_reported():
    """SDPA on tensors that come from no linear: matched, with a note that nothing can fold."""
    class Raw(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q = torch.randn(1, 4, 5, 8)
    _, (s,) = sites_of(Raw(), q, q.clone(), q.clone())
    assert s.status == "ok" and s.name == "sdpa0"
    assert any(n.startswith("q: no projection linear found") for n in s.notes)
    assert s.out_source is None


class _VWide(nn.Module):
    """Value heads 16 wide, query/key heads 8: SDPA accepts it, kvfx's [h, head_dim, R] projections cannot."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 8).transpose(1, 2)
        k = self.k(x).view(b, n, 4, 8).transpose(1, 2)
        v = self.v(x).view(b, n, 4, 16).transpose(1, 2)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 64))


class _Flat(nn.Module):
    """Heads folded into the batch: 3-D SDPA inputs."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        f = lambda t: t.view(b, n, 4, 8).transpose(1, 2).reshape(b * 4, n, 8)  # noqa: E731
        o = F.scaled_dot_product_attention(f(self.q(x)), f(self.k(x)), f(self.v(x)))
        return self.o(o.view(b, 4, n, 8).transpose(1, 2).reshape(b, n, 32))


@pytest.mark.parametrize("module,status", [
    (_VWide, "unsupported: value width 16 != key width 8"),
    (_Flat, "unsupported: q/k/v are not 4-D [batch, heads, tokens, head_dim] tensors"),
])
def test_unsupported_status(module, status):
    _, (s,) = sites_of(module().eval(), torch.randn(1, 5, 32))
    assert s.status == status


def _decode_graph(kind):
    m = tiny_llama(1)
    P = random_projections(m, rank=4)
    ids = model_inputs(m, tokens=5)
    cache = kvfx.LowRankCache(P, kind, max_cache_len=8)
    with torch.no_grad():
        m(ids, past_key_values=cache)  # eager prefill fills the rank-R cache
    (sites,) = capture_graphs(forward_of(m), ids[:, :1], past_key_values=cache, on_graph=_find)
    return sites


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_lowrank_cache_decode(kind):
    (s,) = _decode_graph(kind)
    assert s.status == "ok" and s.name == "model.layers.0.self_attn"
    assert s.lowrank_cache and s.k.cache == s.v.cache == "lowrank"
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.value_dim) == (4, 2, 8, 8)
    cache = "L['kwargs']['past_key_values'].layers[0]"
    assert s.tags == {"k": (f"{cache}.kvfx_key_up", f"{cache}.kvfx_key_down"),
                      "v": (f"{cache}.kvfx_value_up", f"{cache}.kvfx_value_down")}
    for p in (s.k, s.v):
        assert p.recon.args == (p.latent, p.up)
        assert gu.shape_of(p.latent)[-1] == 4  # the cache holds rank-R tensors
    assert s.v.foldable and not s.k.foldable  # v: linear -> cache write is layout only; k: RoPE
    if kind == "static":
        assert s.k.repeat_kv is not None  # masked decode: repeat_kv on the reconstruction

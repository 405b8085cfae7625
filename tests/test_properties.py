"""Property tests: kvfx's rewrite on randomly configured hand-written attention (tests/coverage/archs.SDPAAttention).

Hypothesis draws the attention's configuration — query heads, kv heads dividing them (MHA, GQA, MQA),
head_dim, q/k/v biases, rotate-half RoPE, fused qkv Linear or separate q/k/v — plus layers, batch, tokens,
rank and the kind of projection, and checks on every draw:

(a) full-rank identity projections reproduce the original model (rel err <= 1e-5, float32);
(b) random rank-R projections (orthonormal, or oblique A != B, C != D) give exactly the low-rank math of an
    independent plain-PyTorch reference, softmax((q·B_i)(k·A)ᵀ/sqrt(d))·(v·C)·D_iᵀ (archs.hand_reference);
    and that reference is itself SDPA on (q·B, k·A, v·C) with the ORIGINAL scale, then ·Dᵀ.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import archs  # noqa: E402
import kvfx  # noqa: E402
from helpers import random_projections  # noqa: E402
from kvfx.projections import SiteShape  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def configs(draw):
    """An SDPAAttention configuration and the shapes to run it at."""
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))         # kv heads divide heads: MHA, GQA, MQA
    head_dim = draw(st.sampled_from([2, 4, 6, 8, 16]))           # even: rotate-half RoPE
    return dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, bias=draw(st.booleans()),
                rope=draw(st.booleans()), fused=draw(st.booleans()), layers=draw(st.integers(1, 2)),
                batch=draw(st.integers(1, 3)), tokens=draw(st.integers(1, 9)), seed=draw(st.integers(0, 10_000)))


def build(cfg):
    """(HandLM of SDPAAttention layers, site names, site shape, input ids)."""
    attn = {k: cfg[k] for k in ("heads", "kv_heads", "head_dim", "bias", "rope", "fused")}
    torch.manual_seed(cfg["seed"])
    model = archs.HandLM(lambda: archs.SDPAAttention(**attn), layers=cfg["layers"]).eval()
    names = [f"layers.{i}.attn" for i in range(cfg["layers"])]
    shape = SiteShape(cfg["heads"], cfg["kv_heads"], cfg["head_dim"])
    g = torch.Generator().manual_seed(cfg["seed"])
    ids = torch.randint(0, archs.VOCAB, (cfg["batch"], cfg["tokens"]), generator=g)
    return model, names, shape, ids


def compressed_output(model, projections, ids, cfg):
    """Output of kvfx.compress(torch.compile(model, backend="eager"), projections), checking what was rewritten
    and folded: every site; W_O always; W_Q and W_K whenever no RoPE sits between them and SDPA, except that
    with GQA (repeat_kv between W_K/W_V and SDPA) W_K and W_V stay unfolded; W_V always otherwise."""
    torch._dynamo.reset()
    kvfx.counters.clear()
    cm = kvfx.compress(torch.compile(model, backend="eager"), projections)
    try:
        out = archs.forward(cm, ids)
    finally:
        kvfx.decompress(cm)
    c, n = kvfx.counters["kvfx"], cfg["layers"]
    assert (c["graphs"], c["rewritten"], c["folded_o"]) == (1, n, n), (dict(c), cfg)
    assert c["folded_q"] == (0 if cfg["rope"] else n), (dict(c), cfg)
    if cfg["heads"] == cfg["kv_heads"]:
        assert c["folded_v"] == n and c["folded_k"] == (0 if cfg["rope"] else n), (dict(c), cfg)
    return out


@SETTINGS
@given(cfg=configs())
def test_identity_projections_reproduce_the_model(cfg):
    model, names, shape, ids = build(cfg)
    ident = archs.identity_projections(random_projections(None, rank=1, names=names, shape=shape))
    expected = archs.forward(model, ids)
    assert archs.rel_err(compressed_output(model, ident, ids, cfg), expected) <= 1e-5, cfg


@SETTINGS
@given(cfg=configs(), rank_frac=st.floats(0.0, 1.0), kind=st.sampled_from(["orthonormal", "oblique"]))
def test_rank_r_equals_lowrank_reference(cfg, rank_frac, kind):
    model, names, shape, ids = build(cfg)
    rank = 1 + int(rank_frac * (shape.head_dim - 1))
    P = random_projections(None, rank=rank, kind=kind, seed=cfg["seed"], names=names, shape=shape)
    expected = archs.hand_reference(model, ids, P)
    out = compressed_output(model, P, ids, cfg)
    assert archs.rel_err(out, expected) <= 1e-4, (cfg, rank, kind)
    if kind == "oblique":  # never a no-op: arbitrary A, B, C, D change the model
        assert archs.rel_err(out, archs.forward(model, ids)) > 1e-3, (cfg, rank)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(cfg=configs(), rank_frac=st.floats(0.0, 1.0))
def test_reference_is_sdpa_on_projected_tensors(cfg, rank_frac):
    """archs.lowrank_attention (einsum, float64) == F.scaled_dot_product_attention(q·B, k·A, v·C, causal,
    scale=1/sqrt(d) — the original head_dim, not the rank) · Dᵀ, with kv groups expanded like repeat_kv."""
    H, h, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    rank = 1 + int(rank_frac * (d - 1))
    P = random_projections(None, rank=rank, kind="oblique", seed=cfg["seed"], names=["s"], shape=SiteShape(H, h, d))
    p = P.sites["s"]
    g = torch.Generator().manual_seed(cfg["seed"])
    b, n = cfg["batch"], cfg["tokens"]
    q, k, v = (torch.randn(b, x, n, d, generator=g, dtype=torch.float64) for x in (H, h, h))
    rep = H // h
    B, D = p.key_up.double().repeat_interleave(rep, 0), p.value_up.double().repeat_interleave(rep, 0)
    k_lat = torch.einsum("bhnd,hdr->bhnr", k, p.key_down.double()).repeat_interleave(rep, 1)
    v_lat = torch.einsum("bhnd,hdr->bhnr", v, p.value_down.double()).repeat_interleave(rep, 1)
    q_lat = torch.einsum("bHnd,Hdr->bHnr", q, B)
    o = F.scaled_dot_product_attention(q_lat, k_lat, v_lat, is_causal=True, scale=1 / math.sqrt(d))
    expected = torch.einsum("bHnr,Hdr->bHnd", o, D)
    assert archs.rel_err(archs.lowrank_attention(q, k, v, p), expected) <= 1e-12

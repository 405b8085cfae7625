"""kvfx.compress / decompress / explain: options kept, no graph breaks, and clear errors that leave the model alone."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kvfx
from helpers import (HandAttention, hand_model, hand_reference, identity_projections, model_inputs,
                     random_projections, rel_err, run, tiny_gpt2, tiny_llama)
from kvfx.passes.compile import UnsupportedAttention
from kvfx.projections import ProjectionError, SiteProjection, SiteShape


def snapshot(m, x):
    """Everything compress may touch: instance attributes, parameters, and the output."""
    return dict(forward=m.__dict__.get("forward"), generate=m.__dict__.get("generate"), kvfx=hasattr(m, "_kvfx"),
                params={k: v.clone() for k, v in m.state_dict().items()}, out=run(m, x))


def assert_untouched(m, x, before):
    after = snapshot(m, x)
    assert after["forward"] is before["forward"] and "forward" not in m.__dict__
    assert after["generate"] is before["generate"] and "generate" not in m.__dict__
    assert not after["kvfx"]
    assert after["params"].keys() == before["params"].keys()
    assert all(torch.equal(after["params"][k], v) for k, v in before["params"].items())
    assert torch.equal(after["out"], before["out"])


# ---------------------------------------------------------------------------------------------- compile options
@pytest.mark.parametrize("kwargs,check", [
    (dict(backend="eager"), lambda o: o.backend is torch._dynamo.backends.debugging.eager),
    (dict(mode="max-autotune-no-cudagraphs"), lambda o: o.backend == "inductor" and o.options["max_autotune"]),
    (dict(options={"epilogue_fusion": False}), lambda o: o.options == {"epilogue_fusion": False}),
    (dict(dynamic=False, fullgraph=True), lambda o: o.dynamic is False and o.fullgraph is True),
    (dict(backend="aot_eager", dynamic=True), lambda o: o.backend.__name__ == "aot_eager" and o.dynamic is True),
])
def test_compile_options_kept(kwargs, check):
    m = hand_model(1)
    cm = kvfx.compress(torch.compile(m, **kwargs), identity_projections(m))
    assert cm is m  # the original module comes back
    assert check(cm._kvfx.options)
    assert check(cm._kvfx.backend.opts)


def test_plain_module_defaults_to_inductor():
    m = hand_model(1)
    kvfx.compress(m, identity_projections(m))
    o = m._kvfx.options
    assert (o.backend, o.options, o.dynamic, o.fullgraph) == ("inductor", {}, None, False)


def test_user_backend_receives_rewritten_graph():
    """Any inner compiler works: a user's backend gets kvfx's graph plus the extra constants."""
    seen = []

    def my_backend(gm, example_inputs):
        seen.append(([n.name for n in gm.graph.nodes if n.op == "placeholder"], len(example_inputs)))
        return gm.forward

    m = hand_model(1)
    P = random_projections(m, rank=4)
    x = model_inputs(m)
    out = run(kvfx.compress(torch.compile(m, backend=my_backend), P), x)
    assert rel_err(out, hand_reference(m, x, P)) <= 1e-4
    ((names, n_inputs),) = seen
    assert "kvfx_layers_0_attn_o_folded_weight" in names and n_inputs == len(names)


def test_fullgraph_kept_and_holds():
    m = tiny_llama(1)
    cm = kvfx.compress(torch.compile(m, backend="eager", fullgraph=True), identity_projections(m))
    x = model_inputs(m)
    assert rel_err(run(cm, x), run(kvfx.decompress(cm), x)) <= 1e-5


# ---------------------------------------------------------------------------------------------- graph breaks
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("lowrank_cache", [False, True])
def test_no_graph_breaks(make, lowrank_cache):
    m = make(2)
    P = random_projections(m, rank=4)
    cm = kvfx.compress(torch.compile(m, backend="eager"), P)
    x = model_inputs(m)
    kw = dict(past_key_values=kvfx.make_cache(cm)) if lowrank_cache else {}
    info = torch._dynamo.explain(cm.forward)(x, **kw)
    assert (info.graph_count, info.graph_break_count) == (1, 0), info.break_reasons


# ---------------------------------------------------------------------------------------------- decompress
def test_decompress_restores_and_recompress_applies_new_projections():
    m = hand_model(2)
    x = model_inputs(m)
    before = snapshot(m, x)
    P1, P2 = random_projections(m, rank=4, seed=1), random_projections(m, rank=3, seed=2)
    out1 = run(kvfx.compress(torch.compile(m, backend="eager"), P1), x)
    assert "forward" in m.__dict__
    kvfx.decompress(m)
    assert_untouched(m, x, before)
    out2 = run(kvfx.compress(torch.compile(m, backend="eager"), P2), x)  # not a stale graph from P1
    assert rel_err(out1, hand_reference(m, x, P1)) <= 1e-4
    assert rel_err(out2, hand_reference(m, x, P2)) <= 1e-4
    kvfx.decompress(m)
    assert_untouched(m, x, before)


def test_decompress_hf_model_restores_generate():
    m = tiny_llama(1)
    x = model_inputs(m)
    before = snapshot(m, x)
    cm = kvfx.compress(torch.compile(m, backend="eager"), identity_projections(m))
    assert "generate" in m.__dict__ and "forward" in m.__dict__
    kvfx.decompress(cm)
    assert_untouched(m, x, before)
    with pytest.raises(ProjectionError, match="not compressed"):
        kvfx.decompress(m)


def test_compress_twice():
    m = hand_model(1)
    x = model_inputs(m)
    P = random_projections(m, rank=4)
    cm = kvfx.compress(torch.compile(m, backend="eager"), P)
    state, fwd = cm._kvfx, cm.forward
    for again in (cm, torch.compile(cm, backend="eager")):
        with pytest.raises(ProjectionError, match=r"already compressed.*kvfx.decompress"):
            kvfx.compress(again, P)
    assert cm._kvfx is state and cm.forward is fwd  # the first compress is intact
    assert rel_err(run(cm, x), hand_reference(m, x, P)) <= 1e-4


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def llama():
    m = tiny_llama(2)
    x = model_inputs(m)
    return m, x, snapshot(m, x)


def _shaped(m, shape: SiteShape, rank=4):
    names = [f"model.layers.{i}.self_attn" for i in range(2)]
    return random_projections(None, rank=rank, names=names, shape=shape)


@pytest.mark.parametrize("make_p,error,match", [
    (lambda m: random_projections(tiny_gpt2(2)), ProjectionError,
     r"no module 'transformer.h.0.attn' \(and 1 more\).*another model. Recalibrate"),
    (lambda m: _shaped(m, SiteShape(4, 2, 16)), ProjectionError,
     r"heads/kv heads/head_dim \[4, 2, 8\] but.*\[4, 2, 16\]: another model. Recalibrate"),
    (lambda m: _shaped(m, SiteShape(4, 4, 8)), ProjectionError, r"\[4, 2, 8\] but.*\[4, 4, 8\]"),
    (lambda m: _shaped(m, SiteShape(8, 2, 8)), ProjectionError, r"4 attention heads but .* made for \[8\]"),
    (lambda m: random_projections(tiny_llama(3)), ProjectionError, "no module 'model.layers.2.self_attn'"),
    (lambda m: random_projections(tiny_llama(1)), ProjectionError, "2 layers but the projections cover 1 attention"),
    (lambda m: {"model.layers.0.self_attn": SiteProjection.identity(2, 8)}, TypeError,
     "must be kvfx.Projections.*got dict"),
    (lambda m: "projections.safetensors", TypeError, "got str"),
])
def test_wrong_projections(llama, make_p, error, match):
    m, x, before = llama
    with pytest.raises(error, match=match):
        kvfx.compress(torch.compile(m, backend="eager"), make_p(m))
    assert_untouched(m, x, before)


@pytest.mark.parametrize("kind,bad", [
    ("rank 0", torch.zeros(2, 8, 0)), ("rank > d", torch.randn(2, 8, 9)),
    ("nan", torch.full((2, 8, 4), float("nan"))), ("inf", torch.full((2, 8, 4), float("inf"))),
])
def test_bad_tensors_after_construction(llama, kind, bad):
    """Projections are re-validated by compress (they are mutable after construction)."""
    m, x, before = llama
    P = random_projections(m, rank=4)
    site = P.sites["model.layers.1.self_attn"]
    site.key_down = bad
    if kind.startswith("rank"):
        site.key_up = bad.clone()
    with pytest.raises(ProjectionError, match="rank 0 is outside|rank 9 is outside|NaN/inf"):
        kvfx.compress(torch.compile(m, backend="eager"), P)
    assert_untouched(m, x, before)


@pytest.mark.parametrize("rank", [0, 9])
def test_bad_rank_refused_at_construction(rank):
    with pytest.raises(ProjectionError, match=f"rank {rank} is outside 1..8"):
        random_projections(tiny_llama(1), rank=rank, kind="oblique")


def test_bad_cache_kind_and_non_module(llama):
    m, x, before = llama
    with pytest.raises(ValueError, match="cache must be 'dynamic' or 'static', got 'bogus'"):
        kvfx.compress(torch.compile(m, backend="eager"), identity_projections(m), cache="bogus")
    assert_untouched(m, x, before)
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        kvfx.compress(lambda x: x, identity_projections(m))


def test_model_without_attention_modules():
    """nn.Sequential of Linear layers: the projections' site modules do not exist."""
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).eval()
    x = torch.randn(2, 8)
    before = snapshot(m, x)
    with pytest.raises(ProjectionError, match="no module 'model.layers.0.self_attn'"):
        kvfx.compress(torch.compile(m, backend="eager"), identity_projections(tiny_llama(2)))
    assert_untouched(m, x, before)


@pytest.mark.parametrize("names", [["sdpa0"], ["0", "1"]])
def test_model_without_sdpa_is_refused_at_first_forward(names):
    """Projections whose names exist (or are positional, sdpa{i}) but the model calls no SDPA: nothing would
    be compressed. Only tracing can tell; the first forward raises and undoes compress."""
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).eval()
    x = torch.randn(2, 8)
    before = snapshot(m, x)
    P = random_projections(None, rank=2, names=names, shape=SiteShape(4, 4, 8))
    cm = kvfx.compress(torch.compile(m, backend="eager"), P)
    with pytest.raises(UnsupportedAttention, match="no attention site.*kvfx.explain.*undone"):
        run(cm, x)
    assert_untouched(m, x, before)


def test_attention_sites_not_in_projections():
    """The projections name real modules, but not the attention sites the graph has."""
    m = hand_model(2)
    x = model_inputs(m)
    before = snapshot(m, x)
    P = random_projections(None, rank=4, names=["layers.0", "layers.1"], shape=SiteShape(4, 4, 8))
    cm = kvfx.compress(torch.compile(m, backend="eager"), P)
    with pytest.raises(ProjectionError, match="No projection for attention site 'layers.0.attn'.*recalibrate"):
        run(cm, x)
    assert_untouched(m, x, before)


class _VWideBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = HandAttention()
        self.attn.v_proj = nn.Linear(32, 64)
        self.attn.o_proj = nn.Linear(64, 32)

    def forward(self, x):
        a, (b, n, _) = self.attn, x.shape
        q = a.q_proj(x).view(b, n, 4, 8).transpose(1, 2)
        k = a.k_proj(x).view(b, n, 4, 8).transpose(1, 2)
        v = a.v_proj(x).view(b, n, 4, 16).transpose(1, 2)
        return a.o_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 64))


def test_unsupported_attention_at_first_forward():
    m = _VWideBlock().eval()
    x = torch.randn(1, 5, 32)
    before = snapshot(m, x)
    P = random_projections(None, rank=4, names=["attn"], shape=SiteShape(4, 4, 8))
    cm = kvfx.compress(torch.compile(m, backend="eager"), P)
    with pytest.raises(UnsupportedAttention, match=r"attn: unsupported: value width 16 != key width 8.*kvfx.explain"):
        run(cm, x)
    assert_untouched(m, x, before)


def test_later_calls_use_compiled_forward_directly():
    m = hand_model(1)
    cm = kvfx.compress(torch.compile(m, backend="eager"), identity_projections(m))
    first = cm.forward
    run(cm, model_inputs(m))
    assert cm.forward is not first and cm.forward is not None and "forward" in cm.__dict__
    assert kvfx.counters["kvfx"]["graphs"] == 1


# ---------------------------------------------------------------------------------------------- explain
def test_explain_llama(capsys):
    m = tiny_llama(2)
    e = kvfx.explain(m, model_inputs(m))
    printed = capsys.readouterr().out
    assert [r.site for r in e.rows] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for r in e.rows:
        assert (r.heads, r.kv_heads, r.head_dim, r.rope, r.foldable, r.status) == (4, 2, 8, True, "o", "ok")
    assert (e.graphs, e.graph_breaks) == (1, 0)
    lines = printed.splitlines()
    assert lines[0].split() == ["site", "heads", "kv_heads", "head_dim", "rope", "foldable", "cache", "ranks", "status"]
    assert sum(ln.startswith("model.layers.") for ln in lines) == 2
    assert "2 attention sites in 1 graph(s), 0 graph break(s)" in printed
    assert "forward" not in m.__dict__  # explain does not compress


def test_explain_compressed_shows_ranks():
    m = tiny_gpt2(2)
    cm = kvfx.compress(torch.compile(m, backend="eager"), random_projections(m, rank=3))
    e = kvfx.explain(cm, model_inputs(m), use_cache=False, print_table=False)
    assert [(r.site, r.foldable, r.ranks) for r in e.rows] == [(f"transformer.h.{i}.attn", "qkvo", "3/3")
                                                                 for i in range(2)]


def test_explain_names_unsupported_sdpa():
    e = kvfx.explain(_VWideBlock().eval(), torch.randn(1, 5, 32), print_table=False)
    (row,) = e.rows
    assert row.site == "attn" and row.status == "unsupported: value width 16 != key width 8"
    assert "unsupported: value width 16 != key width 8" in str(e)


def test_explain_counts_graph_breaks():
    class Breaks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = HandBlockish(), HandBlockish()

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    class HandBlockish(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = HandAttention()

        def forward(self, x):
            return x + self.attn(x)

    e = kvfx.explain(Breaks().eval(), torch.randn(1, 4, 32), print_table=False)
    assert [r.site for r in e.rows] == ["a.attn", "b.attn"]
    assert (e.graphs, e.graph_breaks) == (2, 1) and len(e.break_reasons) == 1


# ---------------------------------------------------------------------------------------------- dtypes / devices
@pytest.mark.parametrize("model_dtype,proj_dtype", [(torch.float64, torch.float16), (torch.bfloat16, torch.float64)])
def test_projection_dtype_follows_model(model_dtype, proj_dtype):
    """Projections of another float dtype are cast to the model's dtype (the folds are computed in float64)."""
    m = hand_model(1).to(model_dtype)
    x = model_inputs(m).to(model_dtype)
    p = random_projections(m, rank=4)
    expected = hand_reference(m.double(), x.double(), p).to(model_dtype)
    m.to(model_dtype)
    out = run(kvfx.compress(torch.compile(m, backend="eager"), p.to(dtype=proj_dtype)), x)
    assert out.dtype == model_dtype
    tol = 1e-2 if torch.bfloat16 in (model_dtype, proj_dtype) else 2e-3   # float16 projections: ~1e-3 rounding
    assert rel_err(out.double(), expected.double()) < tol


def test_projections_on_meta_device_refused():
    """Projections on the meta device carry no values: refused with a clear error, model untouched."""
    m = hand_model(1)
    x = model_inputs(m)
    before = snapshot(m, x)
    with pytest.raises(ProjectionError, match="meta device"):
        kvfx.compress(torch.compile(m, backend="eager"), random_projections(m, rank=4).to(device="meta"))
    assert_untouched(m, x, before)

"""Shared K+V latent end to end on a tiny Llama: the compiled rewrite against an independent plain-torch
reference (forward and greedy generation), and the projections file keeping the `shared` flag."""
import pytest
import torch

import kvfx
from helpers import compressed, model_inputs, reference_greedy, reference_model, rel_err, run, tiny_llama
from kvfx.calib.collect import collect_stats, fit
from kvfx.projections import Projections, ProjectionError, SiteProjection


@pytest.fixture(scope="module")
def llama_shared():
    m = tiny_llama(2)
    torch._dynamo.reset()
    stats = collect_stats(m, [model_inputs(m, batch=2, tokens=16, seed=s) for s in range(3)], progress=False)
    return m, fit(stats, "kqsvd", 12, granularity="kv")  # 12 of 2·2·8 = 32 numbers per token (0.375)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_forward_matches_reference(llama_shared, backend):
    m, proj = llama_shared
    x = model_inputs(m, tokens=9)
    ref = run(reference_model(m, proj), x, use_cache=False)
    kvfx.counters.clear()
    with compressed(m, proj, backend) as cm:
        out = run(cm, x, use_cache=False)
    assert kvfx.counters["kvfx"]["shared"] == 2 and kvfx.counters["kvfx"]["rewritten"] == 2
    assert rel_err(out, ref) < 1e-5
    assert rel_err(out, run(m, x, use_cache=False)) > 1e-3  # rank 12 of 32 is not the identity


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_matches_reference(llama_shared, cache, recwarn):
    m, proj = llama_shared
    ids = model_inputs(m, tokens=6)
    ref = reference_greedy(m, proj, ids, 8)
    with compressed(m, proj, cache=cache) as cm, torch.no_grad():
        out = cm.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref)
    # compress hands generate its cache under the name this transformers takes (`cache` from 5.24 on)
    assert not [w for w in recwarn if "past_key_values" in str(w.message) and "generate" in str(w.message)]


def test_cache_holds_one_latent(llama_shared):
    m, proj = llama_shared
    cache = kvfx.LowRankCache(proj)
    with torch.no_grad():
        m(model_inputs(m, tokens=10), past_key_values=cache, use_cache=True)
    assert [tuple(layer.keys.shape) for layer in cache.layers] == [(1, 1, 10, 12)] * 2
    assert cache.nbytes() == 2 * 10 * 12 * 4
    full = 2 * 2 * 2 * 8 * 10 * 4  # layers × (k, v) × kv heads × head_dim × tokens × float32
    assert cache.nbytes() / full == pytest.approx(proj.kv_fraction())


def test_save_load_keeps_shared(llama_shared, tmp_path):
    _, proj = llama_shared
    proj.save(tmp_path / "p.safetensors")
    back = Projections.load(tmp_path / "p.safetensors")
    assert all(p.shared for p in back.sites.values()) and back.kv_fraction() == proj.kv_fraction()
    for n, p in proj.sites.items():
        assert all(torch.equal(t, back.sites[n].tensors()[k]) for k, t in p.tensors().items())


def test_malformed_shared_refused(llama_shared):
    _, proj = llama_shared
    name, p = next(iter(proj.sites.items()))
    bad = SiteProjection(p.key_down, p.key_up, p.value_down[..., :8], p.value_up[..., :8], shared=True)
    with pytest.raises(ProjectionError, match="shared K\\+V latent needs"):
        Projections({name: bad}, {name: proj.shapes[name]})


def test_explain_shows_the_shared_rank(llama_shared):
    m, proj = llama_shared
    with compressed(m, proj) as cm:
        rows = kvfx.explain(cm, model_inputs(m, tokens=5), print_table=False).rows
    assert [r.ranks for r in rows] == ["12 shared"] * 2

"""Expand (kvfx/passes/expand.py): with many query rows a joint latent is read expanded to its kv heads.

Tiny Llama: H = 4 query heads, h = 2 kv heads, head_dim 8. A shared 12-wide latent expands above 12 query rows,
a `layer` latent of 12 + 12 too, a per-head latent never. Numerics against the independent plain-torch reference.
"""
import pytest
import torch

import kvfx
from helpers import compressed, model_inputs, reference_greedy, reference_model, rel_err, run, tiny_llama
from kvfx.calib.collect import collect_stats, fit
from kvfx.passes import expand
from kvfx.passes.expand import min_query_rows


@pytest.fixture(scope="module")
def llama_stats():
    m = tiny_llama(2)
    torch._dynamo.reset()
    return m, collect_stats(m, [model_inputs(m, batch=2, tokens=16, seed=s) for s in range(3)], progress=False)


def test_threshold():
    assert min_query_rows(4, 2, 8, 12, 12) == 12              # 2·8·24 / (4·(24 − 16))
    assert 25 < min_query_rows(9, 3, 64, 360, 360) < 26       # SmolLM2's shared 360-wide latent
    assert min_query_rows(4, 2, 8, 8, 8) == float("inf")      # R_k + R_v = 2d: rank space is never dearer
    assert min_query_rows(9, 3, 64, 32, 32) == float("inf")   # narrow latents never expand


def _rank_space(m, proj, x, monkeypatch):
    """The same compressed forward with expansion switched off (the rank-space form, tested elsewhere)."""
    with monkeypatch.context() as mp:
        mp.setattr(expand, "worth_expanding", lambda *a: False)
        with compressed(m, proj) as cm:
            return run(cm, x, use_cache=False)


@pytest.mark.parametrize("granularity,rank", [("kv", 12), ("layer", 12)])
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_prefill_expands_and_matches_reference(llama_stats, granularity, rank, backend, monkeypatch):
    m, stats = llama_stats
    proj = fit(stats, "kqsvd", rank, granularity=granularity)
    for tokens, expanded in ((13, 2), (12, 0)):  # above the threshold: both layers expand; at it: rank space
        x = model_inputs(m, tokens=tokens)
        kvfx.counters.clear()
        with compressed(m, proj, backend) as cm:
            out = run(cm, x, use_cache=False)
        assert kvfx.counters["kvfx"]["expanded"] == expanded and kvfx.counters["kvfx"]["rewritten"] == 2
        # the plain-torch reference has per-head and shared latents; a `layer` latent is checked against rank space
        ref = run(reference_model(m, proj), x, use_cache=False) if granularity == "kv" else _rank_space(
            m, proj, x, monkeypatch)
        assert rel_err(out, ref) < 1e-5
        assert rel_err(out, run(m, x, use_cache=False)) > 1e-3  # rank 12 of 32 is not the identity


def test_per_head_never_expands(llama_stats):
    m, stats = llama_stats
    kvfx.counters.clear()
    with compressed(m, fit(stats, "kqsvd", 4)) as cm:
        run(cm, model_inputs(m, tokens=24), use_cache=False)
    assert kvfx.counters["kvfx"]["expanded"] == 0 and kvfx.counters["kvfx"]["rewritten"] == 2


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_prefill_expanded_decode_in_rank_space(llama_stats, cache):
    """A long prompt prefills through kvfx's cache expanded; the decode steps read the same latents in rank space."""
    m, stats = llama_stats
    proj = fit(stats, "kqsvd", 12, granularity="kv")
    ids = model_inputs(m, tokens=20)
    kvfx.counters.clear()
    with compressed(m, proj, cache=cache) as cm, torch.no_grad():
        out = cm.generate(ids, max_new_tokens=6, do_sample=False)
    assert kvfx.counters["kvfx"]["expanded"] == 2 and kvfx.counters["kvfx"]["reassociated"] >= 4
    assert torch.equal(out, reference_greedy(m, proj, ids, 6))


def test_symbolic_query_length_guards_each_side(llama_stats):
    """Compiled with dynamic shapes the choice is a guard on the query length: one graph per side of it."""
    m, stats = llama_stats
    proj = fit(stats, "kqsvd", 12, granularity="kv")
    ref = reference_model(m, proj)
    kvfx.counters.clear()
    cm = kvfx.compress(torch.compile(m, backend="eager", dynamic=True), proj)
    try:
        for tokens in (20, 30, 5, 7, 25):
            x = model_inputs(m, tokens=tokens)
            assert rel_err(run(cm, x, use_cache=False), run(ref, x, use_cache=False)) < 1e-5
    finally:
        kvfx.decompress(cm)
        torch._dynamo.reset()
    assert kvfx.counters["kvfx"]["graphs"] == 2   # long (expanded) and short (rank space): no more
    assert kvfx.counters["kvfx"]["expanded"] == 2  # the two layers of the long graph

"""kvfx.LowRankCache and generation through a compressed model.

Greedy decoding is compared with helpers.reference_greedy, which re-runs the whole sequence with the low-rank
math every step and no cache at all, so it shares no code with the cache or the graph pass.
"""
import pytest
import torch
from transformers import DynamicCache, StaticCache

import kvfx
from helpers import model_inputs, random_projections, reference_greedy, tiny_gpt2, tiny_llama
from kvfx import quant
from kvfx.cache import LowRankDynamicLayer, LowRankStaticLayer, cache_nbytes

NEW = 8


def greedy(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, **kw)  # no early stop


@pytest.fixture(scope="module")
def llama():
    m = tiny_llama(2)
    P = random_projections(m, rank=4, seed=11)
    ids = model_inputs(m, batch=2, tokens=5)
    return m, P, ids, reference_greedy(m, P, ids, NEW)


def test_reference_differs_from_full_rank(llama):
    m, _, ids, ref = llama
    assert not torch.equal(greedy(m, ids), ref), "pick projections whose tokens differ from the full model"


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_compressed_generate_matches_reference(llama, kind):
    m, P, ids, ref = llama
    cm = kvfx.compress(torch.compile(m, backend="eager"), P, cache=kind)
    out = greedy(cm, ids)
    assert torch.equal(out, ref), (out.tolist(), ref.tolist())
    c = kvfx.counters["kvfx"]
    # generate ran the compiled forward: prefill + decode graphs, decode reading the rank-R cache, and
    # recompiles stay bounded over 8 decode steps (dynamic: static prefill, static decode, symbolic decode)
    assert 2 <= c["graphs"] <= (3 if kind == "dynamic" else 2)
    assert c["reassociated"] >= 2
    assert not torch._dynamo.utils.counters["graph_break"]
    kvfx.decompress(cm)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_eager_lowrank_cache_matches_reference(llama, kind):
    """The cache alone (uncompiled model, reconstruction really computed) is the same low-rank attention."""
    m, P, ids, ref = llama
    cache = kvfx.LowRankCache(P, kind, max_cache_len=ids.shape[1] + NEW)
    assert torch.equal(greedy(m, ids, past_key_values=cache), ref)


def test_gpt2_generate_matches_reference():
    m = tiny_gpt2(1)
    P = random_projections(m, rank=3, kind="oblique", seed=12)
    ids = model_inputs(m, tokens=4)
    ref = reference_greedy(m, P, ids, NEW)
    cm = kvfx.compress(torch.compile(m, backend="eager"), P)
    assert torch.equal(greedy(cm, ids), ref)
    c = kvfx.counters["kvfx"]
    assert c["folded_k"] == c["folded_v"] == c["graphs"] >= 2  # no RoPE: k, v fold into every cache write


# ---------------------------------------------------------------------------------------------- sizes
def _prefill(m, ids, cache):
    with torch.no_grad():
        m(ids, past_key_values=cache)
    return cache


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_dynamic_nbytes_half(make_model):
    m = make_model(2)
    ids = model_inputs(m, batch=2, tokens=7)
    d = m.config.head_dim if hasattr(m.config, "head_dim") and m.config.head_dim else 8
    P = random_projections(m, rank=d // 2)
    low = _prefill(m, ids, kvfx.LowRankCache(P))
    full = _prefill(m, ids, DynamicCache(config=m.config))
    assert low.nbytes() * 2 == cache_nbytes(full) > 0
    for layer in low.layers:
        assert isinstance(layer, LowRankDynamicLayer)
        kv = m.config.num_key_value_heads if hasattr(m.config, "num_key_value_heads") else m.config.n_head
        assert layer.keys.shape == layer.values.shape == (2, kv, 7, d // 2)
    assert low.get_seq_length() == 7


def test_static_nbytes_half():
    m = tiny_llama(2)
    ids = model_inputs(m, tokens=5)
    P = random_projections(m, rank=4)
    low = _prefill(m, ids, kvfx.LowRankCache(P, "static", max_cache_len=12))
    full = _prefill(m, ids, StaticCache(config=m.config, max_cache_len=12))
    assert low.nbytes() * 2 == cache_nbytes(full) > 0
    assert all(isinstance(layer, LowRankStaticLayer) and layer.keys.shape == (1, 2, 12, 4) for layer in low.layers)


def test_compressed_model_writes_rank_r():
    """Through the compiled graph (reassociated, v folded into the cache write) the cache still holds rank R."""
    m = tiny_llama(1)
    P = random_projections(m, rank=2)
    cm = kvfx.compress(torch.compile(m, backend="eager"), P)
    ids = model_inputs(m, tokens=5)
    cache = kvfx.make_cache(cm)
    with torch.no_grad():
        cm(ids, past_key_values=cache)
        cm(ids[:, :1], past_key_values=cache)
    assert [tuple(layer.keys.shape) for layer in cache.layers] == [(1, 2, 6, 2)]
    assert cache.nbytes() == 2 * (1 * 2 * 6 * 2) * 4  # (k, v) × elements × float32
    assert kvfx.counters["kvfx"]["reassociated"] == kvfx.counters["kvfx"]["graphs"] == 2  # prefill and decode
    assert not torch._dynamo.utils.counters["graph_break"]


def test_nbytes_empty_and_ranks_per_kind():
    m = tiny_llama(2)
    P = random_projections(m, rank=4)
    P.sites["model.layers.1.self_attn"] = random_projections(m, rank=2).sites["model.layers.1.self_attn"]
    cache = kvfx.LowRankCache(P)
    assert cache.nbytes() == 0
    _prefill(m, model_inputs(m, tokens=3), cache)
    assert cache.nbytes() == 2 * (1 * 2 * 3 * 4) * 4 + 2 * (1 * 2 * 3 * 2) * 4


# ---------------------------------------------------------------------------------------------- construction
def test_cache_arguments():
    P = random_projections(tiny_llama(1), rank=4)
    with pytest.raises(ValueError, match="'dynamic' or 'static'"):
        kvfx.LowRankCache(P, "paged")
    with pytest.raises(ValueError, match="needs max_cache_len"):
        kvfx.LowRankCache(P, "static")
    c = kvfx.LowRankCache(P, dtype=torch.float64)
    layer = c.layers[0]
    assert layer.kvfx_key_down.dtype == torch.float64
    assert layer.kvfx_key_up.shape == (2, 4, 8)  # Bᵀ, what reconstruction multiplies by
    site = P.sites["model.layers.0.self_attn"]
    assert torch.equal(layer.kvfx_value_up, site.value_up.transpose(1, 2).double())


def test_make_cache():
    m = tiny_llama(1)
    P = random_projections(m, rank=4)
    with pytest.raises(kvfx.ProjectionError, match="needs a model returned by kvfx.compress"):
        kvfx.make_cache(m)
    cm = kvfx.compress(torch.compile(m, backend="eager"), P, cache="static")
    c = kvfx.make_cache(cm, max_cache_len=9)
    assert c.kind == "static" and c.layers[0].max_cache_len == 9
    assert kvfx.make_cache(cm, "dynamic").kind == "dynamic"
    kvfx.decompress(cm)


@pytest.mark.parametrize("kwargs", [dict(max_length=9), dict(max_new_tokens=2, max_length=5, inputs=None)])
def test_static_generate_sizes_cache(kwargs):
    """compress(cache="static")'s generate sizes the preallocated cache from max_new_tokens or max_length
    (max_new_tokens wins, as in transformers); a too-small cache would fail with an index error."""
    m = tiny_llama(1)
    P = random_projections(m, rank=4)
    ids = model_inputs(m, tokens=5)
    with torch.no_grad():  # reference first: compress changes m itself
        by_name = kwargs.pop("inputs", 0) is None  # pass the prompt as generate(inputs=...)
        ref = m.generate(ids, do_sample=False, eos_token_id=None,
                         past_key_values=kvfx.LowRankCache(P, "static", max_cache_len=32), **kwargs)
        cm = kvfx.compress(torch.compile(m, backend="eager"), P, cache="static")
        out = (cm.generate(inputs=ids, do_sample=False, eos_token_id=None, **kwargs) if by_name else
               cm.generate(ids, do_sample=False, eos_token_id=None, **kwargs))
    assert torch.equal(out, ref)
    expected = 5 + kwargs["max_new_tokens"] if "max_new_tokens" in kwargs else kwargs["max_length"]
    assert out.shape[1] == expected


# ---------------------------------------------------------------------------------------------- exact rows
EXACT = "int4|sinks2|recent3"


def _layer_updates(layer, chunks, seed=0):
    """Feed `chunks` (token counts) of random keys / values [1, 2, n, 8] to a cache layer; all its inputs."""
    gen = torch.Generator().manual_seed(seed)
    ks, vs = [], []
    for n in chunks:
        k, v = torch.randn(1, 2, n, 8, generator=gen), torch.randn(1, 2, n, 8, generator=gen)
        keys, _ = layer.update(k, v)
        ks.append(k), vs.append(v)
    return torch.cat(ks, 2), torch.cat(vs, 2), keys


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_exact_rows_hold_the_sinks_and_the_last_tokens(kind):
    """'int4|sinks2|recent3': after 6 + 1 + 4 + 1 tokens the layer holds, in float16, the latents of tokens 0, 1
    (sinks) and 9, 10, 11 (the last three), and a read returns those rows exact and every other row rounded."""
    P = random_projections(tiny_llama(1), rank=4)
    site = P.sites["model.layers.0.self_attn"]
    layer = (LowRankDynamicLayer(site, quantize=EXACT) if kind == "dynamic"
             else LowRankStaticLayer(site, 16, quantize=EXACT))
    k, _, keys = _layer_updates(layer, [6, 1, 4, 1])
    pos = layer.kvfx_exact_positions
    assert sorted(pos[pos >= 0].tolist()) == [0, 1, 9, 10, 11] and pos.shape == (2 + 3 + 1,)
    latent = k @ site.key_down  # [1, 2, 12, 4]
    for slot, p in enumerate(pos.tolist()):
        if p >= 0:
            assert torch.equal(layer.kvfx_exact_keys[:, :, slot], latent[:, :, p].half())
    assert layer.kvfx_exact_keys.dtype == torch.float16
    up = site.key_up.transpose(1, 2)
    exact = latent.half().float() @ up
    rounded = quant.fake_quant(latent, "int4") @ up
    for p in range(12):
        want = exact if p in (0, 1, 9, 10, 11) else rounded
        torch.testing.assert_close(keys[:, :, p], want[:, :, p], rtol=1e-5, atol=1e-5)


def test_exact_rows_follow_crop_and_beam_reordering():
    P = random_projections(tiny_llama(1), rank=4)
    layer = LowRankDynamicLayer(P.sites["model.layers.0.self_attn"], quantize=EXACT)
    _layer_updates(layer, [8])
    layer.crop(-2)  # 6 tokens left: the exact rows of 6 and 7 are no longer cached tokens
    pos = layer.kvfx_exact_positions
    assert sorted(pos[pos >= 0].tolist()) == [0, 1, 5]
    two = LowRankDynamicLayer(P.sites["model.layers.0.self_attn"], quantize=EXACT)
    k = torch.randn(2, 2, 5, 8)
    two.update(k, torch.randn(2, 2, 5, 8))
    before = two.kvfx_exact_keys.clone()
    two.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(two.kvfx_exact_keys, before.flip(0))


def test_exact_rows_are_counted_and_need_codes():
    m = tiny_llama(2)
    P = random_projections(m, rank=4)
    cache = _prefill(m, model_inputs(m, tokens=7), kvfx.LowRankCache(P, quantize=EXACT))
    codes = 2 * 2 * (1 * 2 * 7 * quant.row_bytes("int4", 4))  # layers × (k, v) × rows
    exact = 2 * 2 * (1 * 2) * quant.exact_bytes(EXACT, 4)    # layers × (k, v) × heads × a head's exact rows
    assert cache.nbytes() == codes + exact and quant.exact_bytes(EXACT, 4) == 2 * 4 * 6
    with pytest.raises(ValueError, match=r"optionally with exact rows .*got '\|sinks2'"):  # exact rows need codes
        LowRankDynamicLayer(P.sites["model.layers.0.self_attn"], quantize="|sinks2")
    with pytest.raises(ValueError, match=r"'\|sinksS' and '\|recentW'.*got 'sink2'"):
        kvfx.LowRankCache(P, quantize="int4|sink2")


@pytest.mark.parametrize("form,backend", [("shared", "inductor"), ("head", "eager"), ("head", "inductor")])
def test_exact_rows_token_by_token_equal_the_exact_window_forward(form, backend):
    """Two implementations of one semantics: tokens fed one at a time through kvfx's cache (each step reads the
    sinks and the last W tokens exact) give the logits of one full forward through the exact-window rewrite
    (passes/exact_window.py), which picks each (query, key) pair's exact or rounded latent by their distance."""
    m = tiny_llama(2, head_dim=16)
    P = random_projections(m, rank=5, seed=4) if form == "head" else _shared_projections(m)
    ids = model_inputs(m, batch=2, tokens=12)
    cache = kvfx.LowRankCache(P, quantize="int2|sinks2|recent3")
    plain = kvfx.LowRankCache(P, quantize="int2")
    with torch.no_grad():
        steps = torch.cat([m(ids[:, i:i + 1], past_key_values=cache).logits for i in range(12)], 1)
        rounded = torch.cat([m(ids[:, i:i + 1], past_key_values=plain).logits for i in range(12)], 1)
        cm = kvfx.compress(torch.compile(m, backend=backend), P, quantize="int2|sinks2|recent3")
        full = cm(ids, use_cache=False).logits
        kvfx.decompress(cm)
    assert kvfx.counters["kvfx"]["exact_window"] == 2
    torch.testing.assert_close(full, steps, rtol=1e-5, atol=1e-5)
    assert (steps - rounded).abs().max() > 1e-2  # the exact rows change the numbers


def _shared_projections(m):
    from kvfx.calib.collect import collect_stats, fit
    stats = collect_stats(m, [model_inputs(m, batch=2, tokens=16, seed=s) for s in range(2)], progress=False)
    return fit(stats, "kqsvd", 40, granularity="kv")


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_exact_rows_generate_through_the_kernel(kind):
    """Compiled (Inductor) generate with exact rows: the decode kernel reads the codes and the exact rows, with the
    tokens and logits of the uncompressed model run eagerly with kvfx's cache."""
    m = tiny_llama(2, head_dim=16)
    P = _shared_projections(m)
    ids = model_inputs(m, batch=2, tokens=6)
    gen = dict(do_sample=False, eos_token_id=None, max_new_tokens=10, output_logits=True,
               return_dict_in_generate=True)
    with torch.no_grad():
        ref = m.generate(ids, **gen, past_key_values=kvfx.LowRankCache(P, kind, max_cache_len=16, quantize=EXACT))
        cm = kvfx.compress(torch.compile(m), P, cache=kind, quantize=EXACT)
        out = cm.generate(ids, **gen)
        decode = cm._kvfx.backend.graphs[-1].graph
        kvfx.decompress(cm)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-4, atol=1e-4)
    calls = [n for n in decode.nodes if n.target is torch.ops.kvfx.decode_attention.default]
    assert len(calls) == 2 and all(len(n.args) == 12 for n in calls)  # codes + exact rows + their positions
    # rows rounded around the calibration mean: the kernel's output gets the offset back, once
    assert all([u.target for u in n.users] == [torch.add] for n in calls)
    assert not any(n.target is torch.ops.kvfx.dequantize.default for n in decode.nodes)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_low_bit_cache_rounds_around_the_calibration_mean(kind):
    """Projections with means: the cache stores round(c - offset) and reads it back + offset (codes and exact
    rows alike), so keys/values far from zero round finer than uncentred, and nothing else changes."""
    m = tiny_llama(2, head_dim=16)
    P = _shared_projections(m)
    p = P.sites[next(iter(P.sites))]
    off, _ = p.latent_offsets()
    assert off is not None and off.abs().max() > 0
    g = torch.Generator().manual_seed(0)
    # the calibration mean plus noise of about its size (this tiny model's means are ~0.01 a number)
    k = 0.01 * torch.randn(1, 2, 7, 16, generator=g) + p.key_mean[None, :, None]
    v = 0.01 * torch.randn(1, 2, 7, 16, generator=g) + p.value_mean[None, :, None]
    c = k.transpose(1, 2).flatten(2) @ p.key_down[0] + v.transpose(1, 2).flatten(2) @ p.value_down[0]
    up = p.key_up.transpose(1, 2)
    errors = {}
    for label, proj in (("centred", P), ("plain", P.uncentred())):
        cache = kvfx.LowRankCache(proj, kind, max_cache_len=8, quantize="int2|sinks2")
        keys, _ = cache.layers[0].update(k, v, {"cache_position": torch.arange(7)})
        keys = keys[:, :, :7]  # the static layer reads its whole length
        offset = off if label == "centred" else 0
        held = c.unsqueeze(1) - offset
        want = quant.fake_quant(held, "int2")
        want[:, :, :2] = held[:, :, :2].half().float()  # the two sinks: 16 bits
        torch.testing.assert_close(keys, (want + offset) @ up, rtol=1e-5, atol=1e-5)
        errors[label] = float(((keys - c.unsqueeze(1) @ up) ** 2).mean())
    assert errors["centred"] < 0.8 * errors["plain"]

"""Pass 4 — decode: a one-token step attends over each cached latent head once (query heads of a group folded
into the query axis), and kvfx's dynamic cache writes decode rows in place.

Numerics: greedy tokens and logits against the cacheless low-rank reference (helpers.reference_greedy /
archs.reference_model share no code with the cache or the passes); graphs: the decode graph's SDPA reads the
cached latent [b, h, N, R] directly, never an expanded copy; counters: `decode_grouped` counts the rewrites.
"""
import copy

import pytest
import torch

import kvfx
from helpers import (VOCAB, decode_steps_without_recompiles, model_inputs, random_projections,
                     reference_greedy, tiny_llama)
from kvfx.compress import cache_kwarg
from kvfx.passes import graph_utils as gu

pytestmark = pytest.mark.usefixtures("one_thread")
NEW = 6
GEN = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


@pytest.fixture(scope="module")
def llama():
    m = tiny_llama(2, heads=4, kv_heads=2)
    ids = model_inputs(m, batch=2, tokens=5)
    return m, ids


def _calibrated(m, granularity):
    batches = [torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    return kvfx.calibrate(m, batches, method="kqsvd", rank=0.5, granularity=granularity, progress=False)


def _decode_sdpa_inputs(model):
    """(query, key) shapes of every SDPA call of the last (decode) graph, from the nodes feeding it."""
    g = model._kvfx.backend.graphs[-1]
    return [gu.sdpa_args(n) for n in g.graph.nodes if gu.is_sdpa(n)]


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("granularity", ["head", "layer", "kv"])
def test_decode_reads_each_latent_head_once(llama, kind, granularity):
    m, ids = llama
    P = _calibrated(m, granularity)
    # reference: the uncompressed model, eager, with kvfx's cache (its reconstruction really computed: no pass)
    with torch.no_grad():
        ref = m.generate(ids, max_new_tokens=NEW, **GEN, **{cache_kwarg(m): kvfx.LowRankCache(
            P, kind, max_cache_len=ids.shape[1] + NEW)})
    cm = kvfx.compress(torch.compile(copy.deepcopy(m), backend="eager"), P, cache=kind)
    with torch.no_grad():
        out = cm.generate(ids, max_new_tokens=NEW, **GEN)
    assert torch.equal(out, ref), (out.tolist(), ref.tolist())
    c = kvfx.counters["kvfx"]
    assert c["decode_grouped"] == 2 * (c["graphs"] - 1)  # every site of every decode graph; prefill untouched
    # 2 query rows per per-head latent stay with SDPA; the 4 of a layer / kv latent go to the CPU kernel
    kernel = granularity != "head"
    assert c["float_decode"] == (c["decode_grouped"] if kernel else 0)
    # q·B (RoPE blocks its fold) reads B once per kv head; the kv latent is 16 wide (> head_dim 8), so W_O' = Dᵀ·W_O
    # would be twice W_O: o·Dᵀ stays unfolded and is grouped too
    wide = granularity == "kv"
    assert c["decode_grouped_proj"] == c["decode_grouped"] * (2 if wide else 1)
    assert (c["folded_o"] == 0) == wide
    nodes = cm._kvfx.backend.graphs[-1].graph.nodes
    calls = [dict(zip(("query", "key", "value"), n.args)) for n in nodes
             if n.target is torch.ops.kvfx.decode_attention.default]
    assert len(calls) == (2 if kernel else 0) and len(_decode_sdpa_inputs(cm)) == (0 if kernel else 2)
    for args in _decode_sdpa_inputs(cm) + calls:
        assert not args.get("enable_gqa")
        assert gu.is_method(args["query"], "reshape")  # [b, H, 1, R] -> [b, h, g, R]
        assert not gu.is_method(args["key"], "reshape", "expand")  # the cache's tensor itself, not repeat_kv's copy
    assert not any(gu.is_method(n, "expand") for n in nodes)


def test_prefill_and_causal_calls_are_not_grouped(llama):
    m, ids = llama
    P = random_projections(m, rank=4, seed=3)
    cm = kvfx.compress(torch.compile(copy.deepcopy(m), backend="eager"), P)
    with torch.no_grad():
        cm(ids)  # prefill only (no cache write of one token)
    assert kvfx.counters["kvfx"]["decode_grouped"] == 0


def test_left_padded_decode_mask_broadcasts_over_grouped_rows(llama):
    """A padding mask [b, 1, 1, N] must hide the same keys from all g query rows of a group: each row of a
    left-padded batch generates what it generates alone."""
    m, _ = llama
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    P = _calibrated(m, "kv")
    for kind in ("dynamic", "static"):
        cm = kvfx.compress(torch.compile(copy.deepcopy(m), backend="eager"), P, cache=kind)
        with torch.no_grad():
            out = cm.generate(ids, attention_mask=mask, max_new_tokens=NEW, **GEN)
            assert kvfx.counters["kvfx"]["decode_grouped"] > 0
            for row, start in ((0, 3), (1, 0)):
                alone = cm.generate(ids[row:row + 1, start:], max_new_tokens=NEW, **GEN)
                assert torch.equal(out[row, 7:], alone[0, 7 - start:]), (kind, row)
        kvfx.decompress(cm)


def test_dynamic_cache_writes_decode_rows_in_place(llama):
    """A cache with room reserved (generate reserves prompt + new tokens) never moves its storage: no torch.cat
    copy of the whole cache per step."""
    m, ids = llama
    P = random_projections(m, rank=4, seed=3)
    cm = kvfx.compress(torch.compile(copy.deepcopy(m), backend="eager"), P)
    cache = kvfx.make_cache(cm, max_cache_len=ids.shape[1] + NEW)
    kw = {cache_kwarg(cm): cache, "use_cache": True}
    seq = ids
    with torch.no_grad():
        logits = cm(ids, **kw).logits
        ptrs = [layer._slots["keys"].storage.data_ptr() for layer in cache.layers]
        for _ in range(NEW):
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
            logits = cm(seq[:, -1:], **kw).logits
            assert [layer._slots["keys"].storage.data_ptr() for layer in cache.layers] == ptrs
    assert cache.get_seq_length() == ids.shape[1] + NEW
    assert torch.equal(seq, reference_greedy(m, P, ids, NEW))


def test_dynamic_cache_grows_past_its_reserve(llama):
    """Past its reservation (or without one) the storage grows geometrically and keeps what it held."""
    m, ids = llama
    P = random_projections(m, rank=4, seed=3)
    cm = kvfx.compress(torch.compile(copy.deepcopy(m), backend="eager"), P)
    for reserve in (None, 2):
        cache = kvfx.make_cache(cm, max_cache_len=reserve)
        with torch.no_grad():
            out = cm.generate(ids, max_new_tokens=NEW, **GEN, **{cache_kwarg(cm): cache})
        assert torch.equal(out, reference_greedy(m, P, ids, NEW))
        layer = cache.layers[0]
        assert layer.keys.shape[2] == out.shape[1] - 1 < layer._slots["keys"].storage.shape[2]
    # past the reservation within one run: a cache with room for 6 tokens fed 5 + 300
    cache = kvfx.make_cache(cm, max_cache_len=6)
    with torch.no_grad():
        logits = cm(ids, **{cache_kwarg(cm): cache}).logits
        for _ in range(300):
            logits = cm(logits[:, -1:].argmax(-1), **{cache_kwarg(cm): cache}).logits
    assert cache.get_seq_length() == ids.shape[1] + 300 < cache.layers[0]._slots["keys"].storage.shape[2]


@pytest.mark.parametrize("kind,quantize", [("static", None), ("dynamic", None), ("static", "int4|sinks2|recent5"),
                                           ("dynamic", "int4|sinks2|recent5")])
def test_256_decode_steps_compile_nothing_after_warm_up(llama, kind, quantize):
    """The issue's recompile target: after warm-up (prefill + a few steps), 256 decode steps under
    fail_on_recompile, for the static cache (the CUDA-graph path) and the dynamic one; with exact rows too (their
    ring's position is a tensor: it moves without a guard)."""
    m, _ = llama
    P = random_projections(m, rank=4, seed=3)
    cm = kvfx.compress(torch.compile(copy.deepcopy(m), backend="eager"), P, cache=kind, quantize=quantize)
    ids = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))
    cache = kvfx.make_cache(cm, max_cache_len=4 + 4 + 256)
    kw = {cache_kwarg(cm): cache, "use_cache": True}
    with torch.no_grad():
        logits = decode_steps_without_recompiles(cm, cm(ids, **kw).logits, kw, 0)  # warm-up: may compile
        graphs = kvfx.counters["kvfx"]["graphs"]
        decode_steps_without_recompiles(cm, logits, kw, 256, warmup=0)
    assert kvfx.counters["kvfx"]["graphs"] == graphs
    assert cache.get_seq_length() == 4 + 4 + 256

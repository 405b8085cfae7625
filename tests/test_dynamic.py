"""Dynamic use of a compressed model's generate, with the dynamic and the static low-rank cache (tiny Llama:
RoPE, GQA 4/2): left-padded batches with an attention mask, prompts of different lengths across calls, beam
search (the cache is reordered between steps), generation far past the calibration length, and bounded,
counted recompiles.

Three references, none of which goes through kvfx's graph pass:
* eager generate of the UNcompressed model with `kvfx.LowRankCache(P)` (the cache's reconstruction is computed);
* a cacheless low-rank reference (tests/coverage/archs.reference_model: transformers' own SDPA attention and
  masks on q·B, k·A, v·C, then ·Dᵀ, re-run over the whole sequence at every step, `use_cache=False`);
* at full rank (identity projections), plain `model.generate` with transformers' own cache.
"""

import pytest
import torch

import archs  # noqa: E402
import kvfx  # noqa: E402
from helpers import VOCAB, identity_projections, random_projections, tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


GEN = dict(do_sample=False, eos_token_id=None, pad_token_id=0)  # no early stop: every call runs to the end
KINDS = ["dynamic", "static"]


@pytest.fixture(scope="module")
def llama():
    """(model, rank-4 projections, cacheless low-rank reference model)."""
    m = tiny_llama(2)
    P = random_projections(m, rank=4, seed=11)
    return m, P, archs.reference_model(m, P)


def prompt(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of the given lengths, left-padded with pad id 0 to the longest: (input_ids, attention_mask)."""
    n = max(lengths)
    ids, mask = torch.zeros(len(lengths), n, dtype=torch.long), torch.zeros(len(lengths), n, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, n - length:] = prompt(length, seed=seed + i)[0]
        mask[i, n - length:] = 1
    return ids, mask


def generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, **(GEN | kw))


def eager_lowrank(m, P, ids, kind, new, **kw):
    """Eager generate of the uncompressed model with a low-rank cache of the same kind."""
    cache = kvfx.LowRankCache(P, kind, max_cache_len=ids.shape[1] + new)
    return generate(m, ids, past_key_values=cache, max_new_tokens=new, **kw)


def rel_err(a, b) -> float:
    return archs.rel_err(a, b)


# ---------------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch(llama, kind):
    m, P, ref = llama
    ids, mask = left_padded([4, 7, 2])
    new = 8
    cm = archs.compressed_copy(m, P, cache=kind)
    got = generate(cm, ids, attention_mask=mask, max_new_tokens=new, output_logits=True, return_dict_in_generate=True)
    expected = eager_lowrank(m, P, ids, kind, new, attention_mask=mask, output_logits=True,
                             return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.equal(got.sequences, generate(ref, ids, attention_mask=mask, max_new_tokens=new, use_cache=False))
    for a, b in zip(got.logits, expected.logits):
        assert rel_err(a, b) <= 1e-4
    assert not torch._dynamo.utils.counters["graph_break"]
    assert kvfx.counters["kvfx"]["reassociated"] == kvfx.counters["kvfx"]["rewritten"] > 0  # the cache path


@pytest.mark.parametrize("kind", KINDS)
def test_identity_projections_equal_plain_generate(llama, kind):
    """Full rank: a left-padded batch with beam search gives exactly what transformers' own generate (its own
    DynamicCache / StaticCache) gives: the low-rank cache's padding, masks and beam reordering are right."""
    m, _, _ = llama
    ids, mask = left_padded([5, 3], seed=3)
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=2, num_return_sequences=2, output_scores=True,
              return_dict_in_generate=True)
    expected = generate(m, ids, cache_implementation=kind, **kw)
    got = generate(archs.compressed_copy(m, identity_projections(m), cache=kind), ids, **kw)
    assert torch.equal(got.sequences, expected.sequences)
    assert rel_err(got.sequences_scores, expected.sequences_scores) <= 1e-5
    assert kvfx.counters["kvfx"]["rewritten"] > 0


# ---------------------------------------------------------------------------------------------- beam search
@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_reorders_the_low_rank_cache(llama, kind, monkeypatch):
    m, P, ref = llama
    ids, mask = left_padded([6, 4], seed=5)
    new = 8
    reorders = []
    original = kvfx.LowRankCache.reorder_cache

    def spy(self, beam_idx):
        reorders.append(beam_idx.clone())
        return original(self, beam_idx)

    monkeypatch.setattr(kvfx.LowRankCache, "reorder_cache", spy, raising=False)
    kw = dict(attention_mask=mask, num_beams=2, num_return_sequences=2)
    cm = archs.compressed_copy(m, P, cache=kind)
    got = generate(cm, ids, max_new_tokens=new, output_scores=True, return_dict_in_generate=True, **kw)
    assert reorders and any(not torch.equal(b, torch.arange(len(b))) for b in reorders)  # beams really swapped
    expected = eager_lowrank(m, P, ids, kind, new, output_scores=True, return_dict_in_generate=True, **kw)
    assert got.sequences.shape == (4, ids.shape[1] + new)
    assert torch.equal(got.sequences, expected.sequences)
    assert rel_err(got.sequences_scores, expected.sequences_scores) <= 1e-4
    assert torch.equal(got.sequences, generate(ref, ids, max_new_tokens=new, use_cache=False, **kw))


def test_cache_batch_ops_act_on_rank_r_storage(llama):
    """reorder_cache / batch_repeat_interleave / batch_select_indices (transformers' base-class methods) on the
    low-rank layers permute the stored rank-R tensors along the batch axis, like a full cache's keys/values."""
    m, P, _ = llama
    ids = prompt(5, batch=3, seed=9)
    ops = {"reorder_cache": (torch.tensor([2, 0, 0]), lambda t, i: t[i]),
           "batch_repeat_interleave": (2, lambda t, r: t.repeat_interleave(r, 0)),
           "batch_select_indices": (torch.tensor([5, 0, 3]), lambda t, i: t[i])}
    for kind in KINDS:
        cache = kvfx.LowRankCache(P, kind, max_cache_len=8)
        with torch.no_grad():
            m(ids, past_key_values=cache)
        # transformers' static layers have no batch_repeat_interleave / batch_select_indices (StaticCache neither)
        for op in (ops if kind == "dynamic" else ["reorder_cache"]):
            arg, expect = ops[op]
            before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
            getattr(cache, op)(arg)
            for layer, (k, v) in zip(cache.layers, before):
                assert k.shape[-1] == 4 and torch.equal(layer.keys, expect(k, arg)), (kind, op)
                assert torch.equal(layer.values, expect(v, arg)), (kind, op)
        assert cache.get_seq_length() == 5


# ---------------------------------------------------------------------------------------------- lengths, recompiles
@pytest.mark.parametrize("kind", KINDS)
def test_prompt_lengths_across_calls_and_bounded_recompiles(llama, kind):
    """Three generate calls with other prompt lengths and other numbers of new tokens: each right, and kvfx's
    backend compiles at most 4 graphs (static-shape prefill and decode, then one symbolic version of each) —
    a fourth call with yet other lengths must not recompile at all (Dynamo's fail_on_recompile stance)."""
    m, P, _ = llama
    cm = archs.compressed_copy(m, P, cache=kind)
    graphs = []
    for n, new in ((5, 4), (9, 8), (13, 12)):
        ids = prompt(n, seed=n)
        assert torch.equal(generate(cm, ids, max_new_tokens=new), eager_lowrank(m, P, ids, kind, new)), (n, new)
        graphs.append(kvfx.counters["kvfx"]["graphs"])
    assert graphs[0] >= 2 and graphs[-1] <= 4, graphs  # prefill + decode; then at most one symbolic pair
    assert graphs[-1] == graphs[-2], graphs                 # the third call compiled nothing new
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs[-1]  # Dynamo agrees: no other frames
    ids = prompt(7, seed=7)
    torch.compiler.set_stance("fail_on_recompile")
    try:
        out = generate(cm, ids, max_new_tokens=20)
    finally:
        torch.compiler.set_stance("default")
    assert torch.equal(out, eager_lowrank(m, P, ids, kind, 20))
    assert kvfx.counters["kvfx"]["graphs"] == graphs[-1]
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.fixture(scope="module")
def calibrated(llama):
    """Projections calibrated on 2 x 2 windows of 8 tokens, and the cacheless reference's 6 + 40 tokens."""
    m, _, _ = llama
    P = kvfx.calibrate(m, archs.token_batches(n=2, batch=2, tokens=8), method="kqsvd", rank=4, progress=False)
    ids = prompt(6, seed=21)
    return P, ids, generate(archs.reference_model(m, P), ids, max_new_tokens=LONG, use_cache=False)


LONG = 40


@pytest.mark.parametrize("kind", KINDS)
def test_long_generation_past_calibration_length(llama, calibrated, kind):
    """Calibrated on 8-token windows, generating 6 + 40 tokens: still the low-rank math, the cache at rank R."""
    m, _, _ = llama
    P, ids, expected = calibrated
    assert P.report["tokens"] == 2 * 2 * 8
    cm = archs.compressed_copy(m, P, cache=kind)
    cache = kvfx.make_cache(cm, max_cache_len=ids.shape[1] + LONG)
    got = generate(cm, ids, max_new_tokens=LONG, past_key_values=cache)
    assert got.shape[1] == 6 + LONG and torch.equal(got, expected)
    for layer in cache.layers:
        assert layer.keys.shape[-1] == layer.values.shape[-1] == 4                 # stored at rank R
        assert layer.keys.shape[-2] == 6 + LONG - (kind == "dynamic")              # the last token is never written
    assert cache.get_seq_length() == 6 + LONG - 1

"""Joint latent and budgeted ranks end to end on a tiny Llama: compress → forward / generate (both caches)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvfx
from helpers import reference_greedy
from kvfx.calib.collect import collect_stats, fit


@pytest.fixture(scope="module")
def llama_and_stats():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    m = LlamaForCausalLM(cfg).eval()
    torch._dynamo.reset()
    stats = collect_stats(m, [torch.randint(0, 64, (2, 16)) for _ in range(3)], progress=False)
    return m, stats


@pytest.mark.parametrize("granularity", ["layer", "kv"])
def test_joint_full_rank_reproduces_logits(llama_and_stats, granularity):
    m, stats = llama_and_stats
    ids = torch.randint(0, 64, (1, 7))
    proj = fit(stats, "pca", 1.0, granularity=granularity)
    with torch.no_grad():
        ref = m(ids).logits
        cm = kvfx.compress(torch.compile(m, backend="eager"), proj)
        out = cm(ids).logits
        kvfx.decompress(cm)
    assert ((out - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("rank,granularity", [(0.5, "layer"), (kvfx.Budget(0.5), "head"), (kvfx.Budget(0.5), "layer"),
                                              (0.5, "kv")])
def test_generate_equals_eager_low_rank_cache(llama_and_stats, cache, rank, granularity):
    m, stats = llama_and_stats
    proj = fit(stats, "kqsvd", rank, granularity=granularity)
    ids = torch.randint(0, 64, (1, 6))
    kvfx.counters.clear()
    with torch.no_grad():
        ref_cache = kvfx.LowRankCache(proj)
        ref = m.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=ref_cache)
        cm = kvfx.compress(torch.compile(m, backend="eager"), proj, cache=cache)
        out = cm.generate(ids, max_new_tokens=8, do_sample=False)
        kvfx.decompress(cm)
    assert torch.equal(out, ref)
    if granularity != "layer":  # and the independent cacheless reference (tests/coverage/archs.py, no kvfx code;
        assert torch.equal(out, reference_greedy(m, proj, ids, 8))  # it has per-head and shared latents, not joint)
    assert kvfx.counters["kvfx"]["reassociated"] > 0
    if granularity in ("layer", "kv"):
        assert kvfx.counters["kvfx"]["joint"] > 0
        assert all(layer.keys.shape[1] == 1 for layer in ref_cache.layers)  # one latent "head" per layer
    if granularity == "kv":  # one latent for keys and values: the value slot stays empty
        assert kvfx.counters["kvfx"]["shared"] > 0
        assert all(layer.values.shape[-1] == 0 and layer.keys.shape[-1] == 16 for layer in ref_cache.layers)
    # half the numbers of a full cache: [b, h, n, d] × 2 per layer
    full = sum(2 * 2 * 8 * layer.keys.shape[-2] for layer in ref_cache.layers) * 4
    assert ref_cache.nbytes() == pytest.approx(0.5 * full, rel=1e-9)

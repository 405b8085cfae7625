"""The real default model (SmolLM2-135M-Instruct) end to end: calibrate → save/load → compress → eval → generate.

Small on purpose (2 calibration windows, 1 eval window, the "eager" inner compiler) so CI stays fast;
benchmarks/quality.py runs the full protocol through Inductor.
"""
import pytest
import torch

import kvfx
from kvfx.cache import cache_nbytes
from kvfx.compress import cache_kwarg

from helpers import reference_greedy
from kvfx import data, models
from kvfx.calib.collect import collect_stats, fit


@pytest.fixture(scope="module")
def smollm():
    try:
        model, tok = models.load_default_model(torch.float32)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return model, tok


@pytest.mark.slow
def test_calibrate_compress_eval_generate(smollm, tmp_path):
    model, tok = smollm
    torch._dynamo.reset()
    calib = data.wikitext_calibration_windows(tok, n_windows=2, window=256)
    test = data.wikitext_test_windows(tok, n_windows=1, window=256)
    proj = kvfx.calibrate(model, calib.split(1), method="kqsvd", rank=0.5, progress=False)
    assert len(proj.sites) == 30 and proj.kv_fraction() == pytest.approx(0.5)
    assert all(r["eps"] >= -1e-6 for r in proj.report["sites"].values())  # K-only SVD never beats kqsvd
    path = tmp_path / "smollm2-kqsvd-0.5.safetensors"
    proj.save(path)
    proj = kvfx.Projections.load(path)

    def ppl(m):
        return data.perplexity(lambda ids: m(input_ids=ids, use_cache=False).logits, test, progress=False)

    base = ppl(model)
    kvfx.counters.clear()
    cm = kvfx.compress(torch.compile(model, backend="eager"), proj)
    low = ppl(cm)
    assert kvfx.counters["kvfx"]["rewritten"] == 30 and kvfx.counters["kvfx"]["folded_o"] == 30
    # rank 0.5 loses quality but must stay a language model: 32.4 -> 95.5 (2.95×) on this window, calibrated on 2
    # windows (16 windows of 512 tokens: 36 -> 113, 3.1×); 3.5× leaves room for BLAS round-off, not for a regression
    assert base < low < 3.5 * base, (base, low)

    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    ref_cache = kvfx.LowRankCache(proj)
    with torch.no_grad():
        out = cm.generate(prompt, max_new_tokens=8, do_sample=False)
        kvfx.decompress(cm)
        ref = model.generate(prompt, max_new_tokens=8, do_sample=False, past_key_values=ref_cache)
        full = model.generate(prompt, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out, ref)  # compiled, rewritten generate == eager low-rank-cache generate
    assert torch.equal(out, reference_greedy(model, proj, prompt, 8))  # == the cacheless reference (no kvfx code)
    assert ref_cache.nbytes() * 2 == cache_nbytes(full.past_key_values)


def _ppl(model, proj, test, quantize):
    """Perplexity of the compiled, rewritten model (no cache: the pass projects and rounds keys and values)."""
    cm = kvfx.compress(torch.compile(model, backend="eager"), proj, quantize=quantize)
    try:
        return data.perplexity(lambda ids: cm(input_ids=ids, use_cache=False).logits, test, progress=False)
    finally:
        kvfx.decompress(cm)
        torch._dynamo.reset()


def _cache_ppl(model, proj, test, quantize):
    """The same perplexity in eager mode through kvfx's cache (it stores and rounds the latents the pass would)."""
    return data.perplexity(lambda ids: model(input_ids=ids, past_key_values=kvfx.LowRankCache(proj, quantize=quantize))
                           .logits, test, progress=False)


@pytest.fixture(scope="module")
def shared_stats(smollm):
    """Calibration statistics of 2 windows, collected once for both shared-latent tests."""
    _, tok = smollm
    calib = data.wikitext_calibration_windows(tok, n_windows=2, window=256)
    return collect_stats(smollm[0], calib.split(1), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind,rank,row", [("int8", 192, 193), ("int4", 360, 180 + 12)])
def test_low_bit_shared_latent(smollm, shared_stats, kind, rank, row):
    """One shared K+V latent per layer stored in low bits at 25 % of a 16-bit cache's bytes (int8: 192 of the
    384 K+V features; int4: 360): rounding costs little perplexity — for int4 once the latent is rotated — and
    generate's cache really holds int8 rows of `row` bytes."""
    model, tok = smollm
    torch._dynamo.reset()
    test = data.wikitext_test_windows(tok, n_windows=1, window=256)
    proj = fit(shared_stats, "kqsvd", rank, granularity="kv")
    assert proj.kv_fraction(kind) == pytest.approx(row / 768)

    kvfx.counters.clear()
    plain, rounded = _cache_ppl(model, proj, test, None), _ppl(model, proj, test, kind)
    assert kvfx.counters["kvfx"]["quantized"] == 30 and kvfx.counters["kvfx"]["shared"] == 30
    assert rounded == pytest.approx(_cache_ppl(model, proj, test, kind), rel=1e-4)  # the pass rounds as the cache
    assert plain != rounded
    if kind == "int8":
        assert abs(rounded / plain - 1) < 0.03, (plain, rounded)
    else:  # int4 rounds a PCA-ordered latent coarsely; rotated, much less (4×512 tokens: 37.84 vs 31.43, plain 30.32)
        proj = kvfx.rotate_latents(proj)
        rotated = _cache_ppl(model, proj, test, kind)
        assert rotated < rounded and abs(rotated / plain - 1) < 0.08, (plain, rounded, rotated)

    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    cache = kvfx.LowRankCache(proj, quantize=kind)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=8, do_sample=False, **{cache_kwarg(model): cache})
        full = model.generate(prompt, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert {layer.keys.dtype for layer in cache.layers} == {torch.int8}
    assert {layer.keys.shape[-1] for layer in cache.layers} == {row}
    # the float32 cache halved = a 16-bit cache's bytes
    assert cache.nbytes() / (cache_nbytes(full.past_key_values) / 2) == pytest.approx(proj.kv_fraction(kind))

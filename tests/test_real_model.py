"""The real default model (SmolLM2-135M-Instruct) end to end: calibrate → save/load → compress → eval → generate.

Small on purpose (2 calibration windows, 1 eval window, the "eager" inner compiler) so CI stays fast;
benchmarks/quality.py runs the full protocol through Inductor.
"""
import pytest
import torch

import kvfx
from kvfx.cache import cache_nbytes

models = pytest.importorskip("kvfx.models")
data = pytest.importorskip("kvfx.data")


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
    # rank 0.5 loses quality but must stay a language model (reference: 36 -> 113 at 16 windows of 512)
    assert base < low < 6 * base, (base, low)

    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    ref_cache = kvfx.LowRankCache(proj)
    with torch.no_grad():
        out = cm.generate(prompt, max_new_tokens=8, do_sample=False)
        kvfx.decompress(cm)
        ref = model.generate(prompt, max_new_tokens=8, do_sample=False, past_key_values=ref_cache)
        full = model.generate(prompt, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out, ref)  # compiled, rewritten generate == eager low-rank-cache generate
    assert ref_cache.nbytes() * 2 == cache_nbytes(full.past_key_values)

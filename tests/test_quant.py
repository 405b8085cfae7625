"""int8 latents (`kvfx.compress(..., quantize="int8")`, kvfx/quant.py): the storage format, the rewrite and the
cache against an independent reference, the bytes they keep, budgets priced in int8 bytes, bad input."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import kvfx
from archs import int8_round
from helpers import compressed, model_inputs, random_projections, reference_greedy, reference_model, rel_err, run, tiny_llama
from kvfx import quant
from kvfx.calib.allocate import greedy
from kvfx.calib.collect import collect_stats, fit
from kvfx.compress import cache_kwarg


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64), st.floats(-12, 12), st.integers(0, 2**16))
def test_round_trip_error_within_half_a_step(width, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, width, generator=g) * 2.0 ** log_scale
    stored = quant.quantize(x)
    assert stored.dtype == torch.int8 and stored.shape == (3, width + 1)
    back = quant.dequantize(stored, torch.float32)
    amax = x.abs().amax(-1, keepdim=True)
    # the scale is at most an eighth of an octave above amax/127, and at least 2^-16 (the smallest scale code)
    step = (amax / 127 * 2 ** (1 / quant.SCALE_STEPS)).clamp_min(2.0 ** -16)
    assert ((back - x).abs() <= step / 2 * (1 + 1e-5)).all()
    assert torch.equal(quant.fake_quant(x), back)  # the rewrite's rounding is the cache's
    assert torch.allclose(back, int8_round(x.double()).float(), rtol=1e-6, atol=0)


def test_zero_rows_and_gradient():
    x = torch.zeros(2, 5)
    assert torch.equal(quant.dequantize(quant.quantize(x), torch.float32), x)
    z = torch.randn(4, 6).bfloat16() * 40
    assert torch.equal(quant.fake_quant(z), quant.dequantize(quant.quantize(z), torch.bfloat16))  # any dtype alike
    y = torch.randn(4, 6, requires_grad=True)
    quant.fake_quant(y).sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))  # straight through


@pytest.fixture(scope="module")
def llama():
    m = tiny_llama(2)
    torch._dynamo.reset()
    stats = collect_stats(m, [model_inputs(m, batch=2, tokens=16, seed=s) for s in range(3)], progress=False)
    return m, {"shared": fit(stats, "kqsvd", 12, granularity="kv"), "head": fit(stats, "kqsvd", 5)}


@pytest.mark.parametrize("backend", ["eager", "inductor"])
@pytest.mark.parametrize("form", ["shared", "head"])
def test_forward_matches_reference(llama, backend, form):
    m, projs = llama
    proj, x = projs[form], model_inputs(m, tokens=9)
    ref = run(reference_model(m, proj, int8=True), x, use_cache=False)
    kvfx.counters.clear()
    with compressed(m, proj, backend, quantize="int8") as cm:
        out = run(cm, x, use_cache=False)
    assert kvfx.counters["kvfx"]["quantized"] == 2
    assert rel_err(out, ref) < 1e-4
    assert rel_err(out, run(reference_model(m, proj), x, use_cache=False)) > 1e-4  # the rounding is really there


@pytest.mark.parametrize("cache,form,backend", [("dynamic", "shared", "eager"), ("static", "shared", "eager"),
                                                ("dynamic", "head", "eager"), ("static", "head", "eager"),
                                                ("dynamic", "shared", "inductor")])
def test_generate_matches_reference(llama, cache, form, backend):
    m, projs = llama
    ids = model_inputs(m, tokens=6)
    ref = reference_greedy(m, projs[form], ids, 8, int8=True)
    with compressed(m, projs[form], backend, cache=cache, quantize="int8") as cm, torch.no_grad():
        out = cm.generate(ids, max_new_tokens=8, do_sample=False)
    n = out.shape[1]  # generate stops at the end-of-sequence token; the reference runs on
    assert torch.equal(out, ref[:, :n]) and (n == ref.shape[1] or out[0, -1] == m.generation_config.eos_token_id)


@pytest.mark.parametrize("form", ["shared", "head"])
def test_cache_holds_int8_rows_and_prefill_agrees(llama, form):
    m, projs = llama
    proj, x = projs[form], model_inputs(m, tokens=10)
    with compressed(m, proj, quantize="int8") as cm, torch.no_grad():
        cache = kvfx.make_cache(cm)
        via_cache = cm(x, **{cache_kwarg(cm): cache}, use_cache=True).logits
        plain = cm(x, use_cache=False).logits
    assert rel_err(via_cache, plain) < 1e-5  # the cache's int8 rows are what the plain path rounds to
    assert {layer.keys.dtype for layer in cache.layers} == {torch.int8}
    if form == "shared":
        assert [tuple(layer.keys.shape) for layer in cache.layers] == [(1, 1, 10, 13)] * 2
    else:
        assert [tuple(layer.keys.shape) for layer in cache.layers] == [(1, 2, 10, 6)] * 2
    full16 = 2 * 2 * 2 * 8 * 10 * 2  # layers × (k, v) × kv heads × head_dim × tokens × 2 bytes (16-bit cache)
    assert cache.nbytes() / full16 == pytest.approx(proj.kv_fraction("int8"))


def test_budget_priced_in_int8_bytes():
    prof = {(f"s{i}", "latent"): {r: 1.0 / r for r in range(1, 33)} for i in range(3)}
    width, heads = {f"s{i}": 16 for i in range(3)}, {f"s{i}": 1 for i in range(3)}
    ranks, used, _ = greedy(prof, width, heads, kvfx.Budget(0.25, quantize="int8"))
    # 16-bit cache: 3 sites × 32 numbers × 2 bytes = 192 bytes; int8 rows: Σ (R + 1) bytes <= 48
    assert sum(r + 1 for r in ranks.values()) <= 48 and used <= 0.25 + 1e-9
    assert sum(r + 1 for r in ranks.values()) > 48 - 3  # and spent: one rank less each would be under
    plain, _, _ = greedy(prof, width, heads, kvfx.Budget(0.25))
    assert sum(plain.values()) <= 24 < sum(ranks.values())


def test_bad_quantize_refused_and_nothing_applied(llama):
    m, projs = llama
    forward = m.forward
    with pytest.raises(ValueError, match="quantize must be None .* or 'int8'"):
        kvfx.compress(torch.compile(m, backend="eager"), projs["shared"], quantize="int4")
    assert getattr(m, "_kvfx", None) is None and m.forward == forward
    with pytest.raises(ValueError, match="Budget quantize must be None or 'int8'"):
        kvfx.Budget(0.25, quantize="fp8")
    with pytest.raises(ValueError, match="quantize must be"):
        kvfx.LowRankCache(random_projections(m, rank=4), quantize=8)


def test_explain_shows_int8(llama):
    m, projs = llama
    with compressed(m, projs["shared"], quantize="int8") as cm:
        rows = kvfx.explain(cm, model_inputs(m, tokens=5), print_table=False).rows
    assert [r.ranks for r in rows] == ["12 shared int8"] * 2

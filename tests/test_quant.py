"""Low-bit latents (`kvfx.compress(..., quantize="int8" | "int4")`, kvfx/quant.py): the storage formats, the rewrite
and the cache against an independent reference, the bytes they keep, budgets priced in stored bytes, bad input."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kvfx
from archs import low_bit_round
from helpers import compressed, model_inputs, random_projections, reference_greedy, reference_model, rel_err, run, tiny_llama
from kvfx import quant
from kvfx.calib.allocate import greedy
from kvfx.calib.collect import collect_stats, fit
from kvfx.compress import cache_kwarg

KINDS = ("int8", "int4")


def assert_rounds_as_reference(back, x, kind):
    """kvfx's float32 rounding equals the float64 reference, but where x lies on a rounding tie within float32's
    resolution (either neighbour is then as near x: the two may pick different ones)."""
    ref = low_bit_round(x.double(), kind).float()
    off = ~torch.isclose(back, ref, rtol=1e-6, atol=0)
    gap = ((back.double() - x.double()).abs() - (ref.double() - x.double()).abs()).abs()
    assert (gap[off] <= 1e-5 * x.double().abs()[off]).all(), (back[off], ref[off], x[off])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(KINDS + ("int5", "int3", "int2")), st.integers(1, 100), st.floats(-12, 12), st.integers(0, 2**16))
def test_round_trip_error_within_half_a_step(kind, width, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, width, generator=g) * 2.0 ** log_scale
    stored = quant.quantize(x, kind)
    per_byte = {"int8": 1, "int4": 2, "int2": 4}
    code_bytes = (math.ceil(width / 4) + math.ceil(width / 8) if kind == "int3"  # low-bit plane, sign plane
                  else math.ceil(width / 2) + math.ceil(width / 8) if kind == "int5"
                  else math.ceil(width / per_byte[kind]))
    nbytes = code_bytes + (1 if kind == "int8" else math.ceil(width / 32))
    assert stored.dtype == torch.int8 and stored.shape == (3, nbytes) and quant.row_bytes(kind, width) == nbytes
    back = quant.dequantize(stored, torch.float32, width, kind)
    top, group = {"int8": (127, width), "int5": (16, 32), "int4": (7, 32), "int3": (4, 32), "int2": (2, 32)}[kind]
    # per group: the scale is at most an eighth of an octave above amax/top, and at least 2^-16 (smallest code)
    amax = torch.cat([p.abs().amax(-1, keepdim=True).expand_as(p) for p in x.split(group, -1)], -1)
    step = (amax / top * 2 ** (1 / quant.SCALE_STEPS)).clamp_min(2.0 ** -16)
    assert ((back - x).abs() <= step / 2 * (1 + 1e-5)).all()
    assert torch.equal(quant.fake_quant(x, kind), back)  # the rewrite's rounding is the cache's
    assert_rounds_as_reference(back, x, kind)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(("int8", "int5", "int4", "int3", "int2")), st.integers(1, 70)), min_size=1, max_size=4),
       st.integers(0, 2**16))
def test_bands_store_each_band_in_its_format(bands, seed):
    kind = "+".join(f"{k}x{w}" for k, w in bands)
    width = sum(w for _, w in bands)
    x = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(seed)) * 3
    stored = quant.quantize(x, kind)
    assert stored.shape == (2, 5, quant.row_bytes(kind, width))
    assert quant.row_bytes(kind, width) == sum(quant.row_bytes(k, w) for k, w in bands)
    back = quant.dequantize(stored, torch.float32, width, kind)
    assert torch.equal(quant.fake_quant(x, kind), back)
    assert_rounds_as_reference(back, x, kind)
    # each band's bytes are that band stored alone, in column order
    at, col = 0, 0
    for k, w in bands:
        n = quant.row_bytes(k, w)
        assert torch.equal(stored[..., at:at + n], quant.quantize(x[..., col:col + w], k))
        at, col = at + n, col + w


def test_int2_packs_four_codes_per_byte_at_mid_rise_levels():
    x = torch.tensor([[1.5, -1.5, -0.5, 0.5, 1.5]])  # amax 1.5 -> 2·s >= 1.5: s = 2^(e/8) with e = -3 (0.771)
    stored = quant.quantize(x, "int2")
    s = 2 ** (-3 / 8)
    codes = [1, -2, -1, 0, 1]  # floor(x / s)
    assert stored[0, :2].tolist() == [64 * 0 + 16 * 3 + 4 * 2 + 1, 1] and stored[0, 2].item() == -3
    assert torch.allclose(quant.dequantize(stored, torch.float32, 5, "int2"), (torch.tensor([codes]) + 0.5) * s)


def test_int3_stores_a_low_bits_plane_then_a_sign_plane():
    x = torch.tensor([[3.5, -3.5, -0.5, 0.5, 2.5, -4.0, 1.5, -2.5, 0.2]])  # amax 4 -> 4·s >= 4: e = 0, s = 1
    stored = quant.quantize(x, "int3")
    codes = [3, -4, -1, 0, 2, -4, 1, -3, 0]  # floor(x / s), clipped to [-4, 3]
    low = [c % 4 for c in codes]  # the two's-complement low bits; the sign: c < 0
    packed_low = [sum(low[4 * i + j] << 2 * j for j in range(4) if 4 * i + j < 9) for i in range(3)]
    signs = sum(1 << j for j, c in enumerate(codes[:8]) if c < 0)
    as_int8 = [b - 256 if b > 127 else b for b in packed_low + [signs, int(codes[8] < 0)]]
    assert stored.shape == (1, 3 + 2 + 1) and stored[0, :5].tolist() == as_int8 and stored[0, 5].item() == 0
    assert torch.equal(quant.dequantize(stored, torch.float32, 9, "int3"), torch.tensor([codes]) + 0.5)


def test_int5_stores_a_nibble_plane_then_a_sign_plane():
    x = torch.tensor([[15.5, -16.0, -0.5, 0.5, 7.2, -9.9, 1.5, -2.5, 0.2]])  # amax 16 -> 16·s >= 16: e = 0, s = 1
    stored = quant.quantize(x, "int5")
    codes = [15, -16, -1, 0, 7, -10, 1, -3, 0]  # floor(x / s), clipped to [-16, 15]
    low = [c % 16 for c in codes]  # the two's-complement low four bits (int4's layout); the sign: c < 0
    packed_low = [low[2 * i] + (low[2 * i + 1] << 4 if 2 * i + 1 < 9 else 0) for i in range(5)]
    signs = sum(1 << j for j, c in enumerate(codes[:8]) if c < 0)
    as_int8 = [b - 256 if b > 127 else b for b in packed_low + [signs, int(codes[8] < 0)]]
    assert stored.shape == (1, 5 + 2 + 1) and stored[0, :7].tolist() == as_int8 and stored[0, 7].item() == 0
    assert torch.equal(quant.dequantize(stored, torch.float32, 9, "int5"), torch.tensor([codes]) + 0.5)


def test_bands_refuse_a_latent_of_another_width():
    with pytest.raises(ValueError, match="spans 96 latent columns, but this latent has 40"):
        quant.row_bytes("int8x32+int4x64", 40)
    with pytest.raises(ValueError, match="bands such as"):
        quant.check("int8x32+int6x64")
    with pytest.raises(ValueError, match="not 'b'"):
        quant.site({"a": "int4"}, "b")


@pytest.mark.parametrize("kind", KINDS)
def test_zero_rows_and_gradient(kind):
    x = torch.zeros(2, 5)
    assert torch.equal(quant.dequantize(quant.quantize(x, kind), torch.float32, 5, kind), x)
    z = torch.randn(4, 37).bfloat16() * 40
    assert torch.equal(quant.fake_quant(z, kind), quant.dequantize(quant.quantize(z, kind), torch.bfloat16, 37, kind))
    y = torch.randn(4, 6, requires_grad=True)
    quant.fake_quant(y, kind).sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))  # straight through


@pytest.mark.parametrize("kind", ["int4", "int2", "int8x16+int3x32+int2x16"])
def test_fake_quant_rounds_around_an_offset(kind):
    """fake_quant(x, kind, offset) = fake_quant(x - offset) + offset: rows far from zero along the offset round
    with steps sized to what varies."""
    g = torch.Generator().manual_seed(0)
    offset = 3 * torch.randn(64, generator=g)
    x = offset + 0.3 * torch.randn(500, 64, generator=g)
    torch.testing.assert_close(quant.fake_quant(x, kind, offset), quant.fake_quant(x - offset, kind) + offset)
    err = lambda y: float(((y - x) ** 2).mean())  # noqa: E731
    assert err(quant.fake_quant(x, kind, offset)) < 0.1 * err(quant.fake_quant(x, kind))


def test_int4_packs_two_codes_per_byte():
    x = torch.tensor([[7.0, -7.0, -1.0, 3.0, 0.0]])  # amax 7 -> scale 1 (e = 0): the codes are x itself
    stored = quant.quantize(x, "int4")
    assert stored.tolist() == [[16 * -7 + 7, 16 * 3 + 15, 0, 0]]  # (7, -7), (-1, 3), (0, pad), scale code 0
    assert torch.equal(quant.dequantize(stored, torch.float32, 5, "int4"), x)


@pytest.fixture(scope="module")
def llama():
    m = tiny_llama(2, head_dim=16)  # K+V width 64: a shared latent of 40 spans two int4 groups (32 + 8)
    torch._dynamo.reset()
    stats = collect_stats(m, [model_inputs(m, batch=2, tokens=16, seed=s) for s in range(3)], progress=False)
    return m, {"shared": fit(stats, "kqsvd", 40, granularity="kv"), "head": fit(stats, "kqsvd", 9)}  # odd: int4 pads a row


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["eager", "inductor"])
@pytest.mark.parametrize("form", ["shared", "head"])
def test_forward_matches_reference(llama, backend, form, kind):
    m, projs = llama
    proj, x = projs[form], model_inputs(m, tokens=9)
    ref = run(reference_model(m, proj, quantize=kind), x, use_cache=False)
    kvfx.counters.clear()
    with compressed(m, proj, backend, quantize=kind) as cm:
        out = run(cm, x, use_cache=False)
    assert kvfx.counters["kvfx"]["quantized"] == 2
    assert rel_err(out, ref) < 1e-4
    assert rel_err(out, run(reference_model(m, proj), x, use_cache=False)) > 1e-4  # the rounding is really there


@pytest.mark.parametrize("cache,form,backend,kind", [
    ("dynamic", "shared", "eager", "int8"), ("static", "shared", "eager", "int8"), ("dynamic", "head", "eager", "int8"),
    ("static", "head", "eager", "int8"), ("dynamic", "shared", "inductor", "int8"),
    ("dynamic", "shared", "eager", "int4"), ("static", "head", "eager", "int4"), ("dynamic", "head", "inductor", "int4")])
def test_generate_matches_reference(llama, cache, form, backend, kind):
    m, projs = llama
    ids = model_inputs(m, tokens=6)
    ref = reference_greedy(m, projs[form], ids, 8, quantize=kind)
    with compressed(m, projs[form], backend, cache=cache, quantize=kind) as cm, torch.no_grad():
        out = cm.generate(ids, max_new_tokens=8, do_sample=False)
    n = out.shape[1]  # generate stops at the end-of-sequence token; the reference runs on
    assert torch.equal(out, ref[:, :n]) and (n == ref.shape[1] or out[0, -1] == m.generation_config.eos_token_id)


@pytest.mark.parametrize("kind,shared_row,head_row", [("int8", 41, 10), ("int4", 20 + 2, 5 + 1)])
@pytest.mark.parametrize("form", ["shared", "head"])
def test_cache_holds_low_bit_rows_and_prefill_agrees(llama, form, kind, shared_row, head_row):
    m, projs = llama
    proj, x = projs[form], model_inputs(m, tokens=10)
    with compressed(m, proj, quantize=kind) as cm, torch.no_grad():
        cache = kvfx.make_cache(cm)
        via_cache = cm(x, **{cache_kwarg(cm): cache}, use_cache=True).logits
        plain = cm(x, use_cache=False).logits
    assert rel_err(via_cache, plain) < 1e-5  # the cache's rows are what the plain path rounds to
    assert {layer.keys.dtype for layer in cache.layers} == {torch.int8}
    if form == "shared":
        assert [tuple(layer.keys.shape) for layer in cache.layers] == [(1, 1, 10, shared_row)] * 2
    else:
        assert [tuple(layer.keys.shape) for layer in cache.layers] == [(1, 2, 10, head_row)] * 2
    full16 = 2 * 2 * 2 * 16 * 10 * 2  # layers × (k, v) × kv heads × head_dim × tokens × 2 bytes (16-bit cache)
    assert cache.nbytes() / full16 == pytest.approx(proj.kv_fraction(kind))


def test_budget_priced_in_stored_bytes():
    prof = {(f"s{i}", "latent"): {r: 1.0 / r for r in range(1, 65)} for i in range(3)}
    width, heads = {f"s{i}": 32 for i in range(3)}, {f"s{i}": 1 for i in range(3)}
    # 16-bit cache: 3 sites × 64 numbers × 2 bytes = 384 bytes; a quarter is 96
    spent = {}
    for kind in (None, "int8", "int4"):
        ranks, used, _ = greedy(prof, width, heads, kvfx.Budget(0.25, quantize=kind))
        spent[kind] = sum(quant.row_bytes(kind, r) for r in ranks.values())
        assert spent[kind] <= 96 and used <= 0.25 + 1e-9 and used * 384 == pytest.approx(spent[kind])
        assert spent[kind] > 96 - 2  # and spent: the last step down saved at most 2 bytes
        if kind == "int4":  # no step down that saves no byte (59 takes the bytes of 60)
            assert all(quant.row_bytes(kind, r) < quant.row_bytes(kind, r + 1) for r in ranks.values())
        spent[kind] = sorted(ranks.values())
    assert sum(spent[None]) < sum(spent["int8"]) < sum(spent["int4"])


def test_bad_quantize_refused_and_nothing_applied(llama):
    m, projs = llama
    forward = m.forward
    with pytest.raises(ValueError, match="quantize must be None .*'int2', 'e8', bands .*, got 'int6'"):
        kvfx.compress(torch.compile(m, backend="eager"), projs["shared"], quantize="int6")
    assert getattr(m, "_kvfx", None) is None and m.forward == forward
    with pytest.raises(ValueError, match="Budget quantize must be None .*'int2'.*got 'fp8'"):
        kvfx.Budget(0.25, quantize="fp8")
    with pytest.raises(ValueError, match="bits per direction come from kvfx.allocate_bits"):
        kvfx.Budget(0.25, quantize="int8x8+int4x32")
    with pytest.raises(ValueError, match="Refine: quantize must be"):
        kvfx.Refine(quantize="int6x10")
    with pytest.raises(ValueError, match="quantize must be"):
        kvfx.LowRankCache(random_projections(m, rank=4), quantize=8)


@pytest.mark.parametrize("kind", KINDS)
def test_explain_shows_the_format(llama, kind):
    m, projs = llama
    with compressed(m, projs["shared"], quantize=kind) as cm:
        rows = kvfx.explain(cm, model_inputs(m, tokens=5), print_table=False).rows
    assert [r.ranks for r in rows] == [f"40 shared {kind}"] * 2


def test_identity_projections_make_a_plain_low_bit_cache(llama):
    """calibrate(method="identity", rank=1.0) + quantize: kvfx as a per-token low-bit KV cache without low rank
    (the reference a low-rank method must beat at equal bytes)."""
    m, _ = llama
    stats = collect_stats(m, [model_inputs(m, tokens=8)], progress=False)
    ident, x = fit(stats, "identity", 1.0), model_inputs(m, tokens=9)
    with compressed(m, ident) as cm:
        assert rel_err(run(cm, x, use_cache=False), run(m, x, use_cache=False)) < 1e-5  # exact without rounding
    with compressed(m, ident, quantize="int4") as cm:
        out = run(cm, x, use_cache=False)
    assert rel_err(out, run(reference_model(m, ident, quantize="int4"), x, use_cache=False)) < 1e-4
    assert ident.kv_fraction("int4") == pytest.approx((8 + 1) / 32)  # 16 numbers: 8 code bytes + 1 scale byte


@pytest.mark.parametrize("kind,width", [("e8", 48), ("e8", 8), ("int4x16+e8x32+int2x16", 64), ("int8x8+e8x40", 48)])
def test_e8_stores_lattice_indices_and_rounds_as_the_written_out_rule(kind, width):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(6, width, generator=g) * 3
    stored = quant.quantize(x, kind)
    assert stored.dtype == torch.int8 and stored.shape[-1] == quant.row_bytes(kind, width)
    back = quant.dequantize(stored, torch.float32, width, kind)
    assert torch.equal(back, quant.fake_quant(x, kind))
    ref = low_bit_round(x.double(), kind).float()
    assert rel_err(back, ref) < 1e-6  # float32 against float64: a near-tie may pick the other neighbour


def test_e8_bytes_and_error_against_int2():
    x = torch.randn(2048, 64, generator=torch.Generator().manual_seed(0))
    assert quant.row_bytes("e8", 64) == quant.row_bytes("int2", 64) == 64 // 4 + 2  # 2 bits a number, a scale a 32
    err = {k: float(((quant.fake_quant(x, k) - x) ** 2).mean()) for k in ("e8", "int2")}
    assert 0.09 < err["e8"] < 0.1 and err["int2"] > 0.13
    # each group's largest 8-vector keeps its length (its step fits it in the ball): typically within 10 %
    vec = x.reshape(-1, 8, 8).norm(dim=-1)
    out = quant.fake_quant(x, "e8").reshape(-1, 8, 8).norm(dim=-1)
    top = vec.reshape(2048, 2, 4).amax(-1)
    kept = out.reshape(2048, 2, 4).gather(-1, vec.reshape(2048, 2, 4).argmax(-1, keepdim=True)).squeeze(-1)
    assert (kept / top).median() > 0.9


def test_e8_widths_must_be_whole_lattice_points(llama):
    m, projs = llama
    for kind in ("e8x12", "int4x60+e8x4"):
        with pytest.raises(ValueError, match="e8 codes 8 numbers a lattice point: its columns must be a multiple of 8"):
            quant.check(kind)
    with pytest.raises(ValueError, match="multiple of 8, got 12 in 'e8'"):
        quant.row_bytes("e8", 12)
    x = model_inputs(m, tokens=5)
    before = run(m, x, use_cache=False)
    with pytest.raises(ValueError, match="site .*: e8 codes 8 numbers.*got 9"):  # per-head rank 9
        kvfx.compress(m, projs["head"], quantize="e8")
    assert torch.equal(run(m, x, use_cache=False), before)  # nothing applied


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_e8_forward_and_generate_match_the_reference(llama, backend):
    """e8 codes through the rewrite (fake_quant), kvfx's cache and the decode step (the C++ kernel's float path)."""
    m, projs = llama
    proj, x = projs["shared"], model_inputs(m, tokens=9)
    ref = run(reference_model(m, proj, quantize="e8"), x, use_cache=False)
    with compressed(m, proj, backend, quantize="e8") as cm:
        assert rel_err(run(cm, x, use_cache=False), ref) < 1e-4
    ids = model_inputs(m, tokens=6)
    want = reference_greedy(m, proj, ids, 8, quantize="e8")
    with compressed(m, proj, backend, quantize="e8") as cm, torch.no_grad():
        kvfx.counters.clear()
        out = cm.generate(ids, max_new_tokens=8, do_sample=False)
        assert kvfx.counters["kvfx"]["lowbit_decode"] >= 2
    n = out.shape[1]
    assert torch.equal(out, want[:, :n]) and (n == want.shape[1] or out[0, -1] == m.generation_config.eos_token_id)
    with compressed(m, proj, backend, cache="static", quantize="e8") as cm, torch.no_grad():
        assert torch.equal(cm.generate(ids, max_new_tokens=8, do_sample=False), out)

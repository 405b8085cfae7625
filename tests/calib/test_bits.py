"""kvfx.allocate_bits (kvfx/calib/bits.py): bits per latent direction under a byte budget — the band choice, the
exactness of balancing and rotating, the bytes the cache then holds, its numerics against the reference, bad input."""
import pytest
import torch

import kvfx
from helpers import compressed, model_inputs, reference_model, rel_err, run, tiny_llama
from kvfx import quant
from kvfx.calib.bits import choose_bands, format_error
from kvfx.calib.collect import collect_stats, fit
from kvfx.compress import cache_kwarg


def test_format_errors_are_ordered_and_near_theory():
    e8, e4, e2 = (format_error(b) for b in (8, 4, 2))
    assert e8 < 1e-4 < e4 < 0.02 < e2 < 0.15  # 2 bits mid-rise: 0.13 (Lloyd-Max's Gaussian optimum is 0.1175)


@pytest.mark.parametrize("decay", [0.9, 0.98, 1.0])
@pytest.mark.parametrize("budget", [40.0, 100.0, 200.0])
def test_bands_fit_the_budget_and_water_fill(decay, budget):
    lam = decay ** torch.arange(128, dtype=torch.float64)
    bands, err = choose_bands(lam, budget)
    assert sum(quant.row_bytes(f"int{b}", n) for b, n in bands) <= budget
    assert [b for b, _ in bands] == sorted((b for b, _ in bands), reverse=True)  # more bits first
    # never worse than any single format at its widest (what the predicted error counts)
    for b in (8, 4, 2):
        n = max((k for k in range(16, 129, 16) if quant.row_bytes(f"int{b}", k) <= budget), default=0)
        if n:
            single = (format_error(b) * float(lam[:n].sqrt().sum()) ** 2 / n + float(lam[n:].sum())) / float(lam.sum())
            assert err <= single + 1e-12
    if decay == 1.0:  # a flat spectrum: every direction matters as much; a whole int2 row fits, so none is dropped
        assert sum(n for _, n in bands) == 128


def test_unreachable_budget_is_refused():
    with pytest.raises(ValueError, match="below the smallest band .* raise the budget"):
        choose_bands(torch.ones(64, dtype=torch.float64), 3.0)


@pytest.fixture(scope="module")
def setup():
    m = tiny_llama(2, head_dim=32)  # K+V width 128 per layer: room for several bands
    torch._dynamo.reset()
    stats = collect_stats(m, [model_inputs(m, batch=2, tokens=24, seed=s) for s in range(4)], progress=False)
    return m, stats, fit(stats, "kqsvd", 1.0, granularity="kv")


def test_balancing_and_rotating_are_exact(setup):
    """Without rounding, the allocated projections compute the attention of the same directions cut plainly."""
    m, stats, full = setup
    proj = kvfx.allocate_bits(stats, full, 0.25)
    kept = {n: p.key_rank for n, p in proj.sites.items()}
    plain = fit(stats, "kqsvd", kept, granularity="kv")
    x = model_inputs(m, tokens=9)
    ref = run(reference_model(m, plain), x, use_cache=False)
    assert rel_err(run(reference_model(m, proj), x, use_cache=False), ref) < 1e-4


@pytest.mark.parametrize("budget", [0.25, 0.125])
def test_cache_holds_the_budget_and_matches_the_reference(setup, budget):
    m, stats, full = setup
    proj = kvfx.allocate_bits(stats, full, budget)
    formats = proj.quantize
    assert set(formats) == set(proj.sites) and all("+" in f or f.startswith("int") for f in formats.values())
    assert proj.kv_fraction(formats) <= budget
    x = model_inputs(m, tokens=10)
    with compressed(m, proj) as cm, torch.no_grad():  # the recorded formats, with no further argument
        cache = kvfx.make_cache(cm)
        via_cache = cm(x, **{cache_kwarg(cm): cache}, use_cache=True).logits
        plain = cm(x, use_cache=False).logits
    assert rel_err(via_cache, plain) < 1e-5
    full16 = 2 * 2 * 2 * 32 * 10 * 2  # layers × (k, v) × kv heads × head_dim × tokens × 2 bytes
    assert cache.nbytes() / full16 == pytest.approx(proj.kv_fraction(formats)) and cache.nbytes() / full16 <= budget
    # float64 reference rounding: a number on a code boundary may round the other way (an int2 step is large)
    ref = run(reference_model(m, proj, quantize=formats), x, use_cache=False)
    err = rel_err(plain, ref)
    assert err < 1e-3
    assert rel_err(plain, run(reference_model(m, proj), x, use_cache=False)) > 10 * max(err, 1e-4)  # rounding is there


def test_generate_and_decode_kernel_read_the_bands(setup):
    m, stats, full = setup
    proj = kvfx.allocate_bits(stats, full, 0.25)
    ids = model_inputs(m, tokens=6)
    with compressed(m, proj, "inductor") as cm, torch.no_grad():
        kvfx.counters.clear()
        out = cm.generate(ids, max_new_tokens=6, do_sample=False)
        assert kvfx.counters["kvfx"]["lowbit_decode"] >= 2
    ref = reference_model(m, proj, quantize=proj.quantize)
    seq = ids
    with torch.no_grad():
        for _ in range(out.shape[1] - ids.shape[1]):
            seq = torch.cat([seq, ref(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_saved_formats_come_back(setup, tmp_path):
    _, stats, full = setup
    proj = kvfx.allocate_bits(stats, full, 0.25)
    proj.save(tmp_path / "p.safetensors")
    back = kvfx.Projections.load(tmp_path / "p.safetensors")
    assert back.quantize == proj.quantize and back.kv_fraction(back.quantize) == proj.kv_fraction(proj.quantize)


def test_bad_input(setup):
    m, stats, full = setup
    with pytest.raises(ValueError, match="shared K\\+V latents"):
        kvfx.allocate_bits(stats, fit(stats, "kqsvd", 1.0), 0.25)
    with pytest.raises(ValueError, match="rotated"):
        kvfx.allocate_bits(stats, kvfx.rotate_latents(full), 0.25)
    with pytest.raises(ValueError, match="budget must be"):
        kvfx.allocate_bits(stats, full, 1.5)
    with pytest.raises(ValueError, match="below the smallest band"):
        kvfx.allocate_bits(stats, full, 0.01)
    proj = kvfx.allocate_bits(stats, full, 0.25)
    other = {n: "int4x8" for n in proj.sites}  # a format for another width: refused before anything is applied
    forward = m.forward
    with pytest.raises(ValueError, match="spans 8 latent columns"):
        kvfx.compress(torch.compile(m, backend="eager"), proj, quantize=other)
    assert getattr(m, "_kvfx", None) is None and m.forward == forward

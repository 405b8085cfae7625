"""kvfx.allocate_bits (kvfx/calib/bits.py): bits per latent direction under a byte budget — the band choice, the
exactness of balancing and rotating, the bytes the cache then holds, its numerics against the reference, bad input."""
import math

import pytest
import torch

import kvfx
from helpers import compressed, model_inputs, reference_model, rel_err, run, tiny_llama
from kvfx import quant
from kvfx.calib.bits import choose_bands, format_error, frontier, spend
from kvfx.calib.collect import collect_stats, fit
from kvfx.compress import cache_kwarg


def test_format_errors_are_ordered_and_near_theory():
    e8, e5, e4, e3, e2 = (format_error(b) for b in (8, 5, 4, 3, 2))
    assert e8 < 1e-4 < e4 < 0.02 < e2 < 0.15  # 2 bits mid-rise: 0.13 (Lloyd-Max's Gaussian optimum is 0.1175)
    assert 0.02 < e3 < 0.045  # 3 bits mid-rise with a scale per 32 numbers: 0.033 (Lloyd-Max: 0.0345)
    assert 1e-3 < e5 < 3e-3 and e4 / e5 > 4  # 5 bits mid-rise: 0.0020, ~5x below int4 for 1.25 bits more


def test_int5_fills_the_gap_between_int8_and_int4():
    """A spectrum whose leading directions want about 5-6 bits: int5 takes what int8 took, and the predicted error
    at equal bytes is below the int8 / int4 / int3 / int2 allocation's."""
    lam = 0.95 ** torch.arange(128, dtype=torch.float64)
    for budget in (60.0, 80.0, 100.0):
        with5, err5 = choose_bands(lam, budget)
        without, err = choose_bands(lam, budget, bits=(8, 4, 3, 2))
        assert err5 < err and 5 not in [b for b, _ in without]
        assert any(b == 5 for b, _ in with5)


def test_rounding_priced_below_dropping_keeps_more_directions():
    """rounding_weight ρ < 1 prices a band's rounding error at ρ × a dropped direction's: at the same bytes the
    chosen bands keep at least as many directions (more here), in coarser formats, and ρ = 1 is the plain price."""
    lam = 0.97 ** torch.arange(128, dtype=torch.float64)
    for budget in (40.0, 60.0, 90.0):
        plain = [pt for pt in frontier(lam) if pt[0] <= budget][-1]
        cheap = [pt for pt in frontier(lam, rounding_weight=0.5) if pt[0] <= budget][-1]
        width = lambda pt: sum(n for _, n in pt[2])  # noqa: E731
        assert width(cheap) >= width(plain) and cheap[0] <= budget
        if budget == 40.0:
            assert width(cheap) > width(plain)
    same = frontier(lam, rounding_weight=1.0)
    assert same == frontier(lam)


def test_e8_takes_int2s_place_at_less_error():
    """e8 lattice codes cost int2's bytes at ~0.72x its error: at equal bytes the allocation with them predicts less
    error and keeps at least as many directions (a direction is worth more bits when they round it finer)."""
    assert 0.09 < format_error("e8") < 0.1 < 0.13 < format_error(2)
    lam = 0.96 ** torch.arange(128, dtype=torch.float64)
    for budget in (24.0, 40.0, 60.0):
        with_e8, err_e8 = choose_bands(lam, budget, bits=(8, 5, 4, 3, "e8"))
        plain, err = choose_bands(lam, budget)
        assert err_e8 < err and any(b == "e8" for b, _ in with_e8)
        assert all(n % 8 == 0 for b, n in with_e8 if b == "e8")


def test_int3_fills_the_gap_between_int4_and_int2():
    """A spectrum whose water-filling wants about 3 bits for its middle directions: int3 takes them, and the
    predicted error at equal bytes is below the int8 / int4 / int2 allocation's."""
    lam = 0.97 ** torch.arange(128, dtype=torch.float64)
    for budget in (40.0, 60.0, 80.0):
        with3, err3 = choose_bands(lam, budget)
        without, err = choose_bands(lam, budget, bits=(8, 4, 2))
        assert err3 <= err and 3 not in [b for b, _ in without]
    assert any(b == 3 for b, _ in choose_bands(lam, 60.0)[0])


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


def test_frontier_is_the_pareto_front_of_every_band_choice():
    lam = 0.93 ** torch.arange(48, dtype=torch.float64)
    front = frontier(lam)
    assert all(a[0] < b[0] and a[1] > b[1] for a, b in zip(front, front[1:]))
    for nbytes, err, bands in front:  # each point's bytes and error are what its bands cost
        assert sum(quant.row_bytes(f"int{b}", n) for b, n in bands) == nbytes
        lo, want = 0, 0.0
        for b, n in bands:
            want += format_error(b) * float(lam[lo:lo + n].sqrt().sum()) ** 2 / n
            lo += n
        assert err == pytest.approx(want + float(lam[lo:].sum()))
    for budget in (10, 20, 33.5, 60):  # choose_bands takes the front's best point within the budget
        bands, err = choose_bands(lam, budget)
        best = max(pt for pt in front if pt[0] <= budget)
        assert bands == best[2] and err == pytest.approx(best[1] / float(lam.sum()))


@pytest.mark.parametrize("seed", range(6))
def test_spend_across_sites_is_near_the_exhaustive_optimum(seed):
    """Three sites of different spectra and weights: the knapsack's choice fits the bytes, never loses to equal
    shares, and is the best of every combination of frontier points."""
    import itertools
    g = torch.Generator().manual_seed(seed)
    fronts = {s: frontier(torch.sort(torch.rand(48, generator=g, dtype=torch.float64) ** (2 + 4 * s),
                                     descending=True).values) for s in range(3)}
    weights = {s: float(torch.rand((), generator=g)) * 10 ** s for s in range(3)}
    total = 3 * 16.0 + float(torch.randint(0, 40, (), generator=g))
    chosen = spend(fronts, weights, total)
    cost = lambda pick: sum(weights[s] * pt[1] for s, pt in pick.items())  # noqa: E731
    assert sum(pt[0] for pt in chosen.values()) <= total
    best = min((dict(enumerate(c)) for c in itertools.product(*fronts.values())
                if sum(pt[0] for pt in c) <= total), key=cost)
    assert cost(chosen) == pytest.approx(cost(best), rel=1e-12)
    equal = {s: max(pt for pt in f if pt[0] <= total / 3) for s, f in fronts.items()}
    assert cost(chosen) <= cost(equal) + 1e-12
    with pytest.raises(ValueError, match="below the cheapest bands of every site"):
        spend(fronts, weights, sum(f[0][0] for f in fronts.values()) - 1)


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
    with compressed(m, proj, "eager") as cm, torch.no_grad():
        kvfx.counters.clear()
        out = cm.generate(ids, max_new_tokens=6, do_sample=False)
        assert kvfx.counters["kvfx"]["lowbit_decode"] >= 2
    ref = reference_model(m, proj, quantize=proj.quantize)
    seq = ids
    with torch.no_grad():
        for _ in range(out.shape[1] - ids.shape[1]):
            seq = torch.cat([seq, ref(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_e8_bands_through_the_cache_and_the_decode_step(setup):
    """allocate_bits with e8 in int2's place: formats with e8 bands, the budget's bytes in the cache, the cache's
    rows what the plain path rounds to, the float64 reference's numbers, greedy tokens through the decode step."""
    m, stats, full = setup
    proj = kvfx.allocate_bits(stats, full, 0.125, levels=(8, 5, 4, 3, "e8"))
    formats = proj.quantize
    assert any("e8x" in f for f in formats.values()) and proj.kv_fraction(formats) <= 0.125
    x = model_inputs(m, tokens=10)
    with compressed(m, proj) as cm, torch.no_grad():
        cache = kvfx.make_cache(cm)
        via_cache = cm(x, **{cache_kwarg(cm): cache}, use_cache=True).logits
        plain = cm(x, use_cache=False).logits
        assert rel_err(via_cache, plain) < 1e-5
        assert cache.nbytes() / (2 * 2 * 2 * 32 * 10 * 2) == pytest.approx(proj.kv_fraction(formats))
        ids = model_inputs(m, tokens=6)
        out = cm.generate(ids, max_new_tokens=6, do_sample=False)
    assert rel_err(plain, run(reference_model(m, proj, quantize=formats), x, use_cache=False)) < 1e-3
    ref, seq = reference_model(m, proj, quantize=formats), ids
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
    for bad in (0, 0.0, 1.5, -0.5, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="rounding_weight must be in \\(0, 1\\]"):
            kvfx.allocate_bits(stats, full, 0.25, rounding_weight=bad)
    cheap = kvfx.allocate_bits(stats, full, 0.125, rounding_weight=0.5)
    plain = kvfx.allocate_bits(stats, full, 0.125)
    assert cheap.report["bits"]["rounding_weight"] == 0.5 and plain.report["bits"]["rounding_weight"] == 1.0
    assert cheap.kv_fraction(cheap.quantize) <= 0.125
    assert sum(p.key_rank for p in cheap.sites.values()) >= sum(p.key_rank for p in plain.sites.values())
    for bad in ((4, 8), (8, 6), (), (8, 8, 2), (8, 2, "e8"), (8, "e4")):
        with pytest.raises(ValueError, match="levels must be distinct band formats"):
            kvfx.allocate_bits(stats, full, 0.25, levels=bad)
    old = kvfx.allocate_bits(stats, full, 0.25, levels=(8, 4, 2))  # the allocation before int3 existed
    assert old.report["bits"]["formats"] == [8, 4, 2] and all("int3" not in f for f in old.quantize.values())
    proj = kvfx.allocate_bits(stats, full, 0.25)
    assert proj.report["bits"]["formats"] == [8, 5, 4, 3, 2]
    other = {n: "int4x8" for n in proj.sites}  # a format for another width: refused before anything is applied
    forward = m.forward
    with pytest.raises(ValueError, match="spans 8 latent columns"):
        kvfx.compress(torch.compile(m, backend="eager"), proj, quantize=other)
    assert getattr(m, "_kvfx", None) is None and m.forward == forward


def test_measured_profile_moves_bytes_between_layers(setup):
    """With a sensitivity profile, a layer whose cuts cost the model more KL gets more bytes; the cache holds the
    budget in total."""
    m, stats, full = setup
    names = list(full.sites)
    plain = kvfx.allocate_bits(stats, full, 0.125)
    width = full.sites[names[0]].key_rank
    probes = {int(width * 0.75): 1.0, int(width * 0.875): 0.5, width: 0.0}
    profile = {"base": 0.0, "sites": {n: {"latent": {r: kl * (100 if n == names[0] else 1) for r, kl in probes.items()}}
                                      for n in names}}
    proj = kvfx.allocate_bits(stats, full, 0.125, profile=profile)
    rows, before = proj.report["bits"]["row_bytes"], plain.report["bits"]["row_bytes"]
    assert rows[names[0]] > before[names[0]] and rows[names[1]] < before[names[1]]
    assert proj.kv_fraction(proj.quantize) <= 0.125 and proj.report["bits"]["across_sites"]
    x = model_inputs(m, tokens=10)
    with compressed(m, proj) as cm, torch.no_grad():
        cache = kvfx.make_cache(cm)
        cm(x, **{cache_kwarg(cm): cache}, use_cache=True)
    assert cache.nbytes() / (2 * 2 * 2 * 32 * 10 * 2) == pytest.approx(proj.kv_fraction(proj.quantize))


def test_real_profile_and_bad_profiles(setup):
    m, stats, full = setup
    windows = [model_inputs(m, tokens=16, seed=s) for s in range(2)]
    # the tiny model's K+V (width 128) span its 64 hidden numbers: the last directions carry nothing to cut
    flat = kvfx.sensitivity(m, full, windows, ranks=(0.75, 0.875, 1.0), progress=False)
    with pytest.raises(ValueError, match="no KL at its two least-cut ranks .* probe lower ranks"):
        kvfx.allocate_bits(stats, full, 0.25, profile=flat)
    profile = kvfx.sensitivity(m, full, windows, ranks=(0.25, 0.375, 1.0), progress=False)
    proj = kvfx.allocate_bits(stats, full, 0.25, profile=profile)
    assert proj.kv_fraction(proj.quantize) <= 0.25 and proj.report["bits"]["across_sites"]
    with pytest.raises(ValueError, match="does not cover these projections' sites"):
        kvfx.allocate_bits(stats, full, 0.25, profile={"base": 0.0, "sites": {}})
    other = {"base": 0.0, "sites": {n: {"key": {8: 1.0}, "value": {8: 1.0}} for n in full.sites}}
    with pytest.raises(ValueError, match="no cut latent ranks"):
        kvfx.allocate_bits(stats, full, 0.25, profile=other)


def test_exact_rows_are_reserved_from_the_budget(setup):
    """exact=(sinks, recent): the formats carry the suffix, the codes get the budget less the exact rows' bytes at
    `context` tokens, and a cache of that many tokens holds no more than the budget — the rows really exact."""
    m, stats, full = setup
    plain = kvfx.allocate_bits(stats, full, 0.25)
    proj = kvfx.allocate_bits(stats, full, 0.25, exact=(1, 2), context=64)
    assert all(f.endswith("|sinks1|recent2") for f in proj.quantize.values())
    exact = proj.report["bits"]["exact"]["bytes_per_token"]
    widths = {n: p.key_rank for n, p in proj.sites.items()}
    assert exact == {n: math.ceil(2 * w * 4 / 64) for n, w in widths.items()}  # 16 bits × width × 4 slots / 64 tokens
    assert sum(proj.report["bits"]["row_bytes"].values()) < sum(plain.report["bits"]["row_bytes"].values())
    x = model_inputs(m, tokens=64)
    with compressed(m, proj) as cm, torch.no_grad():
        cache = kvfx.make_cache(cm)
        cm(x, **{cache_kwarg(cm): cache}, use_cache=True)
    full16 = 2 * 2 * 2 * 32 * 64 * 2
    assert cache.nbytes() / full16 == pytest.approx(proj.kv_fraction(proj.quantize, context=64))
    assert cache.nbytes() / full16 <= 0.25 < proj.kv_fraction(proj.quantize, context=16)  # counted at 64 tokens
    with pytest.raises(ValueError, match="give the context"):
        kvfx.allocate_bits(stats, full, 0.25, exact=(4, 0))
    with pytest.raises(ValueError, match="of them its exact rows'.*keep fewer exact rows"):
        kvfx.allocate_bits(stats, full, 0.05, exact=(4, 32), context=8)
    with pytest.raises(ValueError, match="exact must be"):
        kvfx.allocate_bits(stats, full, 0.25, exact=4, context=8)

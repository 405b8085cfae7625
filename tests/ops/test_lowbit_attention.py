"""kvfx::decode_attention (the C++ CPU kernel) against its plain-torch reference (dequantise the whole cache, then
SDPA), and the decode pass calling it on the stored codes of kvfx's low-bit cache."""
import concurrent.futures
import copy
import platform

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvfx
from helpers import VOCAB, random_projections, tiny_llama
from kvfx import quant
from kvfx.compress import cache_kwarg
from kvfx.ops import lowbit_attention as la

pytestmark = pytest.mark.usefixtures("one_thread")
FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The integer path (lowbit_attention.cpp, AMX): each query row, times the softmax scale, is rounded to integers
# |x| <= Q (one scale per row: max |scale·q| / Q; Q = 32512 for int8 rows and the columns of an int8 band, 2032 for
# int4 rows and the columns of int4 / int2 bands); the value sums' weights p·s_v to 0 <= x <= 32512 of their
# largest per block (two digits, 16 bits). Nothing else is rounded.
Q_STEPS = {8: 32512, 5: 32512, 4: 2032, 3: 2032, 2: 2032}
W_STEPS = 32512
# The AVX2 integer path (lowbit_attention_avx2i.h, opt-in: KVFX_AVX2_INTEGER=1, which the `integer` fixture sets;
# int4 / int3 / int2 rows and bands without an int8 band): the query
# rounded per group of 32 columns of a band to |x| <= 127 (scale: the group's max |scale·q| / 127), the weights p·s_v
# to 0 <= x <= 255 of their largest per block (8 bits).
AVX2_Q, AVX2_W = 127, 255


def _query_steps(kind, width):
    """Q of each of the row's columns (above), float64 [width]."""
    return torch.cat([torch.full((w,), float(Q_STEPS[fmt.bits]), dtype=torch.float64)
                      for fmt, w in quant.layout(kind, width)])


def _exact(q, k, v, scale, mask):
    """float64 softmax(scale·q·kᵀ + mask) and its output."""
    s = scale * q.double() @ k.transpose(-1, -2)
    if mask is not None:
        s = s + la._additive(mask, k.shape[2]).double()[:, None, None, :]
    p = torch.softmax(s, -1)
    return p, p @ v


def _rounded_query(q, steps, scale):
    """scale·q rounded to |x| <= steps (a number, or one per column) per row as the integer path does (float32 like
    the kernel, half to even like VCVTPS2DQ), in float64."""
    amax = q.abs().amax(-1, keepdim=True) * abs(scale)
    steps = torch.as_tensor(steps, dtype=torch.float64)
    inv = torch.where(amax > 0, scale * steps.float() / amax, torch.zeros_like(amax)).float()
    return torch.round(q.float() * inv).double() * (amax.double() / steps)


def _column_scales(stored, width, kind):
    """Each stored number's scale 2^(e/8), [..., width] (kvfx/quant.py; per band)."""
    bands = quant.layout(kind, width)
    out = []
    for part, (fmt, w) in zip(stored.split([fmt.row_bytes(w) for fmt, w in bands], -1), bands):
        e = part[..., fmt.code_bytes(w):].double()
        out.append(torch.exp2(e / quant.SCALE_STEPS).repeat_interleave(fmt.group or w, -1)[..., :w])
    return torch.cat(out, -1)


def _groups(kind, width):
    """The AVX2 path's query groups: (first, end) columns of every 32 columns of each band."""
    out, col = [], 0
    for _, w in quant.layout(kind, width):
        out += [(col + a, col + min(a + 32, w)) for a in range(0, w, 32)]
        col += w
    return out


def _group_amax(q, kind, width, scale):
    """max |scale·q| over each column's AVX2 query group, float32 [..., width] (what the kernel divides by)."""
    v = (scale * q).float()
    return torch.cat([v[..., a:b].abs().amax(-1, keepdim=True).expand(*v.shape[:-1], b - a)
                      for a, b in _groups(kind, width)], -1)


def _rounded_query_avx2(q, kind, width, scale):
    """scale·q rounded per group as the AVX2 path does (float32: x = round(v · (127 / amax)), half to even), in
    float64."""
    v, amax = (scale * q).float(), _group_amax(q, kind, width, scale)
    inv = torch.where(amax > 0, AVX2_Q / amax, torch.zeros_like(amax))
    return torch.round(v * inv).double() * (amax.double() / AVX2_Q)


def _weight_bound_avx2(p, v, sv):
    """|Δout| from the AVX2 path's weights: each w = p·s_v rounds to 8 bits of its block's largest, off by at most
    min(w, max w / 510) (a weight under half a step becomes 0), times the code it multiplies (|v / s_v|)."""
    w = p[..., :, None] * sv[:, :, None]  # [b, h, g, n, c]
    err = torch.minimum(w, w.amax(-2, keepdim=True) / (2 * AVX2_W))
    return (err * (v.abs() / sv)[:, :, None]).sum(-2)


def _weight_bound(p, v, sv):
    """|Δout| from the weights' rounding: each weight w = p·s_v is off by at most max w / (2·32512), and an output
    column sums codes v / s_v with them: <= max_n(p_n·s_v,n) · sum_n |v_n / s_v,n| / 65024 (p = the softmax)."""
    return (p[..., :, None] * sv[:, :, None]).amax(-2) * (v.abs() / sv).sum(-2)[:, :, None, :] / (2 * W_STEPS)


def _integer_bound(q, kc, vc, rk, rv, kind, scale, mask, shared, rounding="amx", exact=None):
    """(exact output, bound on |kernel - exact|) of the integer path, float64. The query's rounding (at most half a
    step, max |scale·q_g| / (2Q), per number) moves each score by at most d_gn = step_g/2 · ||k_n||_1, and the
    softmax's output by at most 2·D·sum_n p_n |v_n - out| (first order, D = max_n d_gn; times e^(2D) for the rest);
    plus the weights' rounding (_weight_bound) and float32 round-off. exact: (keys, values, positions) of exact rows,
    which stand for their codes' rows and are not rounded (their d and weights' error are 0)."""
    rv = rk if shared else rv
    k = quant.dequantize(kc, torch.float64, rk, kind)
    v = k if shared else quant.dequantize(vc, torch.float64, rv, kind)
    held = torch.zeros(k.shape[2], dtype=torch.bool)
    kx, vx = k, v
    if exact is not None:
        ek, ev, pos = exact
        kx = la._put_exact(k.clone(), ek, pos)
        vx = kx if shared else la._put_exact(v.clone(), ev, pos)
        held[pos[(pos >= 0) & (pos < k.shape[2])]] = True
    p, out = _exact(q, kx, vx, scale, mask)
    pc = p.masked_fill(held, 0.0)  # the code rows' weights
    sv = _column_scales(kc if shared else vc, rv, kind)
    if rounding == "avx2":  # half a step of each column's group: max |scale·q| over it / 127
        half = _group_amax(q, kind, rk, scale).double() / (2 * AVX2_Q)
        d = half @ k.abs().transpose(-1, -2)
        weights = _weight_bound_avx2(pc, v, sv)
    else:
        amax = (scale * q.double()).abs().amax(-1, keepdim=True)
        d = amax / 2 * (k.abs() / _query_steps(kind, rk)).sum(-1)[:, :, None, :]
        weights = _weight_bound(pc, v, sv)
    d = torch.where(pc > 0, d, torch.zeros_like(p)).amax(-1, keepdim=True)
    spread = (p[..., None] * (vx[:, :, None] - out[:, :, :, None]).abs()).sum(-2)
    bound = 2 * d * spread * torch.exp(2 * d) + weights
    return out, bound + 1e-5 * max(1.0, out.abs().max().item())


def _assert_matches(out, q, kc, vc, rk, rv, kind, scale, mask, shared, rounding=None, exact=None, rtol=1e-5):
    """The op against the plain-torch reference: float32 round-off (`rtol` of the output's size: the kernel folds
    the scale into q and sums in another order than SDPA), or, for rows on an integer path (`rounding`, default this
    CPU's), the bound of its rounding (_integer_bound: AMX ~1e-3 (int4) / ~1e-4 (int8) of the output's size on these
    inputs, far below the cache's own rounding; AVX2 coarser, still below it). exact: (keys, values, positions)."""
    ref = la.reference(q, kc, vc, rk, rv, kind, scale, mask, shared, *(exact or ()))
    assert out.shape == ref.shape and out.dtype == ref.dtype
    rounding = rounding or la.integer_rounding("cpu")
    if la.takes_integer_path(rounding, kind):
        _, bound = _integer_bound(q, kc, vc, rk, rv, kind, scale, mask, shared, rounding, exact)
        err = (out.double() - ref.double()).abs()
        assert (err <= bound).all(), f"{(err / bound).max().item():.3g} x the bound"
    else:
        torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * max(1.0, ref.abs().max().item()))


def test_kernel_builds_here():
    """CI has a compiler and ninja: the kernel, not the reference fallback, is what runs."""
    assert la.kernel_available("cpu")


def _case(b, h, g, n, rk, rv, kind, mask, shared, seed):
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(b, h, n, rk, generator=gen) * 3, torch.randn(b, h, n, rv, generator=gen)
    if kind in FLOATS:  # 16/32-bit latents, read as stored
        kc, vc = k.to(FLOATS[kind]), v.to(FLOATS[kind])
    else:
        kc, vc = quant.quantize(k, kind), quant.quantize(v, kind)
    q = torch.randn(b, h, g, rk, generator=gen)
    m = None
    if mask == "bool":
        m = torch.rand(b, 1, 1, n, generator=gen) > 0.3
        m[..., 0] = True  # at least one visible key per row
    elif mask == "float":
        m = torch.randn(1, 1, 1, n, generator=gen)
    return q, kc, vc, m


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), g=st.integers(1, 9), n=st.integers(1, 700),
       rk=st.integers(1, 70), rv=st.integers(1, 70), kind=st.sampled_from(["int8", "int4", *FLOATS]),
       mask=st.sampled_from([None, "bool", "float"]), shared=st.booleans(), seed=st.integers(0, 99))
def test_kernel_matches_reference(b, h, g, n, rk, rv, kind, mask, shared, seed):
    q, kc, vc, m = _case(b, h, g, n, rk, rv, kind, mask, shared, seed)
    kind = "float" if kind in FLOATS else kind
    out = torch.ops.kvfx.decode_attention(q, kc, vc, rk, rv, kind, 0.125, m, shared)
    assert out.shape == (b, h, g, rk if shared else rv)
    _assert_matches(out, q, kc, vc, rk, rv, kind, 0.125, m, shared)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), g=st.integers(1, 9), n=st.integers(1, 300),
       rk=st.sampled_from([16, 32, 48, 64, 96]), rv=st.sampled_from([16, 32, 64]), mask=st.sampled_from([None, "bool", "float"]),
       spare=st.booleans(), seed=st.integers(0, 99))
def test_int4_rows_decoded_in_registers(b, h, g, n, rk, rv, mask, spare, seed):
    """int4 keys and values in their own rows, widths multiples of 16 — per-head latents at rank 16, 32, … — take
    the AVX2 build's in-register path (lowbit_attention_avx2_int4.h: no decoded buffer; AMX CPUs: the integer path,
    within its bound; others: the float path): the reference's numbers to float32 round-off, for any row count (a
    last tile of fewer than 4 rows, read from a copy: with `spare` False the rows end where their storage does),
    masks and query groups."""
    q, kc, vc, m = _case(b, h, g, n + (5 if spare else 0), rk, rv, "int4", mask, False, seed)
    kc, vc = kc[:, :, :n], vc[:, :, :n]
    m = None if m is None else m[..., :n].contiguous()
    if m is not None and m.dtype == torch.bool:
        m[..., 0] = True
    out = torch.ops.kvfx.decode_attention(q, kc, vc, rk, rv, "int4", 0.125, m, False)
    _assert_matches(out, q, kc, vc, rk, rv, "int4", 0.125, m, False)


def test_int4_rows_in_registers_skip_exact_rows(monkeypatch):
    """Exact rows beside int4 codes of widths 64 / 32: their codes are skipped there too."""
    monkeypatch.setenv("KVFX_NO_AMX", "1")
    q, kc, vc, m = _case(2, 2, 3, 300, 64, 32, "int4", "bool", False, 5)
    ek, ev, pos = _exact_rows(2, 2, 300, 64, 32, 17, 5)
    out = torch.ops.kvfx.decode_attention(q, kc, vc, 64, 32, "int4", 0.125, m, False, ek, ev, pos)
    ref = la.reference(q, kc, vc, 64, 32, "int4", 0.125, m, False, ek, ev, pos)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))


@settings(max_examples=40, deadline=None)
@given(g=st.integers(1, 9), n=st.integers(1, 400),
       widths=st.lists(st.one_of(st.integers(1, 140), st.integers(1, 8).map(lambda x: 16 * x)), min_size=1,
                       max_size=3),
       bits=st.lists(st.sampled_from([8, 5, 4, 3, 2]), min_size=3, max_size=3), rv=st.integers(1, 70),
       mask=st.sampled_from([None, "bool"]), shared=st.booleans(), seed=st.integers(0, 99))
def test_bands_and_int2_rows_match_reference(g, n, widths, bits, rv, mask, shared, seed):
    """Bits per direction (kvfx.quant bands: int8 / int5 / int4 / int3 / int2 runs of columns in one row) and whole
    int2 rows: on the integer path (AMX, AVX-512 VNNI; int3 / int5 runs of whole 16-column runs transcoded, others on
    the float path) within the bound of its rounding, elsewhere
    (each band decoded in column order) the
    reference's numbers to float32 round-off. Widths cross group ends (32), 64-column int8 units and the 64-number
    int2 vectors."""
    kind = "+".join(f"int{b}x{w}" for b, w in zip(bits, widths))
    rk = sum(widths)
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, 1, n, rk, generator=gen) * 3, torch.randn(2, 1, n, rv, generator=gen)
    kc, vc = quant.quantize(k, kind), quant.quantize(v, "int2")
    q = torch.randn(2, 1, g, rk, generator=gen)
    m = None if mask is None else torch.rand(2, 1, 1, n, generator=gen) > 0.3
    if m is not None:
        m[..., 0] = True
    if not shared:  # keys and values in different formats: check each side through a one-format call
        out = torch.ops.kvfx.decode_attention(q, kc, kc, rk, rk, kind, 0.125, m, False)
        _assert_matches(out, q, kc, kc, rk, rk, kind, 0.125, m, False)
        q2 = torch.randn(2, 1, g, rv, generator=gen)
        out = torch.ops.kvfx.decode_attention(q2, vc, vc, rv, rv, "int2", 0.125, m, False)
        _assert_matches(out, q2, vc, vc, rv, rv, "int2", 0.125, m, False)
    else:
        out = torch.ops.kvfx.decode_attention(q, kc, kc, rk, rk, kind, 0.125, m, True)
        _assert_matches(out, q, kc, kc, rk, rk, kind, 0.125, m, True)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_portable_path_matches_reference(kind, monkeypatch):
    """KVFX_NO_AMX=1: int8 / int4 rows decoded to float32 (the path of CPUs without AMX), the reference's numbers to
    float32 round-off."""
    monkeypatch.setenv("KVFX_NO_AMX", "1")
    assert not la.integer_path("cpu")
    for i, (g, n, rk, rv, shared, mask) in enumerate([(9, 700, 70, 70, True, "bool"), (3, 300, 33, 17, False, None),
                                                      (20, 40, 5, 64, False, "float")]):
        q, kc, vc, m = _case(2, 2, g, n, rk, rv, kind, mask, shared, i)
        out = torch.ops.kvfx.decode_attention(q, kc, vc, rk, rv, kind, 0.125, m, shared)
        ref = la.reference(q, kc, vc, rk, rv, kind, 0.125, m, shared)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))


PORTABLE_ARCHS = ("x86-64-v2", "x86-64-v3")


@pytest.fixture(scope="module")
def portable_builds():
    """Both builds at once (one compiler process each: two cores build them in the time of one)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 build flags")
    with concurrent.futures.ThreadPoolExecutor(len(PORTABLE_ARCHS)) as pool:
        builds = {arch: pool.submit(la._build, arch) for arch in PORTABLE_ARCHS}
    return {arch: build.result() for arch, build in builds.items()}


@pytest.mark.parametrize("arch", PORTABLE_ARCHS)
def test_portable_build_matches_reference(arch, portable_builds, monkeypatch):
    """The file built for a CPU without AVX-512 and AMX, every row kind, decoded to float32 (KVFX_NO_AMX=1): the
    reference's numbers (float32 round-off). x86-64-v2: the plain-C++ loops; x86-64-v3: the AVX2 + FMA code (AMD
    Zen 1-3, Intel before AVX-512: 8-float registers, scores in tiles of 3 query rows × 4 key rows). A module per
    arch, built once and cached."""
    ext = portable_builds[arch]
    monkeypatch.setenv("KVFX_NO_AMX", "1")
    assert not ext.integer_path()
    for i, kind in enumerate(["int8", "int4", "int2", "int8x6+int4x32+int2x32", "int4x16+int3x70", "int5",
                              "int8x16+int5x45+int4x32+int3x16", *FLOATS]):
        out, ref, _ = _run_build(ext, kind, i)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))
    q, kc, vc, m = _case(2, 2, 9, 301, 64, 32, "int4", "bool", False, 9)  # x86-64-v3: int4 decoded in registers
    out = ext.decode_attention(q, kc, vc, 64, 32, 4, 0.125, m.reshape(2, 301), False, [], [], la._scales(), None,
                               None, None)
    ref = la.reference(q, kc, vc, 64, 32, "int4", 0.125, m, False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))
    q, kc, vc, m = _case(2, 2, 9, 300, 70, 45, "int4", "bool", False, 7)  # exact rows beside the codes
    ek, ev, pos = _exact_rows(2, 2, 300, 70, 45, 37, 7)
    out = ext.decode_attention(q, kc, vc, 70, 45, 4, 0.125, m.reshape(2, 300), False, [], [], la._scales(), ek, ev, pos)
    ref = la.reference(q, kc, vc, 70, 45, "int4", 0.125, m, False, ek, ev, pos)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))
    for kind, width in DEQUANT_CASES:  # the cache's prefill read, with this build's decoders
        stored = _stored_view(kind, width, seed=width)
        bits = la._BITS.get(kind, -1)
        spec = list(la._band_spec(kind, width)) if bits < 0 else []
        _check_dequantized(ext.dequantize_rows(stored, width, bits, spec, la._scales()), stored, width, kind)
        x = torch.randn(2, 50, width, generator=torch.Generator().manual_seed(width)) * torch.logspace(0, -2, width)
        assert torch.equal(ext.quantize_rows(x, width, bits, spec, la._scales(), la._scales(-1)),
                           torch.ops.kvfx.quantize(x, kind))  # the prefill's write: this build's encoder (plain C++)


def _run_build(ext, kind, i):
    """One call of a build's kernel on _case's inputs (shared latents for even i) and the reference's output."""
    shared = i % 2 == 0
    rk = quant.width_of(kind) if "x" in kind else 70
    rv = rk if "x" in kind else 45  # bands: one format for keys and values
    q, kc, vc, m = _case(2, 2, 9, 300, rk, rv, kind, "bool", shared, i)
    kind = "float" if kind in FLOATS else kind
    bits = la._BITS.get(kind, -1)
    out = ext.decode_attention(q, kc, vc, rk, rv, bits, 0.125, m.reshape(2, 300), shared,
                               list(la._band_spec(kind, rk)) if bits < 0 else [],
                               list(la._band_spec(kind, rv)) if bits < 0 else [], la._scales(), None, None, None)
    return out, la.reference(q, kc, vc, rk, rv, kind, 0.125, m, shared), (q, kc, vc, rk, rv, kind, m, shared)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def test_integer_builds_compile_for_other_cpus(monkeypatch):
    """The integer path's two builds whatever this CPU is: Sapphire Rapids (the tile unit with the VNNI blocks) and
    Ice Lake server (AVX-512 VNNI without AMX: the VNNI blocks alone) compile and load; where this CPU runs Ice Lake's
    instructions (Zen 4 has them) that build takes the VNNI path (integer_path 3), rounding as documented."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 build flags")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        builds = {arch: pool.submit(la._build, arch) for arch in ("sapphirerapids", "icelake-server")}
    builds = {arch: build.result() for arch, build in builds.items()}
    if not {"avx512_vnni", "avx512vbmi", "avx512_vbmi2", "gfni", "avx512_bitalg", "avx512ifma"} <= _cpu_flags():
        return  # built and loaded; this CPU cannot run Ice Lake's code
    ext = builds["icelake-server"]
    monkeypatch.delenv("KVFX_NO_AMX", raising=False)
    monkeypatch.delenv("KVFX_NO_VNNI", raising=False)
    assert ext.integer_path() == 3
    for i, kind in enumerate(["int4", "int8", "int8x16+int5x32+int3x32+int2x16", "int4x16+int3x70"]):
        out, ref, (q, kc, vc, rk, rv, kind, m, shared) = _run_build(ext, kind, i)
        assert la.takes_integer_path("vnni", kind) == (i < 3)
        if la.takes_integer_path("vnni", kind):
            _assert_matches(out, q, kc, vc, rk, rv, kind, 0.125, m, shared, rounding="vnni")
            assert not torch.allclose(out, ref, rtol=1e-6, atol=1e-6)  # rounded, not decoded
        else:  # an int3 band not of whole 16-column runs: decoded to float32
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))


def test_avx2_build_takes_its_integer_path(portable_builds, monkeypatch):
    """The x86-64-v3 build on its own (any x86 CPU with AVX2, whatever this one has), KVFX_AVX2_INTEGER=1: int4 /
    int3 / int2 rows and bands without an int8 band take the AVX2 integer path, within the bound of its rounding;
    int8 rows and bands with an int8 band the float path, the reference's numbers. Without the variable: none."""
    ext = portable_builds["x86-64-v3"]
    monkeypatch.delenv("KVFX_NO_AMX", raising=False)
    monkeypatch.delenv("KVFX_AVX2_INTEGER", raising=False)
    assert ext.integer_path() == 0  # opt-in: its 8-bit roundings move outputs ~10x more than AMX's
    monkeypatch.setenv("KVFX_AVX2_INTEGER", "1")
    assert ext.integer_path() == 2
    for i, kind in enumerate(["int4", "int2", "int3", "int4x16+int3x70", "int4x40+int2x24", "int8", "int8x6+int4x32",
                              "int5x40+int4x32"]):
        out, ref, (q, kc, vc, rk, rv, kind, m, shared) = _run_build(ext, kind, i)
        if la.takes_integer_path("avx2", kind):
            _assert_matches(out, q, kc, vc, rk, rv, kind, 0.125, m, shared, rounding="avx2")
            assert not torch.allclose(out, ref, rtol=1e-5, atol=1e-5)  # rounded, not decoded
        else:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))


# kinds × widths for kvfx::dequantize: int4 groups cut short, one column, int2 and bands with partial groups
DEQUANT_CASES = [("int8", 192), ("int8", 7), ("int4", 360), ("int4", 45), ("int4", 1), ("int2", 70),
                 ("int8x6+int4x32+int2x32", 70), ("int8x16+int4x16", 32), ("int3", 70),
                 ("int8x16+int4x32+int3x48+int2x16", 112), ("int5", 70), ("int8x16+int5x48+int4x32+int2x16", 112),
                 ("e8", 64), ("int8x16+e8x40+int2x8", 64)]


def _stored_view(kind, width, seed):
    """quantized rows [2, 3, 50, row bytes] as the cache holds them: a [:, :, :50] view of a larger storage."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 50, width, generator=gen) * torch.rand(width, generator=gen) * 3
    rows = quant.quantize(x, kind)
    storage = torch.zeros(2, 3, 80, rows.shape[-1], dtype=torch.int8)
    storage[:, :, :50] = rows
    return storage[:, :, :50]


def _check_dequantized(out, stored, width, kind):
    """The C++ dequantisation against quant.dequantize: the scales are torch's vectorised exp2 (la._scales), so the
    numbers agree bit for bit except where torch's own exp2 ran its scalar tail (last-bit differences)."""
    ref = quant.dequantize(stored.contiguous(), torch.float32, width, kind)
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=2.5e-7, atol=0)
    assert (out == ref).float().mean() > 0.9


@pytest.mark.parametrize("kind,width", DEQUANT_CASES)
def test_dequantize_reads_strided_rows_in_column_order(kind, width):
    if not la.kernel_available("cpu"):
        pytest.skip("no C++ compiler: kvfx::dequantize runs quant.dequantize itself")
    stored = _stored_view(kind, width, seed=width)
    _check_dequantized(torch.ops.kvfx.dequantize(stored, width, kind, torch.float32), stored, width, kind)
    half = torch.ops.kvfx.dequantize(stored, width, kind, torch.bfloat16)
    assert torch.equal(half, torch.ops.kvfx.dequantize(stored, width, kind, torch.float32).bfloat16())
    with pytest.raises(RuntimeError, match="rows of"):
        la._extension().dequantize_rows(stored[..., 1:], width, la._BITS.get(kind, -1),
                                        list(la._band_spec(kind, width)) if kind not in la._BITS else [], la._scales())


@pytest.mark.parametrize("kind,width", DEQUANT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_adds_the_offset_then_rounds_once(kind, width, dtype):
    """With an offset (the latent the rows were rounded around), each number is the float32 decoded one plus the
    offset, rounded once to the model's dtype (in the reader for float32 / bfloat16, by a cast for others), on
    strided rows; held exact rows get the offset too."""
    if not la.kernel_available("cpu"):
        pytest.skip("no C++ compiler: kvfx::dequantize runs quant.dequantize itself")
    stored = _stored_view(kind, width, seed=width)
    offset = torch.randn(stored.shape[1], 1, width, generator=torch.Generator().manual_seed(3))
    plain = torch.ops.kvfx.dequantize(stored, width, kind, torch.float32)
    out = torch.ops.kvfx.dequantize(stored, width, kind, dtype, None, None, offset)
    assert out.dtype == dtype and out.shape == plain.shape and out.is_contiguous()
    assert torch.equal(out, (plain + offset).to(dtype))
    rows = torch.randn(*stored.shape[:2], 2, width).half()
    out = torch.ops.kvfx.dequantize(stored, width, kind, dtype, rows, torch.tensor([1, -1]), offset)
    want = (plain + offset).to(dtype)
    want[:, :, 1] = (rows[:, :, 0].float() + offset[:, 0]).to(dtype)
    assert torch.equal(out, want)


def test_dequantize_rounds_to_bfloat16_as_torch_does():
    """The reader's bfloat16 rounding (ties to even, NaN and infinities kept) is torch's: zero rows plus offsets
    that sit on rounding ties, next to them, and at the ends of the range."""
    if not la.kernel_available("cpu"):
        pytest.skip("no C++ compiler: kvfx::dequantize runs quant.dequantize itself")
    one = torch.tensor(1.0).view(torch.int32).item()
    bits = torch.tensor([one + 0x8000, one + 0x18000, one + 0x7FFF, one + 0x8001, 0x7F7FFFFF, 0x7F7F8000, 1, 0x8000],
                        dtype=torch.int32)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 3.0e38, -1e-40])
    offset = torch.cat([bits.view(torch.float32), -bits.view(torch.float32), special, torch.randn(14)])  # 36 numbers
    stored = quant.quantize(torch.zeros(1, 1, 5, 36), "int8")
    out = torch.ops.kvfx.dequantize(stored, 36, "int8", torch.bfloat16, None, None, offset.view(1, 1, 36))
    want = offset.bfloat16().expand(1, 1, 5, 36)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.nan_to_num(), want.nan_to_num())


# (g, n, rk, rv, shared, mask): widths across int4 groups and int8 64-column chunks, odd ones, more than 16 query
# rows (two row blocks of tiles), several row blocks and a ragged last one, masks
ROUNDING_CASES = [(9, 300, 360, 360, True, None), (3, 40, 32, 32, False, "bool"), (20, 150, 70, 9, False, "float"),
                  (1, 129, 65, 130, False, None), (16, 64, 1, 33, False, "bool")]


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("case", ROUNDING_CASES)
def test_integer_path_rounds_only_the_query_and_the_weights(kind, case, integer):
    """The integer path against float64 attention with the query rounded as documented (AMX: Q_STEPS a row; AVX2:
    127 steps a 32-column group): what is left is the weights' rounding, so a query quantised wrongly (a lost digit,
    columns out of order, a wrong scale) fails: a query rounded more coarsely (AMX: to 8 bits; AVX2: one scale a
    row) fails the same tolerance."""
    if not la.integer_path("cpu", kind):
        pytest.skip(f"{kind} rows take no integer path on this CPU")
    g, n, rk, rv, shared, mask = case
    q, kc, vc, m = _case(1, 2, g, n, rk, rv, kind, mask, shared, 4)
    out = torch.ops.kvfx.decode_attention(q, kc, vc, rk, rv, kind, 0.125, m, shared)
    _assert_rounds_as_documented(out, q, kc, vc, rk, rv, kind, 0.125, m, shared, coarser=rk > _coarser_from(integer))



@pytest.fixture
def integer(monkeypatch):
    """The integer path this CPU has, turned on (AVX2's is opt-in); skips where there is none."""
    monkeypatch.setenv("KVFX_AVX2_INTEGER", "1")
    if not la.integer_path("cpu"):
        pytest.skip("no integer path on this CPU (AMX-INT8, or AVX2 without AVX-512)")
    return la.integer_rounding("cpu")


def _coarser_from(rounding):
    """Widths from which a coarser query rounding shows beyond the weights' tolerance (AVX2: its 8-bit weights allow
    more error than one query scale a row adds to a narrow row; a row of one 32-column group rounds as documented)."""
    return 100 if rounding == "avx2" else 1



def _assert_rounds_as_documented(out, q, kc, vc, rk, rv, kind, scale, mask, shared, rounding=None, coarser=False):
    """out against float64 attention with the query rounded as documented: what is left is the weights' rounding
    (_weight_bound / _weight_bound_avx2). coarser: also check that a query rounded more coarsely than documented
    (AMX: 8 bits a row; AVX2: 127 steps of the row's largest, not of each group's) misses that tolerance."""
    rounding = rounding or la.integer_rounding("cpu")
    k = quant.dequantize(kc, torch.float64, rk, kind)
    v = k if shared else quant.dequantize(vc, torch.float64, rv, kind)
    p, exact = _exact(q, k, v, scale, mask)
    sv = _column_scales(kc if shared else vc, rv, kind)
    if rounding == "avx2":
        query, weights = _rounded_query_avx2(q, kind, rk, scale), _weight_bound_avx2(p, v, sv)
        coarse = _rounded_query(q, AVX2_Q, scale)
    else:
        query, weights = _rounded_query(q, _query_steps(kind, rk), scale), _weight_bound(p, v, sv)
        coarse = _rounded_query(q, 127, scale)
    _, rounded = _exact(query, k, v, 1.0, mask)
    tol = weights + 1e-5 * exact.abs().max()
    err = (out.double() - rounded).abs()
    assert (err <= tol).all(), f"{(err / tol).max().item():.3g} x the tolerance"
    if coarser:
        _, wrong = _exact(coarse, k, v, 1.0, mask)
        assert ((wrong - rounded).abs() > tol).any()


# (format, g, n, shared, mask): bands as kvfx.allocate_bits makes them (edges at 16 columns, an int8 band beside
# int4 / int2 ones, partial groups, int3 and int5 bands: on AMX transcoded where their widths are multiples of 16, a
# 160-wide int3 band over two 128-column chunks), int8 bands over several 64-column units, odd widths, whole int2 rows
BAND_CASES = [("int8x48+int4x224+int2x80", 9, 300, True, None), ("int4x16+int2x16", 20, 150, False, "bool"),
              ("int8x130+int2x20", 3, 129, False, "float"), ("int2x100+int4x17", 16, 64, True, "bool"),
              ("int2", 9, 257, False, None), ("int8x7+int4x3+int2x5", 1, 40, True, None),
              ("int4x64+int3x70+int2x128", 9, 300, True, None), ("int3x45+int2x20", 4, 100, False, "bool"),
              ("int8x32+int5x80+int4x64+int2x16", 9, 300, True, None), ("int5x45+int3x20", 4, 100, False, "bool"),
              ("int8x48+int5x32+int4x128+int3x96+int2x48", 9, 300, True, None),
              ("int5x64+int3x160", 4, 100, False, "bool"), ("int3x16+int5x16", 3, 129, False, "float")]


@pytest.mark.parametrize("case", BAND_CASES)
def test_integer_path_rounds_bands_as_documented(case, integer):
    """Bands on the integer path. AMX and AVX-512 VNNI: 4/2-bit units summed as int4 groups (int2 as k = 2q + 1 at half the scale),
    int8 bands as int8 chunks, one query scale per row with the int8 band's columns at 16x the precision of the rest
    (_query_steps). AVX2: every band's groups of 32 as 4-bit codes with an offset (int2 / int3: q + 8, mid-rise), one
    query scale a group. Float64 attention with the query rounded so leaves only the weights' rounding; a query
    rounded more coarsely fails that tolerance."""
    kind, g, n, shared, mask = case
    if not la.integer_path("cpu", kind):
        pytest.skip(f"{kind} takes no integer path on this CPU")
    rk = quant.width_of(kind) or 70
    q, kc, vc, m = _case(1, 2, g, n, rk, rk, kind, mask, shared, 6)
    out = torch.ops.kvfx.decode_attention(q, kc, vc, rk, rk, kind, 0.125, m, shared)
    _assert_rounds_as_documented(out, q, kc, vc, rk, rk, kind, 0.125, m, shared, coarser=rk > _coarser_from(integer))


@pytest.mark.parametrize("case", BAND_CASES)
def test_bands_on_the_float_path_match_reference(case, monkeypatch):
    """KVFX_NO_AMX=1 (CPUs without AMX-INT8): band rows decoded to float32 in column order, the reference's numbers
    to float32 round-off."""
    monkeypatch.setenv("KVFX_NO_AMX", "1")
    kind, g, n, shared, mask = case
    rk = quant.width_of(kind) or 70
    q, kc, vc, m = _case(2, 1, g, n, rk, rk, kind, mask, shared, 7)
    out = torch.ops.kvfx.decode_attention(q, kc, vc, rk, rk, kind, 0.125, m, shared)
    ref = la.reference(q, kc, vc, rk, rk, kind, 0.125, m, shared)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_masked_rows_cost_no_precision(kind, integer):
    """Masked rows (a static cache's empty slots, padding) may hold anything: rows 100x larger than the rest, masked,
    leave the others' weights their 16 bits (each block's weights are rounded against its largest *weight*)."""
    if not la.integer_path("cpu", kind):
        pytest.skip(f"{kind} rows take no integer path on this CPU")
    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn(2, 1, 300, 40, generator=gen), torch.randn(2, 1, 300, 40, generator=gen)
    mask = torch.rand(2, 1, 1, 300, generator=gen) > 0.5
    mask[..., 0] = True
    k, v = [torch.where(mask.reshape(2, 1, 300, 1), x, 100 * x) for x in (k, v)]
    kc, vc = quant.quantize(k, kind), quant.quantize(v, kind)
    q = torch.randn(2, 1, 9, 40, generator=gen)
    out = torch.ops.kvfx.decode_attention(q, kc, vc, 40, 40, kind, 0.2, mask, False)
    _assert_rounds_as_documented(out, q, kc, vc, 40, 40, kind, 0.2, mask, False)


def test_long_context_split_over_chunks_and_threads():
    """Long N: several split-K chunks merged by log-sum-exp, on every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, kc, vc, m = _case(1, 1, 9, 20000, 96, 96, "int4", "bool", True, 0)
        _assert_matches(torch.ops.kvfx.decode_attention(q, kc, vc, 96, 96, "int4", 0.1, m, True), q, kc, vc, 96,
                        96, "int4", 0.1, m, True)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_cache_views_are_read_in_place(kind, monkeypatch):
    """The cache passes [:, :, :N] views of its reserved storage (strided over batch and heads): the kernel reads
    them through their strides, with the reference's numbers, and never makes the contiguous copy of the cache that
    `.contiguous()` would: the profiler sees no allocation as large as the cache, only the output."""
    from torch.profiler import ProfilerActivity, profile
    gen = torch.Generator().manual_seed(3)
    storage = quant.quantize(torch.randn(2, 3, 900, 40, generator=gen), kind)
    kc, vc = storage[:, :, :613], storage[:, :, 1:614]
    assert not kc.is_contiguous()
    q = torch.randn(2, 3, 4, 40, generator=gen)
    m = torch.rand(2, 1, 1, 613, generator=gen) > 0.2
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = torch.ops.kvfx.decode_attention(q, kc, vc, 40, 40, kind, 0.2, m, False)
    assert max(e.cpu_memory_usage for e in prof.events()) < kc.numel()
    _assert_matches(out, q, kc.contiguous(), vc.contiguous(), 40, 40, kind, 0.2, m, False)


def test_bfloat16_queries_come_back_in_their_dtype():
    q, kc, vc, _ = _case(1, 2, 3, 50, 16, 16, "int8", None, False, 1)
    out = torch.ops.kvfx.decode_attention(q.bfloat16(), kc, vc, 16, 16, "int8", 0.25, None, False)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), la.reference(q, kc, vc, 16, 16, "int8", 0.25), rtol=2e-2, atol=2e-2)


def test_bad_rows_are_refused():
    q, kc, vc, _ = _case(1, 1, 2, 10, 16, 16, "int8", None, False, 2)
    with pytest.raises(RuntimeError, match="key rows hold"):
        torch.ops.kvfx.decode_attention(q, kc[..., :-1], vc, 16, 16, "int8", 0.25, None, False)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_decode_steps_read_the_codes(quantize, kind):
    """Compressed low-bit decode (Inductor) calls the kernel on the stored codes, with the tokens and logits of the
    uncompressed model run eagerly with kvfx's cache (which dequantises: no pass, no kernel)."""
    m = tiny_llama(2)
    P = random_projections(m, rank=4, seed=7)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=5, output_logits=True,
               return_dict_in_generate=True)
    with torch.no_grad():
        ref = m.generate(ids, **gen, **{cache_kwarg(m): kvfx.LowRankCache(P, kind, max_cache_len=10,
                                                                          quantize=quantize)})
        cm = kvfx.compress(torch.compile(copy.deepcopy(m)), P, cache=kind, quantize=quantize)
        out = cm.generate(ids, **gen)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-4, atol=1e-4)
    assert kvfx.counters["kvfx"]["lowbit_decode"] == 2 * (kvfx.counters["kvfx"]["graphs"] - 1)
    decode = cm._kvfx.backend.graphs[-1].graph
    assert any(n.target is torch.ops.kvfx.decode_attention.default for n in decode.nodes)
    assert not any(n.target is torch.ops.kvfx.dequantize.default for n in decode.nodes)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_opcheck(kind):
    """Fake kernels agree with the real ones (shapes, strides, dtypes) — what Inductor relies on."""
    q, kc, vc, m = _case(1, 2, 3, 20, 9, 7, kind, "bool", False, 3)  # odd widths: int4 pads a row
    torch.library.opcheck(torch.ops.kvfx.decode_attention.default, (q, kc, vc, 9, 7, kind, 0.3, m, False),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.kvfx.dequantize.default, (kc, 9, kind, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))


def _exact_rows(b, h, n, rk, rv, slots, seed):
    """16-bit exact rows and their positions: some past the cache (N), some empty (-1), the rest distinct rows."""
    gen = torch.Generator().manual_seed(seed + 1000)
    pos = torch.randperm(n + 4, generator=gen)[:slots]
    pos[torch.rand(len(pos), generator=gen) < 0.2] = -1
    slots = len(pos)
    ek, ev = torch.randn(b, h, slots, rk, generator=gen).half(), torch.randn(b, h, slots, rv, generator=gen).half()
    return ek, ev, pos


@settings(max_examples=40, deadline=None)
@given(g=st.integers(1, 9), n=st.integers(1, 600), rk=st.integers(1, 70), rv=st.integers(1, 70),
       kind=st.sampled_from(["int8", "int4", "int2", "int3", "int8x20+int4x30+int2x20", "int8x10+int5x40+int2x20"]),
       mask=st.sampled_from([None, "bool", "float"]), shared=st.booleans(), slots=st.integers(1, 40),
       seed=st.integers(0, 99))
def test_exact_rows_stand_for_their_codes(g, n, rk, rv, kind, mask, shared, slots, seed):
    """Exact rows (a format's '|sinksS|recentW', kvfx/cache.py): the kernel scores the 16-bit row held for a
    position instead of its codes, merged with the chunks' partial softmaxes — the reference's numbers (dequantise,
    replace the held rows, SDPA) to float32 round-off. Positions -1 and >= N are not rows."""
    if "x" in kind:
        rk = rv = 70
    q, kc, vc, m = _case(2, 2, g, n, rk, rv, "int8", mask, shared, seed)
    gen = torch.Generator().manual_seed(seed)
    kc, vc = quant.quantize(torch.randn(2, 2, n, rk, generator=gen), kind), quant.quantize(
        torch.randn(2, 2, n, rv, generator=gen), kind)
    ek, ev, pos = _exact_rows(2, 2, n, rk, rk if shared else rv, slots, seed)
    out = torch.ops.kvfx.decode_attention(q, kc, vc, rk, rv, kind, 0.125, m, shared, ek, ev, pos)
    ref = la.reference(q, kc, vc, rk, rv, kind, 0.125, m, shared, ek, ev, pos)
    plain = la.reference(q, kc, vc, rk, rv, kind, 0.125, m, shared)
    _assert_matches(out, q, kc, vc, rk, rv, kind, 0.125, m, shared, exact=(ek, ev, pos), rtol=1e-4)
    held = ((pos >= 0) & (pos < n)).any()
    if held and (m is None or m.dtype != torch.bool) and not la.integer_path("cpu", kind):
        # the rows are really used: out is the reference's, not the codes' (one held row of 600 can move the output
        # by only ~1e-4: compared with the round-off, not a constant; on the integer path see the test below)
        assert (out - plain).abs().max() > max(1e-5, 10 * (out - ref).abs().max())


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_dequantize_writes_the_exact_rows_over_their_codes(kind):
    latent = torch.randn(1, 2, 5, 3)
    stored = quant.quantize(latent, kind)
    rows = -torch.ones(1, 2, 4, 3).cumsum(2)  # slot j holds -(j + 1)
    out = torch.ops.kvfx.dequantize(stored, 3, kind, torch.float32, rows.half(), torch.tensor([3, -1, 0, 7]))
    want = quant.dequantize(stored, torch.float32, 3, kind)
    want[:, :, 3], want[:, :, 0] = -1.0, -3.0  # slot 1 is empty, slot 3's position is past the 5 rows
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)  # the C++ decoder: float32 round-off
    assert torch.equal(out[:, :, [0, 3]], want[:, :, [0, 3]])


@pytest.mark.parametrize("kind", ["int4", "int8x16+int5x32+int4x16+int3x32"])
def test_exact_rows_replace_their_codes_on_the_integer_path(kind, integer):
    """On an integer path too (AMX here, or AVX2 switched on), a held position scores its exact row, not its codes:
    exact keys that point along the query take nearly all the weight, so the output is nearly their values' mean,
    while the codes alone give something else entirely."""
    if not la.integer_path("cpu", kind):
        pytest.skip(f"{kind} takes no integer path on this CPU")
    q, kc, vc, _ = _case(1, 2, 3, 300, 96, 96, kind, None, False, 8)
    pos = torch.tensor([0, 150, 299])
    ek = (q[:, :, :1] * 40).expand(1, 2, 3, 96).half()  # scores ~40·|q|²·0.125 above the codes'
    ev = torch.randn(1, 2, 3, 96).half()
    out = torch.ops.kvfx.decode_attention(q, kc, vc, 96, 96, kind, 0.125, None, False, ek, ev, pos)
    _assert_matches(out, q, kc, vc, 96, 96, kind, 0.125, None, False, exact=(ek, ev, pos))
    plain = la.reference(q, kc, vc, 96, 96, kind, 0.125)
    near = ev.float().mean(2, keepdim=True).expand_as(out)
    assert (out[:, :, :1] - near[:, :, :1]).abs().max() < 0.05 < (plain[:, :, :1] - near[:, :, :1]).abs().max()


@pytest.mark.parametrize("switch", ["KVFX_NO_AMX", "KVFX_AVX2_INTEGER", None])
def test_every_row_held_exact(switch, monkeypatch):
    """Every position held exact (a cache shorter than its sinks + window), on the float path, with the AVX2
    integer path switched on and on this CPU's own path (AMX where it has one): whole blocks of codes skipped, the
    output the exact rows' attention."""
    if switch:
        monkeypatch.setenv(switch, "1")
    q, kc, vc, _ = _case(1, 2, 9, 300, 64, 64, "int4", None, False, 5)
    ek, ev = torch.randn(1, 2, 300, 64).half(), torch.randn(1, 2, 300, 64).half()
    out = torch.ops.kvfx.decode_attention(q, kc, vc, 64, 64, "int4", 0.125, None, False, ek, ev, torch.arange(300))
    want = torch.nn.functional.scaled_dot_product_attention(q, ek.float(), ev.float(), scale=0.125)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_exact_rows_opcheck():
    q, kc, vc, m = _case(1, 2, 3, 20, 9, 7, "int4", "bool", False, 3)
    ek, ev, pos = _exact_rows(1, 2, 20, 9, 7, 6, 3)
    torch.library.opcheck(torch.ops.kvfx.decode_attention.default, (q, kc, vc, 9, 7, "int4", 0.3, m, False, ek, ev, pos),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.kvfx.dequantize.default, (kc, 9, "int4", torch.float32, ek, pos),
                          test_utils=("test_schema", "test_faketensor"))


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), g=st.integers(1, 4), n=st.integers(1, 700),
       rk=st.integers(6, 140), rv=st.integers(6, 140), mask=st.sampled_from([None, "bool", "float"]),
       shared=st.booleans(), exact=st.booleans(), kind=st.sampled_from(["int4", "int8"]), seed=st.integers(0, 99))
def test_vnni_rows_are_the_tile_paths_numbers(b, h, g, n, rk, rv, mask, shared, exact, kind, seed):
    """int4 / int8 rows read by up to 4 query rows a kv head (per-head latents) take AVX-512 VNNI instead of the
    tile unit on AMX CPUs (lowbit_attention_vnni.h): the same integer sums and roundings, so the same numbers as the
    tile path (KVFX_NO_VNNI=1) up to the float sums' order — for any row count, masks, groups, widths and exact
    rows."""
    if la.integer_rounding("cpu") != "amx":
        pytest.skip("no AMX here: int4 / int8 rows take no tile path to compare with")
    q, kc, vc, m = _case(b, h, g, n, rk, rv, kind, mask, shared, seed)
    extra = _exact_rows(b, h, n, rk, rk if shared else rv, 9, seed) if exact else ()
    run = lambda: torch.ops.kvfx.decode_attention(q, kc, vc, rk, rv, kind, 0.125, m, shared, *extra)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KVFX_NO_VNNI", "1")
        tile = run()
        env.setenv("KVFX_NO_VNNI", "0")
        vnni = run()
    torch.testing.assert_close(vnni, tile, rtol=1e-5, atol=1e-6 * max(1.0, tile.abs().max().item()))


# band rows of every unit kind the VNNI blocks take: int8 chunks (64 columns and a partial one), int5 groups (a pair
# and a lone one), int4 / int3 groups (partial ones too), 2-bit groups; with and without an int8 band
VNNI_BANDS = ["int8x80+int5x48+int4x40+int3x32+int2x40", "int5x32+int4x17+int2x16", "int4x48+int3x16+int2x70"]


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 2), g=st.integers(2, 20), n=st.integers(1, 400),
       rk=st.integers(6, 100), rv=st.integers(6, 100), mask=st.sampled_from([None, "bool", "float"]),
       shared=st.booleans(), kind=st.sampled_from(["int4", "int8", "int2", "int5", "int3", *VNNI_BANDS]),
       seed=st.integers(0, 99))
def test_vnni_passes_give_each_query_row_its_own_numbers(b, h, g, n, rk, rv, mask, shared, kind, seed):
    """Without a tile unit (AVX-512 VNNI CPUs: Ice Lake, Zen 4) the VNNI blocks take any number of query rows a
    latent head, in passes of up to 4 that share the rows' operands (lowbit_attention_vnni.h; bands:
    lowbit_attention_vnni_bands.h): each query row's output is bit for bit what it gets alone (its own query digits,
    sums and softmax), for 2-20 rows (a shared latent's 9; more than 16: two blocks of query digits), masks, widths,
    row counts, and every unit of a band row (8-bit int8 chunks and int5 groups, 4-bit int4 and int3 groups, 2-bit)."""
    if la.integer_rounding("cpu") != "vnni":
        pytest.skip("AVX-512 VNNI without AMX only (on AMX CPUs more than 4 query rows take the tile unit)")
    if quant.bands_of(kind) is not None:
        rk = rv = quant.width_of(kind)
    elif kind in ("int5", "int3"):  # transcoded in whole 16-column runs
        rk, rv = 16 * (rk // 16 + 1), 16 * (rv // 16 + 1)
    assert la.takes_integer_path("vnni", kind)
    q, kc, vc, m = _case(b, h, g, n, rk, rv, kind, mask, shared, seed)
    run = lambda qq: torch.ops.kvfx.decode_attention(qq, kc, vc, rk, rv, kind, 0.125, m, shared)
    alone = torch.cat([run(q[:, :, i:i + 1].contiguous()) for i in range(g)], 2)
    assert torch.equal(run(q), alone)


@pytest.mark.skipif(la.integer_rounding("cpu") not in ("amx", "vnni"), reason="the VNNI blocks run on AVX-512 VNNI CPUs")
def test_stage_counters_count_only_in_the_stages_build():
    """benchmarks/kernel.py --stages: a build with -DKVFX_STAGE_CYCLES counts each VNNI stage's cycles and every
    row it reads (read and reset by stage_cycles()); the default build counts nothing and gives the same numbers.
    On AMX CPUs the tile unit's blocks (9 query rows a latent) count their coarser stages (no separate weights);
    without AMX the VNNI blocks take them."""
    k, v = (quant.quantize(torch.randn(1, 3, 300, 32), "int4") for _ in range(2))
    q = torch.randn(1, 3, 3, 32)
    ext, counting = la._extension(), la._build(stages=True)
    want = ext.attend(q, k, v, 32, 32, 4, 0.125, None, False, [], [])
    got = counting.attend(q, k, v, 32, 32, 4, 0.125, None, False, [], [])
    assert torch.equal(got, want)
    counts = counting.stage_cycles().tolist()
    assert counts[5] == 3 * 300 and all(c > 0 for c in counts[:5])
    assert counting.stage_cycles().tolist() == [0] * 6  # reset by the read
    assert ext.stage_cycles().tolist() == [0] * 6
    q9 = torch.randn(1, 1, 9, 32)
    assert torch.equal(counting.attend(q9, k[:, :1], k[:, :1], 32, 32, 4, 0.125, None, True, [], []),
                       ext.attend(q9, k[:, :1], k[:, :1], 32, 32, 4, 0.125, None, True, [], []))
    counts = counting.stage_cycles().tolist()
    tile = la.integer_rounding("cpu") == "amx"
    assert counts[5] == 300 and (counts[3] == 0) == tile and all(counts[i] > 0 for i in (0, 1, 2, 4))


@pytest.mark.skipif(la.integer_rounding("cpu") not in ("amx", "vnni"), reason="the VNNI blocks run on AVX-512 VNNI CPUs")
def test_kernel_bench_prints_the_stage_split():
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).parents[2] / "benchmarks" / "kernel.py"
    out = subprocess.run([sys.executable, str(script), "--stages", "--n", "256", "--layers", "1", "--reps", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("head-", "kv-"))]
    tile = la.integer_rounding("cpu") == "amx"  # else no tile unit: the shared latents and bands take VNNI too
    assert [r[0] for r in rows] == ["head-0.5-int8", "head-0.5-int4", "head-0.25-int4", "kv-0.9375-int4",
                                    "kv-bits5-0.25"]
    assert [r[1] for r in rows] == ["vnni"] * 3 + ["tile" if tile else "vnni"] * 2
    assert all(float(r[-1]) > 0 for r in rows)  # cycles per row, all stages


@pytest.mark.parametrize("kind,rk", [("e8", 40), ("int5x16+int3x16+e8x32", 64), ("int8x16+e8x48", 64),
                                     ("int4x32+e8x136", 168)])
def test_e8_codes_read_by_the_kernel(kind, rk):
    """e8 codes (kvfx/ops/lattice_e8.h): the C++ kernel reads them, on AMX / AVX-512 VNNI transcoded to int4 nibbles
    (u = 2x, as int3's levels) on the integer path, elsewhere decoded to float32 (the AVX2 integer path and the
    Triton kernel do not take them: float32 / the reference); the same bytes as quant.quantize."""
    from kvfx.ops import lowbit_attention_triton as tri
    for shared in (True, False):
        q, kc, vc, m = _case(2, 2, 3, 300, rk, rk, kind, "bool", shared, 0)
        out = torch.ops.kvfx.decode_attention(q, kc, vc, rk, rk, kind, 0.125, m, shared)
        _assert_matches(out, q, kc, vc, rk, rk, kind, 0.125, m, shared)
    x = torch.randn(2, 3, 5, rk)
    assert torch.equal(torch.ops.kvfx.quantize(x, kind), quant.quantize(x, kind))
    assert la.takes_integer_path("amx", kind) and la.takes_integer_path("vnni", kind)
    assert not la.takes_integer_path("avx2", kind) and not tri.handles(kind)


def test_e8_codes_on_the_float_path(monkeypatch):
    monkeypatch.setenv("KVFX_NO_AMX", "1")
    q, kc, vc, m = _case(1, 2, 9, 200, 64, 64, "int8x16+e8x48", None, True, 1)
    out = torch.ops.kvfx.decode_attention(q, kc, vc, 64, 64, "int8x16+e8x48", 0.125, m, True)
    _assert_matches(out, q, kc, vc, 64, 64, "int8x16+e8x48", 0.125, m, True, rounding="none")

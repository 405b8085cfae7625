"""kvfx::quantize (the C++ encoder kvfx's cache writes a prefill's or a chunk's rows with) against kvfx.quant.quantize:
the same stored bytes, every format."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import random_projections, tiny_llama
from kvfx import quant
from kvfx.cache import LowRankDynamicLayer
from kvfx.ops import lowbit_attention as la

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not la.kernel_available("cpu"), reason="no C++ compiler: the op runs quant.quantize")]
KINDS = ["int8", "int4", "int2", "int3", "int5", "int4|sinks4"]


def _off_scale_edges(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """x with each group (quant's layout: 32 columns, or a whole int8 band) rescaled so that amax / top lies halfway
    between two scale steps 2^(e/8): where float round-off cannot decide between two scale codes."""
    parts, col = [], 0
    for fmt, w in quant.layout(kind, x.shape[-1]):
        top = 2 ** (fmt.bits - 1) if fmt.midrise else fmt.qmax
        for part in x[..., col:col + w].split(fmt.group or w, -1):
            e = torch.randint(-60, 20, (*part.shape[:-1], 1), generator=gen).float()
            amax = part.abs().amax(-1, keepdim=True).clamp_min(1e-20)
            parts.append(part / amax * top * torch.exp2((e - 0.5) / quant.SCALE_STEPS))
        col += w
    return torch.cat(parts, -1)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(KINDS + ["bands"]), width=st.integers(1, 200), rows=st.integers(1, 300),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2 ** 16))
def test_same_bytes_as_quant_quantize(kind, width, rows, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "bands":  # int8, int5, int4, int3 and int2 bands of random widths spanning the row
        cuts = sorted(torch.randint(0, width + 1, (4,), generator=gen).tolist())
        widths = [b - a for a, b in zip([0] + cuts, cuts + [width])]
        kind = "+".join(f"int{bits}x{w}" for bits, w in zip((8, 5, 4, 3, 2), widths) if w) or "int4x1"
        width = quant.width_of(kind)
    x = torch.randn(2, rows, width, generator=gen) * torch.logspace(0, -3, width)
    x = _off_scale_edges(x, kind, gen)
    x[0, 0] = 0  # an all-zero row: the smallest scale code
    x = x.to(dtype)
    got = torch.ops.kvfx.quantize(x, kind)
    assert got.dtype == torch.int8 and got.shape == (2, rows, quant.row_bytes(kind, width))
    assert torch.equal(got, quant.quantize(x, kind))


@settings(max_examples=30, deadline=None)
@given(widths=st.lists(st.integers(1, 12).map(lambda n: 8 * n), min_size=1, max_size=3), rows=st.integers(1, 200),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2 ** 16))
def test_e8_bytes_as_quant_quantize(widths, rows, dtype, seed):
    """e8 codes (kvfx/ops/lattice_e8.h): the lattice points' indices and scale codes quant.quantize writes. A scale
    code is 8·log2 of the group's rms (or of its largest 8-vector's length) rounded, computed in float32 in another
    order of sums than torch's: rows whose code lands within round-off of a half step may differ (none in practice).
    An 8-vector exactly as near two lattice points (bfloat16 inputs make equal magnitudes common; seed 208 below) may
    take either: the two encoders' tie-breaks (the first of equal D8 rounding errors, a ≤ between the two cosets) run
    on doubles computed in other orders. Every other difference fails."""
    kind = "+".join(f"{f}x{w}" for f, w in zip(("e8", "int4", "e8"), widths))
    width = sum(widths)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, rows, width, generator=gen) * torch.logspace(0, -3, width)).to(dtype)
    x[0, 0] = 0
    got, ref = torch.ops.kvfx.quantize(x, kind), quant.quantize(x, kind)
    assert got.shape == ref.shape == (2, rows, quant.row_bytes(kind, width))
    same = (got == ref).all(-1)
    if not same.all():  # each differing 8-vector a tie: as near x as quant's point
        err = [((quant.dequantize(t[~same], torch.float64, width, kind) - x[~same].double()) ** 2)
               .reshape(-1, width // 8, 8).sum(-1) for t in (got, ref)]
        assert torch.allclose(err[0], err[1], rtol=1e-4, atol=1e-12), "a code that is not one of two equally near points"
    assert same.float().mean() >= 0.9


def test_e8_tie_of_two_points_may_take_either():
    """The case hypothesis found (widths [8, 88, 88], 30 rows, bfloat16, seed 208): one 8-vector of one row lies
    exactly between two lattice points (two coordinates ±0.00149: swapping the points' ±1 / ±3 keeps the distance)."""
    test_e8_bytes_as_quant_quantize.hypothesis.inner_test([8, 88, 88], 30, torch.bfloat16, 208)


@pytest.mark.parametrize("kind", KINDS + ["int8x64+int5x32+int4x128+int3x48+int2x88"])
def test_unprepared_rows_differ_only_at_scale_edges(kind):
    """Raw Gaussian rows: a group's scale code is the smallest step covering it (the decoder's own table), where
    quant.quantize's ceil(8·log2) may take the next step when 8·log2 lands within round-off of an integer: at most
    a few groups in 10^5 differ, by one step, and the rest are the same bytes."""
    gen = torch.Generator().manual_seed(1)
    width = quant.width_of(kind) or 360
    x = torch.randn(3, 3000, width, generator=gen) * torch.logspace(0, -2, width)
    got, ref = torch.ops.kvfx.quantize(x, kind), quant.quantize(x, kind)
    scale_cols = torch.zeros(got.shape[-1], dtype=torch.bool)
    at = 0
    for fmt, w in quant.layout(kind, width):
        scale_cols[at + fmt.code_bytes(w):at + fmt.row_bytes(w)] = True
        at += fmt.row_bytes(w)
    de = got[..., scale_cols].int() - ref[..., scale_cols].int()
    assert de.abs().max() <= 1 and (de != 0).float().mean() < 1e-4
    same_rows = (de == 0).all(-1)
    assert torch.equal(got[same_rows], ref[same_rows])


def test_strided_rows_and_opcheck():
    x = _off_scale_edges(torch.randn(2, 3, 20, 70), "int4", torch.Generator().manual_seed(0))
    held = torch.zeros(2, 3, 40, 70)
    held[:, :, ::2] = x  # the view below has strided rows, as a cache's [:, :, :N] slice
    assert torch.equal(torch.ops.kvfx.quantize(held[:, :, ::2], "int4"), quant.quantize(x, "int4"))
    torch.library.opcheck(torch.ops.kvfx.quantize.default, (torch.randn(2, 5, 37), "int4"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kind", ["int4", "int8x2+int4x2|sinks1"])
@pytest.mark.parametrize("cpp_codec", [True, False])
def test_cache_writes_many_rows_through_the_op(kind, cpp_codec, monkeypatch):
    """kvfx's cache encodes a prefill's rows with kvfx::quantize, and a decode step's one row too where compiled
    graphs call it as the C++ op (passes/decode_kernel.py); with KVFX_NO_CPP_CODEC=1 the step's row goes through
    quant.quantize's ops (which Inductor fuses into the step). A read returns the same rounded latents either way."""
    if not cpp_codec:
        monkeypatch.setenv("KVFX_NO_CPP_CODEC", "1")
    calls = []
    real = torch.ops.kvfx.quantize
    monkeypatch.setattr(torch.ops.kvfx, "quantize", lambda x, k: calls.append(x.shape[-2]) or real(x, k))
    site = random_projections(tiny_llama(1), rank=4).sites["model.layers.0.self_attn"]
    layer = LowRankDynamicLayer(site, quantize=kind)
    k, v = torch.randn(2, 2, 13, 8), torch.randn(2, 2, 13, 8)
    layer.update(k[:, :, :12], v[:, :, :12])
    keys, _ = layer.update(k[:, :, 12:], v[:, :, 12:])
    # keys and values of the prefill, then of the step where the C++ op takes it
    assert calls == ([12, 12, 1, 1] if cpp_codec and la.kernel_available("cpu") else [12, 12])
    latent = k @ site.key_down
    want = quant.fake_quant(latent, kind) @ site.key_up.transpose(1, 2)
    torch.testing.assert_close(keys[:, :, 1:], want[:, :, 1:], rtol=1e-5, atol=1e-5)  # row 0: a sink, held exact

"""The Triton decode kernel (kvfx/ops/lowbit_attention_triton.py) against the plain-torch reference (dequantise the
whole cache, then SDPA).

Without a CUDA device the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before triton is
imported; the kernels then take CPU tensors): slow, so the cases are small (N ≤ 300). With one, the same cases run
compiled on the GPU, and the `gpu` test checks that `torch.ops.kvfx.decode_attention` takes the Triton path.
"""
import importlib
import math
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # before triton (and every @triton.jit, triton.language's own included) see it
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        # Imported already (tests/conftest.py imports kvfx, whose torch imports pull in triton): triton.language's
        # jit functions (tl.sum, tl.zeros, ...) were made for compiling and refuse to run in the interpreter. Import
        # triton's Python modules again (its compiled extension stays).
        for _mod in [m for m in sys.modules if (m == "triton" or m.startswith("triton.")) and
                     not m.startswith("triton._C")]:
            del sys.modules[_mod]
triton = pytest.importorskip("triton")

from kvfx import quant  # noqa: E402
from kvfx.ops import lowbit_attention as la  # noqa: E402
from kvfx.ops import lowbit_attention_triton as lt  # noqa: E402

if not CUDA:
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(lt._partial_kernel, InterpretedFunction):  # imported before the variable was set
        lt = importlib.reload(lt)  # its kernels defined again, interpreted

pytestmark = pytest.mark.usefixtures("one_thread")
DEVICE = "cuda" if CUDA else "cpu"
FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _case(b, h, g, n, rk, rv, kind, mask, seed, spare=23):
    """q, and the key / value rows as [:, :, :n] views (strided, like the cache's) of larger stored tensors."""
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(b, h, n + spare, rk, generator=gen) * 3, torch.randn(b, h, n + spare, rv, generator=gen)
    if kind in FLOATS:
        kc, vc = k.to(FLOATS[kind]), v.to(FLOATS[kind])
    else:
        kc, vc = quant.quantize(k, kind), quant.quantize(v, kind)
    kc, vc = kc[:, :, :n], vc[:, :, spare:]  # offset views: the values start later in their storage
    q = torch.randn(b, h, g, rk, generator=gen)
    m = None
    if mask == "bool":
        m = torch.rand(b, 1, 1, n, generator=gen) > 0.3
        m[..., 0] = True
    elif mask == "float":
        m = torch.randn(1, 1, 1, n, generator=gen)
    elif mask == "bool1":  # one mask for the whole batch
        m = torch.rand(1, 1, 1, n, generator=gen) > 0.5
        m[..., -1] = True
    elif mask == "floatB":  # a float mask per batch row, with -inf entries
        m = torch.randn(b, 1, 1, n, generator=gen).masked_fill(torch.rand(b, 1, 1, n, generator=gen) > 0.6, -math.inf)
        m[..., 1] = 0.0
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(q), to(kc), to(vc), to(m), ("float" if kind in FLOATS else kind)


def _check(out, ref, rtol=1e-4):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # float32 round-off of the output's own size: the kernel sums in another order (and base 2) than SDPA
    torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * max(1.0, ref.abs().max().item()))


# mask None: one chunk (the first kernel writes the output); the masks: several chunks merged by log-sum-exp
CHUNKS = {None: None, "bool": 64, "float": 100}


@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("widths", [(20, 33), (360, 360)], ids=["narrow", "wide"])
@pytest.mark.parametrize("g", [1, 3, 9])
@pytest.mark.parametrize("shared", [False, True], ids=["kv", "shared"])
@pytest.mark.parametrize("kind", ["int8", "int4", "float32", "bfloat16"])
def test_matches_reference(kind, shared, g, widths, mask):
    """Every row format, shared and separate K/V, the broadcast (G ≤ 4, narrow rows) and tl.dot (G padded to 16,
    or wide rows) paths, N not a multiple of the row block, batch 2 with strided cache views."""
    rk, rv = widths
    n = (133 if rk < 128 else 61) + 17 * g + (11 if shared else 0)  # never a whole number of row blocks
    q, kc, vc, m, kind = _case(2, 2, g, n, rk, rv, kind, mask, seed=g + rk)
    out = lt.decode_attention_triton(q, kc, vc, rk, rv, kind, 0.125, m, shared, chunk_tokens=CHUNKS[mask],
                                     plan=_interpreted_plan(g, rk, rk if shared else rv))
    _check(out, la.reference(q, kc, vc, rk, rv, kind, 0.125, m, shared))


def _interpreted_plan(g, rk, rv):
    """The interpreter runs every tile in Python: wide rows take 128-column tiles there (still 3 key column blocks
    and 3 value tiles at width 360), not the GPU's 64 (test_wide_rows_with_the_gpu_tiles runs those)."""
    plan = lt._plan(g, rk, rv)
    if CUDA or max(rk, rv) <= 128:
        return plan
    return plan._replace(block_n=32, block_r=128, block_v=128)


@pytest.mark.parametrize("kind, g, shared", [("int4", 3, False), ("int8", 9, True)])
def test_wide_rows_with_the_gpu_tiles(kind, g, shared):
    """The tile sizes the GPU runs for rows of 360 numbers (6 key column blocks and 6 value tiles of 64), on both
    the broadcast and the tl.dot path, over several chunks."""
    q, kc, vc, m, kind = _case(2, 1, g, 77, 360, 360, kind, "bool", seed=g)
    out = lt.decode_attention_triton(q, kc, vc, 360, 360, kind, 0.1, m, shared, chunk_tokens=32)
    _check(out, la.reference(q, kc, vc, 360, 360, kind, 0.1, m, shared))


@pytest.mark.parametrize("kind, rk, rv, shared", [("int4", 33, 7, False), ("int4", 45, 45, True),
                                                  ("int8", 1, 5, False), ("float16", 17, 64, False),
                                                  ("int4", 64, 3, False)])
@pytest.mark.parametrize("mask", ["bool1", "floatB"])
def test_odd_widths_and_batch_masks(kind, rk, rv, shared, mask):
    """Odd int4 widths (a padding nibble), width 1, float16 rows; a bool mask shared by the batch and a float mask
    per batch row holding -inf; default chunking and forced small chunks."""
    q, kc, vc, m, kind = _case(2, 3, 5, 290, rk, rv, kind, mask, seed=rk)
    ref = la.reference(q, kc, vc, rk, rv, kind, 0.3, m, shared)
    for chunk_tokens in (None, 32):
        _check(lt.decode_attention_triton(q, kc, vc, rk, rv, kind, 0.3, m, shared, chunk_tokens=chunk_tokens), ref)


BANDS = "int8x8+int5x11+int4x17+int3x9+int2x7"  # 52 columns: every band format, odd band widths (padding in each)


@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("g", [2, 9])
@pytest.mark.parametrize("shared", [False, True], ids=["kv", "shared"])
@pytest.mark.parametrize("kind", ["int2", "int3", "int5", BANDS])
def test_table_formats_match_reference(kind, shared, g, mask):
    """int2 / int3 / int5 rows and bands (what kvfx.allocate_bits and best_config choose), decoded through each
    column's table entry: low bits, int3's / int5's sign plane, mid-rise levels, a scale per 32 columns or per int8 band."""
    w = 52 if kind == BANDS else 37
    q, kc, vc, m, kind = _case(2, 2, g, 150 + g, w, w, kind, mask, seed=g + w)
    out = lt.decode_attention_triton(q, kc, vc, w, w, kind, 0.15, m, shared, chunk_tokens=CHUNKS[mask])
    _check(out, la.reference(q, kc, vc, w, w, kind, 0.15, m, shared))


def test_column_table_reads_what_quant_stores():
    """The table's bytes, shifts and scales rebuild quant.dequantize's numbers for every column (plain torch)."""
    x = torch.randn(3, 376) * torch.linspace(4, 0.1, 376)
    kind = "int8x64+int5x40+int4x160+int3x80+int2x32"
    stored = quant.quantize(x, kind).to(torch.int32) & 0xFF
    t = lt.column_table(kind, 376, torch.device("cpu")).long()
    lo, hi = stored[:, t[0]], stored[:, t[3]]
    u = ((lo >> t[1]) & ((1 << t[2]) - 1)) | (((hi >> t[4]) & t[5]) << t[2])
    bits = t[2] + t[5]
    q = u - (((u >> (bits - 1)) & 1) << bits)
    e = stored[:, t[7]].to(torch.int8).float()
    got = (q.float() + 0.5 * t[6]) * torch.exp2(e / 8)
    torch.testing.assert_close(got, quant.dequantize(quant.quantize(x, kind), torch.float32, 376, kind))
    assert lt.handles(kind) and lt.handles("int2") and not lt.handles("int4|sinks4") and not lt.handles("int6")


def _exact(b, h, n, rk, rv, seed):
    """Exact rows as kvfx's cache holds them: 4 sinks, a ring of recent positions, an empty slot, one past N."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.tensor([0, 1, 2, 3, n - 1, n - 3, n - 2, -1, n + 5])
    ek = torch.randn(b, h, len(pos), rk, generator=gen).half()
    return ek.to(DEVICE), torch.randn(b, h, len(pos), rv, generator=gen).half().to(DEVICE), pos.to(DEVICE)


@pytest.mark.parametrize("mask", [None, "bool", "floatB"])
@pytest.mark.parametrize("shared", [False, True], ids=["kv", "shared"])
@pytest.mark.parametrize("kind", ["int4", "int8", BANDS])
def test_exact_rows_stand_for_their_codes(kind, shared, mask):
    """Exact rows (a format's '|sinksS|recentW'): the kernel skips the held tokens' codes and the exact rows'
    softmax merges in by log-sum-exp — the reference's numbers (dequantise, put the exact rows in, SDPA)."""
    w = 52 if kind == BANDS else 40
    n = 170
    q, kc, vc, m, kind = _case(2, 2, 3, n, w, w, kind, mask, seed=w)
    ek, ev, pos = _exact(2, 2, n, w, w, seed=7)
    for chunk_tokens in (None, 48):
        out = lt.decode_attention_triton(q, kc, vc, w, w, kind, 0.2, m, shared, ek, ev, pos, chunk_tokens=chunk_tokens)
        ref = la.reference(q, kc, vc, w, w, kind, 0.2, m, shared, ek, ev, pos)
        _check(out, ref)
    assert (out - la.reference(q, kc, vc, w, w, kind, 0.2, m, shared)).abs().max() > 1e-3  # the rows are used


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_exact_rows_only_and_nothing_visible():
    """A query row that sees only exact rows gets their attention; one that sees nothing gets NaN (as SDPA)."""
    n = 60
    q, kc, vc, _, kind = _case(2, 1, 2, n, 24, 24, "int4", None, seed=3)
    ek, ev, pos = _exact(2, 1, n, 24, 24, seed=4)
    keep = torch.zeros(2, 1, 1, n, dtype=torch.bool, device=DEVICE)
    keep[1, ..., :4] = True  # batch row 1: the sinks only, all of them exact
    out = lt.decode_attention_triton(q, kc, vc, 24, 24, kind, 0.3, keep, False, ek, ev, pos)
    assert out[0].isnan().all()
    want = torch.softmax(0.3 * q[1].float() @ ek[1, :, :4].float().transpose(-1, -2), -1) @ ev[1, :, :4].float()
    torch.testing.assert_close(out[1], want, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy: 0 / 0
@pytest.mark.parametrize("chunk_tokens", [None, 32])
@pytest.mark.parametrize("mask", ["bool", "float"])
def test_all_masked_rows_give_nan_like_sdpa(mask, chunk_tokens):
    """Batch row 0 sees no key: NaN, as the C++ CPU kernel gives (and softmax of nothing but -inf; torch 2.13's CPU
    SDPA, hence `reference` on CPU, returns 0 there instead). Batch row 1 has its first chunks fully masked, which
    must not leak NaN into the merge."""
    q, kc, vc, _, kind = _case(2, 2, 3, 200, 24, 24, "int8", None, seed=5)
    keep = torch.zeros(2, 1, 1, 200, dtype=torch.bool, device=DEVICE)
    keep[1, ..., 150:] = True
    m = keep if mask == "bool" else torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, -math.inf)
    out = lt.decode_attention_triton(q, kc, vc, 24, 24, kind, 0.2, m, False, chunk_tokens=chunk_tokens)
    assert out[0].isnan().all()
    _check(out[1], la.reference(q, kc, vc, 24, 24, kind, 0.2, m, False)[1])


def test_low_precision_queries_come_back_in_their_dtype():
    q, kc, vc, m, kind = _case(1, 2, 4, 120, 32, 16, "int4", "bool", seed=1)
    out = lt.decode_attention_triton(q.bfloat16(), kc, vc, 32, 16, kind, 0.25, m, False)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), la.reference(q.bfloat16().float(), kc, vc, 32, 16, kind, 0.25, m),
                               rtol=1e-2, atol=1e-2)


def test_bad_rows_are_refused():
    q, kc, vc, _, kind = _case(1, 1, 2, 10, 16, 16, "int8", None, seed=2)
    with pytest.raises(RuntimeError, match="key rows hold"):
        lt.decode_attention_triton(q, kc[..., :-1], vc, 16, 16, kind, 0.25, None, False)
    assert lt.supported(16, 16) and not lt.supported(16, lt.MAX_WIDTH + 1) and lt.supported(16, 10**6, shared=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("kind, shared", [("int8", False), ("int4", True), ("bfloat16", True), ("int4", False)])
def test_op_dispatches_to_triton_on_cuda(kind, shared, monkeypatch):
    """On a CUDA device the custom op runs the Triton kernel (not the reference) and matches the reference over a
    long cache (many split-K chunks), with the Llama-like shapes of a decode step."""
    calls = []
    real = lt.decode_attention_triton
    monkeypatch.setattr(lt, "decode_attention_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, kc, vc, m, kind = _case(2, 8, 4, 4096, 128, 96, kind, "bool", seed=0)
    out = torch.ops.kvfx.decode_attention(q, kc, vc, 128, 96, kind, 128 ** -0.5, m, shared)
    assert calls == [1]
    _check(out, la.reference(q, kc, vc, 128, 96, kind, 128 ** -0.5, m, shared))
    qh = q.bfloat16()  # a bf16 model's queries: output in bf16
    out = torch.ops.kvfx.decode_attention(qh, kc, vc, 128, 96, kind, 128 ** -0.5, None, shared)
    assert out.dtype == torch.bfloat16 and len(calls) == 2
    torch.testing.assert_close(out, la.reference(qh, kc, vc, 128, 96, kind, 128 ** -0.5, None, shared),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("exact", [False, True], ids=["codes", "exact-rows"])
def test_op_takes_triton_for_bands_and_exact_rows_on_cuda(exact, monkeypatch):
    """best_config's formats on a GPU: bands with int3 / int2 columns over a shared latent, with and without exact
    rows, run the Triton kernel through the op (no dequantised copy of the cache) and match the reference."""
    calls = []
    real = lt.decode_attention_triton
    monkeypatch.setattr(lt, "decode_attention_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    kind = "int8x32+int4x48+int3x32+int2x16"
    q, kc, vc, m, kind = _case(2, 3, 9, 8192, 128, 128, kind, "bool", seed=1)
    extra = _exact(2, 3, 8192, 128, 128, seed=2) if exact else ()
    out = torch.ops.kvfx.decode_attention(q, kc, vc, 128, 128, kind, 0.09, m, True, *extra)
    assert calls == [1]
    _check(out, la.reference(q, kc, vc, 128, 128, kind, 0.09, m, True, *extra))

"""kvfx::decode_attention (the C++ CPU kernel) against its plain-torch reference (dequantise the whole cache, then
SDPA), and the decode pass calling it on the stored codes of kvfx's low-bit cache."""
import copy

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
    ref = la.reference(q, kc, vc, rk, rv, kind, 0.125, m, shared)
    out = torch.ops.kvfx.decode_attention(q, kc, vc, rk, rv, kind, 0.125, m, shared)
    assert out.shape == ref.shape == (b, h, g, rk if shared else rv)
    # float32 round-off of the output's own size (a shared latent's values are the keys, ~3× larger): the kernel
    # folds the scale into q and sums in another order than SDPA
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))


def test_long_context_split_over_chunks_and_threads():
    """Long N: several split-K chunks merged by log-sum-exp, on every thread."""
    torch.set_num_threads(2)
    q, kc, vc, m = _case(1, 1, 9, 20000, 96, 96, "int4", "bool", True, 0)
    torch.testing.assert_close(torch.ops.kvfx.decode_attention(q, kc, vc, 96, 96, "int4", 0.1, m, True),
                               la.reference(q, kc, vc, 96, 96, "int4", 0.1, m, True), rtol=1e-5, atol=1e-5)


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
    ref = la.reference(q, kc.contiguous(), vc.contiguous(), 40, 40, kind, 0.2, m)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = torch.ops.kvfx.decode_attention(q, kc, vc, 40, 40, kind, 0.2, m, False)
    assert max(e.cpu_memory_usage for e in prof.events()) < kc.numel()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


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

"""Pass 5b — decode kernel: a CPU graph's kvfx::decode_attention calls the C++ op `attend` on the same kernel, and
kvfx::quantize / dequantize call `encode` / `decode`.

The ops against the Python ops they stand for (bit-equal: the same kernels and scale tables, for every row format,
masks, exact rows, offsets, bfloat16 queries and rows; fake kernels via opcheck); the pass's counters
(`decode_kernels`, `codec_kernels`: one per call) beside numerics (Inductor's tokens and logits equal those with the
switches KVFX_NO_DECODE_KERNEL=1 / KVFX_NO_CPP_CODEC=1, which keep the Python ops); kvfx's kept graphs still show
kvfx.decode_attention; other devices leave it alone."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kvfx
from helpers import model_inputs, random_projections, reference_greedy, tiny_llama
from kvfx import quant
from kvfx.ops import lowbit_attention as la
from kvfx.passes import decode_kernel

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = ["int8", "int4", "int2", "int3", "int5", "int8x20+int4x30+int2x20", "float"]


def _attend():
    return la._extension().attend.default


def _inputs(g, n, rk, rv, kind, mask, shared, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    if "x" in kind:
        rk = rv = quant.width_of(kind)
    k, v = torch.randn(2, 2, n + 5, rk, generator=gen) * 3, torch.randn(2, 2, n + 5, rv, generator=gen)
    store = (lambda x: x) if kind == "float" else (lambda x: quant.quantize(x, kind))
    kc, vc = store(k)[:, :, :n], store(v)[:, :, :n]  # the cache's views of its reserved rows
    q = torch.randn(2, 2, g, rk, generator=gen).to(dtype)
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, 1, n, generator=gen) > 0.3
        m[..., 0] = True
    elif mask == "float":
        m = torch.randn(1, 1, 1, n, generator=gen).to(dtype)
    return q, kc, vc, rk, rv, m


@settings(max_examples=30, deadline=None)
@given(g=st.integers(1, 9), n=st.integers(1, 400), rk=st.integers(1, 70), rv=st.integers(1, 70),
       kind=st.sampled_from(KINDS), mask=st.sampled_from([None, "bool", "float"]), shared=st.booleans(),
       exact=st.booleans(), bf16=st.booleans(), seed=st.integers(0, 99))
def test_op_is_the_python_op(g, n, rk, rv, kind, mask, shared, exact, bf16, seed):
    q, kc, vc, rk, rv, m = _inputs(g, n, rk, rv, kind, mask, shared, seed, torch.bfloat16 if bf16 else torch.float32)
    extra = ()
    if exact and kind != "float":
        gen = torch.Generator().manual_seed(seed)
        pos = torch.randperm(n + 3, generator=gen)[:5]
        extra = (torch.randn(2, 2, len(pos), rk, generator=gen).half(),
                 torch.randn(2, 2, len(pos), rk if shared else rv, generator=gen).half(), pos)
    want = torch.ops.kvfx.decode_attention(q, kc, vc, rk, rv, kind, 0.125, m, shared, *extra)
    got = _attend()(q, kc, vc, rk, rv, *la.kernel_format(kind, rk, rv, shared)[:1], 0.125, m, shared,
                    *la.kernel_format(kind, rk, rv, shared)[1:], *extra)
    assert got.dtype == q.dtype and torch.equal(got, want)


def test_opcheck_and_refusal():
    q, kc, vc, rk, rv, m = _inputs(3, 20, 9, 7, "int4", "bool", False, 3)
    bits, kb, vb = la.kernel_format("int4", rk, rv, False)
    torch.library.opcheck(_attend(), (q, kc, vc, rk, rv, bits, 0.3, m, False, kb, vb),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="mask must hold one number"):
        _attend()(q, kc, vc, rk, rv, bits, 0.3, m[..., :-1], False, kb, vb)


def _calls(gm, target):
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


def _generate_twice(quantize, switch, counter, monkeypatch):
    """Generate with a compressed tiny llama, then again with the environment `switch` set (the Python ops kept):
    tokens and logits equal (the same kernels, the same numbers). Returns the first run's model, the graphs the pass
    made for it, and its `counter`."""
    m = tiny_llama(2)
    ids = model_inputs(m, batch=2, tokens=5)
    P = random_projections(m, rank=4, seed=7)
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=4, output_logits=True,
               return_dict_in_generate=True)
    seen = []
    real = decode_kernel.decode_kernels
    monkeypatch.setattr(decode_kernel, "decode_kernels", lambda gm: seen.append(real(gm)) or seen[-1])
    with torch.no_grad():
        cm = kvfx.compress(torch.compile(copy.deepcopy(m)), P, quantize=quantize)
        out = cm.generate(ids, **gen)
        count, first = kvfx.counters["kvfx"][counter], len(seen)
        monkeypatch.setenv(switch, "1")
        torch._dynamo.reset()
        ref = kvfx.compress(torch.compile(copy.deepcopy(m)), P, quantize=quantize).generate(ids, **gen)
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(torch.stack(out.logits), torch.stack(ref.logits))
    return cm, seen[:first], count


@pytest.mark.parametrize("quantize", ["int4", "int8x2+int4x2"])
def test_the_pass_binds_every_call_and_changes_no_number(quantize, monkeypatch):
    cm, seen, count = _generate_twice(quantize, "KVFX_NO_DECODE_KERNEL", "decode_kernels", monkeypatch)
    decode = torch.ops.kvfx.decode_attention.default
    kept = sum(_calls(g, decode) for g in cm._kvfx.backend.graphs)
    assert kept == 2 and count == kept  # two layers' decode step
    assert sum(_calls(g, _attend()) for g in seen) == kept and sum(_calls(g, decode) for g in seen) == 0


def test_wanted_only_on_cpu_with_the_switch_off(monkeypatch):
    assert decode_kernel.wanted([torch.zeros(1)]) and not decode_kernel.wanted([torch.zeros(1, device="meta")])
    monkeypatch.setenv("KVFX_NO_DECODE_KERNEL", "1")
    assert not decode_kernel.wanted([torch.zeros(1)])


def _ext():
    return la._extension()


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 9), width=st.integers(1, 70), kind=st.sampled_from(KINDS[:-1]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), offset=st.booleans(),
       exact=st.booleans(), strided=st.booleans(), seed=st.integers(0, 99))
def test_codec_ops_against_plain_torch(rows, width, kind, dtype, offset, exact, strided, seed):
    """encode with the pass's arguments (a whole-row int5 / int3 / int2 band as -1: the rows' width) stores
    quant.quantize's bytes for any float dtype and strided rows; decode reads the float32 reader's numbers plus the
    offset, rounded once to the dtype, with the exact rows (plus the offset) at held positions. The Python ops
    call the same C++ ops (no second copy of their logic)."""
    gen = torch.Generator().manual_seed(seed)
    width = quant.width_of(kind) or width
    x = (torch.randn(2, 3, rows, 2 * width, generator=gen) * 3)[..., ::2] if strided else \
        torch.randn(2, 3, rows, width, generator=gen) * 3
    x = x.to(dtype)
    stored = _ext().encode(x, *decode_kernel._encode_format(kind))
    # quant.quantize's ceil(8·log2) may pick the next scale code within float round-off of an integer (~1e-5 of
    # groups; tests/ops/test_quantize_rows.py); these draws have none
    assert torch.equal(stored, quant.quantize(x.float(), kind))
    torch.library.opcheck(_ext().encode.default, (x, *decode_kernel._encode_format(kind)),
                          test_utils=("test_schema", "test_faketensor"))
    extra = [None, None, None]
    if exact:
        extra[:2] = torch.randn(2, 3, 4, width, generator=gen).to(torch.bfloat16), torch.tensor([0, rows + 2, -1, 0])
        extra[1][3] = rows - 1
    if offset:
        extra[2] = torch.randn(3, 1, width, generator=gen)
    bits, spec, _ = la.kernel_format(kind, width, 0, True)
    got = _ext().decode(stored, width, bits, spec, dtype, *extra)
    off = extra[2] if offset else torch.zeros(1)
    # the float32 reader tests/ops checks against quant.dequantize (to its exp2 table's last bits), then in torch
    want = (_ext().dequantize_rows(stored, width, bits, spec, la._scales()) + off).to(dtype)
    if exact:
        want = la._put_exact(want, (extra[0].float() + off).to(dtype), extra[1])
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(torch.ops.kvfx.dequantize(stored, width, kind, dtype, *extra), got)
    torch.library.opcheck(_ext().decode.default, (stored, width, bits, spec, dtype, *extra),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("quantize", ["int4", "int3", "int8x2+int4x2"])
def test_the_pass_binds_the_caches_writes_and_reads_and_changes_no_number(quantize, monkeypatch):
    """Every kvfx::quantize (a prompt's rows and each step's one row) and kvfx::dequantize (a prompt's read) of the
    compiled graphs becomes encode / decode; tokens and logits those of the Python ops (KVFX_NO_CPP_CODEC=1)."""
    _, seen, count = _generate_twice(quantize, "KVFX_NO_CPP_CODEC", "codec_kernels", monkeypatch)
    # prompt: 2 layers × (quantize k, v + dequantize k, v); step: 2 layers × quantize k, v
    assert count == 12
    assert sum(_calls(g, _ext().encode.default) for g in seen) == 8
    assert sum(_calls(g, _ext().decode.default) for g in seen) == 4
    python_ops = (torch.ops.kvfx.quantize, torch.ops.kvfx.quantize.default, torch.ops.kvfx.dequantize,
                  torch.ops.kvfx.dequantize.default)
    assert not any(n.target in python_ops for g in seen for n in g.graph.nodes if n.op == "call_function")


def test_cpp_codec_switch(monkeypatch):
    assert decode_kernel.cpp_codec()
    monkeypatch.setenv("KVFX_NO_CPP_CODEC", "1")
    assert not decode_kernel.cpp_codec()


@pytest.mark.parametrize("kinds", [("int4x8+int2x8", "int4x16+e8x8"), ("int2", "e8")])
def test_two_models_of_other_widths_in_one_process(kinds):
    """Two compressed models of one class whose latents differ in width, decoding in turn: Dynamo then makes the
    cache's width symbolic in the graphs it compiles next (automatic dynamic shapes); the pass reads a bands format's
    columns off the format and sends a whole-row format's band with the rows' width (-1)."""
    m = tiny_llama(2, head_dim=32)
    ids = model_inputs(m, tokens=5)
    models = []
    for rank, kind in zip((16, 24), kinds):
        proj = random_projections(m, rank=rank, seed=rank)
        models.append((kvfx.compress(torch.compile(copy.deepcopy(m), backend="inductor"), proj, quantize=kind),
                       reference_greedy(m, proj, ids, 4, quantize=kind)))
    kvfx.counters.clear()
    for _ in range(2):
        for cm, want in models:
            with torch.no_grad():
                out = cm.generate(ids, max_new_tokens=4, do_sample=False)
            n = out.shape[1]
            assert torch.equal(out, want[:, :n])
    assert kvfx.counters["kvfx"]["decode_kernels"] >= 2

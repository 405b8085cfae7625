"""Pass 5b — decode kernel: a CPU graph's kvfx::decode_attention calls the C++ op `attend` on the same kernel.

The op against the Python op it stands for (bit-equal: the same kernel and scale table, for every row format,
masks, exact rows, bfloat16 queries; fake kernel via opcheck); the pass's counter (`decode_kernels`: one per call)
beside numerics (Inductor's tokens and logits equal those with the switch KVFX_NO_DECODE_KERNEL=1, which keeps
the Python op); kvfx's kept graphs still show kvfx.decode_attention; other devices leave it alone."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kvfx
from helpers import model_inputs, random_projections, tiny_llama
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


@pytest.mark.parametrize("quantize", ["int4", "int8x2+int4x2"])
def test_the_pass_binds_every_call_and_changes_no_number(quantize, monkeypatch):
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
        monkeypatch.setenv("KVFX_NO_DECODE_KERNEL", "1")
        torch._dynamo.reset()
        ref = kvfx.compress(torch.compile(copy.deepcopy(m)), P, quantize=quantize).generate(ids, **gen)
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(torch.stack(out.logits), torch.stack(ref.logits))  # the same kernel, the same numbers
    decode = torch.ops.kvfx.decode_attention.default
    graphs = cm._kvfx.backend.graphs
    kept = sum(_calls(g, decode) for g in graphs)
    assert kept == 2 and kvfx.counters["kvfx"]["decode_kernels"] == kept  # two layers' decode step
    assert sum(_calls(g, _attend()) for g in seen) == kept and sum(_calls(g, decode) for g in seen) == 0


def test_wanted_only_on_cpu_with_the_switch_off(monkeypatch):
    assert decode_kernel.wanted([torch.zeros(1)]) and not decode_kernel.wanted([torch.zeros(1, device="meta")])
    monkeypatch.setenv("KVFX_NO_DECODE_KERNEL", "1")
    assert not decode_kernel.wanted([torch.zeros(1)])

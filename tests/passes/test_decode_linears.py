"""Pass 5 — decode linears: every linear of a CPU inference graph handed to Inductor is kvfx's linear op.

Counters (`decode_linears`: one per linear) beside numerics (greedy tokens equal the uncompressed model's with
kvfx's cache, eager); kvfx's rewritten graphs (KvfxBackend.graphs, the expect-tests) keep `linear`; the switch
KVFX_NO_DECODE_LINEAR=1, grad mode and a graph on another device leave the linears alone."""
import copy

import pytest
import torch

import kvfx
from helpers import model_inputs, random_projections, tiny_llama
from kvfx.compress import cache_kwarg
from kvfx.ops import decode_linear as ops
from kvfx.passes import decode_linear, graph_utils as gu

pytestmark = pytest.mark.usefixtures("one_thread")
GEN = dict(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=5)


def _linears(gm):
    return sum(gu.is_linear(n) for n in gm.graph.nodes)


def test_every_linear_becomes_the_op_and_tokens_stay(monkeypatch):
    m = tiny_llama(2)
    ids = model_inputs(m, batch=2, tokens=5)
    P = random_projections(m, rank=4, seed=3)
    with torch.no_grad():
        ref = m.generate(ids, **GEN, **{cache_kwarg(m): kvfx.LowRankCache(P, "dynamic", max_cache_len=10)})
    seen = []
    real = decode_linear.decode_linears
    monkeypatch.setattr(decode_linear, "decode_linears", lambda gm: seen.append(real(gm)) or seen[-1])
    cm = kvfx.compress(torch.compile(copy.deepcopy(m), backend="eager"), P)
    with torch.no_grad():
        out = cm.generate(ids, **GEN)
    assert torch.equal(out, ref), (out.tolist(), ref.tolist())
    graphs = cm._kvfx.backend.graphs
    assert len(seen) == len(graphs) and all(_linears(g) > 0 for g in graphs)  # kvfx's graphs keep linear
    for g, handed in zip(graphs, seen):
        single = [n for n in handed.graph.nodes if n.target is ops.op()]
        groups = [n for n in handed.graph.nodes if n.target is ops.group_op()]
        assert _linears(handed) == 0 and len(single) + sum(len(n.args[1]) for n in groups) == _linears(g)
        assert sorted(len(n.args[1]) for n in groups) == [2, 2, 3, 3]  # each layer's (gate, up) and (q, k, v)
    # 2 layers × (q, k, v, o, gate, up, down) + lm_head, in every graph (prefill and decode)
    assert kvfx.counters["kvfx"]["decode_linears"] == 15 * len(graphs)
    assert kvfx.counters["kvfx"]["decode_linear_groups"] == 4 * len(graphs)


def test_switched_off_and_other_devices(monkeypatch):
    m = tiny_llama(1)
    ids = model_inputs(m, tokens=4)
    monkeypatch.setenv("KVFX_NO_DECODE_LINEAR", "1")
    cm = kvfx.compress(torch.compile(copy.deepcopy(m), backend="eager"), random_projections(m, rank=4))
    with torch.no_grad():
        cm(ids)
    assert kvfx.counters["kvfx"]["decode_linears"] == 0 and kvfx.counters["kvfx"]["graphs"] == 1
    monkeypatch.delenv("KVFX_NO_DECODE_LINEAR")
    with torch.no_grad():
        assert decode_linear.wanted([torch.zeros(1)]) and not decode_linear.wanted([torch.zeros(1, device="meta")])
    assert not decode_linear.wanted([torch.zeros(1)])  # grad on: the op has no autograd kernel
    cm(ids).logits.sum().backward()  # a graph compiled with grad on keeps F.linear (Dynamo guards on grad mode)
    assert kvfx.counters["kvfx"]["decode_linears"] == 0 and kvfx.counters["kvfx"]["graphs"] == 2


def test_groups_switched_off(monkeypatch):
    m = tiny_llama(1)
    monkeypatch.setenv("KVFX_NO_LINEAR_GROUPS", "1")
    cm = kvfx.compress(torch.compile(copy.deepcopy(m), backend="eager"), random_projections(m, rank=4))
    with torch.no_grad():
        cm(model_inputs(m, tokens=4))
    assert kvfx.counters["kvfx"]["decode_linears"] == 8 and kvfx.counters["kvfx"]["decode_linear_groups"] == 0


def test_inductor_runs_the_op():
    m = tiny_llama(1)
    ids = model_inputs(m, tokens=4)
    P = random_projections(m, rank=4)
    with torch.no_grad():
        want = kvfx.compress(torch.compile(copy.deepcopy(m), backend="eager"), P)(ids).logits
        got = kvfx.compress(torch.compile(copy.deepcopy(m)), P)(ids).logits
    assert kvfx.counters["kvfx"]["decode_linears"] == 2 * 8
    assert kvfx.counters["kvfx"]["decode_linear_groups"] == 2 * 2  # (q, k, v), (gate, up), in both compiles
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

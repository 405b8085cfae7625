"""Pass 5c — decode matmuls: a decode step's small matmuls by kvfx constants become a multiply-sum Inductor writes.

The pass's counter (`decode_matmuls`: one per matmul) beside numerics (Inductor's tokens equal, and its logits
match, those with the switch KVFX_NO_DECODE_MATMUL=1); what it leaves alone (a prefill's rows, a large product, a
matmul by a graph input that is not a 3-D constant, grad mode, other devices)."""
import copy

import pytest
import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import kvfx
from helpers import model_inputs, random_projections, tiny_llama
from kvfx.passes import decode_matmul

pytestmark = pytest.mark.usefixtures("one_thread")


def _by_constant(gm):
    return sum(n.op == "call_function" and n.target is torch.matmul and n.args[1].op == "placeholder"
               for n in gm.graph.nodes)


@pytest.mark.parametrize("rank", [4, 12])  # 12 > head_dim 8: the wide value latent keeps o·Dᵀ too
def test_every_small_matmul_goes_and_tokens_stay(rank, monkeypatch):
    m = tiny_llama(2)
    ids = model_inputs(m, batch=2, tokens=5)
    P = random_projections(m, rank=rank, seed=5)
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=4, output_logits=True,
               return_dict_in_generate=True)
    seen = []
    real = decode_matmul.decode_matmuls
    monkeypatch.setattr(decode_matmul, "decode_matmuls", lambda gm: seen.append((gm, real(gm))) or seen[-1][1])
    with torch.no_grad():
        out = kvfx.compress(torch.compile(copy.deepcopy(m)), P).generate(ids, **gen)
        count = kvfx.counters["kvfx"]["decode_matmuls"]
        monkeypatch.setenv("KVFX_NO_DECODE_MATMUL", "1")
        torch._dynamo.reset()
        ref = kvfx.compress(torch.compile(copy.deepcopy(m)), P).generate(ids, **gen)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)
    before = sum(_by_constant(a) for a, _ in seen)
    assert before >= 2 and count == before  # at least the decode step's q·B of both layers
    assert all(_by_constant(b) == 0 for _, b in seen)


def _graph(x_shape, c_shape, dynamic=(), dtype=torch.float32):
    """matmul(x, c) with x's value recorded (the sizes at `dynamic` SymInts) and c a 3-D placeholder."""
    g = fx.Graph()
    x, c = g.placeholder("x"), g.placeholder("c")
    x.meta["example_value"], c.meta["example_value"] = torch.empty(x_shape), torch.empty(c_shape, dtype=dtype)
    if dynamic:
        env = ShapeEnv()
        dims = [DimDynamic.DYNAMIC if i in dynamic else DimDynamic.STATIC for i in range(len(x_shape))]
        x.meta["example_value"] = FakeTensorMode(shape_env=env).from_tensor(
            torch.empty(x_shape), source=ConstantSource("x"), symbolic_context=StatelessSymbolicContext(dims))
    g.output(g.call_function(torch.matmul, (x, c)))
    return fx.GraphModule(torch.nn.Module(), g)


@pytest.mark.parametrize("x_shape, c_shape, dynamic, takes", [
    ((2, 3, 3, 64), (3, 64, 32), (), True),         # a decode step's grouped q·B
    ((1, 9, 1, 64), (9, 64, 32), (), True),         # one query row a head
    ((4, 9, 1, 64), (9, 64, 32), (0,), True),       # ... with a dynamic batch
    ((1, 9, 512, 64), (9, 64, 32), (), False),      # a prefill's 512 tokens: a GEMM
    ((1, 9, 16, 64), (9, 64, 32), (2,), False),     # a prefill of a dynamic length (and no guard on it)
    ((8, 64, 16, 128), (64, 128, 128), (), False),  # 16 rows, but 2^24 numbers in the product
])
def test_what_it_takes(x_shape, c_shape, dynamic, takes):
    gm = _graph(x_shape, c_shape, dynamic)
    new = decode_matmul.decode_matmuls(gm)
    if dynamic:
        assert not gm.graph.find_nodes(op="placeholder")[0].meta["example_value"].fake_mode.shape_env.guards
    assert (new is not gm) == takes and _by_constant(new) == (0 if takes else 1)
    if takes:
        x, c = torch.randn(x_shape), torch.randn(c_shape)
        torch.testing.assert_close(new(x, c), torch.matmul(x, c), rtol=1e-5, atol=1e-4)
        xb, cb = x.bfloat16(), c.bfloat16()
        got = decode_matmul.decode_matmuls(_graph(x_shape, c_shape, dtype=torch.bfloat16))(xb, cb)
        assert got.dtype == torch.bfloat16  # summed in float32, rounded once
        torch.testing.assert_close(got, torch.matmul(xb.float(), cb.float()).bfloat16(), rtol=1e-2, atol=1e-2)


def test_wanted_only_on_cpu_without_grad_and_switch(monkeypatch):
    assert not decode_matmul.wanted([torch.zeros(1)])  # grad on
    with torch.no_grad():
        assert decode_matmul.wanted([torch.zeros(1)]) and not decode_matmul.wanted([torch.zeros(1, device="meta")])
        monkeypatch.setenv("KVFX_NO_DECODE_MATMUL", "1")
        assert not decode_matmul.wanted([torch.zeros(1)])

"""Pass 5c — decode matmuls: a decode step's small matmuls by kvfx constants become the C++ op small_matmul (or,
without it or with KVFX_MATMUL_MULSUM=1, a multiply-sum Inductor writes).

The pass's counter (`decode_matmuls`: one per matmul) beside numerics (Inductor's tokens equal, and its logits
match, those with the switch KVFX_NO_DECODE_MATMUL=1), per-head and joint (`kv`) latents; what it leaves alone (a
prefill's rows, a large product, a matmul by a graph input that is not a 2-D / 3-D constant, grad mode, other
devices); the op against torch.matmul."""
import copy

import pytest
import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import kvfx
from helpers import model_inputs, random_projections, tiny_llama
from kvfx.calib.collect import collect_stats, fit
from kvfx.ops import lowbit_attention as la
from kvfx.passes import decode_matmul

pytestmark = pytest.mark.usefixtures("one_thread")


def _by_constant(gm):
    return sum(n.op == "call_function" and n.target is torch.matmul and n.args[1].op == "placeholder"
               for n in gm.graph.nodes)


@pytest.mark.parametrize("rank", [4, 12, "kv"])  # 12 > head_dim 8: the wide value latent keeps o·Dᵀ too; kv: a
def test_every_small_matmul_goes_and_tokens_stay(rank, monkeypatch):  # joint latent's projections of the new token
    m = tiny_llama(2)
    ids = model_inputs(m, batch=2, tokens=5)
    if rank == "kv":
        stats = collect_stats(m, [model_inputs(m, batch=2, tokens=16, seed=s) for s in range(2)], progress=False)
        P = fit(stats, "kqsvd", 12, granularity="kv")
    else:
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
    assert before >= (6 if rank == "kv" else 2) and count == before  # at least q·B (kv: and K, V down) a layer
    assert all(_by_constant(b) == 0 for _, b in seen)
    op = decode_matmul.small_matmul_op()
    if op is not None:  # the C++ op took them
        assert sum(n.target is op for _, b in seen for n in b.graph.nodes) == count


def _graph(x_shape, c_shape, dynamic=(), dtype=torch.float32):
    """matmul(x, c) with x's value recorded (the sizes at `dynamic` SymInts) and c a placeholder."""
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
    ((1, 1, 192), (192, 360), (), True),            # a joint latent's new keys (3 kv heads × 64) by D
    ((4, 1, 192), (192, 360), (0,), True),          # ... with a dynamic batch
    ((1, 300, 192), (192, 360), (), False),         # a prefill's keys: a GEMM
    ((1, 1, 192), (3, 192, 4, 360), (), False),     # a 4-D constant
])
@pytest.mark.parametrize("mulsum", [False, True])
def test_what_it_takes(x_shape, c_shape, dynamic, takes, mulsum, monkeypatch):
    if mulsum:
        monkeypatch.setenv("KVFX_MATMUL_MULSUM", "1")
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


@pytest.mark.skipif(not la.kernel_available("cpu"), reason="no C++ compiler: the pass writes the multiply-sum")
@pytest.mark.parametrize("x_shape, c_shape", [((1, 1, 192), (192, 360)), ((2, 3, 3, 64), (3, 64, 360)),
                                              ((4, 1, 200), (200, 37)), ((1, 9, 1, 64), (9, 64, 70)),
                                              ((3, 2, 5, 16), (2, 16, 17)), ((1, 4100, 16), (16, 8))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_small_matmul_is_matmul(x_shape, c_shape, dtype):
    """The op against torch.matmul: float32 sums (in float32, one rounding for bfloat16); strided x; what it does
    not take (float16, more than 4096 rows) is torch.matmul itself; opcheck (its fake kernel's shapes)."""
    op = la._extension().small_matmul.default
    g = torch.Generator().manual_seed(len(x_shape) + c_shape[-1])
    x = torch.randn(*x_shape[:-1], 2 * x_shape[-1], generator=g)[..., ::2].to(dtype)  # strided rows
    c = torch.randn(c_shape, generator=g).to(dtype)
    got = op(x, c)
    assert got.dtype == dtype and got.shape == torch.matmul(x, c).shape
    if dtype == torch.float16 or x.numel() // x_shape[-1] > 4096:
        assert torch.equal(got, torch.matmul(x, c))
    else:
        want = torch.matmul(x.double(), c.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5 if dtype == torch.float32 else 8e-3,
                                   atol=1e-4 if dtype == torch.float32 else 1e-2)
    torch.library.opcheck(op, (x, c))


@pytest.mark.skipif(not la.kernel_available("cpu"), reason="no C++ compiler: the pass writes the multiply-sum")
@pytest.mark.parametrize("x_shape, c_shape", [((1, 3, 3, 64), (3, 64, 360)), ((1, 3, 3, 320), (3, 320, 64)),
                                              ((1, 1, 192), (192, 360)), ((2, 9, 1, 64), (9, 64, 70))])
def test_small_matmul_rows_split_among_threads_change_no_number(x_shape, c_shape):
    """Rows split among threads (each row's sums in one thread, in the same order): the numbers of one thread."""
    op = la._extension().small_matmul.default
    g = torch.Generator().manual_seed(c_shape[-1])
    x, c = torch.randn(x_shape, generator=g), torch.randn(c_shape, generator=g)
    one = op(x, c)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert torch.equal(op(x, c), one)
    finally:
        torch.set_num_threads(threads)

"""kvfx's linear op (ops/decode_linear.py): F.linear, with a decode step's float32 / bfloat16 rows through the C++
kernel.

Against F.linear on every shape the kernel sees (rows 1-8, widths not multiples of 4 / 8, bias or not, a weight
with a row stride; bfloat16 against float32 sums of the same numbers rounded once), the cases it leaves to F.linear,
and torch.library's schema and fake-tensor checks."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from kvfx.ops import decode_linear as dl

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not dl.takes_kernel(torch.zeros(1, 8), torch.zeros(4, 8)),
                                 reason="no C++ compiler: no kvfx linear op here")]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, dl.MAX_ROWS), out=st.integers(1, 70), width=st.integers(1, 90), bias=st.booleans(),
       stride=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_equals_f_linear(rows, out, width, bias, stride, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g)
    w = torch.randn(out * stride, width, generator=g)[::stride]  # stride > 1: rows not adjacent in memory
    b = torch.randn(out, generator=g) if bias else None
    assert dl.takes_kernel(x, w)
    got, want = dl.op()(x, w, b), F.linear(x, w, b)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * width ** 0.5)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, dl.MAX_ROWS), out=st.integers(1, 70), width=st.integers(1, 90), bias=st.booleans(),
       stride=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_bfloat16_sums_in_float32_and_rounds_once(rows, out, width, bias, stride, seed):
    """bfloat16 x and W: the float32 sum of their products (+ bias) rounded to bfloat16 once, as ATen's bfloat16
    linear rounds — at most one bfloat16 step from that sum taken in another order (a sum can straddle a rounding
    boundary), where rounding after each product would be many steps off."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g).bfloat16()
    w = torch.randn(out * stride, width, generator=g).bfloat16()[::stride]
    b = torch.randn(out, generator=g).bfloat16() if bias else None
    assert dl.takes_kernel(x, w) and not dl.takes_kernel(x, w.float())  # x and W of one dtype
    got = dl.op()(x, w, b)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == exact.shape and got.dtype == torch.bfloat16
    step = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(1e-30)  # one bfloat16 step (<= 2 ulp below 1.0)
    assert ((got.double() - exact).abs() <= step + 1e-5 * width ** 0.5).all()
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 4, 5, 8])
def test_batched_decode_shape_and_model_sized_layers(batch, dtype):
    """SmolLM2's widths (576 in, 1536 in for its down projection): many full steps of the kernels' loops (up to 4
    rows one weight row at a time, 5-8 rows eight; ops/decode_linear.h) and their tails (1536 / 64 = 24 steps)."""
    for width, out in ((576, 1536), (1536, 576), (576, 200)):
        x = torch.randn(batch, 1, width).to(dtype)  # [batch, one token, hidden]
        w = torch.randn(out, width).to(dtype)
        got = dl.op()(x, w, None)
        assert got.shape == (batch, 1, out) and got.dtype == dtype
        exact = F.linear(x.double(), w.double())
        tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(torch.bfloat16).eps
        torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol * width ** 0.5 * 4)


@pytest.mark.parametrize("case", ["prefill", "float16", "float64", "empty"])
def test_other_inputs_are_f_linear(case):
    x, w = torch.randn(2, 5, 16), torch.randn(12, 16)  # prefill: 10 rows > MAX_ROWS
    if case in ("float16", "float64"):
        x, w = x[:, :1].to(getattr(torch, case)), w.to(getattr(torch, case))
    if case == "empty":
        x = x[:0]
    assert not dl.takes_kernel(x, w)
    assert torch.equal(dl.op()(x, w, None), F.linear(x, w))


def test_no_autograd_kernel():
    """Inference only: the pass never puts it in a graph compiled with grad on (tests/passes/test_decode_linears.py)."""
    x, w = torch.randn(1, 20, requires_grad=True), torch.randn(9, 20)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        dl.op()(x, w, None).sum().backward()


@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(bias):
    x, w = torch.randn(2, 1, 24), torch.randn(10, 24)
    torch.library.opcheck(dl.op(), (x, w, torch.randn(10) if bias else None),
                          test_utils=("test_schema", "test_faketensor"))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, dl.MAX_ROWS), outs=st.lists(st.integers(1, 70), min_size=1, max_size=4),
       width=st.integers(1, 90), bf16=st.booleans(), stride=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_linears_is_the_op_for_each_weight(rows, outs, width, bf16, stride, seed):
    """linears(x, weights): the linear op's numbers for each weight (the same kernel on each row, bit for bit), all
    of them in one call: output rows of several weights (and their out % 8 tails) in one split over the threads."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(1, rows, width, generator=g).to(dt)
    ws = [torch.randn(o * stride, width, generator=g).to(dt)[::stride] for o in outs]
    got = dl.group_op()(x, ws)
    assert len(got) == len(ws)
    for y, w in zip(got, ws):
        assert y.dtype == dt and torch.equal(y, dl.op()(x, w, None))


def test_linears_leaves_what_the_kernel_does_not_take_to_f_linear():
    x = torch.randn(12, 24)  # 12 rows: a prefill
    ws = [torch.randn(10, 24), torch.randn(7, 24)]
    for y, w in zip(dl.group_op()(x, ws), ws):
        torch.testing.assert_close(y, F.linear(x, w))
    torch.library.opcheck(dl.group_op(), (torch.randn(2, 1, 24), ws), test_utils=("test_schema", "test_faketensor"))

"""The decode-linear op: F.linear, with a decode step's matrix-vector products read at the memory's speed.

A decode step (one token a sequence) reads every weight of the model once; with the cache compressed, the weights
are most of the step's bytes (SmolLM2-135M: 0.54 GB of float32 weights against 0.09 GB of cache at 25 % and 16k
tokens). ATen's float32 linear runs those products at ~9-12 GB/s on this project's 2-core CPU, about half what the
machine reads; the C++ kernel (decode_linear.h, registered as `linear` in the low-bit attention build,
torch.ops.kvfx_lowbit_attention.linear) reads them at ~17-19 GB/s. The op takes that kernel for float32 or bfloat16
CPU inputs (x and W of one dtype) of at most MAX_ROWS rows (batch × tokens) and is F.linear otherwise (prefill,
other dtypes), so passes/decode_linear.py can put it in place of every linear of a graph. Its numbers are
F.linear's up to float32 round-off (another summation order; bfloat16: summed in float32, rounded once, so at most
one bfloat16 step apart where the two sums straddle a rounding boundary). Inference only: it has no autograd kernel
(the pass only uses it in graphs compiled with grad off).
"""
from __future__ import annotations

import torch

from .lowbit_attention import _extension

MAX_ROWS = 8  # decode_linear.h's kMaxRows


def op():
    """torch.ops.<build>.linear.default, or None without the C++ kernel (no compiler)."""
    ext = _extension()
    return None if ext is None else ext.linear.default


def group_op():
    """torch.ops.<build>.linears.default — [F.linear(x, W) for W in weights] in one call — or None (no compiler)."""
    ext = _extension()
    return None if ext is None else ext.linears.default


def takes_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the op runs the C++ matrix-vector kernel for these inputs (else it is F.linear)."""
    return (op() is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and weight.dtype == x.dtype and weight.dim() == 2 and 0 < x.numel() <= MAX_ROWS * x.shape[-1])

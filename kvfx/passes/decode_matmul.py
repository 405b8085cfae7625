"""Pass 5c — decode matmuls: a decode step's small matmuls by kvfx constants as one C++ op call each.

    matmul(x [.., g, d], C [h, d, R])   ==>   small_matmul(x, C)      (kvfx/ops/decode_matmul.h)
    matmul(x [.., n, d], C [d, R])      ==>   small_matmul(x, C)

A decode step keeps a few small matmuls by kvfx constants: q·B where RoPE blocks folding B into W_Q (one a layer;
passes/decode.py groups it per kv head), o·Dᵀ where a latent wider than head_dim keeps it, and the cache's
projection of the new token's keys and values into a joint latent (`layer` / `kv` granularity: x [b, 1, h·d] by C
[h·d, R], two a layer). Each is a few thousand multiply-adds (SmolLM2 per-head: 3 kv heads × 3 query rows × 64 ×
32), but as a matmul it leaves Inductor as an ATen bmm / mm call: ~14-22 µs a call in float32 and ~50-80 µs in
bfloat16 on this project's CPU (oneDNN's bfloat16 path), one to three a layer and step. The C++ op sums each row in
float32 against C read from the caches (~2-5 µs), its input computed once into a buffer. Without the C++ build, or
with KVFX_MATMUL_MULSUM=1, the pass writes a multiply and a sum instead,

    (x.float()[.., :, None] * C.float()[:, None]).sum(-2).to(x.dtype)   (2-D C: C.float()[None])

a loop Inductor writes itself, fused with the RoPE before it — which it then recomputes, cos and sin included, for
every 16 output columns (generated code; 13 k cos / sin a layer for SmolLM2's 360-wide latent). Only where the rows
a head multiplies are few (x's second-to-last size known and ≤ MAX_ROWS: one token's query heads of a group) and
the product is small (≤ MAX_PRODUCT numbers), so a prefill graph's matmul over its tokens stays a GEMM. One counter
per matmul (`decode_matmuls`). Runs on the graph handed to the compiler, like passes 5 and 5b; only for CPU graphs
compiled with grad off, not in live mode, not with KVFX_NO_DECODE_MATMUL=1.
"""
from __future__ import annotations

import math
import os

import torch
import torch.fx as fx

from ..ops.lowbit_attention import _extension
from . import graph_utils as gu
from .constants import fresh_copy
from .counters import counters

MAX_ROWS = 16          # query rows a head multiplies: a decode step's g query heads of a kv group (× 1 token)
MAX_PRODUCT = 1 << 20  # numbers of the broadcast product x[..., None] * C: a few µs of one loop


def wanted(example_inputs) -> bool:
    """Whether the pass runs for a graph with these example inputs."""
    if os.environ.get("KVFX_NO_DECODE_MATMUL") == "1" or torch.is_grad_enabled():
        return False
    return gu.cpu_only(example_inputs)


def _sizes(node) -> tuple | None:
    """x's sizes from its trace-time value or, for a reshape a kvfx pass inserted (no value recorded), its args."""
    shape = gu.shape_of(node)
    if shape is not None:
        return shape
    if gu.is_method(node, "reshape") and all(isinstance(a, int) for a in node.args[1:]):
        return tuple(node.args[1:])
    return None


def _small(node: fx.Node) -> bool:
    """A matmul(x, C) by a 3-D constant whose rows a head are few and whose product is small."""
    if not (node.op == "call_function" and node.target is torch.matmul and len(node.args) == 2 and not node.kwargs):
        return False
    x, c = node.args
    cs, xs = gu.shape_of(c), _sizes(x)
    if c.op != "placeholder" or cs is None or len(cs) not in (2, 3) or xs is None or len(xs) < 3:
        return False
    rows = gu.static_int(xs[-2])
    if rows is None or not 0 < rows <= MAX_ROWS:
        return False
    heads = math.prod(_hint(b) for b in xs[:-2])
    return heads * rows * cs[-2] * cs[-1] <= MAX_PRODUCT


def _hint(size) -> int:
    """A batch size as traced (a dynamic batch: the size it was traced at, without guarding on it; a reshape's -1:
    the batch rows, 1 here)."""
    known = gu.static_int(size)
    if known is not None:
        return abs(known)
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else 1


def small_matmul_op():
    """torch.ops.<build>.small_matmul.default (kvfx/ops/decode_matmul.h), or None without the C++ kernel or with
    KVFX_MATMUL_MULSUM=1 (the multiply-sum instead)."""
    if os.environ.get("KVFX_MATMUL_MULSUM") == "1":
        return None
    ext = _extension()
    return None if ext is None else ext.small_matmul.default


def decode_matmuls(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` with every small matmul by a constant as small_matmul or a multiply-sum (`gm` itself when it
    has none)."""
    if not any(_small(n) for n in gm.graph.nodes):
        return gm
    new = fresh_copy(gm)
    g = new.graph
    op = small_matmul_op()
    for node in list(g.nodes):
        if not _small(node):
            continue
        x, c = node.args
        dtype = c.meta.get("example_value", c.meta.get("val")).dtype  # x's: kvfx makes C in the graph's dtype
        with g.inserting_before(node):
            if op is not None:  # the C++ op: x computed once, into a buffer (see the top)
                out = g.call_function(op, (x, c))
            else:
                xf = g.call_method("unsqueeze", (g.call_method("float", (x,)), -1))
                cf = g.call_method("unsqueeze", (g.call_method("float", (c,)), -3))
                out = g.call_method("to", (g.call_method("sum", (g.call_function(torch.mul, (xf, cf)), -2)), dtype))
        node.replace_all_uses_with(out)
        g.erase_node(node)
        counters["kvfx"]["decode_matmuls"] += 1
    g.lint()
    new.recompile()
    return new

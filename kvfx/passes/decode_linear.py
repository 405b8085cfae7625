"""Pass 5 — decode linears: every linear of a CPU inference graph becomes kvfx's linear op (ops/decode_linear.py).

    linear(x, W, b)   ==>   kvfx_lowbit_attention.linear(x, W, b)

The op is F.linear, except that a decode step's float32 / bfloat16 matrix-vector products (≤ 8 rows: batch × one
token) read the weights at the memory's speed instead of ATen's ~half of it on CPU. With the cache compressed, those
weights are most of what a step reads, so this is where the saved cache bytes turn into step time. One counter
per linear (`decode_linears`). Runs last, on the graph handed to Inductor (kvfx's rewritten graphs, what
`KvfxBackend.graphs` and the expect-tests show, keep `linear`). Only for graphs compiled with grad off (what
generate and evaluation run; the op has no autograd kernel, and Dynamo guards on grad mode, so a graph compiled
with grad on keeps F.linear), with CPU inputs only (on CUDA Inductor's GEMMs serve them), not in live mode
(training), not without the C++ kernel, and not with KVFX_NO_DECODE_LINEAR=1.
"""
from __future__ import annotations

import os

import torch
import torch.fx as fx

from ..ops import decode_linear as ops
from . import graph_utils as gu
from .constants import fresh_copy
from .counters import counters


def wanted(example_inputs) -> bool:
    """Whether the pass runs for a graph with these example inputs."""
    if os.environ.get("KVFX_NO_DECODE_LINEAR") == "1" or torch.is_grad_enabled():
        return False
    return gu.cpu_only(example_inputs) and ops.op() is not None


def decode_linears(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` with every linear as kvfx's linear op (`gm` itself when it has none)."""
    if not any(gu.is_linear(n) for n in gm.graph.nodes):
        return gm
    new = fresh_copy(gm)
    for node in new.graph.nodes:
        if not gu.is_linear(node):
            continue
        args = dict(zip(("input", "weight", "bias"), node.args), **node.kwargs)
        node.target = ops.op()
        node.args, node.kwargs = (args["input"], args["weight"], args.get("bias")), {}
        counters["kvfx"]["decode_linears"] += 1
    new.graph.lint()
    new.recompile()
    return new

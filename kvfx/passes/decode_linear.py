"""Pass 5 — decode linears: every linear of a CPU inference graph becomes kvfx's linear op (ops/decode_linear.py).

    linear(x, W, b)   ==>   kvfx_lowbit_attention.linear(x, W, b)

The op is F.linear, except that a decode step's float32 / bfloat16 matrix-vector products (≤ 8 rows: batch × one
token) read the weights at the memory's speed instead of ATen's ~half of it on CPU. With the cache compressed, those
weights are most of what a step reads, so this is where the saved cache bytes turn into step time. One counter
per linear (`decode_linears`). Linears without bias that read one x from the graph's own weights (an attention's
q, k, v; an MLP's gate and up) become one call, `linears(x, [W_q, W_k, W_v])`, one dispatch and one split of
all their rows over the threads (counter `decode_linear_groups`; KVFX_NO_LINEAR_GROUPS=1 keeps one call a
linear). Runs last, on the graph handed to Inductor (kvfx's rewritten graphs, what
`KvfxBackend.graphs` and the expect-tests show, keep `linear`). Only for graphs compiled with grad off (what
generate and evaluation run; the op has no autograd kernel, and Dynamo guards on grad mode, so a graph compiled
with grad on keeps F.linear), with CPU inputs only (on CUDA Inductor's GEMMs serve them), not in live mode
(training), not without the C++ kernel, and not with KVFX_NO_DECODE_LINEAR=1.
"""
from __future__ import annotations

import operator
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
    if os.environ.get("KVFX_NO_LINEAR_GROUPS") != "1":
        _group_by_input(new.graph)
    new.graph.lint()
    new.recompile()
    return new


def _group_by_input(g: fx.Graph) -> None:
    """The op's calls without bias that read one x (q, k, v; gate, up), their weights the graph's inputs, as one
    `linears(x, [W, ...])` call: one dispatch and one fork-join of the threads for all of them."""
    calls: dict[fx.Node, list[fx.Node]] = {}
    for node in g.nodes:
        w = node.args[1] if node.target is ops.op() and node.args[2] is None else None
        if isinstance(w, fx.Node) and w.op in ("placeholder", "get_attr"):
            calls.setdefault(node.args[0], []).append(node)
    for x, nodes in calls.items():
        if len(nodes) < 2:
            continue
        with g.inserting_before(nodes[0]):
            group = g.call_function(ops.group_op(), (x, [n.args[1] for n in nodes]))
            for i, n in enumerate(nodes):
                n.replace_all_uses_with(g.call_function(operator.getitem, (group, i)))
        for n in nodes:
            g.erase_node(n)
        counters["kvfx"]["decode_linear_groups"] += 1

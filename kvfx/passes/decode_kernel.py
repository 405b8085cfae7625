"""Pass 5b — decode kernel: a CPU graph's `kvfx::decode_attention` calls the C++ kernel as one C++ op.

    kvfx.decode_attention(q, K, V, rk, rv, kind, scale, mask, shared, …)
        ==>  kvfx_lowbit_attention.attend(q, K, V, rk, rv, bits(kind), scale, mask, shared,
                                          bands(kind, rk), bands(kind, rv), …)

`kvfx::decode_attention` (ops/lowbit_attention.py) is a Python custom op: every call it picks the kernel for the
device, reshapes the mask and turns the row format's name into the kernel's integers — ~100-250 µs of Python a
call, one call a layer and step (SmolLM2: 30 a step, several ms of a step that takes 50-90). The C++ op `attend`
does the same around the same kernel, with the format's integers as constants of the graph, for the dispatcher's
few µs: the same numbers (tests/passes/test_decode_kernel.py). One counter per call (`decode_kernels`). Runs on the
graph handed to the compiler, like pass 5 (kvfx's kept graphs still show `kvfx.decode_attention`); only for graphs
whose inputs are all on the CPU (CUDA keeps the Python op, which picks the Triton kernel), with the C++ kernel
built, not in live mode (training), and not with KVFX_NO_DECODE_KERNEL=1.
"""
from __future__ import annotations

import os

import torch
import torch.fx as fx

from ..ops import lowbit_attention as ops
from . import graph_utils as gu
from .constants import fresh_copy
from .counters import counters

_ARGS = ("q", "kc", "vc", "rk", "rv", "kind", "scale", "mask", "shared", "exact_keys", "exact_values", "positions")


def wanted(example_inputs) -> bool:
    """Whether the pass runs for a graph with these example inputs."""
    if os.environ.get("KVFX_NO_DECODE_KERNEL") == "1":
        return False
    return gu.cpu_only(example_inputs) and ops.kernel_available("cpu")


def _is_decode(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.kvfx.decode_attention.default


def decode_kernels(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` with every kvfx::decode_attention as the C++ op (`gm` itself when it has none)."""
    if not any(_is_decode(n) for n in gm.graph.nodes):
        return gm
    new = fresh_copy(gm)
    attend = ops._extension().attend.default
    for node in new.graph.nodes:
        if not _is_decode(node):
            continue
        a = dict(zip(_ARGS, node.args), **node.kwargs)
        kind, rk, rv, shared = a["kind"], a["rk"], a["rv"], a["shared"]
        bits, kbands, vbands = ops.kernel_format(kind, rk, rv, shared)
        node.target = attend
        node.args = (a["q"], a["kc"], a["vc"], rk, rv, bits, a["scale"], a["mask"], shared, kbands, vbands,
                     a.get("exact_keys"), a.get("exact_values"), a.get("positions"))
        node.kwargs = {}
        counters["kvfx"]["decode_kernels"] += 1
    new.graph.lint()
    new.recompile()
    return new

"""Pass 5b — decode kernel: a CPU graph's kvfx ops call the C++ kernels as C++ ops.

    kvfx.decode_attention(q, K, V, rk, rv, kind, scale, mask, shared, …)
        ==>  kvfx_lowbit_attention.attend(q, K, V, rk, rv, bits(kind), scale, mask, shared,
                                          bands(kind, rk), bands(kind, rv), …)
    kvfx.quantize(x, kind)                    ==>  kvfx_lowbit_attention.encode(x, bits(kind), bands(kind, R))
    kvfx.dequantize(rows, R, kind, dtype, …)  ==>  kvfx_lowbit_attention.decode(rows, R, bits(kind), bands(kind, R),
                                                                                dtype, …)

`kvfx::decode_attention` (ops/lowbit_attention.py) is a Python custom op: every call it picks the kernel for the
device, reshapes the mask and turns the row format's name into the kernel's integers — ~100-250 µs of Python a
call, one call a layer and step (SmolLM2: 30 a step, several ms of a step that takes 50-90). The C++ op `attend`
does the same around the same kernel, with the format's integers as constants of the graph, for the dispatcher's
few µs: the same numbers (tests/passes/test_decode_kernel.py). One counter per call (`decode_kernels`). Runs on the
graph handed to the compiler, like pass 5 (kvfx's kept graphs still show `kvfx.decode_attention`); only for graphs
whose inputs are all on the CPU (CUDA keeps the Python op, which picks the Triton kernel), with the C++ kernel
built, not in live mode (training), and not with KVFX_NO_DECODE_KERNEL=1.

The cache's writes and a prompt's reads likewise: `kvfx::quantize` (each layer's new rows) and `kvfx::dequantize` (a
prefill's or a chunk's read) are Python custom ops too, ~75 µs and ~100-250 µs of dispatch a call where the C++
encoder takes ~6 µs for a decode step's row. Their C++ twins `encode` / `decode` do what the Python ops do around
the same C++ functions (same bytes, same numbers). One counter per call (`codec_kernels`); KVFX_NO_CPP_CODEC=1
keeps the Python ops (and a decode step's row on quant.quantize's torch ops, as before these ops: an A/B switch).
"""
from __future__ import annotations

import os

import torch
import torch.fx as fx

from .. import quant
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


def cpp_codec() -> bool:
    """Whether CPU graphs' kvfx::quantize / dequantize become C++ ops (the cache then sends a decode step's one row
    through kvfx::quantize too)."""
    return (os.environ.get("KVFX_NO_DECODE_KERNEL") != "1" and os.environ.get("KVFX_NO_CPP_CODEC") != "1"
            and ops.kernel_available("cpu"))


def _is_decode(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.kvfx.decode_attention.default


_QUANTIZE = (torch.ops.kvfx.quantize, torch.ops.kvfx.quantize.default)      # Dynamo records the packet
_DEQUANTIZE = (torch.ops.kvfx.dequantize, torch.ops.kvfx.dequantize.default)


def _codec(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _QUANTIZE + _DEQUANTIZE


def _encode_format(kind: str) -> tuple[int, list[int]]:
    """kvfx_lowbit_attention.encode's (bits, bands) for rows of format `kind`: a whole-row low-bit format's one band
    spans the rows' width, -1 (read off the input when the op runs: the graph's recorded sizes of a folded projection's
    output are its sizes before the fold)."""
    bands = quant.bands_of(kind)
    if bands is not None:
        return ops.kernel_format(kind, quant.width_of(kind), 0, True)[:2]
    bits = ops.row_bits(kind)
    return (bits, []) if bits > 0 else (bits, [ops.band_code(quant.FORMATS[quant.codes_of(kind)]), -1])


def _to_cpp(node: fx.Node, ext) -> None:
    """Point a kvfx::quantize / dequantize node at its C++ twin."""
    if node.target in _QUANTIZE:
        x, kind = (list(node.args) + [node.kwargs.get("kind")])[:2]
        node.target, node.args, node.kwargs = ext.encode.default, (x, *_encode_format(kind)), {}
        return
    names = ("stored", "width", "kind", "dtype", "exact_rows", "positions", "offset")
    a = dict(zip(names, node.args), **node.kwargs)
    bits, spec, _ = ops.kernel_format(a["kind"], a["width"], 0, True)
    node.target = ext.decode.default
    node.args = (a["stored"], a["width"], bits, spec, a["dtype"], a.get("exact_rows"), a.get("positions"),
                 a.get("offset"))
    node.kwargs = {}


def decode_kernels(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` with every kvfx::decode_attention, quantize and dequantize as the C++ op (`gm` itself when it
    has none)."""
    if not any(_is_decode(n) or _codec(n) for n in gm.graph.nodes):
        return gm
    new = fresh_copy(gm)
    ext, codecs = ops._extension(), cpp_codec()
    attend = ext.attend.default
    for node in new.graph.nodes:
        if _codec(node):
            if codecs:
                _to_cpp(node, ext)
                counters["kvfx"]["codec_kernels"] += 1
            continue
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

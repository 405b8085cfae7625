"""Small helpers shared by the kvfx graph passes (torch-IR graphs captured by Dynamo)."""
from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx

SDPA = torch._C._nn.scaled_dot_product_attention
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
LINEAR_FNS = (torch._C._nn.linear, torch.nn.functional.linear)
LAYOUT_METHODS = {"view", "reshape", "transpose", "contiguous", "permute", "unsqueeze", "flatten", "clone"}
CAST_METHODS = {"to", "float", "half", "bfloat16", "type"}


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (SDPA, torch.nn.functional.scaled_dot_product_attention)


def sdpa_args(node: fx.Node) -> dict:
    """SDPA's arguments by name, whether they were passed by position or keyword."""
    out = dict(zip(SDPA_ARGS, node.args))
    out.update(node.kwargs)
    return out


def set_sdpa_args(node: fx.Node, **changes) -> None:
    args = sdpa_args(node)
    args.update(changes)
    node.args = (args.pop("query"), args.pop("key"), args.pop("value"))
    node.kwargs = args


def cpu_only(example_inputs) -> bool:
    """Whether every tensor a graph is compiled for lives on the CPU (where kvfx's C++ kernels run)."""
    return {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)} <= {"cpu"}


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_FNS


def is_addmm(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.addmm


def is_method(node: fx.Node, *names: str) -> bool:
    return node.op == "call_method" and node.target in names


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def is_layout(node: fx.Node) -> bool:
    """A node that only moves or casts data: view/reshape/transpose/contiguous/..."""
    if node.op == "call_method" and node.target in LAYOUT_METHODS | CAST_METHODS:
        return True
    if node.op == "call_function" and node.target in (torch.transpose, torch.reshape, torch.permute):
        return True
    return False


def shape_of(node) -> tuple[int, ...] | None:
    val = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    return None


def static_int(x) -> int | None:
    """x as a Python int when it is known at trace time, else None (symbolic sizes). Never guards: int() of a
    dynamic SymInt would return its hint and specialise the graph to it."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import is_concrete_int
        return int(x) if is_concrete_int(x) else None
    try:
        return int(x)
    except Exception:  # noqa: BLE001 - symbolic ints raise various errors
        return None


_MODULE_RE = re.compile(r"_modules\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def source_name(node: fx.Node) -> str | None:
    """Dynamo's source expression of a placeholder, e.g. L['self']._modules['q_proj']._parameters['weight']."""
    if node.op != "placeholder":
        return None
    arg = node.meta.get("grapharg")
    src = getattr(arg, "source", None)
    return src.name if src is not None else None


def module_path(node: fx.Node) -> str | None:
    """Module path ('model.layers.0.self_attn.q_proj') of a parameter placeholder, or None."""
    name = source_name(node)
    if not name or "_parameters[" not in name:
        return None
    head = name.split("._parameters[")[0]
    parts = re.findall(r"_modules\['([^']+)'\]", head)
    return ".".join(parts) if parts else ""


def depends_on(node: fx.Node, pred, limit: int = 64) -> bool:
    """Does `node` (or a node it reads, searching back at most `limit` nodes) satisfy pred?"""
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if pred(n):
            return True
        stack.extend(n.all_input_nodes)
    return False


def is_trig(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("cos", "sin")) or (
        node.op == "call_function" and node.target in (torch.cos, torch.sin))


def retarget_last_dim(nodes, old: int, new: int, heads: int | None = None) -> None:
    """Change view/reshape/expand sizes whose last entry is the feature width `old` (or heads·old)."""
    for n in nodes:
        if not (is_method(n, "view", "reshape", "expand") or n.target is torch.reshape):
            continue
        sizes = list(n.args[1:]) if n.op == "call_method" else list(n.args[1])
        packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
        seq = list(sizes[0]) if packed else sizes
        if not seq:
            continue
        last = static_int(seq[-1]) if not isinstance(seq[-1], fx.Node) else None
        if last == old:
            seq[-1] = new
        elif heads and last == heads * old:
            seq[-1] = heads * new
        else:
            continue
        sizes = [tuple(seq)] if packed else seq
        n.args = (n.args[0], *sizes) if n.op == "call_method" else (n.args[0], tuple(seq))


def is_head_repeat_interleave(n: fx.Node) -> bool:
    """x.repeat_interleave(g, dim=1) on a [b, h, N, d] tensor: GQA's grouping (query head i uses kv head i // g)."""
    if not (n.op == "call_method" and n.target == "repeat_interleave" or
            n.op == "call_function" and n.target in (torch.repeat_interleave, torch.Tensor.repeat_interleave)):
        return False
    reps = n.args[1] if len(n.args) > 1 else n.kwargs.get("repeats")
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
    src, out = shape_of(n.args[0]), shape_of(n)
    return (isinstance(reps, int) and dim in (1, -3) and src is not None and out is not None and len(src) == 4
            and out == (src[0], src[1] * reps, *src[2:]))


def unrepeat(node: fx.Node) -> fx.Node:
    """The kv-head tensor under repeat_kv (x[:, :, None].expand(..).reshape(..), x.unsqueeze(2)...) or
    x.repeat_interleave(g, dim=1); `node` itself when it is not repeated."""
    if is_head_repeat_interleave(node):
        return node.args[0]
    if not (is_method(node, "reshape", "view") or node.target is torch.reshape):
        return node
    e = node.args[0]
    if not isinstance(e, fx.Node) or not (is_method(e, "expand") or e.target is torch.Tensor.expand):
        return node
    u = e.args[0]
    if is_getitem(u) and isinstance(u.args[1], tuple) and len(u.args[1]) >= 3 and u.args[1][2] is None:
        return u.args[0]
    if is_method(u, "unsqueeze") and u.args[1:] == (2,):
        return u.args[0]
    return node


def erase_dead_layout(g: fx.Graph, node: fx.Node) -> fx.Node:
    """Erase `node` and the pure layout ops under it (a bypassed repeat_kv chain) while nothing reads them; returns
    the first node kept."""
    while (isinstance(node, fx.Node) and not node.users and node.op == "call_method"
           and node.target in ("reshape", "view", "expand", "unsqueeze", "repeat_interleave")
           or isinstance(node, fx.Node) and not node.users and (is_getitem(node) or node.target in (
               torch.reshape, torch.Tensor.expand, torch.repeat_interleave, torch.Tensor.repeat_interleave))):
        src = node.args[0]
        g.erase_node(node)
        node = src
    return node

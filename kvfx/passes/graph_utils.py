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
    """x as a Python int when it is known at trace time, else None (symbolic sizes)."""
    if isinstance(x, int):
        return x
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

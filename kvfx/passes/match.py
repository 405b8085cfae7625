"""Pass 1 — match: find every SDPA attention site in a Dynamo-captured graph.

For each `scaled_dot_product_attention` node we walk its query/key/value inputs back to the projection
linear through layout ops (view/reshape/transpose/contiguous), RoPE (mul/add with cos/sin), cache
concatenation, repeat_kv (expand + reshape) and the low-rank cache's reconstruction, and its output
forward to W_O. Nothing here changes the graph; `explain` prints what was found.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from . import cache_contract, graph_utils as gu


@dataclass
class LinearSource:
    """The projection that produces q, k or v (or consumes the attention output, for W_O)."""
    node: fx.Node            # linear(x, W, b) or addmm(b, x, W) (Conv1D: W stored [in, out])
    weight: fx.Node
    bias: fx.Node | None
    transposed: bool         # True for addmm/Conv1D (W is [in, out])
    split: fx.Node | None = None   # fused QKV: the split node ...
    split_index: int | None = None  # ... and which chunk this path reads

    @property
    def module(self) -> str | None:
        path = gu.module_path(self.weight)
        return path


@dataclass
class InputPath:
    """How one SDPA input (q, k or v) is produced."""
    nodes: list[fx.Node]            # from the SDPA input back towards the source (exclusive)
    source: LinearSource | None
    rope: bool = False
    cache: str = "none"             # none | cat | lowrank
    repeat_kv: fx.Node | None = None  # the expand of repeat_kv, if any
    base: fx.Node | None = None     # the tensor before repeat_kv (kv heads)
    latent: fx.Node | None = None   # low-rank cache: the rank-R cached tensor ...
    up: fx.Node | None = None       # ... and the [h, R, d] reconstruction matrix it is multiplied by
    down: fx.Node | None = None     # low-rank cache: the matmul(new, down) that writes the cache
    recon: fx.Node | None = None    # low-rank cache: the matmul(latent, up) reconstruction
    cache_at: int = 0               # nodes[:cache_at] lie between the reconstruction and SDPA
    reason: str | None = None       # why the walk stopped before a linear

    @property
    def foldable(self) -> bool:
        """Only layout ops between the linear and SDPA (so a right-multiplication commutes into W)."""
        chain = self.nodes[self.cache_at:]  # for the low-rank cache: linear -> cache write
        return self.source is not None and not self.rope and self.cache in ("none", "lowrank") and all(
            gu.is_layout(n) or gu.is_getitem(n) or gu.is_method(n, "split") for n in chain)


@dataclass
class AttentionSite:
    name: str
    sdpa: fx.Node
    q: InputPath
    k: InputPath
    v: InputPath
    out_nodes: list[fx.Node]
    out_source: LinearSource | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_dim: int
    scale: float | fx.Node   # SDPA's scale as given (a graph node when Dynamo made it a dynamic input)
    query_len: int | None = None  # query tokens of this call when static (1 in a decode step)
    status: str = "ok"
    notes: list[str] = field(default_factory=list)
    # set by the rewrite pass, read by fold: the inserted projection matmul (or the cache write it folds into) per
    # input "q" / "k" / "v" and the output "o"; None once folded
    proj: dict[str, fx.Node | None] = field(default_factory=dict)

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rope(self) -> bool:
        return self.q.rope or self.k.rope

    @property
    def lowrank_cache(self) -> bool:
        return self.k.cache == "lowrank" and self.v.cache == "lowrank"


def _cache_attr(node) -> str | None:
    """Which of the low-rank cache's projection tensors `node` is (cache_contract), or None."""
    return cache_contract.attribute(gu.source_name(node)) if isinstance(node, fx.Node) else None


def _is_empty_tensor(node) -> bool:
    shape = gu.shape_of(node)
    return shape is not None and math.prod(shape) == 0


def _find_down(graph: fx.Graph, up: fx.Node) -> fx.Node | None:
    """The cache-write matmul(new, down) that pairs with reconstruction matrix `up`."""
    name = gu.source_name(up)
    down = cache_contract.DOWN_OF_UP[cache_contract.attribute(name)]
    want = name[: len(name) - len(cache_contract.attribute(name))] + down  # the same layer's write matrix
    for n in graph.nodes:
        if n.op == "call_function" and n.target is torch.matmul and isinstance(n.args[1], fx.Node):
            if gu.source_name(n.args[1]) == want:
                return n
    return None


_STOP = object()  # a walk step's "the walk ends here" (its source found, or a reason recorded)


def _step_linear(n: fx.Node, path: InputPath, graph: fx.Graph):
    if gu.is_linear(n):
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        path.source = LinearSource(n, n.args[1], b, transposed=False)
        return _STOP
    if gu.is_addmm(n):
        path.source = LinearSource(n, n.args[2], n.args[0], transposed=True)
        return _STOP
    return None


def _step_lowrank_cache(n: fx.Node, path: InputPath, graph: fx.Graph):
    """kvfx's cache hands SDPA latent·up: remember it and continue from the cache write (latent = input·down)."""
    if not (n.op == "call_function" and n.target is torch.matmul
            and _cache_attr(n.args[1]) in cache_contract.DOWN_OF_UP):
        return None
    path.cache, path.latent, path.up, path.recon = "lowrank", n.args[0], n.args[1], n
    path.cache_at = len(path.nodes)
    path.down = _find_down(graph, n.args[1])
    if path.down is None:
        path.reason = "low-rank cache write not found in this graph"
        return _STOP
    return path.down.args[0]


def _step_repeat_kv(n: fx.Node, path: InputPath, graph: fx.Graph):
    """repeat_kv's expand, or hand-written GQA k.repeat_interleave(g, dim=1) (head i reads i // g)."""
    if gu.is_method(n, "expand") or n.target is torch.Tensor.expand or gu.is_head_repeat_interleave(n):
        path.repeat_kv = n
        path.nodes.append(n)
        return n.args[0]
    return None


def _step_getitem(n: fx.Node, path: InputPath, graph: fx.Graph):
    """A chunk of a fused projection (split → getitem: walk on to the linear, remember the chunk) or an index."""
    if not gu.is_getitem(n):
        return None
    base = n.args[0]
    if path.source is None and (gu.is_method(base, "split") or base.op == "call_function" and base.target is torch.split):
        path.nodes += [n, base]
        sub = trace_input(base.args[0], graph)
        path.nodes += sub.nodes
        path.source, path.reason, path.rope = sub.source, sub.reason, path.rope or sub.rope
        if path.source is not None:
            path.source.split, path.source.split_index = base, n.args[1]
        return _STOP
    idx = n.args[1]
    if path.repeat_kv is not None and isinstance(idx, tuple) and None in idx:
        path.base = base  # repeat_kv's x[:, :, None, :, :]
    path.nodes.append(n)
    return base


def _step_layout(n: fx.Node, path: InputPath, graph: fx.Graph):
    if gu.is_layout(n):
        path.nodes.append(n)
        return n.args[0]
    return None


def _step_cat(n: fx.Node, path: InputPath, graph: fx.Graph):
    """A cache concatenation along the tokens (walk on with the new tokens), or partial RoPE's cat (the end)."""
    if not (n.op == "call_function" and n.target is torch.cat):
        return None
    tensors = list(n.args[0])
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    if dim in (-2, 2) and len(tensors) >= 2:
        if path.cache == "none" and not all(_is_empty_tensor(t) for t in tensors[:-1]):
            path.cache = "cat"
        path.nodes.append(n)
        return tensors[-1]
    path.reason = f"unexpected cat along dim {dim}"
    # partial RoPE (GPT-NeoX, Phi): cat([rotated, pass-through], -1) ends the walk; still report RoPE
    path.rope = path.rope or any(isinstance(t, fx.Node) and gu.depends_on(t, gu.is_trig, limit=32) for t in tensors)
    return _STOP


def _step_rope(n: fx.Node, path: InputPath, graph: fx.Graph):
    """RoPE: x·cos + rotate_half(x)·sin — walk on along the non-trigonometric operand."""
    if n.op == "call_function" and n.target in (operator.add, torch.add) and all(
            isinstance(a, fx.Node) for a in n.args[:2]):
        path.rope = True
        path.nodes.append(n)
        return n.args[0]
    if not (n.op == "call_function" and n.target in (operator.mul, torch.mul)):
        return None
    a, b = n.args[:2]
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        trig_a = gu.depends_on(a, gu.is_trig, limit=12)
        trig_b = gu.depends_on(b, gu.is_trig, limit=12)
        path.rope = True
        nxt = b if trig_a and not trig_b else a
    else:
        nxt = a if isinstance(a, fx.Node) else b
    path.nodes.append(n)
    return nxt


_STEPS = (_step_linear, _step_lowrank_cache, _step_repeat_kv, _step_getitem, _step_layout, _step_cat, _step_rope)


def trace_input(node: fx.Node, graph: fx.Graph) -> InputPath:
    """Walk one SDPA input back to its projection linear, one step per node (the first _STEPS entry that applies)."""
    path = InputPath(nodes=[], source=None)
    n = node
    for _ in range(64):
        nxt = next((r for r in (step(n, path, graph) for step in _STEPS) if r is not None), None)
        if nxt is None:
            path.reason = f"stopped at {n.op} {getattr(n.target, '__name__', n.target)}"
            break
        if nxt is _STOP:
            break
        n = nxt
    return _finish(path, node)


def _finish(path: InputPath, node: fx.Node) -> InputPath:
    if path.base is None:
        path.base = node if path.repeat_kv is None else path.repeat_kv.args[0]
    return path


def trace_output(sdpa: fx.Node) -> tuple[list[fx.Node], LinearSource | None]:
    """Follow the SDPA output through layout ops to the output projection."""
    nodes, n = [], sdpa
    while len(n.users) == 1:
        (u,) = n.users
        if gu.is_linear(u) and u.args[0] is n:
            b = u.args[2] if len(u.args) > 2 else u.kwargs.get("bias")
            return nodes, LinearSource(u, u.args[1], b, transposed=False)
        if gu.is_addmm(u) and u.args[1] is n:
            return nodes, LinearSource(u, u.args[2], u.args[0], transposed=True)
        if not gu.is_layout(u):
            break
        nodes.append(u)
        n = u
    return nodes, None


FALLBACK_PREFIX = "sdpa"  # sites named by position (sdpa0, sdpa1, ...) when no module path names them


def is_fallback_name(name: str) -> bool:
    return name.startswith(FALLBACK_PREFIX) and name[len(FALLBACK_PREFIX):].isdigit()


def _site_name(q: InputPath, o: LinearSource | None, index: int) -> str:
    paths = [p for p in ((q.source and q.source.module), (o and o.module)) if p]
    if not paths:
        return f"{FALLBACK_PREFIX}{index}"
    if len(paths) == 1:
        return paths[0].rsplit(".", 1)[0] if "." in paths[0] else paths[0]
    a, b = paths[0].split("."), paths[1].split(".")
    common = []
    for x, y in zip(a, b):
        if x != y:
            break
        common.append(x)
    return ".".join(common) or f"{FALLBACK_PREFIX}{index}"


def _recon_shape(path: InputPath) -> tuple[int, ...]:
    lat, up = gu.shape_of(path.latent), gu.shape_of(path.up)
    return (lat[0], up[0], lat[2], up[-1])


def match_site(gm: fx.GraphModule, sdpa: fx.Node, index: int) -> AttentionSite:
    args = gu.sdpa_args(sdpa)
    q, k, v = (trace_input(args[x], gm.graph) for x in ("query", "key", "value"))
    out_nodes, o = trace_output(sdpa)
    qs, kbase, vbase = gu.shape_of(args["query"]), gu.shape_of(k.base), gu.shape_of(v.base)
    if k.cache == "lowrank":  # heads and width from the reconstruction matrix [h, R, d]
        kbase = _recon_shape(k)
    if v.cache == "lowrank":
        vbase = _recon_shape(v)
    site = AttentionSite(
        name=_site_name(q, o, index), sdpa=sdpa, q=q, k=k, v=v, out_nodes=out_nodes, out_source=o,
        num_heads=qs[1] if qs else -1, num_kv_heads=kbase[1] if kbase else -1,
        head_dim=qs[-1] if qs else -1, value_dim=vbase[-1] if vbase else -1, scale=0.0,
        query_len=qs[2] if qs and len(qs) == 4 and isinstance(qs[2], int) else None)  # no guard on a SymInt
    scale = args.get("scale")
    if isinstance(scale, fx.Node):  # dynamic=True: Dynamo passes Python floats (module.scaling) as graph inputs
        site.scale = scale          # kept as the node: the rewrite hands SDPA the same runtime value
    else:
        site.scale = float(scale) if scale is not None else 1.0 / math.sqrt(site.head_dim)
    site.status = _check(site, qs, kbase, vbase)
    return site


def _check(site: AttentionSite, qs, ks, vs) -> str:
    if qs is None or ks is None or vs is None or len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return "unsupported: q/k/v are not 4-D [batch, heads, tokens, head_dim] tensors"
    if ks[-1] != qs[-1]:
        return f"unsupported: key width {ks[-1]} != query width {qs[-1]}"
    if vs[1] != ks[1]:
        return f"unsupported: {vs[1]} value heads vs {ks[1]} key heads"
    if vs[-1] != ks[-1]:  # projections are [h, head_dim, R] for keys and values alike (no MLA-style v_head_dim)
        return f"unsupported: value width {vs[-1]} != key width {ks[-1]}"
    if site.num_heads % site.num_kv_heads:
        return f"unsupported: {site.num_heads} query heads not a multiple of {site.num_kv_heads} kv heads"
    if site.k.repeat_kv is not None and site.k.base is site.k.repeat_kv.args[0] and site.k.cache != "lowrank":
        site.notes.append("repeat_kv")
    for label, p in (("q", site.q), ("k", site.k), ("v", site.v)):
        if p.source is None:
            site.notes.append(f"{label}: no projection linear found ({p.reason})")
    if gu.sdpa_args(site.sdpa).get("dropout_p", 0.0) not in (0, 0.0):
        site.notes.append("dropout_p > 0")
    return "ok"


def find_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every SDPA node of `gm`, matched (status 'ok') or with the reason it is unsupported."""
    nodes = [n for n in gm.graph.nodes if gu.is_sdpa(n)]
    return [match_site(gm, n, i) for i, n in enumerate(nodes)]

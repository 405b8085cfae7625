"""Pass 4 — decode: a one-token step reads each cached latent head once, not once per query head.

In a decode step (one query token) with GQA — or a joint / shared latent, one "head" that every query head
reads — SDPA gets queries [b, H, 1, R] and cached keys of h < H heads, and expands the keys per query head:
transformers' repeat_kv (the static cache's path: expand + reshape materialise g = H/h copies) or
`enable_gqa=True` (the dynamic path; the CPU kernels expand too). Both read and write the cache g times.
Every cached token is visible to every query of the step, so the g query heads of a group can be the g query
rows of one attention call over their kv head instead, as MLA's absorbed decode and FlashDecoding do:

    SDPA(q [b,H,1,R], repeat(K) [b,H,N,R])  ==  SDPA(q.reshape(b,h,g,R), K [b,h,N,R]).reshape(b,H,1,R)

Exact when the mask (if any) is the same for every head and the one query row ([b|1, 1, 1, N]: it broadcasts
over the g rows) and `is_causal` is False (transformers never sets it for one query token). Runs after fold
and only touches SDPA's inputs and output, so it composes with every rewrite form.

Over low-bit latents (kvfx's int8 / int4 cache) the step's SDPA(q, dequantize(K), dequantize(V)) becomes
`kvfx::decode_attention` on the stored codes (kvfx/ops/lowbit_attention.py): decoded where they are consumed,
never copied to a float cache. On the CPU, 16/32-bit latents read by at least FLOAT_KERNEL_MIN_GROUP query rows
(`layer` / `kv` latents) take the same kernel (counter `float_decode`); per-head latents keep SDPA.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ops import lowbit_attention  # noqa: F401  (registers torch.ops.kvfx.*)

from ..projections import SiteProjection
from . import graph_utils as gu
from .counters import counters
from .match import AttentionSite


def _heads(node: fx.Node) -> int | None:
    shape = gu.shape_of(node)
    return gu.static_int(shape[1]) if shape is not None and len(shape) == 4 else None


def _mask_per_row(mask) -> bool:
    """A mask SDPA can broadcast over the g query rows of a group: None or [b|1, 1, 1, N]."""
    if mask is None:
        return True
    shape = gu.shape_of(mask) if isinstance(mask, fx.Node) else None
    return shape is not None and len(shape) == 4 and gu.static_int(shape[1]) == 1 and gu.static_int(shape[2]) == 1


def _calls(node, op) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (op.default, op)


def _dequantized(node) -> bool:
    """The cache's read of low-bit rows: dequantize(codes[, exact rows, positions])."""
    return _calls(node, torch.ops.kvfx.dequantize)


def _stored(node: fx.Node) -> tuple[tuple, tuple, fx.Node | None]:
    """(codes, width, kind, dtype), (exact rows, positions) or (None, None), and the latent offset added back (or
    None) of a read `_dequantized` accepts."""
    args = tuple(node.args) + (None,) * (7 - len(node.args))
    return args[:4], args[4:6], args[6]


# 16/32-bit latents go to the kernel when at least this many query rows share each cached row (measured on SmolLM2,
# 2 CPU cores, 16k context: 9 rows per latent — `layer` / `kv` latents — 1.1-1.4x faster than SDPA; 3 rows per
# per-head latent: SDPA as fast or faster)
FLOAT_KERNEL_MIN_GROUP = 4


def _width(node: fx.Node) -> int | None:
    shape = gu.shape_of(node)
    return gu.static_int(shape[-1]) if shape is not None else None


def _float_kernel(key, value) -> bool:
    """16/32-bit latents on the CPU: kvfx::decode_attention's kernel beats SDPA there (it reads the cache's strided
    views in place and shares each row among the g query rows in registers); elsewhere SDPA's own kernels run."""
    vals = [n.meta.get("example_value", n.meta.get("val")) if isinstance(n, fx.Node) else None for n in (key, value)]
    return (all(isinstance(v, torch.Tensor) and v.device.type == "cpu"
                and v.dtype in (torch.float32, torch.bfloat16, torch.float16) for v in vals)
            and _width(value) is not None and lowbit_attention.kernel_available("cpu"))


def group_decode_queries(g: fx.Graph, site: AttentionSite, proj: SiteProjection, consts=None) -> bool:
    """Rewrite a one-token step's attention: fold the query heads of each kv group into the query axis, and over
    low-bit latents call kvfx::decode_attention on the stored codes. True if the site was rewritten."""
    args = gu.sdpa_args(site.sdpa)
    heads = site.num_heads
    if not site.lowrank_cache or site.query_len != 1:
        return False  # prefill (or symbolic query length), or keys that are not kvfx's cache
    if args.get("is_causal") or args.get("dropout_p") or not _mask_per_row(args.get("attn_mask")):
        return False
    key, value = gu.unrepeat(args["key"]), gu.unrepeat(args["value"])
    kv_heads = _heads(key)
    if kv_heads is None or kv_heads != _heads(value) or heads % kv_heads:
        return False
    group, rq, rv = heads // kv_heads, proj.key_up.shape[-1], proj.value_up.shape[-1]
    lowbit = _dequantized(key) and _dequantized(value)
    kernel = lowbit or group >= FLOAT_KERNEL_MIN_GROUP and _float_kernel(key, value)
    if group == 1 and not kernel:
        return False
    sdpa, old = site.sdpa, (args["key"], args["value"])
    q = args["query"]
    if group > 1:
        with g.inserting_before(sdpa):
            q = g.call_method("reshape", (_grouped_query(g, site, proj, consts, q), -1, kv_heads, group, rq))
        counters["kvfx"]["decode_grouped"] += 1
    if kernel:  # the stored rows, read once in place: no float copy of the cache, no expanded heads
        shared = value is key
        exact, offset = (), None
        if lowbit:  # with exact rows the kernel reads them beside the codes (one positions tensor serves both)
            ((kc, rk, kind, _), (ek, pos), _), ((vc, rv_stored, _, _), (ev, _), offset) = _stored(key), _stored(value)
            exact = () if pos is None else (ek, ev, pos)
        else:
            kc, vc, rk, rv_stored, kind = key, value, rq, _width(value), "float"
        with g.inserting_before(sdpa):
            new = g.call_function(torch.ops.kvfx.decode_attention.default,
                                  (q, kc, vc, rk, rv_stored, kind, site.scale, args.get("attn_mask"), shared, *exact))
            # rows rounded around an offset: the keys' offset shifts every score of a query alike (softmax drops
            # it), the values' comes out whole (the weights sum to one): one add to the output, none per row
            result = new if offset is None else g.call_function(torch.add, (new, offset))
        sdpa.replace_all_uses_with(result)
        g.erase_node(sdpa)
        site.sdpa = sdpa = new
        counters["kvfx"]["lowbit_decode" if lowbit else "float_decode"] += 1
    else:
        gu.set_sdpa_args(sdpa, query=q, key=key, value=value, enable_gqa=False)
        result = sdpa
    for n in dict.fromkeys(old):  # shared latent: key and value are one node
        _erase_dead(g, n)
    if not args["query"].users:  # the query-head-repeated q·B that _grouped_query replaced
        g.erase_node(args["query"])
    if group > 1:
        with g.inserting_after(result):
            out = g.call_method("reshape", (result, -1, heads, 1, rv))
        result.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
        _grouped_output(g, site, proj, consts, out)
    return True


# The unfolded up-projections of a decode step (q·B, o·Dᵀ: RoPE blocks the q fold; a latent wider than head_dim keeps
# o·Dᵀ, see fold._shrinks) carry one matrix per QUERY head, B repeated over the g heads of a kv group: [H, d, R].
# With the query heads of a group side by side, one matrix per kv head serves them: [b, h, g, d] @ [h, d, R] reads
# B once, not g times (counter `decode_grouped_proj`).
def _grouped_constant(site, consts, mm: fx.Node, label: str, make):
    """A [h, ·, ·] constant replacing the query-head-repeated one `mm` multiplies by, or None if `mm` is not that."""
    rep = consts.value_of(mm.args[1]) if consts is not None and isinstance(mm.args[1], fx.Node) else None
    if rep is None or rep.dim() != 3 or rep.shape[0] != site.num_heads or site.group == 1:
        return None
    dtype, device = rep.dtype, rep.device
    return consts.add(f"{site.name}_{label}_grouped", rep[::site.group].contiguous(),
                      lambda: make().to(dtype=dtype, device=device))


def _grouped_query(g: fx.Graph, site, proj, consts, q2: fx.Node) -> fx.Node:
    mm = site.proj.get("q")
    if mm is not q2:
        return q2
    h, d, _ = proj.key_up.shape
    const = _grouped_constant(site, consts, mm, "key_up", lambda: proj.key_up)
    if const is None:
        return q2
    q = g.call_function(torch.matmul, (g.call_method("reshape", (mm.args[0], -1, h, site.group, d)), const))
    site.proj["q"] = None  # `mm` still feeds SDPA; group_decode_queries erases it once SDPA reads `q`
    counters["kvfx"]["decode_grouped_proj"] += 1
    return q


def _grouped_output(g: fx.Graph, site, proj, consts, out: fx.Node) -> None:
    mm = site.proj.get("o")
    if mm is None or mm.args[0] is not out or len(out.users) != 1:
        return
    h, d, rv = proj.value_up.shape
    const = _grouped_constant(site, consts, mm, "value_up_t", lambda: proj.value_up.transpose(1, 2))
    if const is None:
        return
    with g.inserting_before(mm):
        o = g.call_function(torch.matmul, (g.call_method("reshape", (out.args[0], -1, h, site.group, rv)), const))
        new = g.call_method("reshape", (o, -1, site.num_heads, 1, d))
    mm.replace_all_uses_with(new)
    g.erase_node(mm)
    g.erase_node(out)
    site.proj["o"] = None
    counters["kvfx"]["decode_grouped_proj"] += 1


def _erase_dead(g: fx.Graph, node: fx.Node) -> None:
    """Erase the bypassed repeat_kv chain and, once nothing reads it, the dequantisation under it."""
    node = gu.erase_dead_layout(g, node)
    if _dequantized(node) and not node.users:
        g.erase_node(node)


def group_decode_sites(gm: fx.GraphModule, sites, projections, consts=None) -> None:
    for site in sites:
        group_decode_queries(gm.graph, site, projections[site.name], consts)

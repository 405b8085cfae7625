"""Pass 3 — fold: absorb the rank-space matmuls into the neighbouring linear weights.

    linear(x, W, b) -> view(.., h, d) -> transpose -> matmul(·, P)   ==>   linear(x, W', b') -> view(.., h, R) -> transpose
      with W'_h = P_hᵀ·W_h and b'_h = b_h·P_h per head h      (A into W_K, B into W_Q, C into W_V)
    matmul(o, Dᵀ) -> transpose -> reshape(.., H·d) -> linear(·, W_O)   ==>   ... reshape(.., H·R) -> linear(·, W_O')
      with W_O' reading head i through D_i

Only where nothing but layout ops lies between the linear and the matmul (no RoPE, no cache concat):
keys and queries of RoPE models keep their matmul; values and W_O always fold. Fused QKV (GPT-2's
Conv1D c_attn) folds chunk by chunk and its split sizes are rewritten. Folded weights are computed once,
from the real weights, in float64.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx as fx

from . import graph_utils as gu
from .constants import GraphConstants
from .counters import counters
from .match import AttentionSite, InputPath, LinearSource


def _single_use(nodes) -> bool:
    return all(len(n.users) == 1 for n in nodes)


def _split_sizes(split: fx.Node, total: int) -> list[int]:
    size = split.args[1] if len(split.args) > 1 else split.kwargs.get("split_size")
    if isinstance(size, int):
        return [min(size, total - i) for i in range(0, total, size)]
    return list(size)


def _shrinks(rows: int, new_rows: int, width: int, p: torch.Tensor) -> bool:
    """Is the folded weight (new_rows × width) no bigger than what it replaces: W's rows × width and P? A latent
    wider than head_dim (`layer` / `kv` with R > d) would make W_O' = Dᵀ·W_O R/d times W_O, read every decode
    step; there the matmul by P stays (it reads fewer bytes)."""
    return new_rows * width <= rows * width + p.numel()


class FoldItem(NamedTuple):
    """One projection matmul that folds into the linear producing its input."""
    site: AttentionSite
    label: str                  # "q", "k" or "v"
    path: InputPath
    matmul: fx.Node             # the inserted matmul(x, P) (or the cache write) that disappears
    own: list[fx.Node]          # layout ops of this input alone: their widths become R
    shared: list[fx.Node]       # layout ops before a fused QKV split: their width becomes the new total
    p: torch.Tensor             # P [h, d, R]


class Folder:
    def __init__(self, gm: fx.GraphModule, consts: GraphConstants):
        self.gm, self.g, self.consts = gm, gm.graph, consts

    # ------------------------------------------------------------ q / k / v
    def _item(self, site: AttentionSite, label: str, path: InputPath, mm: fx.Node) -> FoldItem | None:
        """The fold of this projection into its linear, or None when it cannot fold."""
        if mm is None or not path.foldable or path.source is None:
            return None
        chain = path.nodes[path.cache_at:] if path.cache == "lowrank" else path.nodes
        if path.cache == "lowrank" and mm is not path.down:
            return None
        if path.cache == "none" and (mm.args[0] is not (chain[0] if chain else None) or path.repeat_kv is not None):
            return None
        if path.source.split is not None:
            cut = next(i for i, n in enumerate(chain) if gu.is_getitem(n) and n.args[0] is path.source.split)
            own, shared = chain[:cut + 1], chain[cut + 2:]
        else:
            own, shared = chain, []
        if not _single_use(own) or not _single_use(shared + [path.source.node]):
            return None
        p = self.consts.value_of(mm.args[1])
        if p is None or p.dim() != 3:  # joint latents mix heads: nothing per-head to fold
            return None
        w = self.consts.value_of(path.source.weight)
        h, d, r = p.shape
        if w is not None and not _shrinks(h * d, h * r, w.shape[0 if path.source.transposed else 1], p):
            return None
        return FoldItem(site, label, path, mm, own, shared, p)

    def fold_inputs(self, sites: list[AttentionSite]) -> None:
        groups: dict[fx.Node, list[FoldItem]] = {}
        for site in sites:
            for label in ("q", "k", "v"):
                path: InputPath = getattr(site, label)
                item = self._item(site, label, path, site.proj.get(label))
                if item is not None:
                    groups.setdefault(path.source.node, []).append(item)
        for items in groups.values():
            self._fold_linear(items[0].path.source, items)

    def _fold_linear(self, src: LinearSource, items: list[FoldItem]) -> None:
        w = self.consts.value_of(src.weight)
        b = self.consts.value_of(src.bias) if isinstance(src.bias, fx.Node) else None
        if w is None:
            return
        wo = (w.t() if src.transposed else w).to(torch.float64)  # [out, in]
        bo = b.to(torch.float64) if b is not None else None
        total = wo.shape[0]
        sizes = _split_sizes(src.split, total) if src.split is not None else [total]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        by_chunk = {(it.path.source.split_index or 0): it for it in items}
        new_w, new_b, new_sizes = [], [], []
        for i, (c0, size) in enumerate(zip(starts, sizes)):
            wc, bc = wo[c0:c0 + size], (bo[c0:c0 + size] if bo is not None else None)
            if i in by_chunk:
                p = by_chunk[i].p.to(torch.float64)
                h, d, r = p.shape
                wc = torch.einsum("hdr,hdi->hri", p, wc.reshape(h, d, -1)).reshape(h * r, -1)
                if bc is not None:
                    bc = torch.einsum("hd,hdr->hr", bc.reshape(h, d), p).reshape(-1)
            new_w.append(wc)
            new_b.append(bc)
            new_sizes.append(wc.shape[0])
        wn = torch.cat(new_w).to(w.dtype)
        wn = wn.t().contiguous() if src.transposed else wn
        name = gu.module_path(src.weight) or "linear"
        lin = src.node
        weight_idx = 2 if src.transposed else 1
        args = list(lin.args)
        args[weight_idx] = self.consts.add(f"{name}_folded_weight", wn)
        if bo is not None:
            bias_node = self.consts.add(f"{name}_folded_bias", torch.cat(new_b).to(b.dtype))
            if src.transposed:
                args[0] = bias_node
            elif len(args) > 2:
                args[2] = bias_node
            else:
                lin.kwargs = {**lin.kwargs, "bias": bias_node}
        lin.args = tuple(args)
        if src.split is not None:
            gu.retarget_last_dim(items[0].shared, total, sum(new_sizes))
            src.split.args = (src.split.args[0], new_sizes, *src.split.args[2:])
        for it in items:
            h, d, r = it.p.shape
            gu.retarget_last_dim(it.own, d, r, heads=h)
            it.matmul.replace_all_uses_with(it.matmul.args[0])
            self.g.erase_node(it.matmul)
            it.site.proj[it.label] = None
            counters["kvfx"][f"folded_{it.label}"] += 1

    # ------------------------------------------------------------ W_O
    def fold_output(self, site: AttentionSite) -> None:
        mm, src = site.proj.get("o"), site.out_source
        if mm is None or src is None or not _single_use([site.sdpa, mm, *site.out_nodes]):
            return
        w = self.consts.value_of(src.weight)
        dt = self.consts.value_of(mm.args[1])  # [H, Rv, d]
        if w is None or dt is None:
            return
        wi = (w if src.transposed else w.t()).to(torch.float64)  # [H·d, hidden]
        hh, r, d = dt.shape
        if not _shrinks(hh * d, hh * r, wi.shape[1], dt):
            return
        wn = torch.einsum("hrd,hdo->hro", dt.to(torch.float64), wi.reshape(hh, d, -1)).reshape(hh * r, -1)
        wn = (wn if src.transposed else wn.t()).contiguous().to(w.dtype)
        node = self.consts.add(f"{site.name}_o_folded_weight", wn)
        args = list(src.node.args)
        args[2 if src.transposed else 1] = node
        src.node.args = tuple(args)
        gu.retarget_last_dim(site.out_nodes, d, r, heads=hh)
        mm.replace_all_uses_with(site.sdpa)
        self.g.erase_node(mm)
        site.proj["o"] = None
        counters["kvfx"]["folded_o"] += 1


def fold_sites(gm: fx.GraphModule, sites: list[AttentionSite], consts: GraphConstants) -> None:
    folder = Folder(gm, consts)
    folder.fold_inputs(sites)
    for site in sites:
        folder.fold_output(site)

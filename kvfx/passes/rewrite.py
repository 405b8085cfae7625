"""Pass 2 — rewrite: run each matched attention site in rank space.

    SDPA(q, k, v, scale=s)  ->  SDPA(q·B, k·A, v·C, scale=s) · Dᵀ      (s stays the ORIGINAL 1/sqrt(d))

A shared K+V latent (one c = k·A + v·C per token) becomes SDPA(q·B, c, c)·Dᵀ.
Two forms of input are handled:
  * plain keys/values (no cache, or transformers' own cache): the four matmuls are inserted around SDPA;
  * kvfx's low-rank cache: the cache already wrote K̃ = k·A and hands SDPA the reconstruction K̃·Bᵀ.
    The pass reassociates SDPA(q, K̃·Bᵀ, Ṽ·Dᵀ) into SDPA(q·B, K̃, Ṽ)·Dᵀ so full-width keys never exist,
    moving repeat_kv's expand/reshape onto the rank-R tensors.
With low-bit latents (`quantize="int8"` / `"int4"`) the plain path rounds the latents as the cache would store them
(kvfx.quant.fake_quant; kvfx's cache quantises in its own code), so every path attends over the same numbers; a format
with exact rows attends them where the cache would hold them (exact_window.py).
With many query rows over a joint latent (prefill) the site reads the latent expanded to its heads instead
(kvfx/passes/expand.py). The inserted `matmul(x, P)` nodes are recorded on the site (`site.proj`) for the fold pass.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import quant
from ..projections import SiteProjection
from . import exact_window, expand
from . import graph_utils as gu
from .constants import GraphConstants
from .counters import counters
from .match import AttentionSite


def _dtype_of(node: fx.Node) -> torch.dtype:
    val = node.meta.get("example_value")
    return val.dtype if isinstance(val, torch.Tensor) else torch.float32


def _device_of(node: fx.Node) -> torch.device:
    val = node.meta.get("example_value")
    return val.device if isinstance(val, torch.Tensor) else torch.device("cpu")


class RankSpaceRewrite:
    """Rewrites one site given its projection; constants go through `consts`."""

    def __init__(self, gm: fx.GraphModule, consts: GraphConstants, quantize=None):
        quant.check(quantize)
        self.gm, self.g, self.consts, self.quantize = gm, gm.graph, consts, quantize

    def _const(self, site, label, make, like: fx.Node) -> fx.Node:
        """A graph constant `make()` (a function of the site's projection tensors, kept as its recipe)."""
        dtype, device = _dtype_of(like), _device_of(like)

        def recipe():
            return make().to(dtype=dtype, device=device)
        return self.consts.add(f"{site.name}_{label}", recipe(), recipe)

    def _mm(self, x: fx.Node, p: fx.Node, before: fx.Node) -> fx.Node:
        with self.g.inserting_before(before):
            return self.g.call_function(torch.matmul, (x, p))

    def __call__(self, site: AttentionSite, proj: SiteProjection) -> None:
        args = gu.sdpa_args(site.sdpa)
        q, g, sdpa = args["query"], site.group, site.sdpa
        kind = None if site.lowrank_cache else quant.site(self.quantize, site.name)
        exact = quant.exact_of(kind)  # (sinks, recent): rows the cache would hold exact (kvfx's cache: its own code)
        # many query rows over a joint latent: read it expanded (not with an exact window: that attends in rank space)
        expanding = expand.worth_expanding(site, proj, q) and not sum(exact)
        if not expanding:
            b_q = lambda: proj.key_up.repeat_interleave(g, 0)                    # [H, d, Rk]  # noqa: E731
            site.proj["q"] = q2 = self._mm(q, self._const(site, "key_up", b_q, q), sdpa)
        k2, v2, unrounded = self._cached(site, proj) if site.lowrank_cache else self._projected(site, proj, args, kind)
        counters["kvfx"]["rewritten"] += 1
        if proj.shared:
            counters["kvfx"]["shared"] += 1
        if proj.joint:
            counters["kvfx"]["joint"] += 1
        if expanding:
            expand.expand_site(self, site, proj, q, k2, v2)
            return
        changes = dict(query=q2, key=k2, value=v2, scale=site.scale)
        if proj.joint:
            changes["enable_gqa"] = True  # joint latent: one kv "head" serves every query head
        gu.set_sdpa_args(sdpa, **changes)
        if sum(exact):
            exact_window.replace_sdpa(self.g, site, *unrounded, *exact)
            sdpa = site.sdpa
        with self.g.inserting_after(sdpa):
            out = self.g.call_function(torch.matmul, (sdpa, None))
        sdpa.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
        d_t = lambda: proj.value_up.transpose(1, 2).repeat_interleave(g, 0)      # [H, Rv, d]  # noqa: E731
        out.args = (sdpa, self._const(site, "value_up_t", d_t, q))
        site.proj["o"] = out

    def _cached(self, site: AttentionSite, proj: SiteProjection) -> tuple[fx.Node, fx.Node, None]:
        """kvfx's cache: SDPA reads the cached latents; the cache writes are the fold targets."""
        k2 = self._reassociate(site, site.k, proj, "key_down")
        v2 = self._reassociate(site, site.v, proj, "value_down")
        site.proj["k"], site.proj["v"] = site.k.down, site.v.down
        counters["kvfx"]["reassociated"] += 1
        return k2, v2, None

    def _projected(self, site: AttentionSite, proj: SiteProjection, args: dict, kind) -> tuple[fx.Node, fx.Node, tuple]:
        """Full-width keys / values (no cache, or transformers' own): project them (and round them as the low-bit
        cache would, format `kind`); a shared latent adds its two projections into one. Also returns the latents
        before rounding (what an exact window reads)."""
        k2 = self._plain(site, site.k, args["key"], proj, "key_down")
        v2 = self._plain(site, site.v, args["value"], proj, "value_down")
        site.proj["k"], site.proj["v"] = k2, v2
        offsets = self._offsets(site, proj, args) if kind else (None, None)
        with self.g.inserting_before(site.sdpa):
            if proj.shared:  # one latent c = k·A + v·C read as key and value
                k2 = v2 = self.g.call_function(torch.add, (k2, v2))
            unrounded = (k2, v2, *offsets)
            if kind:  # rounded around the latent offset where the projections have means, as the cache rounds
                k2 = self._rounded(k2, kind, offsets[0])
                v2 = k2 if proj.shared else self._rounded(v2, kind, offsets[1])
                counters["kvfx"]["quantized"] += 1
        return k2, v2, unrounded

    def _rounded(self, x: fx.Node, kind: str, offset: fx.Node | None) -> fx.Node:
        return self.g.call_function(quant.fake_quant, (x, kind) if offset is None else (x, kind, offset))

    def _offsets(self, site, proj: SiteProjection, args: dict) -> tuple:
        """Graph constants of the site's latent offsets (SiteProjection.latent_offsets; None without means), per
        head as the projected keys / values carry heads (repeat_kv'd inputs: per query head)."""
        nodes, present = [], proj.latent_offsets()
        for i, (label, x) in enumerate((("key_offset", args["key"]), ("value_offset", args["value"]))):
            if present[i] is None:
                nodes.append(None)
                continue
            reps = 1 if proj.joint else gu.shape_of(x)[1] // proj.key_down.shape[0]
            nodes.append(self._const(site, label, lambda i=i, reps=reps: proj.latent_offsets()[i]
                                     .repeat_interleave(reps, 0), x))
        return tuple(nodes)

    def _plain(self, site, path, x: fx.Node, proj: SiteProjection, label: str) -> fx.Node:
        down = getattr(proj, label)
        if proj.joint:  # [b, h, N, d] -> [b, N, h·d] · A -> [b, 1, N, R]
            base = path.base
            with self.g.inserting_before(site.sdpa):
                flat = self.g.call_method("flatten", (self.g.call_method("transpose", (base, 1, 2)), 2))
                const = self._const(site, label, lambda: getattr(proj, label)[0], x)
                mm = self.g.call_function(torch.matmul, (flat, const))
                return self.g.call_method("unsqueeze", (mm, 1))
        reps = gu.shape_of(x)[1] // down.shape[0]  # repeat_kv'd inputs carry query heads
        const = self._const(site, label, lambda: getattr(proj, label).repeat_interleave(reps, 0), x)
        return self._mm(x, const, site.sdpa)

    def _reassociate(self, site, path, proj: SiteProjection, label: str) -> fx.Node:
        """Cache path: feed SDPA the rank-R cache directly; use our constant for the cache write."""
        down = getattr(proj, label)
        down = down[0] if proj.joint else down
        make = (lambda: getattr(proj, label)[0]) if proj.joint else (lambda: getattr(proj, label))
        path.down.args = (path.down.args[0], self._const(site, label, make, path.down.args[0]))
        recon = path.recon
        between = path.nodes[: path.cache_at]  # repeat_kv between reconstruction and SDPA: now rank R
        d, r = gu.shape_of(recon)[-1], down.shape[-1]
        gu.retarget_last_dim(between, d, r)
        recon.replace_all_uses_with(path.latent)
        self.g.erase_node(recon)
        return gu.sdpa_args(site.sdpa)["key" if label == "key_down" else "value"]


def rewrite_sites(gm, sites, projections, consts, quantize=None) -> None:
    rw = RankSpaceRewrite(gm, consts, quantize)
    for site in sites:
        rw(site, projections[site.name])

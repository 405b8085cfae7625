"""Calibration pass — observe: record what every attention site reads, without changing results.

Before each matched SDPA node, inserts a call `record(site_name, q, k, v, attn_mask, is_causal, scale)` with the
post-RoPE query, the keys/values before repeat_kv and SDPA's own mask arguments. The graph then runs eagerly (no Inductor) during calibration.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from . import graph_utils as gu
from .constants import GraphConstants, fresh_copy
from .counters import counters
from .match import AttentionSite, find_sites


def output_rows(site: AttentionSite, consts: GraphConstants) -> torch.Tensor | None:
    """W_O as [H, d, hidden]: the rows (x·W form) that read each query head's output."""
    src = site.out_source
    w = consts.value_of(src.weight) if src is not None else None
    if w is None:
        return None
    rows = w if src.transposed else w.t()  # [H·d, hidden]
    return rows.reshape(site.num_heads, site.head_dim, -1)


def insert_observers(gm: fx.GraphModule, example_inputs, record: Callable,
                     on_site: Callable[[AttentionSite, torch.Tensor | None], None]) -> fx.GraphModule:
    """A copy of `gm` that calls record(name, q, k, v, attn_mask, is_causal, scale) before each attention site."""
    new = fresh_copy(gm)
    consts = GraphConstants(new, example_inputs)
    for site in find_sites(new):
        if site.status != "ok":
            raise ValueError(f"cannot calibrate attention site {site.name}: {site.status}")
        on_site(site, output_rows(site, consts))
        args = gu.sdpa_args(site.sdpa)
        with new.graph.inserting_before(site.sdpa):
            new.graph.call_function(record, (site.name, args["query"], site.k.base, site.v.base, args.get("attn_mask"),
                                             args.get("is_causal", False), args.get("scale")))
        counters["kvfx"]["observed"] += 1
    new.recompile()
    return new

"""`kvfx.explain(model, example_inputs)`: one row per attention site the graph pass finds, and why not."""
from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch

from . import quant
from .passes.compile import options_of
from .passes.match import AttentionSite, find_sites


NO_SDPA = ("unsupported: no scaled_dot_product_attention call found, so kvfx has nothing to rewrite (attention "
           "written as matmul -> softmax -> matmul, or a transformers model not loaded with "
           "attn_implementation='sdpa')")


@dataclass
class SiteRow:
    site: str
    heads: int
    kv_heads: int
    head_dim: int
    rope: bool
    foldable: str
    cache: str
    status: str
    notes: str = ""
    ranks: str = ""


@dataclass
class Explanation:
    rows: list[SiteRow] = field(default_factory=list)
    graphs: int = 0
    graph_breaks: int = 0
    break_reasons: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        cols = ["site", "heads", "kv_heads", "head_dim", "rope", "foldable", "cache", "ranks", "status"]
        table = [cols] + [[str(getattr(r, c)) for c in cols] for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for r in self.rows:
            if r.notes:
                lines.append(f"note {r.site}: {r.notes}")
        lines.append(f"{len(self.rows)} attention sites in {self.graphs} graph(s), {self.graph_breaks} graph break(s)")
        if not self.rows:
            lines.append(NO_SDPA)
        lines += [f"graph break: {b}" for b in self.break_reasons]
        return "\n".join(lines)


def _row(site: AttentionSite, projections, quantize=None) -> SiteRow:
    fold = "".join(x for x, p in (("q", site.q), ("k", site.k), ("v", site.v)) if p.foldable)
    fold += "o" if site.out_source is not None else ""
    ranks = ""
    if projections is not None and site.name in projections.sites:
        p = projections.sites[site.name]
        ranks = f"{p.key_rank} shared" if p.shared else f"{p.key_rank}/{p.value_rank}"
        kind = quant.site(quantize, site.name) if quantize else None
        ranks += f" {kind}" if kind else ""
    return SiteRow(site.name, site.num_heads, site.num_kv_heads, site.head_dim, site.rope, fold or "-",
                   site.k.cache, site.status, "; ".join(site.notes), ranks)


def _fresh_code(fn):
    """`fn` over a copy of its code object. Dynamo keeps its compiled code per code object, so tracing the copy starts
    from an empty cache and leaves the user's compiled functions (and their recompile budget) alone — where
    torch._dynamo.explain / reset would throw away every compiled function of the process."""
    bound = getattr(fn, "__self__", None)
    f = getattr(fn, "__func__", fn)
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    return g.__get__(bound) if bound is not None else g


def explain(model, *args, print_table: bool = True, **kwargs) -> Explanation:
    """Trace `model(*args, **kwargs)` and report every SDPA site (matched or not, with the reason)."""
    module, _ = options_of(model)
    state = getattr(module, "_kvfx", None)
    fn = state.original_forward if state is not None and state.original_forward is not None else None
    forward = fn or type(module).forward.__get__(module)
    result = Explanation()
    projections = state.projections if state is not None else None
    quantize = state.quantize if state is not None else None

    def backend(gm, example_inputs):  # what torch._dynamo.explain records, without its reset()
        result.graphs += 1
        reason = getattr(gm, "compile_subgraph_reason", None)
        if reason is not None and reason.graph_break:
            result.break_reasons.append(str(getattr(reason, "reason", reason)))
        result.rows += [_row(s, projections, quantize) for s in find_sites(gm)]
        return gm.forward

    with torch.no_grad():
        torch.compile(_fresh_code(forward), backend=backend)(*args, **kwargs)
    result.graph_breaks = max(result.graphs - 1, 0)
    if print_table:
        print(result)
    return result

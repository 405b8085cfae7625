"""`kvfx.calibrate`: collect Gram statistics through the observer pass, then fit a calibrator per site."""
from __future__ import annotations

from typing import Iterable

import torch
from tqdm.auto import tqdm

from ..passes.compile import compile_isolated
from ..passes.observe import insert_observers
from ..provenance import stamp
from ..projections import Projections, SiteProjection, SiteShape, resolve_rank, split_joint
from .allocate import Budget, allocate_ranks
from .base import get_calibrator
from .shared import DEFAULT_KEY_WEIGHT, fit_shared
from .stats import SiteStats
from .weights import check_attention_weight


class StatsCollector:
    """A torch.compile backend that accumulates SiteStats for every attention site it sees."""

    def __init__(self, samples: int = 0, attention_weight: float = 0.0, own_value_weight: bool = False):
        self.samples = samples
        self.attention_weight = attention_weight
        self.own_value_weight = own_value_weight
        self.stats: dict[str, SiteStats] = {}
        self.order: list[str] = []

    def _on_site(self, site, w_rows) -> None:
        if site.name not in self.stats:
            st = SiteStats.empty(site.num_heads, site.num_kv_heads, site.head_dim)
            st.sample_limit = self.samples
            st.attention_weight = self.attention_weight
            st.own_value_weight = self.own_value_weight
            if w_rows is not None:
                st.set_output_weight(w_rows)
            self.stats[site.name] = st
            self.order.append(site.name)

    def record(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None,
               is_causal: bool = False, scale: float | None = None) -> None:
        self.stats[name].add(q, k, v, attn_mask, is_causal, scale)

    def __call__(self, gm, example_inputs):
        return insert_observers(gm, example_inputs, self.record, self._on_site).forward


def collect_stats(model: torch.nn.Module, batches: Iterable, progress: bool = True, samples: int = 0,
                  attention_weight: float = 0.0, own_value_weight: bool = False) -> dict[str, SiteStats]:
    """Run `model` on each batch (see `call_args`: a tensor, a tuple of arguments or a kwargs dict) and return per-site statistics
    (plus the first `samples` sequences of q/k/v per site, for learned calibrators). attention_weight: γ of the
    attention-aware token weights of the key / value Grams (kvfx.calib.weights; 0: every token counts once);
    own_value_weight: value rows weighted by their own u_t^γ, not the key's f_t^γ (measured no better: RESULTS.md
    "domains-value-weight")."""
    check_attention_weight(attention_weight)
    if own_value_weight and not attention_weight:
        raise ValueError("own_value_weight=True weights value rows by the attention they receive: it needs "
                         "attention_weight > 0 (e.g. 0.5).")
    collector = StatsCollector(samples, attention_weight, own_value_weight)
    fn = compile_isolated(model.forward, backend=collector, dynamic=False)
    batches = list(batches)
    with torch.no_grad():
        for batch in tqdm(batches, desc="kvfx calibrate", disable=not progress):
            args, kwargs = call_args(batch)
            if "use_cache" in _params(model):
                kwargs.setdefault("use_cache", False)
            fn(*args, **kwargs)
    if not collector.stats:
        raise ValueError("unsupported: calibration found no attention sites (no scaled_dot_product_attention call) "
                         "in this model; kvfx needs SDPA attention (for transformers: attn_implementation='sdpa').")
    modules = dict(model.named_modules())
    stray = [n for n in collector.order if n not in modules]
    if stray:
        raise ValueError(f"unsupported: attention site(s) {stray[:3]} are not module paths of this model, so "
                         "graph breaks split the forward into per-layer graphs (e.g. accelerate's device_map hooks, "
                         "which torch.compile does not trace) and layers cannot be told apart. Calibrate the model "
                         "on one device without dispatch hooks (see docs/calibration.md, Distributed calibration).")
    return {n: collector.stats[n] for n in collector.order}


def call_args(batch) -> tuple[tuple, dict]:
    """How a calibration batch calls the model, as torch users expect of any module: a tensor is the first
    positional argument (transformers models take input_ids first), a tuple / list the positional arguments, a
    dict the keyword arguments."""
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def _params(model) -> set[str]:
    import inspect
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


GRANULARITIES = ("head", "layer", "kv")


def _unjoin(proj: SiteProjection, st: SiteStats) -> SiteProjection:
    """Joint-view projection ([1, h·d, R] everywhere) -> down [1, h·d, R], up split per kv head [h, d, R]."""
    shape = SiteShape(st.heads, st.kv_heads, st.head_dim)
    return SiteProjection(proj.key_down, split_joint(proj.key_up, shape), proj.value_down,
                          split_joint(proj.value_up, shape))


def fit(stats: dict[str, SiteStats], method: str = "kqsvd", rank: int | float | dict = 0.5,
        value_rank: int | float | None = None, granularity: str = "head", **options) -> Projections:
    """Projections from collected statistics.

    rank: keep fraction in (0, 1] or int (keys; values use `value_rank` or the same); a dict maps site name
    -> rank or (key_rank, value_rank); a `Budget(kv_fraction)` or `Budget(max_error=...)` allocates ranks per site and separately for
    keys and values from error-rank profiles (see allocate.py). granularity: "head" (one projection per kv head), "layer" (one joint
    latent over the concatenated kv heads of a site, MLA-like; fractions are then of h·d) or "kv" (ONE latent shared by
    keys and values, see shared.py; the rank is the latent's width, fractions are of 2·h·d = the KV-byte fraction;
    option `key_weight` weighs key-logit error against value error, default 4).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    if granularity == "kv":
        return _fit_shared(stats, method, rank, value_rank, **options)
    cal = get_calibrator(method, **options)
    sites, shapes, report = {}, {}, {}
    allocation = None
    if isinstance(rank, Budget):
        views = {n: st.joint() if granularity == "layer" else st for n, st in stats.items()}
        rank, allocation = allocate_ranks(cal, views, rank)
    for name, st in stats.items():
        r = rank.get(name) if isinstance(rank, dict) else rank
        if r is None:
            raise ValueError(f"rank mapping has no entry for site '{name}'.")
        view = st.joint() if granularity == "layer" else st
        rk, rv = r if isinstance(r, (tuple, list)) else (r, value_rank if value_rank is not None else r)
        rk, rv = resolve_rank(rk, view.head_dim), resolve_rank(rv, view.head_dim)
        proj, report[name] = cal.fit(view, rk, rv)
        sites[name] = _unjoin(proj, st) if granularity == "layer" else proj
        shapes[name] = SiteShape(st.heads, st.kv_heads, st.head_dim)
    meta = {"sites": report, "granularity": granularity, "tokens": max(s.tokens for s in stats.values())}
    if allocation is not None:
        meta["allocation"] = allocation
    return Projections(_with_means(sites, stats), shapes, method, meta)


def _with_means(sites: dict, stats: dict) -> dict:
    """Each site's projection with its calibration key / value means (what low-bit latents are rounded around:
    SiteProjection.latent_offsets); unchanged for statistics without first moments."""
    return {n: p.centred(*m) if (m := stats[n].means()) is not None else p for n, p in sites.items()}


def _fit_shared(stats, method, rank, value_rank, key_weight: float = DEFAULT_KEY_WEIGHT, **options) -> Projections:
    if isinstance(rank, Budget):
        raise ValueError("granularity='kv' takes a rank (a KV-byte fraction in (0, 1], an int latent width, or a "
                         "{site: rank} mapping), not a Budget; budgets allocate separate key and value ranks "
                         "(granularity 'head' or 'layer').")
    if value_rank is not None:
        raise ValueError("granularity='kv' has one latent for keys and values: pass rank= only (no value_rank).")
    cal = get_calibrator(method, **options)
    sites, shapes, report = {}, {}, {}
    for name, st in stats.items():
        r = rank.get(name) if isinstance(rank, dict) else rank
        if r is None or isinstance(r, (tuple, list)):
            raise ValueError(f"granularity='kv': site '{name}' needs one latent rank in the mapping, got {r!r}.")
        r = resolve_rank(r, 2 * st.kv_heads * st.head_dim)
        sites[name], report[name] = fit_shared(cal, st, r, key_weight)
        shapes[name] = SiteShape(st.heads, st.kv_heads, st.head_dim)
    meta = {"sites": report, "granularity": "kv", "tokens": max(s.tokens for s in stats.values())}
    return Projections(_with_means(sites, stats), shapes, method, meta)


def calibrate(model: torch.nn.Module, batches: Iterable, method: str = "kqsvd", rank: int | float | dict = 0.5,
              value_rank: int | float | None = None, granularity: str = "head", progress: bool = True,
              distributed: bool | None = None, attention_weight: float = 0.0, **options) -> Projections:
    """Calibrate projections for every attention site of `model` on `batches` of real text.

    distributed: None (default) sums the statistics over torch.distributed ranks when a process group with
    more than one rank is initialized (each rank passes its own shard of the batches; see calib/distributed.py);
    False keeps each rank's statistics local; True requires an initialized process group.
    attention_weight: γ of the attention-aware token weights of the key / value Grams (kvfx.calib.weights;
    0, the default here, counts every calibration token once)."""
    from ..passes.compile import original_module
    from .distributed import is_distributed, reduce_stats
    model = original_module(model, "calibrate")
    if distributed and not is_distributed():
        raise ValueError("calibrate(distributed=True) needs torch.distributed initialized with more than one rank "
                         "(torchrun ... and dist.init_process_group).")
    samples = getattr(get_calibrator(method, **options), "samples_needed", 0)
    if isinstance(rank, Budget) and rank.measure == "output":
        samples = max(samples, 2)
    stats = collect_stats(model, batches, progress=progress, samples=samples, attention_weight=attention_weight)
    if distributed is not False:
        reduce_stats(stats)  # a no-op unless torch.distributed runs with more than one rank
    projections = fit(stats, method, rank, value_rank, granularity, **options)
    tokens = projections.report.get("tokens")
    return stamp(projections, model, method=f"{method}@{granularity}", data={"tokens": tokens})

"""Distributed calibration: every rank collects Gram statistics on its own shard of the calibration data,
the statistics are summed over ranks, and every rank fits the same projections.

The statistics are sums over tokens (`SiteStats`, float64, O(h·d²) per attention site, independent of the
number of tokens), so summing them over ranks gives exactly the statistics of one process that saw all the
data; the fit is deterministic, so every rank ends with identical projections.

    torchrun --nproc_per_node 8 calibrate.py          # each rank: its own batches
        dist.init_process_group("nccl")               # or "gloo" on CPU
        projections = kvfx.calibrate(model, my_batches, method="kqsvd", rank=0.5)   # all-reduces by itself
        if dist.get_rank() == 0: projections.save("p.safetensors")

`kvfx.calibrate` calls `reduce_stats` itself whenever torch.distributed is initialized with more than one rank
(`distributed=False` turns that off, e.g. when every rank calibrates on the same data). The explicit recipe,
for custom pipelines: `stats = collect_stats(model, batches)`, `reduce_stats(stats)`, `fit(stats, ...)`.
"""
from __future__ import annotations

import torch

from .stats import _SUMMED, SiteStats


def is_distributed(group=None) -> bool:
    """torch.distributed is initialized and `group` (default: the world) has more than one rank."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _reduce_device(group) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo (and others) take CPU tensors."""
    import torch.distributed as dist
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_stats(stats: dict[str, SiteStats], group=None) -> dict[str, SiteStats]:
    """Sum per-site statistics over the ranks of `group` in place (and return them); a no-op without
    torch.distributed. Every rank must call it, with statistics of the same model (same sites and shapes).

    The token Grams of all sites travel in ONE float64 all_reduce (W_O Grams are identical everywhere and
    are not summed); token counts are summed too. Sample sequences kept for learned calibrators (if any) are
    gathered in rank order, up to each site's sample limit."""
    if not is_distributed(group):
        return stats
    import torch.distributed as dist
    world = dist.get_world_size(group)
    signature = [(name, st.heads, st.kv_heads, st.head_dim) for name, st in stats.items()]
    signatures = [None] * world
    dist.all_gather_object(signatures, signature, group=group)
    if any(s != signatures[0] for s in signatures):
        bad = next(i for i, s in enumerate(signatures) if s != signatures[0])
        raise ValueError(f"distributed calibration: rank {bad} saw other attention sites than rank 0 "
                         f"({len(signatures[bad])} vs {len(signatures[0])} sites, or other shapes); every rank "
                         "must calibrate the same model with the same attention implementation.")
    tensors = [getattr(st, f) for st in stats.values() for f in _SUMMED if getattr(st, f, None) is not None]
    device = _reduce_device(group)
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors] +
                     [torch.tensor([float(st.tokens) for st in stats.values()], dtype=torch.float64)]).to(device)
    dist.all_reduce(flat, group=group)
    flat = flat.cpu()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    for st, tokens in zip(stats.values(), flat[offset:].tolist()):
        st.tokens = int(round(tokens))
        getattr(st, "memo", {}).clear()  # results derived from the local statistics are stale now
    _gather_samples(stats, group, world)
    return stats


def _gather_samples(stats: dict[str, SiteStats], group, world: int) -> None:
    """Sample sequences (kept only when a calibrator asks for them): rank 0's first, up to the limit."""
    import torch.distributed as dist
    if not any(getattr(st, "sample_limit", 0) for st in stats.values()):
        return
    mine = {name: list(getattr(st, "samples", [])) for name, st in stats.items()}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    for name, st in stats.items():
        merged = [s for rank in everyone for s in rank[name]]
        st.samples = merged[:getattr(st, "sample_limit", len(merged))]

"""Perplexity of a model the two ways a cache is used: one forward over each window, and through the cache.

    forward           exp(mean NLL) over tokens 1..L-1 of every window (kvfx.data.perplexity's protocol)
    forward, 2nd half the same forward, scored on tokens L/2..L-1 only
    cached, 2nd half  prefill tokens 0..L/2-1 into a fresh cache, feed the rest through the cache in chunks of
                      `chunk` tokens, score tokens L/2..L-1: what generation sees (rows read back from the
                      cache, low-bit rounding included)

The two second-half numbers score the same tokens, so their gap is what the cache path costs.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .compress import cache_kwarg


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    logp = F.log_softmax(logits.double(), dim=-1)
    return float(-logp.gather(-1, targets[..., None].to(logp.device)).sum())


def _logits(out) -> torch.Tensor:
    return getattr(out, "logits", out)


@torch.no_grad()
def cache_perplexities(model, windows: torch.Tensor, make_cache: Callable[[], object], chunk: int = 16,
                       progress: bool = True, desc: str = "perplexity", batch_size: int = 1) -> dict[str, float]:
    """{"forward", "forward_second_half", "cached_second_half"} perplexities of `model` (a transformers causal
    LM, compressed or not) on `windows` [n, L]; make_cache() returns a fresh cache for one batch of windows.
    batch_size > 1 runs that many windows side by side through one cache: the same numbers for a cache whose
    rows do not depend on other sequences (kvfx's, transformers' Dynamic/Static, quanto's per-token groups), not for
    one that quantizes across the batch (HQQ's axis-0 groups)."""
    if windows.dim() != 2 or windows.shape[1] < 4:
        raise ValueError(f"windows must be [n, L] token ids with L >= 4, got shape {tuple(windows.shape)}.")
    if chunk < 1 or batch_size < 1:
        raise ValueError(f"chunk and batch_size must be >= 1, got {chunk} and {batch_size}.")
    kw = cache_kwarg(model)
    n, length = windows.shape
    half = length // 2
    sums = {"forward": 0.0, "forward_second_half": 0.0, "cached_second_half": 0.0}
    for ids in tqdm(windows.split(batch_size), desc=desc, unit="batch", disable=not progress):
        logits = _logits(model(input_ids=ids, use_cache=False))
        sums["forward"] += _nll(logits[:, :-1], ids[:, 1:])
        sums["forward_second_half"] += _nll(logits[:, half - 1:-1], ids[:, half:])
        cache = make_cache()
        positions = torch.arange(length, device=ids.device)[None].expand(ids.shape[0], -1)
        parts = [_logits(model(input_ids=ids[:, :half], position_ids=positions[:, :half], use_cache=True,
                               **{kw: cache}))[:, -1:]]
        for s in range(half, length, chunk):  # whole chunks (one compiled shape); the last prediction is unused
            parts.append(_logits(model(input_ids=ids[:, s:s + chunk], position_ids=positions[:, s:s + chunk],
                                       use_cache=True, **{kw: cache})))
        sums["cached_second_half"] += _nll(torch.cat(parts, 1)[:, :-1], ids[:, half:])
    counts = {"forward": n * (length - 1), "forward_second_half": n * (length - half),
              "cached_second_half": n * (length - half)}
    return {k: math.exp(v / counts[k]) for k, v in sums.items()}

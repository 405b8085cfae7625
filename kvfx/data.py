"""Evaluation and calibration text (WikiText-2 and three other domains) and the perplexity protocol.

Protocol (the one the reference figures in shared/DESIGN-NOTES.md use):
  * test text: ``wiki.test.raw`` (wikitext-2-raw-v1 test split), read as UTF-8 in text mode, so the
    file's CRLF line ends become ``\\n``; the whole file is one string, tokenised without special
    tokens (the SmolLM2 tokenizer adds no BOS) and cut into the first ``n`` non-overlapping windows
    of ``window`` tokens. Each window is scored on its own: tokens 1..window-1 are predicted from the
    tokens before them in the same window.
  * calibration text: ``wiki.valid.tokens`` (validation split, disjoint from the test split), same cut.

The data directory is ``<repo>/data/wikitext-2``, or ``$KVFX_DATA`` when set.

Domains (``DOMAINS``; each a test text and a disjoint calibration text, shipped with their licence notes under
``<repo>/data/<domain>/``, or ``$KVFX_DATA_ROOT/<domain>/``): ``wikitext`` (encyclopedia), ``code`` (Python
standard library source), ``docs`` (the Python language reference), ``fiction`` (Moby-Dick, with dialogue).
Every domain is cut into windows the same way (``token_windows``). ``calibration_mix`` interleaves the domains'
calibration windows: the default calibration text, never an evaluation window.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def data_dir() -> Path:
    """Directory holding ``wiki.test.raw`` and ``wiki.valid.tokens`` (``$KVFX_DATA`` overrides)."""
    env = os.environ.get("KVFX_DATA")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data" / "wikitext-2"


def _read(name: str) -> str:
    path = data_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (set KVFX_DATA to the folder holding {name})")
    return path.read_text(encoding="utf-8")  # text mode: CRLF -> LF


def data_root() -> Path:
    """Directory holding one folder per domain (``$KVFX_DATA_ROOT`` overrides)."""
    env = os.environ.get("KVFX_DATA_ROOT")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data"


# domain: (test file, calibration file), relative to its folder
DOMAINS = {"wikitext": ("wiki.test.raw", "wiki.valid.tokens"), "code": ("test.txt", "calib.txt"),
           "docs": ("test.txt", "calib.txt"), "fiction": ("test.txt", "calib.txt")}


def _domain_text(domain: str, split: str) -> str:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}.")
    if split not in ("test", "calib"):
        raise ValueError(f"split must be 'test' or 'calib', got {split!r}.")
    name = DOMAINS[domain][0 if split == "test" else 1]
    if domain == "wikitext":
        return _read(name)
    path = data_root() / domain / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (set KVFX_DATA_ROOT to the folder holding {domain}/{name})")
    return path.read_text(encoding="utf-8")


def domain_windows(tokenizer, domain: str, split: str = "test", n_windows: int = 8, window: int = 512):
    """The first ``n_windows`` windows of ``window`` tokens of a domain's test or calibration text, [n, window]."""
    return token_windows(tokenizer, _domain_text(domain, split), n_windows, window)


def calibration_mix(tokenizer, n_windows: int = 8, window: int = 512, domains=tuple(DOMAINS)) -> torch.Tensor:
    """``n_windows`` calibration windows taken in turn from each domain's calibration text (the first
    ``ceil(n / len(domains))`` of each), [n, window]. Disjoint from every domain's test windows."""
    if not domains:
        raise ValueError("calibration_mix needs at least one domain.")
    per = -(-n_windows // len(domains))
    parts = [domain_windows(tokenizer, d, "calib", per, window) for d in domains]
    return torch.stack([parts[i % len(parts)][i // len(parts)] for i in range(n_windows)])


def token_windows(tokenizer, text: str, n_windows: int, window: int) -> torch.Tensor:
    """First ``n_windows`` non-overlapping windows of ``window`` tokens of ``text``, as LongTensor [n, window].

    Only a prefix of the text is tokenised: it grows (doubling, cut at a line end) until it yields a
    safety margin of tokens beyond what is needed, so the kept tokens equal those of the whole text.
    """
    need, margin = n_windows * window, 64
    chars = max(4 * need, 1024)
    while True:
        prefix = text if chars >= len(text) else text[: text.rfind("\n", 0, chars) + 1 or chars]
        ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        if len(ids) >= need + margin or len(prefix) == len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise ValueError(f"text has {len(ids)} tokens, fewer than {n_windows} windows of {window}")
    return torch.tensor(ids[:need], dtype=torch.long).view(n_windows, window)


def wikitext_test_windows(tokenizer, n_windows: int = 16, window: int = 512) -> torch.Tensor:
    """Evaluation windows from the WikiText-2 raw test split, LongTensor [n_windows, window]."""
    return domain_windows(tokenizer, "wikitext", "test", n_windows, window)


def wikitext_calibration_windows(tokenizer, n_windows: int = 8, window: int = 512) -> torch.Tensor:
    """Calibration windows from the WikiText-2 validation split (``wiki.valid.tokens``)."""
    return domain_windows(tokenizer, "wikitext", "calib", n_windows, window)


@torch.no_grad()
def perplexity(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    windows: torch.Tensor,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> float:
    """``exp(mean NLL)`` over every predicted token (positions 1..L-1 of each independent window).

    ``model_fn(input_ids)`` returns logits [b, L, V] (or an output with ``.logits``). Log-softmax and
    the NLL sum are computed in float64.
    """
    total, count = 0.0, 0
    batches = range(0, windows.shape[0], batch_size)
    for i in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        ids = windows[i : i + batch_size]
        if device is not None:
            ids = ids.to(device)
        logits = model_fn(ids)
        logits = getattr(logits, "logits", logits)
        logp = F.log_softmax(logits[:, :-1].double(), dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None].to(logp.device)).sum()
        total += nll.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)

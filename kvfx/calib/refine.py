"""`kvfx.refine`: end-to-end distillation of projections through the whole model (logit KL).

The closed-form and per-site calibrators fit each attention site on its own; the errors of 30 sites then add
up through the residual stream. `refine` trains the projections of every site together against the
uncompressed model's next-token distribution:

    loss = mean over tokens of KL(p_teacher ‖ p_student),   p = softmax(logits)

where the student is the model compressed with the projections being trained — the same kvfx passes
(match → rewrite, folding off) in a live mode whose graph constants are recomputed from the trainable
tensors at every call, so no per-model code is involved. The model's own weights are frozen; teacher
log-probabilities are computed once (kept in bfloat16).

Parametrisation (`Refine.orthonormal`):
  * False — A, B, C, D free (oblique), started from the given projections (e.g. kqsvd's oblique fit);
  * True  — A = B and C = D orthonormal (the Q factor of an unconstrained matrix; a QR retraction inside the
    forward), started from tied projections (pca, eigen, stiefel, matryoshka); None picks True exactly when
    the start is tied.
Nested (Matryoshka) training (`Refine.rank_set`, arXiv 2410.14731): every step draws a key rank and a value
rank per site from the nested set and trains the leading columns only (the others are masked to zero, which
equals truncation and keeps one graph for every draw), so every leading sub-basis stays a good projection:
start from full-rank projections (`rank=1.0`) and cut the result with `kvfx.calib.matryoshka.truncate`.

The report records the training curve: `train_kl`, the mean training KL over each tenth of the steps, and
`kl_trained`, the held-out KL of the trained projections (returned or not): a start whose training raises them is
worth a lower lr or another start.
Bad runs never return silently wrong projections: a NaN/inf loss stops training (logged) and the start is
returned with `fallback: 1` in the report, as it is when training did not lower the held-out KL.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from tqdm.auto import tqdm

from .. import quant
from ..projections import Projections, resolve_rank
from ..rotate import check_unrotated
from ..passes.compile import original_module
from .live import LiveModel, Student, frozen, sequences, tied

log = logging.getLogger("kvfx.calib")


@dataclass
class Refine:
    """Options of `kvfx.refine` (end-to-end distillation)."""
    steps: int = 100
    lr: float = 1e-3
    warmup: int = 10                  # steps of linear warm-up; then cosine decay to lr/10
    orthonormal: bool | None = None   # None: True when the start is tied (down == up), else False
    rank_set: tuple | None = None     # nested (Matryoshka) training over these ranks (fractions or ints)
    batch: int = 1                    # sequences per step
    eval_sequences: int = 2           # held-out sequences (the last ones given) for the before/after KL
    max_grad_norm: float = 1.0
    seed: int = 0
    quantize: str | None = None       # "int8" / "int4": train (and judge) through the latents kvfx's cache stores

    def __post_init__(self):
        quant.check(self.quantize, "Refine: quantize")
        if not isinstance(self.steps, int) or self.steps < 0 or not self.lr > 0 or self.eval_sequences < 0:
            raise ValueError(f"Refine: steps and eval_sequences must be ints >= 0 and lr > 0, got "
                             f"{self.steps!r}, {self.eval_sequences!r}, {self.lr!r}.")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"Refine: warmup (steps) must be an int >= 0, got {self.warmup!r}.")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"Refine: batch (sequences per step) must be an int >= 1, got {self.batch!r}.")
        if self.rank_set is not None:
            self.rank_set = tuple(self.rank_set)
            bad = [r for r in self.rank_set if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0]
            if not self.rank_set or bad:
                raise ValueError(f"Refine: rank_set must hold fractions in (0, 1] or int ranks, got {self.rank_set!r}.")


def _check_start(start: Projections, orthonormal: bool, nested: bool = False) -> None:
    if not isinstance(start, Projections):
        raise TypeError(f"refine needs kvfx.Projections to start from (from kvfx.calibrate), got {type(start).__name__}.")
    start.validate()
    if nested:
        check_unrotated(start, "refine: nested training (rank_set)")
    if nested and any(p.shared for p in start.sites.values()):
        raise ValueError("refine: nested training (rank_set) draws separate key and value ranks; a shared K+V latent "
                         "(granularity='kv') has one. Refine it at its rank (rank_set=None).")
    if orthonormal and not all(tied(p) for p in start.sites.values()):
        raise ValueError("refine(orthonormal=True) needs tied projections (down == up: pca, eigen, stiefel, "
                         "matryoshka); kqsvd's are oblique — use orthonormal=False (or None).")


def refine(model: torch.nn.Module, projections: Projections, batches: Iterable, config: Refine | None = None,
           progress: bool = True) -> Projections:
    """Projections trained end to end (logit KL to the uncompressed model), started from `projections`.

    batches: calibration windows (LongTensor [n, T] or dicts with input_ids); the last `eval_sequences` are held
    out to compare the KL before and after training. Returns new Projections (method "<start>+refine") whose
    report["refine"] records steps, tokens, seconds, KL before/after and any fallback (the start's per-site
    errors move to report["start_sites"]: they do not describe the trained result); the model is unchanged."""
    cfg = config or Refine()
    module = original_module(model, "refine")
    orthonormal = cfg.orthonormal
    if orthonormal is None:
        orthonormal = isinstance(projections, Projections) and all(tied(p) for p in projections.sites.values())
    _check_start(projections, orthonormal, nested=bool(cfg.rank_set))
    seqs = sequences(batches, "refine")
    n_eval = min(cfg.eval_sequences, len(seqs) - 1)
    train = seqs[: len(seqs) - n_eval]
    t0 = time.time()
    with frozen(module):
        p0 = next(module.parameters(), None)
        student = Student(projections, orthonormal, p0.device if p0 is not None else torch.device("cpu"))
        live = LiveModel(module, student, seqs, quantize=cfg.quantize)
        eval_ranks = _eval_ranks(cfg, projections)

        def held_out() -> float:
            idx = list(range(len(train), len(seqs))) or [0]  # eval_sequences=0: a training sequence
            total = 0.0
            for ranks in eval_ranks:
                student.set_ranks(ranks)
                total += live.mean_kl(idx)
            student.set_ranks(None)
            return total / len(eval_ranks)

        before = held_out()
        trained, losses = _train(cfg, student, live.kl, len(train), projections, progress)
        after = held_out() if trained else float("nan")
    fallback = not after < before
    if fallback:
        log.warning("kvfx refine: %s; returning the starting projections", "training loss became NaN/inf"
                    if not trained else f"training did not lower the held-out KL ({after:.4g} vs {before:.4g})")
    sites = projections.sites if fallback else student.result(projections)
    report = dict(projections.report)
    if not fallback and "sites" in report:  # per-site errors describe the start, not the result
        report["start_sites"] = report.pop("sites")
    report["refine"] = {**{k: v for k, v in asdict(cfg).items() if k != "rank_set"},
                        "rank_set": list(cfg.rank_set) if cfg.rank_set else None, "orthonormal": orthonormal,
                        "train_tokens": int(train.numel()), "seconds": round(time.time() - t0, 1),
                        "kl_before": before, "kl_after": before if fallback else after, "fallback": float(fallback),
                        "kl_trained": after, "train_kl": curve(losses)}
    return Projections(dict(sites), dict(projections.shapes), projections.method + "+refine", report)


def _site_ranks(start: Projections, pick) -> dict[str, tuple[int, int]]:
    out = {}
    for name, p in start.sites.items():
        wk, wv = p.key_down.shape[-1], p.value_down.shape[-1]
        out[name] = (min(wk, resolve_rank(pick(), p.key_down.shape[1])), min(wv, resolve_rank(pick(), p.value_down.shape[1])))
    return out


def _eval_ranks(cfg: Refine, start: Projections) -> list:
    """Rank settings the held-out KL averages over: the full projections, or each entry of the nested set."""
    if not cfg.rank_set:
        return [None]
    return [_site_ranks(start, lambda r=r: r) for r in cfg.rank_set]


def _schedule(i: int, steps: int, warmup: int) -> float:
    """Learning-rate factor of step i: linear warm-up over `warmup` steps, then cosine from 1 to 0.1."""
    if i < warmup:
        return (i + 1) / (warmup + 1)
    t = (i - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * t))


def curve(losses: list[float], parts: int = 10) -> list[float]:
    """Mean of each of `parts` consecutive slices of the per-step losses (fewer when there are fewer steps)."""
    n = len(losses)
    cuts = sorted({round(i * n / parts) for i in range(parts + 1)})
    return [sum(losses[a:b]) / (b - a) for a, b in zip(cuts, cuts[1:])]


def _train(cfg: Refine, student: Student, kl, n_train: int, start: Projections,
           progress: bool) -> tuple[bool, list[float]]:
    """Adam over the student's parameters: (False at the first non-finite loss (logged), else True; each step's loss)."""
    rng = random.Random(cfg.seed)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _schedule(i, cfg.steps, cfg.warmup))
    order: list[int] = []
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="kvfx refine", disable=not progress)
    with torch.enable_grad():
        for step in bar:
            if len(order) < cfg.batch:
                order = list(range(n_train))
                rng.shuffle(order)
            if cfg.rank_set:
                student.set_ranks(_site_ranks(start, lambda: rng.choice(cfg.rank_set)))
            opt.zero_grad()
            loss = kl([order.pop() for _ in range(min(cfg.batch, n_train))])
            if not torch.isfinite(loss):
                log.warning("kvfx refine: non-finite loss at step %d of %d; training stopped", step, cfg.steps)
                return False, losses
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
    student.set_ranks(None)
    return True, losses

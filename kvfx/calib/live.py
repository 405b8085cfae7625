"""The model compressed in kvfx's *live* mode, for objectives measured through the whole network.

`refine` (training) and `sensitivity` (measuring) both run the original model through kvfx's own passes
(match → rewrite, folding off) with graph constants recomputed from a `Student`'s tensors at every call, and
compare its next-token distribution with the uncompressed model's (teacher log-probabilities computed once,
kept in bfloat16). Columns of any site can be masked beyond a rank (= truncation, with one graph for every
mask), which is how nested training and per-site rank probing run without recompiling.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
import torch.nn.functional as F

from ..passes.compile import CompileOptions, KvfxBackend, compile_isolated
from ..projections import Projections, SiteProjection, split_joint
from .distill import orth


def tied(p: SiteProjection) -> bool:
    up_k = p.key_up.reshape(p.key_down.shape) if p.joint else p.key_up
    up_v = p.value_up.reshape(p.value_down.shape) if p.joint else p.value_up
    return torch.equal(p.key_down, up_k) and torch.equal(p.value_down, up_v)


def _scales(p: SiteProjection, kinds) -> dict[str, float]:
    """Each trained tensor is stored divided by its scale, so Adam's steps (a fixed size per entry) are relative to
    it. 1 except for a shared K+V latent, whose four factors differ ~10× in size (keys and values are weighed
    apart, calib/shared.py): there each factor's RMS over their geometric mean, so they all train alike."""
    if not p.shared or len(kinds) < 4:
        return {k: 1.0 for k in kinds}
    rms = {k: float(getattr(p, k).float().pow(2).mean().sqrt()) or 1.0 for k in kinds}
    mean = torch.tensor(list(rms.values())).log().mean().exp().item()
    return {k: r / mean for k, r in rms.items()}


class Student:
    """Tensors per site (trainable or not) and the live SiteProjections built from them at every call."""

    def __init__(self, start: Projections, orthonormal: bool, device):
        self.orthonormal = orthonormal
        self.params: dict[str, dict[str, torch.Tensor]] = {}
        self.scales: dict[str, dict[str, float]] = {}
        self.masks: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        for name, p in start.sites.items():
            kinds = ("key_down", "value_down") if orthonormal else ("key_down", "key_up", "value_down", "value_up")
            self.scales[name] = _scales(p, kinds)
            self.params[name] = {k: (getattr(p, k).detach().to(device, torch.float32) / self.scales[name][k])
                                 .requires_grad_(True) for k in kinds}
            self.masks[name] = (None, None)
        self.shared = {n: p.shared for n, p in start.sites.items()}
        self.means = {n: {k: m.to(device) for k, m in p.means().items()} for n, p in start.sites.items()}  # not trained
        self.joint = {n: p.joint for n, p in start.sites.items()}
        self.shapes = start.shapes
        self.live = Projections({n: self._site(n) for n in start.sites}, dict(start.shapes), start.method)

    def parameters(self) -> list[torch.Tensor]:
        return [t for site in self.params.values() for t in site.values()]

    def _site(self, name: str) -> SiteProjection:
        t, (mk, mv) = self.params[name], self.masks[name]
        if self.orthonormal:
            kd, vd = orth(t["key_down"]), orth(t["value_down"])
            ku, vu = kd, vd
            if self.joint[name]:  # joint latent: the up blocks are the basis split per kv head
                ku, vu = split_joint(kd, self.shapes[name]), split_joint(vd, self.shapes[name])
        else:
            kd, ku, vd, vu = (t[k] * self.scales[name][k] for k in ("key_down", "key_up", "value_down", "value_up"))
        if mk is not None:  # columns beyond the rank are masked (= truncation)
            kd, vd = kd * mk, vd * mv
        return SiteProjection(kd, ku, vd, vu, shared=self.shared[name], **self.means[name])

    def rebuild(self) -> None:
        """Recompute every live projection from the parameters (call before each forward). The SiteProjection
        objects are updated in place: the compiled graphs' recipes hold them."""
        for name in self.params:
            new, old = self._site(name), self.live.sites[name]
            for kind, tensor in new.tensors().items():
                setattr(old, kind, tensor)

    def set_ranks(self, ranks: dict[str, tuple[int, int]] | None) -> None:
        """Mask every column beyond (key_rank, value_rank) per site (sites not named keep every column);
        None: all columns everywhere."""
        for name, t in self.params.items():
            if ranks is None or name not in ranks:
                self.masks[name] = (None, None)
                continue
            rk, rv = ranks[name]
            wk, wv = t["key_down"].shape[-1], t["value_down"].shape[-1]
            dev = t["key_down"].device
            self.masks[name] = ((torch.arange(wk, device=dev) < rk).float(), (torch.arange(wv, device=dev) < rv).float())

    def result(self, start: Projections) -> dict[str, SiteProjection]:
        """The projections at full rank, detached, in the start's dtypes."""
        self.set_ranks(None)
        with torch.no_grad():
            self.rebuild()
            return {n: p.like(**{k: v.detach().to(getattr(start.sites[n], k).dtype)
                                 for k, v in p.tensors().items()}) for n, p in self.live.sites.items()}


def sequences(batches: Iterable, who: str) -> torch.Tensor:
    """Equal-length token windows [n, T] from LongTensors [n, T] / [T] or dicts with input_ids."""
    rows = []
    for b in batches:
        ids = b["input_ids"] if isinstance(b, dict) else b
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() not in (1, 2):
            raise ValueError(f"{who}: batches must be LongTensors of token ids [n, T] (or dicts with input_ids).")
        rows.extend(ids.reshape(-1, ids.shape[-1]).unbind(0))
    if not rows:
        raise ValueError(f"{who}: no calibration sequences given; pass a few windows of real text.")
    if len({r.shape[0] for r in rows}) != 1:
        raise ValueError(f"{who}: calibration sequences must all have the same length (cut them into windows).")
    return torch.stack(rows)


def kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student)."""
    s = F.log_softmax(student_logits.float().flatten(0, -2), -1)
    t = teacher_logp.float().flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


@contextmanager
def frozen(module: torch.nn.Module):
    """The model's own weights without gradients for the duration (restored after)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def lm_logits(forward, ids: torch.Tensor, takes_use_cache: bool) -> torch.Tensor:
    """Next-token logits of a language model for token ids [b, n]: ids passed positionally (transformers models take
    input_ids first; a plain `forward(self, ids)` module too), use_cache=False where the forward takes it, and the
    output's `.logits` or the output itself when it is a tensor."""
    out = forward(ids, use_cache=False) if takes_use_cache else forward(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def takes_use_cache(module) -> bool:
    import inspect
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class LiveModel:
    """The model compressed with a Student's live projections; `kl(idx)` against the teacher on sequences idx.

    backend: the compiler under kvfx's passes ("eager" for training; "inductor" pays a compile once and runs
    no-grad probes faster). quantize="int8" / "int4": latents rounded as the cache stores them (straight-through)."""

    def __init__(self, module: torch.nn.Module, student: Student, seqs: torch.Tensor, backend: str = "eager",
                 quantize: str | None = None):
        p0 = next(module.parameters(), None)
        self.device = p0.device if p0 is not None else torch.device("cpu")
        self.student, self.seqs = student, seqs
        self.use_cache_arg = takes_use_cache(module)
        with torch.no_grad():
            self.teacher = [F.log_softmax(lm_logits(module, s[None].to(self.device), self.use_cache_arg).float(), -1)
                            .to(torch.bfloat16) for s in seqs]
        self.backend = KvfxBackend(student.live, CompileOptions(backend=backend), fold=False, live=True,
                                   quantize=quantize)
        self.forward = compile_isolated(module.forward, backend=self.backend, dynamic=False)

    def kl(self, idx: list[int]) -> torch.Tensor:
        self.student.rebuild()
        logits = lm_logits(self.forward, self.seqs[idx].to(self.device), self.use_cache_arg)
        return kl(logits, torch.stack([self.teacher[i] for i in idx]))

    def mean_kl(self, idx: list[int]) -> float:
        """Mean KL over sequences idx, one forward each, without gradients."""
        with torch.no_grad():
            return sum(float(self.kl([i])) for i in idx) / len(idx)

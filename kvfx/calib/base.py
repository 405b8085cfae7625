"""Calibrator protocol and registry: statistics of one attention site -> its rank-R projection.

A calibrator turns a `SiteStats` into a `SiteProjection` (A, B, C, D, each [kv_heads, d, R]) plus a small
report of floats. Every built-in report carries, under the per-head GQA objective (see `linalg`):

    key_err   = Σ_g tr((P_g−I)ᵀ G_K (P_g−I) G_Q) / Σ_g tr(G_K G_Q),  P_g = A_g B_gᵀ
              = Σ_i ‖K A B_gᵀ Q_iᵀ − K Q_iᵀ‖² / Σ_i ‖K Q_iᵀ‖²   (relative logit error, all query heads)
    value_err = the same with G_V, G_O and P_g = C_g D_gᵀ            (relative attention-output error)
    key_total, value_total = the denominators (so absolute gaps such as kqsvd's ε can be normalised).

A calibrator may set `nested = True` when its rank-r projection is the leading r columns of its full-rank one
(pca, eigen, kqsvd, matryoshka): error-rank profiles for budgets then fit once per site and slice.

Register your own with::

    @register_calibrator("mine")
    class Mine:
        def fit(self, stats, key_rank, value_rank): ...
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from ..projections import SiteProjection, resolve_rank
from .linalg import proj_error, top_eigh
from .stats import SiteStats

__all__ = ["Calibrator", "CALIBRATORS", "register_calibrator", "get_calibrator", "finish", "site_errors"]


@runtime_checkable
class Calibrator(Protocol):
    name: str

    def fit(self, stats: SiteStats, key_rank: int, value_rank: int) -> tuple[SiteProjection, dict]:
        """Projection for one site (ranks: int in 1..d, or keep fraction in (0, 1]) and a report dict."""
        ...


CALIBRATORS: dict[str, type] = {}


def register_calibrator(name: str, *, override: bool = False) -> Callable[[type], type]:
    """Class decorator adding a calibrator to `CALIBRATORS` under `name` (sets `cls.name`)."""
    def deco(cls: type) -> type:
        if not callable(getattr(cls, "fit", None)):
            raise TypeError(f"calibrator {name!r}: {cls.__name__} has no fit(stats, key_rank, value_rank) method.")
        if name in CALIBRATORS and CALIBRATORS[name] is not cls and not override:
            raise ValueError(f"calibrator {name!r} is already registered ({CALIBRATORS[name].__name__}); "
                             "pass override=True to replace it.")
        cls.name = name
        CALIBRATORS[name] = cls
        return cls
    return deco


def get_calibrator(method: str | type | Calibrator, **options) -> Calibrator:
    """Instantiate the calibrator registered as `method` (or a calibrator class) with `options`;
    a calibrator instance passes through unchanged."""
    if isinstance(method, type):
        return method(**options)
    if not isinstance(method, str):
        if options or not isinstance(method, Calibrator):
            raise ValueError(f"method must be a registered name or a Calibrator instance, got {method!r}.")
        return method
    if method not in CALIBRATORS:
        raise ValueError(f"Unknown calibration method {method!r}; known methods: {', '.join(sorted(CALIBRATORS))}. "
                         "Add your own with @kvfx.calib.register_calibrator(name).")
    try:
        return CALIBRATORS[method](**options)
    except TypeError as e:
        raise ValueError(f"calibrator {method!r} does not accept options {sorted(options)}: {e}") from e


def ranks(stats: SiteStats, key_rank, value_rank) -> tuple[int, int]:
    return resolve_rank(key_rank, stats.head_dim), resolve_rank(value_rank, stats.head_dim)


def site_errors(stats: SiteStats, proj: SiteProjection) -> dict[str, float]:
    """key_err / value_err (energy-weighted over kv heads) and their totals; see the module docstring."""
    out = {}
    for kind, (down, up), g_in, g_out in (
            ("key", (proj.key_down, proj.key_up), stats.key, stats.query),
            ("value", (proj.value_down, proj.value_up), stats.value, stats.output)):
        p = down.to(torch.float64) @ up.to(torch.float64).transpose(-1, -2)
        err, total = proj_error(p, g_in, g_out)
        t = float(total.sum())
        out[f"{kind}_err"] = float(err.sum()) / t if t > 0 else 0.0
        out[f"{kind}_total"] = t
    return out


def finish(stats: SiteStats, a, b, c, d, **extra: float) -> tuple[SiteProjection, dict]:
    """Cast float64 factors to a float32 `SiteProjection` and build the report (errors + `extra`)."""
    proj = SiteProjection(*(t.to(torch.float32).contiguous() for t in (a, b, c, d)))
    return proj, site_errors(stats, proj) | {k: float(v) for k, v in extra.items()}


def symmetric_fit(stats: SiteStats, key_gram: torch.Tensor, key_rank, value_rank) -> tuple[SiteProjection, dict]:
    """A = B = top eigenvectors of `key_gram`, C = D = top eigenvectors of the value Gram (pca, eigen)."""
    rk, rv = ranks(stats, key_rank, value_rank)
    _, u = top_eigh(key_gram, rk)
    _, w = top_eigh(stats.value, rv)
    return finish(stats, u, u, w, w)

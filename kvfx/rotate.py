"""Rotated latents for low-bit caches: turn each site's latent basis by a random orthogonal matrix.

A low-bit row's step is set by its largest entry (absmax scale per row or group, kvfx.quant). Calibrated
latents put most of their energy in a few leading columns (that is what makes them truncatable), so those
columns set a coarse step for every other column. Turning the basis by an orthogonal Q (A → A·Q, B → B·Q and
likewise C, D) leaves attention unchanged — (q·B·Q)(k·A·Q)ᵀ = (q·B)(k·A)ᵀ, (p·v·C·Q)(D·Q)ᵀ = p·v·C·Dᵀ — and
spreads each token's energy over all columns, so the same bytes round far less (the reason Palu applies a
Hadamard transform to its latents and QuaRot to its caches). Q is folded into the projections: no runtime cost.

After rotation the leading columns are no longer a lower-rank projection, so cut ranks first (`truncate`,
`allocate`, nested `refine`) and rotate last; those steps refuse rotated projections.
"""
from __future__ import annotations

import torch

from .projections import Projections


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random n×n orthogonal matrix (QR of a Gaussian, signs fixed), float64."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


def _turn(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (t.to(torch.float64) @ q).to(t.dtype).contiguous()


def rotate_latents(projections: Projections, seed: int = 0) -> Projections:
    """`projections` with every site's latent turned by a seeded random orthogonal matrix (one per site and
    side; a shared K+V latent has one). Exact: the compressed model computes the same attention (up to float
    rounding); only a low-bit cache (`kvfx.compress(..., quantize="int4")`) rounds differently — less.
    Recorded in report["rotation"] (the seeds, in order), so saved projections remember it."""
    if not isinstance(projections, Projections):
        raise TypeError(f"rotate_latents needs kvfx.Projections, got {type(projections).__name__}.")
    projections.validate()
    g = torch.Generator().manual_seed(seed)
    sites = {}
    for name, p in projections.sites.items():
        qk = random_orthogonal(p.key_rank, g)
        qv = qk if p.shared else random_orthogonal(p.value_rank, g)
        sites[name] = p.like(key_down=_turn(p.key_down, qk), key_up=_turn(p.key_up, qk),
                             value_down=_turn(p.value_down, qv), value_up=_turn(p.value_up, qv))
    seeds = rotation_seeds(projections) + [seed]
    return Projections(sites, dict(projections.shapes), projections.method,
                       dict(projections.report) | {"rotation": {"seeds": seeds}})


def rotation_seeds(projections: Projections) -> list[int]:
    return list((projections.report.get("rotation") or {}).get("seeds", []))


def check_unrotated(projections: Projections, what: str) -> None:
    """Refuse column cuts on rotated projections: their leading columns are not a lower-rank projection."""
    if rotation_seeds(projections):
        raise ValueError(f"{what}: these projections are rotated (kvfx.rotate_latents), so their leading columns "
                         "are not a lower-rank projection. Cut ranks first (truncate / allocate / nested refine), "
                         "then rotate.")

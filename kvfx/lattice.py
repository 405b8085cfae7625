"""The E8 lattice codebook of kvfx.quant's "e8" format: 8 numbers as one lattice point, a 16-bit index a point.

E8 = D8 ∪ (D8 + ½): the integer vectors with an even sum and the same shifted by ½ in every coordinate. Its points
within radius √10 (56 881 of them, 15.8 bits) are the codebook: 8 numbers, scaled by their group's step, round to the
nearest point and are stored as its index, two bytes — 2 bits a number, as int2, at ~0.096 of a Gaussian's variance
as error instead of int2's 0.133 (the lattice packs its cells denser than a cube's, and the ball drops the corners
a cube of scalar levels wastes).

Points are kept as u = 2·x (integers in [-6, 6]: all even or all odd, Σu ≡ 0 mod 4, Σu² ≤ 40) and ordered by the key
Σ_i (u_i + 6)·13^i, ascending: the index is the point's rank in that order (a rule any decoder can rebuild).

Rounding (Conway & Sloane's decoder): the nearest point of D8 (each coordinate rounded half to even; if the sum is
odd, the coordinate furthest from its integer moves the other way — the first of equals, towards its number, up
on a tie) and of D8 + ½, the nearer of the two (D8's on a tie). A point outside the ball (a vector near its edge)
is found again for y·0.97^k, k = 1 … 4, until it lies inside, else for y drawn in to radius 2.15. kvfx.quant sets each group's step so that no vector
of the group lies outside the ball (its largest 8-vector at most √10 steps long), so that shrinking is rare: a
group's largest numbers — what moves attention scores most — keep their size (a step set from the group's rms
alone, which lets them overflow the ball, measured worse).
"""
from __future__ import annotations

import functools

import torch

RADIUS2 = 10     # x·x of the codebook's points (u·u <= 4·RADIUS2)
SIZE = 56881     # points within it
BASE = 13        # u_i + 6 in [0, 12]: the key's digits
SHRINK = 0.97    # a point outside the ball: y times this, rounded again (at most SHRINKS times)
SHRINKS = 4
LAST = 2.15      # then y drawn in to this radius (√10 − 1, E8's covering radius, less a margin)


def codebook(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(points u = 2·x [SIZE, 8] int8, their keys [SIZE] int64 ascending), on `device`."""
    device = torch.device(device)
    return _BOOK if device.type == "cpu" else _on(str(device))


@functools.lru_cache(maxsize=4)
def _on(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.to(device) for t in _BOOK)


def _build() -> tuple[torch.Tensor, torch.Tensor]:
    found = []
    for values in (torch.arange(-6, 7, 2), torch.arange(-5, 6, 2)):  # D8's points doubled, then D8 + ½'s
        u = values[:, None]
        for _ in range(7):  # one coordinate more at a time, keeping the vectors inside the ball
            u = torch.cat((u.repeat_interleave(len(values), 0), values.repeat(len(u))[:, None]), 1)
            u = u[(u * u).sum(1) <= 4 * RADIUS2]
        found.append(u[torch.remainder(u.sum(1), 4) == 0])
    u = torch.cat(found)
    keys = ((u + 6) * BASE ** torch.arange(8)).sum(1)
    order = torch.argsort(keys)
    assert u.shape[0] == SIZE, u.shape
    return u[order].to(torch.int8).contiguous(), keys[order].contiguous()


_BOOK = _build()  # at import (~30 ms): never built inside a traced graph


def _nearest_d8(y: torch.Tensor) -> torch.Tensor:
    r = torch.round(y)
    odd = torch.remainder(r.sum(-1, keepdim=True), 2) != 0
    d = y - r
    i = d.abs().argmax(-1, keepdim=True)
    step = torch.where(d.gather(-1, i) < 0, -1.0, 1.0).to(y.dtype)
    return torch.where(odd, r.scatter_add(-1, i, step), r)


def _nearest(y: torch.Tensor) -> torch.Tensor:
    a, b = _nearest_d8(y), _nearest_d8(y - 0.5) + 0.5
    return torch.where((((y - a) ** 2).sum(-1, keepdim=True) <= ((y - b) ** 2).sum(-1, keepdim=True)), a, b)


def nearest(y: torch.Tensor) -> torch.Tensor:
    """The codebook point (x, float64) nearest each 8-vector of y [..., 8] (float64), inside the ball (see the top).
    No data-dependent branch (traced into compiled graphs by fake_quant): SHRINKS rounds of shrinking, then a vector
    still outside is drawn in to radius LAST (a point within E8's covering radius 1 of it lies inside)."""
    q = _nearest(y)
    for _ in range(SHRINKS):
        out = (q * q).sum(-1, keepdim=True) > RADIUS2
        y = torch.where(out, y * SHRINK, y)
        q = torch.where(out, _nearest(y), q)
    out = (q * q).sum(-1, keepdim=True) > RADIUS2
    pull = (LAST / (y * y).sum(-1, keepdim=True).sqrt().clamp_min(1e-300)).clamp_max(1.0)
    return torch.where(out, _nearest(y * pull), q)


def index(points: torch.Tensor) -> torch.Tensor:
    """Codebook indices (int64) of points x [..., 8] (each one of the codebook's)."""
    u = torch.round(points * 2).to(torch.int64)
    keys = ((u + 6) * BASE ** torch.arange(8, device=u.device)).sum(-1)
    book = codebook(u.device)[1]
    at = torch.searchsorted(book, keys).clamp_max(SIZE - 1)
    if not torch.compiler.is_compiling() and not bool((book[at] == keys).all()):  # (no data-dependent branch traced)
        raise ValueError("E8 index: a vector is not a point of the codebook")
    return at


def points(indices: torch.Tensor) -> torch.Tensor:
    """The points x (float32) [..., 8] of codebook indices [...] (int64)."""
    return codebook(indices.device)[0][indices].float() * 0.5

"""Projections: the per-site rank-R matrices kvfx applies, with versioned safetensors serialization.

For attention site s with kv heads h, head dim d and ranks (R_k, R_v):
    key_down   A [h, d, R_k]   cached key      k -> k·A
    key_up     B [h, d, R_k]   query           q -> q·B   (one B per kv group, shared by its query heads)
    value_down C [h, d, R_v]   cached value    v -> v·C
    value_up   D [h, d, R_v]   attention out   o -> o·Dᵀ  (folded into W_O)
Joint cross-head latent (granularity "layer", MLA-like): key_down / value_down are [1, h·d, R] and project
the concatenated kv heads into one latent per layer; the up matrices stay [h, d, R] (one block per group).
Shared K+V latent (granularity "kv", `shared=True`, like DeepSeek's MLA c_KV): ONE latent per token and layer,
    c = [k_1 … k_h]·A + [v_1 … v_h]·C          (key_down A, value_down C: [1, h·d, R], post-RoPE keys)
read by attention as both key and value: k̂_g = c·B_gᵀ, v̂_g = c·D_gᵀ, i.e. SDPA(q·B, c, c)·Dᵀ. The cache
holds R numbers per token and layer (not R_k + R_v).
File format 2 adds the `shared` site list; format-1 files (no shared sites) still load. Format 3 adds each site's
calibration key and value means (`key_mean`, `value_mean` [h, d]: low-bit latents are rounded around them, see
`SiteProjection.latent_offsets`); files without means are written as format 2, and older files load without
them. Optional metadata
entries `provenance` (JSON: kvfx version, model fingerprint, data, recipe; see kvfx/provenance.py) and `quantize`
(the latent format the file was made for) do not change the format: files without them load as before.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import quant

FORMAT_VERSION = 3
_KINDS = ("key_down", "key_up", "value_down", "value_up")
_MEANS = ("key_mean", "value_mean")


class ProjectionError(ValueError):
    """Projections that cannot be applied (wrong model, bad ranks, corrupt file, NaN...)."""


@dataclass(frozen=True)
class SiteShape:
    """What a projection must agree with: one attention site of the model."""
    heads: int
    kv_heads: int
    head_dim: int

    def as_list(self) -> list[int]:
        return [self.heads, self.kv_heads, self.head_dim]


@dataclass
class SiteProjection:
    key_down: torch.Tensor
    key_up: torch.Tensor
    value_down: torch.Tensor
    value_up: torch.Tensor
    shared: bool = False     # one latent c = K·A + V·C serves as both cached key and cached value
    key_mean: torch.Tensor | None = None    # [h, d]: the calibration keys' mean (low-bit latents round around it)
    value_mean: torch.Tensor | None = None  # [h, d]

    @property
    def joint(self) -> bool:
        """One latent for all kv heads of the site (down matrices [1, h·d, R]; keys and values alike, see validate).
        The one test of it: passes, cache and calibrators ask this property."""
        return self.key_down.shape[0] == 1 and self.key_down.shape[1] != self.key_up.shape[1]

    @property
    def input_width(self) -> int:
        """The width rank fractions are of: head_dim (per head), h·head_dim (joint), 2·h·head_dim (shared K+V)."""
        return self.key_down.shape[1] * (2 if self.shared else 1)

    @property
    def cached_per_token(self) -> int:
        """Numbers the cache holds per token for this site (keys + values)."""
        if self.shared:
            return self.key_rank
        return self.key_down.shape[0] * self.key_rank + self.value_down.shape[0] * self.value_rank

    def cached_bytes(self, quantize: str | None = None, context: int | None = None) -> float:
        """Bytes per token in the cache (keys + values): latent rows stored by kvfx.quant's format, or at
        16 bits (quantize=None); with `context`, a format's exact rows (a fixed amount a cache) spread over that
        many tokens."""
        def per_token(width: int) -> float:
            exact = quant.exact_bytes(quantize, width) / context if context and width else 0
            return quant.row_bytes(quantize, width) + exact
        if self.shared:
            return per_token(self.key_rank)
        return self.key_down.shape[0] * per_token(self.key_rank) + self.value_down.shape[0] * per_token(self.value_rank)

    @property
    def key_rank(self) -> int:
        return self.key_down.shape[-1]

    @property
    def value_rank(self) -> int:
        return self.value_down.shape[-1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in _KINDS}

    def means(self) -> dict[str, torch.Tensor]:
        """{"key_mean": …, "value_mean": …} where known, else {}."""
        return {k: getattr(self, k) for k in _MEANS if getattr(self, k) is not None}

    def like(self, **tensors: torch.Tensor) -> "SiteProjection":
        """A projection of the same form (shared or not, the same means) with the given tensors."""
        return SiteProjection(**tensors, shared=self.shared, key_mean=self.key_mean, value_mean=self.value_mean)

    def centred(self, key_mean: torch.Tensor, value_mean: torch.Tensor) -> "SiteProjection":
        """This projection with the calibration keys' and values' means ([h, d] each)."""
        return SiteProjection(**self.tensors(), shared=self.shared, key_mean=key_mean, value_mean=value_mean)

    def latent_offsets(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(key, value) latent offsets [h | 1, 1, R] a low-bit cache subtracts before rounding and adds back after:
        the means' latents (k̄·A, v̄·C; a shared latent's k̄·A + v̄·C, value None). Rounding around the mean spends
        the codes on what varies (a latent's mean holds 7-20 % of its energy on SmolLM2); the offset is exact
        either way: reads add it back. (None, None) without means."""
        if self.key_mean is None or self.value_mean is None:
            return None, None

        def offset(mean, down):
            mean = mean.to(device=down.device, dtype=torch.float32)
            if down.shape[0] == 1 and down.shape[1] == mean.numel():  # joint: one latent over the kv heads
                return (mean.reshape(1, -1) @ down[0].float())[:, None]
            return torch.einsum("hd,hdr->hr", mean, down.float())[:, None]
        key, value = offset(self.key_mean, self.key_down), offset(self.value_mean, self.value_down)
        return (key + value, None) if self.shared else (key, value)

    @classmethod
    def identity(cls, kv_heads: int, head_dim: int, dtype=torch.float32) -> "SiteProjection":
        eye = torch.eye(head_dim, dtype=dtype).expand(kv_heads, head_dim, head_dim).clone()
        return cls(eye, eye.clone(), eye.clone(), eye.clone())


@dataclass
class Projections:
    """Rank-R projections for every attention site of one model, keyed by the site's module path."""
    sites: dict[str, SiteProjection]
    shapes: dict[str, SiteShape]
    method: str = "custom"
    report: dict = field(default_factory=dict)  # calibration report (per-site error, ε gap, ...)

    def __post_init__(self):
        self.validate()

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        if not self.sites:
            raise ProjectionError("Projections hold no attention sites; calibrate on a model with attention first.")
        if set(self.sites) != set(self.shapes):
            raise ProjectionError("Projections: every site needs a shape entry (heads, kv heads, head dim).")
        for name, p in self.sites.items():
            shp = self.shapes[name]
            for kind, t in p.tensors().items():
                if not isinstance(t, torch.Tensor) or t.dim() != 3:
                    raise ProjectionError(f"{name}.{kind}: expected a [kv_heads, head_dim, rank] tensor.")
                h, d, r = t.shape
                joint = kind.endswith("_down") and (h, d) == (1, shp.kv_heads * shp.head_dim)
                if (h, d) != (shp.kv_heads, shp.head_dim) and not joint:
                    raise ProjectionError(
                        f"{name}.{kind}: shape {tuple(t.shape)} does not fit {shp.kv_heads} kv heads × "
                        f"head_dim {shp.head_dim}; these projections were made for another model.")
                if t.is_meta:
                    raise ProjectionError(f"{name}.{kind}: is on the meta device (shapes only, no values); "
                                          "load or calibrate the projections on cpu/cuda.")
                if not t.is_floating_point() or not torch.isfinite(t).all():
                    raise ProjectionError(f"{name}.{kind}: contains NaN/inf or is not floating point; recalibrate.")
            if (p.key_down.shape[1] != p.key_up.shape[1]) != (p.value_down.shape[1] != p.value_up.shape[1]):
                raise ProjectionError(f"{name}: keys and values must both be per-head or both joint (one latent over "
                                      "all kv heads); calibrate them with one granularity.")
            for label, down, up in (("key", p.key_down, p.key_up), ("value", p.value_down, p.value_up)):
                width = p.input_width if p.shared else down.shape[1]  # a shared latent spans keys and values
                if not 1 <= down.shape[-1] <= width:
                    raise ProjectionError(f"{name}.{label}: rank {down.shape[-1]} is outside 1..{width} "
                                          "(the projected width); pick a rank in range.")
                if up.shape[-1] != down.shape[-1]:
                    raise ProjectionError(f"{name}.{label}: up and down projections differ in rank.")
            for label, mean in (("key_mean", p.key_mean), ("value_mean", p.value_mean)):
                shape = (shp.kv_heads, shp.head_dim)
                if mean is not None and (not isinstance(mean, torch.Tensor) or tuple(mean.shape) != shape
                                         or not torch.isfinite(mean).all()):
                    raise ProjectionError(f"{name}.{label}: expected finite means of shape [{shp.kv_heads}, "
                                          f"{shp.head_dim}] (kv heads × head_dim); recalibrate.")
            if p.shared and not (p.key_down.shape[0] == p.value_down.shape[0] == 1 and shp.kv_heads * shp.head_dim
                                 == p.key_down.shape[1] == p.value_down.shape[1] and p.key_rank == p.value_rank):
                raise ProjectionError(
                    f"{name}: a shared K+V latent needs key_down and value_down of shape [1, kv_heads·head_dim, R] "
                    f"with one R; got {tuple(p.key_down.shape)} and {tuple(p.value_down.shape)}. Calibrate with "
                    "granularity='kv'.")

    def check_site(self, name: str, shape: SiteShape) -> SiteProjection:
        if name not in self.sites:
            raise ProjectionError(
                f"No projection for attention site '{name}' (have: {', '.join(list(self.sites)[:4])}...). "
                "These projections were calibrated on another model; recalibrate with kvfx.calibrate(model, ...).")
        if self.shapes[name] != shape:
            raise ProjectionError(
                f"Site '{name}' has heads/kv heads/head_dim {shape.as_list()} but the projections were made for "
                f"{self.shapes[name].as_list()}: another model. Recalibrate with kvfx.calibrate(model, ...).")
        return self.sites[name]

    # ---------------------------------------------------------------- summary
    @property
    def provenance(self) -> dict:
        """Who made these projections: kvfx version, model fingerprint, data, recipe (kvfx.provenance); {} if
        unknown (files written before provenance existed)."""
        return self.report.get("provenance") or {}

    @property
    def quantize(self) -> str | dict | None:
        """The latent storage format these projections were made for ("int8" / "int4" / "int2"; None: 16-bit; a
        dict {site: format} from kvfx.allocate_bits). kvfx.compress applies it unless told otherwise."""
        return self.report.get("quantize")

    @property
    def ranks(self) -> dict[str, list[int]]:
        """(key rank, value rank) per site; a shared K+V latent of rank R reads (R, R) and caches R."""
        return {n: [p.key_rank, p.value_rank] for n, p in self.sites.items()}

    def kv_fraction(self, quantize: str | None = None, context: int | None = None) -> float:
        """Cached numbers per token after / before (keys and values together); with a low-bit format (kvfx.quant: one,
        or a dict {site: format}), cached bytes (codes plus scale bytes, kvfx.quant) / the bytes of an uncompressed
        16-bit cache; with `context`, exact rows included as a cache of that many tokens holds them."""
        before = sum(2 * s.kv_heads * s.head_dim for s in self.shapes.values())
        return sum(p.cached_bytes(quant.site(quantize, n), context) for n, p in self.sites.items()) / (2 * before)

    def report_table(self) -> str:
        """Per-site calibration report: ranks, relative key-logit / value-output error, ε gap (kqsvd)."""
        rows = ["site                                  Rk  Rv  key_err  value_err  eps(K-only SVD excess)"]
        for name, p in self.sites.items():
            r = self.report.get("sites", {}).get(name, {})
            eps = f"{r['eps']:.4g}" if "eps" in r else "-"
            rows.append(f"{name:36s} {p.key_rank:3d} {p.value_rank:3d}  {r.get('key_err', float('nan')):7.4f}  "
                        f"{r.get('value_err', float('nan')):9.4f}  {eps}")
        return "\n".join(rows)

    def uncentred(self) -> "Projections":
        """These projections without their calibration means: low-bit latents rounded around zero (as before file
        format 3; an ablation of SiteProjection.latent_offsets)."""
        sites = {n: SiteProjection(**p.tensors(), shared=p.shared) for n, p in self.sites.items()}
        return Projections(sites, dict(self.shapes), self.method, dict(self.report))

    def to(self, dtype=None, device=None) -> "Projections":
        sites = {n: SiteProjection(**{k: t.to(dtype=dtype, device=device) for k, t in p.tensors().items()},
                                   shared=p.shared, **{k: m.to(device=device) for k, m in p.means().items()})
                 for n, p in self.sites.items()}
        return Projections(sites, dict(self.shapes), self.method, dict(self.report))

    # ---------------------------------------------------------------- files
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file
        tensors = {f"{n}/{k}": t.detach().contiguous().cpu() for n, p in self.sites.items()
                   for k, t in (p.tensors() | p.means()).items()}
        centred = any(p.means() for p in self.sites.values())
        meta = {
            "format": "kvfx.projections", "format_version": str(FORMAT_VERSION if centred else 2), "method": self.method,
            "sites": json.dumps(list(self.sites)),
            "fingerprint": json.dumps({n: s.as_list() for n, s in self.shapes.items()}),
            "ranks": json.dumps(self.ranks),
            "report": json.dumps({k: v for k, v in self.report.items() if k != "provenance"}, default=float),
            "shared": json.dumps([n for n, p in self.sites.items() if p.shared]),
        }
        if self.provenance:
            meta["provenance"] = json.dumps(self.provenance | {"format_version": int(meta["format_version"])},
                                            default=float)
        if self.quantize:
            meta["quantize"] = self.quantize if isinstance(self.quantize, str) else json.dumps(self.quantize)
        path = Path(path)  # written next to the target, then renamed: no half-written file under the name
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> "Projections":
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise ProjectionError(f"Projections file not found: {path}. Save one with projections.save(path).")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
            raise ProjectionError(f"Projections file {path} is corrupt or not a safetensors file ({e}).") from e
        if meta.get("format") != "kvfx.projections":
            raise ProjectionError(f"{path} is not a kvfx projections file (no kvfx metadata).")
        try:
            version = int(meta.get("format_version", "0"))
        except ValueError:
            raise ProjectionError(f"{path} has format version {meta.get('format_version')!r}, not one this kvfx "
                                  f"knows (1..{FORMAT_VERSION}); the file is corrupt or from another tool.") from None
        if version > FORMAT_VERSION:
            raise ProjectionError(f"{path} has format version {version}; this kvfx reads up to {FORMAT_VERSION}. Upgrade kvfx.")
        try:
            names = json.loads(meta["sites"])
            fp = json.loads(meta["fingerprint"])
            shared = set(json.loads(meta.get("shared", "[]")))  # format 1: none
            sites = {n: SiteProjection(**{k: tensors[f"{n}/{k}"] for k in _KINDS}, shared=n in shared,
                                       **{k: tensors[f"{n}/{k}"] for k in _MEANS if f"{n}/{k}" in tensors})
                     for n in names}  # means: format 3 (optional there; formats 1-2 have none)
            shapes = {n: SiteShape(*fp[n]) for n in names}
            report = json.loads(meta.get("report", "{}"))
            if "provenance" in meta:  # optional (files before provenance have none)
                report["provenance"] = json.loads(meta["provenance"])
        except (KeyError, json.JSONDecodeError, TypeError) as e:
            raise ProjectionError(f"{path}: metadata and tensors disagree ({e}); the file is corrupt.") from e
        return cls(sites, shapes, meta.get("method", "custom"), report)

    def __repr__(self) -> str:
        ranks = sorted({tuple(r) for r in self.ranks.values()})
        return f"Projections(method={self.method!r}, sites={len(self.sites)}, ranks(k,v)={ranks}, kv_fraction={self.kv_fraction():.3f})"


def split_joint(t: torch.Tensor, shape: SiteShape) -> torch.Tensor:
    """A joint-latent factor [1, h·d, R] as per-kv-head blocks [h, d, R] (the layout of the up matrices)."""
    return t[0].reshape(shape.kv_heads, shape.head_dim, t.shape[-1])


def resolve_rank(rank: int | float, head_dim: int) -> int:
    """The one reading of a rank argument, by type: a float is a keep fraction in (0, 1] of the width (1.0 = full
    width), an int is a count in 1..head_dim (1 = rank one). A float above 1 (2.0) is refused, not read as a count."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ProjectionError(f"rank must be a keep fraction in (0, 1] or an int in 1..{head_dim}, got {rank!r}.")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0 or math.isnan(rank):
            raise ProjectionError(f"rank {rank!r}: a float rank is a keep fraction in (0, 1]; pass an int "
                                  f"({int(rank) if rank == rank and rank >= 1 else 'e.g. 16'}) for a rank count.")
        return max(1, round(rank * head_dim))
    r = int(rank)
    if not 1 <= r <= head_dim:
        raise ProjectionError(f"rank {r} is outside 1..{head_dim} (head_dim); use a fraction or an int in range.")
    return r

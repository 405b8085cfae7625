"""Low-bit storage for the rank-R latents: rank and precision multiply (Palu-style low-rank + quantisation).

Each cached latent row (one token of one latent head, R numbers) is cut into groups; each group stores its
numbers as integer codes plus ONE int8 scale code e (step 2^(e/8)). The log scale with eighth-of-an-octave steps
spans 2^-16 … 2^15.9 in one byte and costs under 0.13 bit of precision against an exact absmax scale. Formats
(`quantize=`):

* "int8": codes in [-127, 127] (x ≈ q·2^(e/8)), one scale per row: R + 1 bytes.
* "int4": codes in [-7, 7] packed two per byte, one scale per 32 numbers: ⌈R/2⌉ + ⌈R/32⌉ bytes. Calibrated
  latents put their largest directions first, so groups of consecutive columns get scales that follow the
  decay of their variance.
* "int2": four codes per byte, one scale per 32 numbers. Two bits take the four mid-rise levels
  x ≈ (q + ½)·2^(e/8), q in [-2, 1] (symmetric codes would leave three: 0.43 of a Gaussian's variance as error,
  against 0.126 for these four).
* "int3": eight mid-rise levels x ≈ (q + ½)·2^(e/8), q in [-4, 3], one scale per 32 numbers, stored as two bit
  planes (decoding takes no shifts across bytes): the low two bits of every code as int2 codes are packed, then
  the sign bits, eight a byte (bit j of byte i: column 8i + j): ⌈R/4⌉ + ⌈R/8⌉ + ⌈R/32⌉ bytes.
* "int5": 32 mid-rise levels x ≈ (q + ½)·2^(e/8), q in [-16, 15], one scale per 32 numbers, stored as int3 is: the
  low four bits of every code as int4 codes are packed, then the sign bits: ⌈R/2⌉ + ⌈R/8⌉ + ⌈R/32⌉ bytes. A band
  between int8 and int4 (a Gaussian's relative error 2.0e-3, against int4's 1.1e-2 and int8's 4e-5 for 3 more bits).
* "e8": 2 bits a number as int2, at 0.72× int2's error: each 8 numbers one point of the E8 lattice within radius
  √10 (kvfx.lattice, 56 881 points), stored as its index in two bytes, one scale code per 32 numbers: R/4 + ⌈R/32⌉
  bytes (R a multiple of 8). The step is the group's rms, raised where needed so that its largest 8-vector lies
  within the ball (its largest numbers keep their size: a step from the rms alone, letting them overflow the ball
  and shrink, measured worse). kvfx's C++ kernel reads it (kvfx/ops/lattice_e8.h: on AMX / AVX-512 VNNI each point
  transcoded to int4 nibbles u = 2x, as int3's levels; elsewhere decoded to float32); the Triton kernel does not yet
  (on CUDA rows of it are dequantized and attended by the reference).
* bands, e.g. "int8x64+int4x224+int2x64": bits per latent direction. The row's columns, in order, are cut into
  bands stored in the formats named (the band "int8" with one scale per band); a row is the bands' rows one
  after the other. kvfx.allocate_bits chooses them (reverse water-filling over the calibrated directions).

Exact rows: a suffix "|sinks4|recent32" (either part) also keeps the latents of the first 4 tokens (attention sinks)
and of the last 32 (the recent window) in 16 bits (`exact_dtype`) beside the codes, e.g. "int4|sinks4" or
"int8x64+int4x224|sinks4|recent32". Every token is still stored as codes; a read takes the exact latent where one is
held (`exact_of`, `codes_of`; kvfx.cache and kvfx::decode_attention); their bytes are a fixed amount a cache
(`exact_bytes`). Without kvfx's cache the rewrite pass attends the exact latents of the first keys and of those
within the window of each query (passes/exact_window.py), as a decode step reads them.

Centring: projections with calibration means (file format 3; SiteProjection.latent_offsets) make kvfx's cache round
latent − offset, the offset being the means' latent, and add it back on read (`fake_quant(x, kind, offset)` in the
rewrite pass, `kvfx::dequantize(..., offset)` in the cache, one add to a decode kernel's output): codes spent on what
varies, not on a mean that every row repeats; exact up to the rounding, no bytes.

A per-site dict {site name: format} gives each attention site its own (`site`). A stored row is one int8 vector
[codes | scale codes] per band, so the cache holds a single int8 tensor [b, h, N, row_bytes(R)] per slot and
transformers' own Dynamic and Static layers store it unchanged.
On CPU, kvfx's cache writes a prefill's or a chunk's rows with `kvfx::quantize` (kvfx/ops/quantize_rows.h, one pass
in C++; the same bytes, up to the scale code of a group whose 8·log2(amax / top) lies within float round-off of an
integer) and a decode step's one row with `quantize` here, which Inductor fuses into the step.

Without kvfx's cache (perplexity runs, transformers' own cache) the rewrite pass inserts `fake_quant` on the
latents, so every path computes attention on the same rounded latents. Gradients pass straight through.
Rounding and scaling run in float32 whatever the model's dtype, then cast back.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from . import lattice

SCALE_STEPS = 8  # scale codes per octave
FIT = 1.02       # e8: a group's largest 8-vector at most √10 / FIT steps long (before the scale code's rounding)


@dataclass(frozen=True)
class Format:
    bits: int
    group: int | None  # numbers per scale code; None: one scale for the whole row (or band)
    midrise: bool = False  # levels (q + ½)·step, q in [-2^(bits-1), 2^(bits-1) - 1]; else q·step, |q| <= qmax
    vq: bool = False  # 8 numbers a point of the E8 lattice (kvfx.lattice), stored as its 16-bit index

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def groups(self, width: int) -> int:
        return 1 if self.group is None else math.ceil(width / self.group)

    def code_bytes(self, width: int) -> int:
        if self.vq:
            return width // 4
        if self.bits in PLANES:  # two planes: the low bits (int2's / int4's layout), then the sign bits
            return math.ceil(width * (self.bits - 1) / 8) + math.ceil(width / 8)
        return math.ceil(width * self.bits / 8)

    def row_bytes(self, width: int) -> int:
        return self.code_bytes(width) + self.groups(width) if width else 0


PLANES = (3, 5)  # formats stored as two bit planes: the low bits as int2 / int4 codes, then the sign bits
FORMATS = {"int8": Format(8, None), "int5": Format(5, 32, midrise=True), "int4": Format(4, 32),
           "int3": Format(3, 32, midrise=True), "int2": Format(2, 32, midrise=True),
           "e8": Format(2, 32, vq=True)}
QUANTIZE = (None, *FORMATS)
_CHOICES = ("None (latents stored in the model's dtype), 'int8', 'int5', 'int4', 'int3', 'int2', 'e8', bands such as "
            "'int8x64+int4x224+int2x64' (bits x columns, in column order) or a dict {site: format}")
_BAND = re.compile(r"(int[23458]|e8)x([1-9][0-9]*)")
_EXACT = re.compile(r"(sinks|recent)([0-9]+)")


def codes_of(kind: str | None) -> str | None:
    """The codes' format of `kind`, without its exact-rows suffix ("int4|sinks4" -> "int4")."""
    return kind.split("|", 1)[0] if isinstance(kind, str) else kind


def exact_of(kind: str | None) -> tuple[int, int]:
    """(sinks, recent): how many first and last tokens a format keeps unrounded ((0, 0): none)."""
    if not isinstance(kind, str) or "|" not in kind:
        return 0, 0
    found = {"sinks": 0, "recent": 0}
    for part in kind.split("|")[1:]:
        m = _EXACT.fullmatch(part)
        if not m:
            raise ValueError(f"exact rows are given as '|sinksS' and '|recentW' after the format (e.g. "
                             f"'int4|sinks4|recent32'), got {part!r} in {kind!r}.")
        found[m[1]] = int(m[2])
    return found["sinks"], found["recent"]


def bands_of(kind: str) -> tuple[tuple[Format, int], ...] | None:
    """A bands format ("int8x64+int4x224+…") as ((Format, width), …); None for a whole-row format. (Not memoised:
    Dynamo traces it inside the cache's update, and folds it to a constant.)"""
    kind = codes_of(kind)
    if kind in FORMATS:
        return None
    parts = [_BAND.fullmatch(p) for p in kind.split("+")]
    if not all(parts):
        raise ValueError(f"quantize must be {_CHOICES}, got {kind!r}.")
    out = tuple((FORMATS[m[1]], int(m[2])) for m in parts)
    for fmt, w in out:
        _check_vq(fmt, w, kind)
    return out


class _LatticeWidth(ValueError):
    pass


def _check_vq(fmt: Format, width: int, kind: str) -> None:
    if fmt.vq and width % 8:
        raise _LatticeWidth(f"e8 codes 8 numbers a lattice point: its columns must be a multiple of 8, got {width} in "
                         f"{kind!r}; use int2 there (the same bytes a number) or widen the band.")


def check(quantize, what: str = "quantize") -> None:
    if isinstance(quantize, dict):
        for v in quantize.values():
            check(v, what)
        return
    base = codes_of(quantize)
    if quantize is not None and not (isinstance(quantize, str) and (base in FORMATS or _valid_bands(base))):
        raise ValueError(f"{what} must be {_CHOICES}, optionally with exact rows ('|sinks4|recent32'), "
                         f"got {quantize!r}.")
    exact_of(quantize)


def _valid_bands(kind: str) -> bool:
    try:
        return bands_of(kind) is not None
    except _LatticeWidth:
        raise
    except ValueError:
        return False


def site(quantize, name: str):
    """The format of attention site `name` under `quantize` (a format, or a dict {site: format})."""
    if isinstance(quantize, dict):
        if name not in quantize:
            raise ValueError(f"quantize names formats per site but not {name!r} (it names {sorted(quantize)[:3]}…); "
                             "give every site a format (None: 16-bit).")
        return quantize[name]
    return quantize


def describe(quantize) -> str:
    """A short human label: "int4", "16-bit", or "bits per direction (30 sites, 25.0 … 25.0 % …)"."""
    if isinstance(quantize, dict):
        kinds = set(quantize.values())
        return next(iter(kinds)) or "16-bit" if len(kinds) == 1 else f"bits per direction ({len(quantize)} site formats)"
    return quantize or "16-bit"


def lattice_coded(kind) -> bool:
    """Whether a format has e8 codes (read by the torch codec only: kvfx's C++ and Triton kernels take the others)."""
    codes = codes_of(kind)
    if not isinstance(codes, str):
        return False
    return codes == "e8" or any(fmt.vq for fmt, _ in (bands_of(codes) or ()))


def width_of(kind: str) -> int | None:
    """Columns a bands format spans (None: any width)."""
    bands = bands_of(kind)
    return None if bands is None else sum(w for _, w in bands)


def layout(kind: str, width: int) -> tuple[tuple[Format, int], ...]:
    """The (Format, columns) bands a row of `width` numbers is stored as."""
    bands = bands_of(kind)
    if bands is None:
        _check_vq(FORMATS[codes_of(kind)], width, kind)
        return ((FORMATS[codes_of(kind)], width),)
    if sum(w for _, w in bands) != width:
        raise ValueError(f"format {kind!r} spans {sum(w for _, w in bands)} latent columns, but this latent has {width}; "
                         "use the format kvfx.allocate_bits chose for these projections.")
    return bands


def row_bytes(quantize: str | None, width: int) -> int:
    """Bytes one cached row of `width` latent numbers takes as codes; None: 2·width (a 16-bit cache, the reference).
    Exact rows come on top of it, a fixed number a cache (`exact_bytes`)."""
    check(quantize)
    if quantize is None:
        return 2 * width
    return sum(fmt.row_bytes(w) for fmt, w in layout(quantize, width))


EXACT_SLOTS_SPARE = 1  # the exact-rows buffer's one spare slot (where rows not kept are written; never read)


def exact_dtype(dtype: torch.dtype) -> torch.dtype:
    """Exact rows are held in 16 bits: the model's dtype when it has 16 bits, else float16."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float16


def exact_suffix(sinks: int, recent: int) -> str:
    """The format suffix that holds `sinks` first and `recent` last tokens exact ("" for none)."""
    return (f"|sinks{sinks}" if sinks else "") + (f"|recent{recent}" if recent else "")


def exact_bytes(quantize: str | None, width: int) -> int:
    """Bytes the exact rows of one cached latent head take (sinks + recent + the spare slot, 16 bits a number),
    however long the context: a cache holds row_bytes per token plus this."""
    sinks, recent = exact_of(quantize)
    return 0 if not sinks + recent else 2 * width * (sinks + recent + EXACT_SLOTS_SPARE)


def _split(x: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, ...]:
    """The groups of x's last dim (the last one shorter). Split and cat, not pad and reshape: Inductor (torch
    2.13, CPU) miscompiled padded groups feeding SDPA (tests/test_quant.py::test_forward_matches_reference)."""
    return x.split(fmt.group or max(x.shape[-1], 1), -1)


def _codes(x: torch.Tensor, fmt: Format) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per group of x [..., R]: (codes q [..., group], scale code e [..., 1]), float32 holding integers."""
    if fmt.vq:
        return [_lattice_codes(part) for part in _split(x.float(), fmt)]
    out = []
    top = 2 ** (fmt.bits - 1) if fmt.midrise else fmt.qmax  # steps from 0 to the group's largest |x|
    for part in _split(x.float(), fmt):
        amax = part.detach().abs().amax(-1, keepdim=True).clamp_min(1e-30)
        e = torch.ceil(torch.log2(amax / top) * SCALE_STEPS).clamp(-128, 127)
        y = part * torch.exp2(-e / SCALE_STEPS)
        q = torch.floor(y).clamp(-top, top - 1) if fmt.midrise else torch.round(y).clamp(-top, top)
        out.append((q, e))
    return out


def _lattice_codes(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A group of an e8 band [..., g] (g a multiple of 8): (its E8 points, float32, scale code e [..., 1]). The step
    2^(e/8) is the group's rms, or where larger FIT / √10 of its largest 8-vector's length (so that it lies within
    the ball, up to the code's rounding), rounded to the nearest code."""
    d = part.detach()
    rms = d.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)
    top = d.reshape(*d.shape[:-1], -1, 8).pow(2).sum(-1).amax(-1, keepdim=True).sqrt().clamp_min(1e-30)
    step = torch.maximum(rms, top * (FIT / lattice.RADIUS2 ** 0.5))
    e = torch.round(torch.log2(step) * SCALE_STEPS).clamp(-128, 127)
    y = (part * torch.exp2(-e / SCALE_STEPS)).double()
    q = lattice.nearest(y.reshape(*y.shape[:-1], -1, 8)).reshape(y.shape)
    return q.float(), e


def _scaled(groups, fmt: Format) -> torch.Tensor:
    half = 0.5 if fmt.midrise else 0.0
    return torch.cat([(q + half) * torch.exp2(e / SCALE_STEPS) for q, e in groups], -1)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (float, signed, `bits` wide) -> one signed byte value per 8/bits codes, the first code in the lowest
    bits: Σ_j 2^(bits·j)·(q_j mod 2^bits), the last code kept signed (so the byte is an int8 value)."""
    per = 8 // bits
    if q.shape[-1] % per:
        q = torch.cat((q, q.new_zeros(*q.shape[:-1], per - q.shape[-1] % per)), -1)
    parts = [q[..., j::per] for j in range(per)]
    out = parts[-1] * 2 ** (bits * (per - 1))
    for j in range(per - 1):
        out = out + torch.remainder(parts[j], 2 ** bits) * 2 ** (bits * j)
    return out


def _unpack(b: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """Inverse of _pack (float in, float out): the first `width` codes."""
    per, m = 8 // bits, 2 ** bits
    codes, rest = [], b
    for _ in range(per - 1):
        low = torch.remainder(rest, m)
        codes.append(torch.where(low >= m // 2, low - m, low))
        rest = (rest - low) / m
    codes.append(rest)
    return torch.stack(codes, -1).flatten(-2)[..., :width]


def _pack_planes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int3 / int5 codes q in [-m, m - 1] = low + m·sign (m = 2^(bits-1), low in [0, m - 1], sign in {-1, 0}): the
    low bits packed as int2 / int4 codes (their two's-complement reading), then the signs as 1-bit codes."""
    m = 2 ** (bits - 1)
    low = torch.remainder(q, m)
    return torch.cat((_pack(torch.where(low >= m // 2, low - m, low), bits - 1), _pack((q - low) / m, 1)), -1)


def _unpack_planes(b: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    m, nlow = 2 ** (bits - 1), math.ceil(width * (bits - 1) / 8)
    return torch.remainder(_unpack(b[..., :nlow], bits - 1, width), m) + m * _unpack(b[..., nlow:], 1, width)


def _lattice_bytes(q: torch.Tensor) -> torch.Tensor:
    """E8 points [..., w] -> their codebook indices as two bytes each, low then high (signed byte values, float)."""
    i = lattice.index(q.reshape(*q.shape[:-1], -1, 8))
    b = torch.stack((i % 256, i // 256), -1).flatten(-2)
    return torch.where(b >= 128, b - 256, b).float()


def _lattice_points(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of _lattice_bytes (float in, float out)."""
    b = torch.remainder(codes, 256).long().reshape(*codes.shape[:-1], -1, 2)
    p = lattice.points(b[..., 0] + 256 * b[..., 1])
    return p.reshape(*p.shape[:-2], -1)


def _quantize_band(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    groups = _codes(x, fmt)
    q = torch.cat([q for q, _ in groups], -1)
    codes = (_lattice_bytes(q) if fmt.vq else q if fmt.bits == 8 else _pack_planes(q, fmt.bits) if fmt.bits in PLANES
             else _pack(q, fmt.bits))
    return torch.cat([codes] + [e for _, e in groups], -1)


def _dequantize_band(stored: torch.Tensor, width: int, fmt: Format) -> torch.Tensor:
    nb = fmt.code_bytes(width)
    codes, e = stored[..., :nb].float(), stored[..., nb:].float()
    q = (_lattice_points(codes) if fmt.vq else codes if fmt.bits == 8 else _unpack_planes(codes, fmt.bits, width)
         if fmt.bits in PLANES else _unpack(codes, fmt.bits, width))
    return _scaled(zip(_split(q, fmt), e.split(1, -1)), fmt)


def quantize(x: torch.Tensor, kind: str = "int8") -> torch.Tensor:
    """[..., R] float -> [..., row_bytes(R)] int8: per band, the codes, then the band's scale codes."""
    bands = layout(kind, x.shape[-1])
    xs = x.split([w for _, w in bands], -1)
    return torch.cat([_quantize_band(part, fmt) for part, (fmt, _) in zip(xs, bands)], -1).to(torch.int8)


def dequantize(stored: torch.Tensor, dtype: torch.dtype, width: int, kind: str = "int8") -> torch.Tensor:
    """[..., row_bytes(width)] int8 -> [..., width] in `dtype`."""
    bands = layout(kind, width)
    parts = stored.split([fmt.row_bytes(w) for fmt, w in bands], -1)
    return torch.cat([_dequantize_band(p, w, fmt) for p, (fmt, w) in zip(parts, bands)], -1).to(dtype)


def fake_quant(x: torch.Tensor, kind: str = "int8", offset: torch.Tensor | None = None) -> torch.Tensor:
    """x rounded as the cache stores it: dequantize(quantize(x)) without the integer tensor, in x's dtype
    (straight-through gradient when x requires one); with `offset` (broadcast against x), x - offset rounded and
    the offset added back, as kvfx's cache rounds latents around their calibration mean."""
    if offset is not None:
        return fake_quant(x - offset, kind) + offset
    bands = layout(kind, x.shape[-1])
    xs = x.split([w for _, w in bands], -1)
    rounded = torch.cat([_scaled(_codes(p, fmt), fmt) for p, (fmt, _) in zip(xs, bands)], -1).to(x.dtype)
    return x + (rounded - x).detach() if x.requires_grad else rounded

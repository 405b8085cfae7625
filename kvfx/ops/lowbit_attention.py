"""Custom ops for low-bit latents: `kvfx::quantize`, `kvfx::dequantize` and `kvfx::decode_attention`.

kvfx's cache reads its int8 / int4 rows through `torch.ops.kvfx.dequantize`, one opaque node in the captured
graph. A decode step (one query token, see passes/decode.py) then turns SDPA(q, dequantize(K), dequantize(V))
into `torch.ops.kvfx.decode_attention(q, K, V, ...)`, which reads the stored codes once and never writes a float
copy of the cache — the plain-torch form (`reference`) dequantises the whole cache every step, a write and a
re-read of a copy several times larger than what is stored.

The same op serves 16/32-bit latents (kind "float": the rows as stored, float32 / bfloat16 / float16) where many
query rows share each cached row (a `layer` / `kv` latent read by every query head).

CPU: a C++ kernel (lowbit_attention.cpp), built on first use with torch.utils.cpp_extension (needs a C++ compiler
and ninja; cached under ~/.cache/torch_extensions). It reads the cache's [:, :, :N] views of its reserved storage
in place, a block of rows at a time, with an online softmax per split-K chunk. On CPUs with AMX-INT8 (Sapphire
Rapids and later; `integer_path()`) int8 / int4 / int2 rows and bands of them (bits per direction:
lowbit_attention_bands.h, lowbit_attention_amx_bands.h; int3 / int5 bands of whole 16-column runs are first transcoded, a block of rows at a
time, to their levels k = 2q + 1 as int4 / int8 codes; e8 bands, a point at a time, to u = 2x as int4 codes,
lattice_e8.h) never become floats: the tile unit computes the scores as int8
dot products of the stored codes with the query, rounded once per call to integers (12 bits for int4, 16 for int8,
one scale per query row), and the value sums as int8 dot products of the codes with the softmax weights times the
rows' scales, rounded per block of rows to 16 bits; float arithmetic only applies the per-group scales and runs the
softmax. On SmolLM2's decode inputs these roundings move the output by at most ~1.3e-3 (int4) / ~3e-4 (int8) of its
size, 200 (int4) / 80 (int8) times less than the cache's own rounding moves it (tests/ops/test_lowbit_attention.py
bounds them); int4 / int8 rows read by up to 4 query rows a kv head (per-head latents) compute the same integer
sums with AVX-512 VNNI instead (lowbit_attention_vnni.h; the tile unit idles on so few rows). On CPUs with AVX-512
VNNI, VBMI and GFNI but no tile unit (Intel Ice Lake, AMD Zen 4; `integer_rounding()` "vnni") int4 / int8 rows take
those VNNI blocks for any number of query rows (a shared latent's 9: passes of up to 4), with the same integers and
roundings, and so do bands (lowbit_attention_vnni_bands.h: the tile path's units, query digits and int3 / int5
transcoding, lowbit_attention_bands.h). On CPUs with AVX2 but
not AVX-512 (AMD Zen 1-3; lowbit_attention_avx2i.h), with KVFX_AVX2_INTEGER=1,
int4 / int3 / int2 rows and bands of them (not those with an int8 or int5 band) take an integer path too: VPMADDUBSW on the
codes as 4-bit integers, the query rounded to 8 bits per 32-column group and the weights to 8 bits per block — 2-17 %
faster decode steps, but outputs moved ~10× more than by AMX's roundings, so opt-in (`integer_rounding()` says which
path runs). Elsewhere, for 16/32-bit latents, and with KVFX_NO_AMX=1, the kernel decodes a block of rows into a
float32 buffer that stays in L1/L2 and computes the block's scores as 16-row tiles (one query row against 16 key
rows in registers, reduced by a shuffle tree; on AVX2-only CPUs such as AMD Zen 1-3, tiles of 3 query rows × 4 key
rows, so the accumulators fit 16 registers and each loaded vector serves several) and its value sums in registers:
the reference's numbers up to float32 round-off. On AVX2, int4 rows of keys and values of 16, 32, 48, … columns
(per-head latents) skip the buffer: their codes become floats in registers where they are consumed
(lowbit_attention_avx2_int4.h; ~1.5× faster on SmolLM2's per-head rank-32 rows at 16k tokens, benchmarks/kernel.py).
Without a compiler the op runs `reference` (float32), without the saving. `kernel_available()` says which. The same
module encodes the rows a prefill or a chunk writes (`quantize`, quantize_rows.h). On CPU graphs
passes/decode_kernel.py calls the kernel through the C++ op `attend` (same arguments with the format as integers),
not through this Python op.

Exact rows (a format's "|sinksS|recentW", kvfx.quant.exact_of): both ops take the 16-bit rows and their positions;
`dequantize` writes them over their codes' rows, `decode_attention` skips those codes (score -inf) and merges the
rows' own partial softmax with the split-K chunks' (on every CPU path, AMX's included; on CUDA the Triton kernel skips
them and ops/exact_merge.py adds the exact rows' softmax).

CUDA: a Triton split-K kernel (lowbit_attention_triton.py) for every format but e8 codes (whole-row codes, int2 / int3 /
int5, bands, exact rows) when triton is installed, tested in Triton's interpreter on CPU (tests/ops/test_lowbit_attention_triton.py);
without triton, and on other devices, `reference`.
"""
from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import quant

log = logging.getLogger(__name__)
E8_BITS = 9  # lattice_e8.h's kE8Bits
_BITS = {"int8": 8, "int4": 4, "float": 0}  # "float": 16/32-bit latents as stored; others: bands (quant.layout)
_EXT: dict = {}


@torch.library.custom_op("kvfx::dequantize", mutates_args=())
def dequantize(stored: torch.Tensor, width: int, kind: str, dtype: torch.dtype, exact_rows: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
    """[..., row_bytes(width)] int8 rows -> [..., width] in `dtype` (kvfx.quant.dequantize as one graph node; on CPU
    the C++ kernel's dequantize_rows: one pass over the codes, not quant.dequantize's dozen torch ops a band). With
    exact rows ([b, h, slots, width] 16-bit latents at `positions` [slots]; -1: an empty slot), a row whose position
    is held is the exact one (kvfx.quant.exact_of), written into the fresh output: no copy of the cache. `offset`
    ([h | 1, 1, width], the latent the rows were rounded around: SiteProjection.latent_offsets) is added to every
    row, exact ones included."""
    ext = _extension() if stored.device.type == "cpu" and width > 0 else None
    if ext is None:
        out = quant.dequantize(stored, dtype, width, kind).contiguous()  # what the fake kernel promises
        out = out if positions is None else _put_exact(out, exact_rows, positions)
        return out if offset is None else out.add_(offset.to(out.dtype))
    # the C++ reader (the op `decode`, which compiled CPU graphs call directly: passes/decode_kernel.py): the offset
    # added to each float32 row, the sum rounded once to float32 or bfloat16 (others: a cast after)
    bits, spec, _ = kernel_format(kind, width, 0, True)
    return ext.decode(stored, width, bits, spec, dtype, exact_rows, positions, offset)


@torch.library.custom_op("kvfx::quantize", mutates_args=())
def quantize(x: torch.Tensor, kind: str) -> torch.Tensor:
    """[..., R] float latents -> [..., row_bytes(R)] int8 rows (kvfx.quant.quantize as one graph node; on CPU the C++
    kernel's quantize_rows: one pass, where Inductor's kernel for quant.quantize's torch ops does not vectorise).
    The same format and numbers, except that a group's scale code is the smallest whose 2^(e/8) (torch's table)
    covers the group: quant.quantize's ceil(8·log2) picks the next one where it lands within float round-off of an
    integer (~1e-5 of Gaussian groups, by one step)."""
    width = x.shape[-1]
    ext = _extension() if x.device.type == "cpu" and width > 0 else None
    if ext is None:
        return quant.quantize(x, kind)
    bits, spec, _ = kernel_format(kind, width, 0, True)
    return ext.encode(x, bits, spec)  # the op compiled CPU graphs call directly (bfloat16: widened in the encoder)


@quantize.register_fake
def _(x, kind):
    return x.new_empty((*x.shape[:-1], quant.row_bytes(kind, x.shape[-1])), dtype=torch.int8)


def _put_exact(latent: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """latent [b, h, N, R] with row p replaced, in place, by rows[:, :, j] where positions[j] = p (0 <= p < N)."""
    held = (positions >= 0) & (positions < latent.shape[2])
    latent[:, :, positions[held]] = rows[:, :, held].to(latent.dtype)
    return latent


@functools.lru_cache(maxsize=2)
def _scales(sign: int = 1) -> torch.Tensor:
    """2^(e/8) (sign -1: 2^(-e/8)) for the 256 scale codes e = -128 … 127, computed as kvfx.quant computes them
    (torch's exp2)."""
    return torch.exp2(sign * torch.arange(-128, 128, dtype=torch.float32) / quant.SCALE_STEPS).contiguous()


@dequantize.register_fake
def _(stored, width, kind, dtype, exact_rows=None, positions=None, offset=None):
    return stored.new_empty((*stored.shape[:-1], width), dtype=dtype)


def _additive(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """SDPA's mask [b|1, 1, 1, N] (bool: True = attend, or additive float) as [b|1, N] additive float32."""
    if mask is None:
        return None
    mask = mask.reshape(mask.shape[0], n)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, -math.inf)
    return mask.float()


def reference(q, kc, vc, rk: int, rv: int, kind: str, scale: float, mask=None, shared: bool = False,
              exact_keys=None, exact_values=None, positions=None):
    """Plain torch: dequantise the whole cache (exact rows where held), then SDPA. q [b, h, g, Rk]; codes
    [b, h, N, row bytes]; exact rows [b, h, slots, R] at `positions` [slots]."""
    k = _decoded(kc, rk, kind)
    v = k if shared else _decoded(vc, rv, kind)
    if positions is not None:
        k = _put_exact(k.clone(), exact_keys, positions)
        v = k if shared else _put_exact(v.clone(), exact_values, positions)
    m = _additive(mask, kc.shape[2])
    m = None if m is None else m[:, None, None, :]
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=m, scale=scale).to(q.dtype)


@functools.lru_cache(maxsize=256)
def _band_spec(kind: str, width: int) -> tuple[int, ...]:
    """(bits, columns, bits, columns, …) of a bands format (or int2) for the C++ kernel (memoised: the op runs it
    every decode step and layer; Dynamo never traces it, the op is opaque to it)."""
    if width == -1 and quant.bands_of(kind) is None:
        return band_code(quant.FORMATS[quant.codes_of(kind)]), -1
    return tuple(n for fmt, w in quant.layout(kind, width) for n in (band_code(fmt), w))


def band_code(fmt: quant.Format) -> int:
    """A band format's code in the C++ kernel's band specs: its bits, E8_BITS for e8 codes (lattice_e8.h)."""
    return E8_BITS if fmt.vq else fmt.bits


def row_bits(kind: str) -> int:
    """The C++ kernel's `bits` for rows of format `kind`: 8, 4, 0 (16/32-bit latents) or -1 (bands)."""
    return _BITS.get(kind, -1)


def kernel_format(kind: str, rk: int, rv: int, shared: bool) -> tuple[int, list[int], list[int]]:
    """The C++ kernel's arguments for rows of format `kind`: bits (8, 4, 0 for 16/32-bit latents, -1 for bands;
    int2 is one band) and the key and value rows' band specs (empty unless bands; the values' empty when shared)."""
    bits = row_bits(kind)
    kbands = list(_band_spec(kind, _static(rk, kind))) if bits < 0 else []
    return bits, kbands, list(_band_spec(kind, _static(rv, kind))) if bits < 0 and not shared else []


def _static(width, kind: str) -> int:
    """A latent width as an int for the band specs. A graph may hold it symbolic (Dynamo makes a cache's width
    dynamic once two compressed models of one class have run with different widths): a bands format's columns are
    its own (quant.width_of); a whole-row format's one band takes -1, the rows' width (read by the C++ kernel)."""
    if isinstance(width, int):
        return width
    return quant.width_of(kind) or -1


def _decoded(rows: torch.Tensor, width: int, kind: str) -> torch.Tensor:
    return rows.float() if kind == "float" else quant.dequantize(rows, torch.float32, width, kind)


def _build(arch: str = "native", stages: bool = False):
    """lowbit_attention.cpp compiled for -march=`arch` (another arch: another module, e.g. "x86-64-v2" for the
    portable code a CPU without AVX-512 and AMX runs; torch caches each build under ~/.cache/torch_extensions).
    stages: a module whose VNNI blocks count their stages' cycles (`stage_cycles()`; benchmarks/kernel.py --stages)."""
    from torch.utils.cpp_extension import load_inline
    here = Path(__file__).parent  # the AMX part lives in its own file, pasted in (so the source hash covers it)
    src = (here / "lowbit_attention.cpp").read_text()
    for part in ("lowbit_attention_amx.h", "lowbit_attention_bands.h", "lowbit_attention_amx_bands.h",
                 "lowbit_attention_vnni.h", "lowbit_attention_vnni_bands.h",
                 "lowbit_attention_avx2i.h",
                 "lowbit_attention_avx2_int4.h", "decode_linear.h", "decode_matmul.h", "quantize_rows.h", "lattice_e8.h"):
        src = src.replace(f'#include "{part}"', (here / part).read_text())
    flags = ["-O3", f"-march={arch}", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
             "-fno-trapping-math"]
    name = "kvfx_lowbit_attention" + ("" if arch == "native" else "_" + arch.replace("-", "_").replace(".", "_"))
    if stages:
        flags, name = flags + ["-DKVFX_STAGE_CYCLES"], name + "_stages"
    # no pybind11 module: the .so registers its functions as ops (torch.ops.<name>.decode_attention, …), and ATen
    # alone parses in a third of torch/extension.h's time: a build takes ~30 s, not ~60 (a first decode waits for it)
    load_inline(name, cpp_sources=[src], extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False,
                no_implicit_headers=True, verbose=False)
    return getattr(torch.ops, name)


def _extension():
    """The compiled CPU kernel module, or None (built once per process; failures logged once)."""
    if "module" not in _EXT:
        _EXT["module"] = None
        try:
            _EXT["module"] = _build()
        except Exception as e:  # noqa: BLE001 - no compiler / ninja: fall back to the reference, say so once
            log.warning("kvfx: low-bit decode kernel not built (%s); decode dequantises the cache instead "
                        "(same numbers, slower). Install a C++ compiler and `pip install ninja`.", e)
    return _EXT["module"]


def kernel_available(device: str | torch.device = "cpu") -> bool:
    return torch.device(device).type == "cpu" and _extension() is not None


def integer_path(device: str | torch.device = "cpu", kind: str | None = None) -> bool:
    """Whether the C++ kernel computes low-bit rows with integer dot products here (see the module docstring): AMX
    (int8 / int4 / int2 rows and bands; int3 / int5 runs of whole 16-column runs) or AVX2 (int4 / int3 / int2 rows and bands without an
    int8 or int5 band; only with KVFX_AVX2_INTEGER=1). `kind`: whether rows of that format do; None: whether any does. False:
    they are decoded to float32 (KVFX_NO_AMX=1 forces that on either CPU)."""
    rounding = integer_rounding(device)
    return rounding is not None if kind is None else takes_integer_path(rounding, kind)


def takes_integer_path(rounding: str | None, kind: str) -> bool:
    """Whether rows of format `kind` take the integer path `rounding` ("amx", "vnni", "avx2"; None: none). ("vnni":
    int4 / int8 rows of at least 6 / 3 columns, narrower ones the float path; bands and int5 / int3 / int2 rows as on
    "amx".)"""
    if rounding is None or kind == "float":
        return False
    if rounding == "vnni" and quant.bands_of(kind) is None and quant.codes_of(kind) in ("int4", "int8"):
        return True
    layout = quant.layout(kind, quant.width_of(kind) or 64)
    if rounding in ("amx", "vnni"):  # int3 / int5 runs are transcoded in whole 16-column runs (kvfx.allocate_bits' edges)
        return all(w % 16 == 0 for fmt, w in layout if fmt.bits in quant.PLANES)
    return not {fmt.bits for fmt, _ in layout} & {8, 5} and not quant.lattice_coded(kind)  # AVX2: no e8


def integer_rounding(device: str | torch.device = "cpu") -> str | None:
    """Which integer path runs here and so how it rounds: "amx" (the query to 12 / 16 bits a row, the value weights
    to 16 bits), "vnni" (AVX-512 VNNI without AMX: the rows "amx" takes, rounded as it rounds them), "avx2"
    (the query to 8 bits a 32-column group, the weights to 8 bits), or None."""
    if not kernel_available(device):
        return None
    return {1: "amx", 2: "avx2", 3: "vnni"}.get(int(_extension().integer_path()))


@torch.library.custom_op("kvfx::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, rk: int, rv: int, kind: str,
                     scale: float, mask: torch.Tensor | None, shared: bool, exact_keys: torch.Tensor | None = None,
                     exact_values: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale·q·Kᵀ + mask)·V over stored low-bit rows; q [b, h, g, Rk] -> [b, h, g, Rv]. With exact rows
    ([b, h, slots, R] 16-bit latents at `positions` [slots], -1: empty) the row at a held position is the exact one,
    not its codes'."""
    if q.device.type == "cuda":  # the Triton kernel when triton is installed (lowbit_attention_triton.py)
        from . import lowbit_attention_triton as tri
        if tri.HAVE_TRITON and tri.handles(kind) and tri.supported(rk, rv, shared):
            return tri.decode_attention_triton(q, kc, vc, rk, rv, kind, scale, mask, shared, exact_keys,
                                               exact_values, positions)
    ext = _extension() if q.device.type == "cpu" else None
    if ext is None:
        return reference(q, kc, vc, rk, rv, kind, scale, mask, shared, exact_keys, exact_values,
                         positions).contiguous()
    # one call, no torch ops around it: the kernel takes SDPA's mask as it is and the columns in their order
    m = None if mask is None else mask.reshape(mask.shape[0], kc.shape[2])
    if m is not None and m.dtype not in (torch.bool, torch.float32):
        m = m.float()
    bits, kbands, vbands = kernel_format(kind, rk, rv, shared)
    out = ext.decode_attention(q if q.dtype == torch.float32 else q.float(), kc, vc, rk, rv, bits, scale, m, shared,
                               kbands, vbands, _scales(), exact_keys, None if shared else exact_values, positions)
    return out if out.dtype == q.dtype else out.to(q.dtype)


@decode_attention.register_fake
def _(q, kc, vc, rk, rv, kind, scale, mask, shared, exact_keys=None, exact_values=None, positions=None):
    return q.new_empty((*q.shape[:-1], rk if shared else rv))

"""`kvfx::decode_attention` on CUDA: a Triton split-K (FlashDecoding) kernel over kvfx's stored latent rows.

    out[b, h, g, :] = softmax_n(scale · q[b, h, g, :] · K[b, h, n, :] + mask[b, n]) · V[b, h, :, :]

One decode step reads each stored byte of the cache once and never writes a float copy of it (the plain-torch
`lowbit_attention.reference` dequantises the whole cache, then runs SDPA). Same contract as the op and the C++ CPU
kernel (lowbit_attention.cpp):

* q [B, H, G, Rk], any float dtype: the G query rows that share each latent head.
* kc / vc [B, H, N, row]: views with any strides over batch, head and token (the cache passes [:, :, :N] views of
  its reserved storage and they are read in place) and a contiguous last dim. Row formats (kvfx/quant.py):
  kind "int8": Rk int8 codes, then one log-scale code e (value = code · 2^(e/8)); kind "int4": ⌈R/2⌉ bytes of two
  4-bit two's-complement codes (low nibble = even column), then one scale code per 32 numbers; kind "float": the
  latents as stored (float32 / bfloat16 / float16); "int2", "int3" and bands ("int8x64+int4x160+int3x32+…",
  kvfx.quant.layout): each column's code and scale found through a per-column table (`column_table`: byte, shift
  and width of its low bits, of int3's sign-plane bit, mid-rise or not, byte of its scale code), built once per
  format and width. With shared=True V is K (vc is not read, Rv = Rk).
* exact rows (a format's "|sinksS|recentW"): [B, H, slots, R] 16-bit latents at `positions` [slots] (-1: empty);
  the rows held are masked out of the kernel's pass over the codes, a second softmax over the ≤ slots exact rows
  runs in torch, and the two merge by their log-sum-exps (the kernel returns its own).
* mask: None or SDPA's [B|1, 1, 1, N]: bool (True = attend) or an additive float mask. A query row that sees no key
  gives NaN, as the C++ CPU kernel does (softmax over nothing but -inf; torch 2.13's CPU SDPA returns 0 there).

Returns [B, H, G, Rv] in q's dtype (contiguous; the math is float32 throughout).

Two launches:

1. `_partial_kernel`, grid (value-column tiles, B·H, chunks): a program owns one head, one chunk of tokens (a
   multiple of BLOCK_N rows) and BLOCK_V of the value columns, and walks the chunk BLOCK_N rows at a time: loads
   the rows' stored bytes, decodes them in registers (int4: each column gathers its byte and picks its nibble;
   scales 2^(e/8) by exp2), computes the scores of all G query rows over the key columns BLOCK_R at a time (q
   pre-multiplied by scale·log2(e), so the softmax runs in base 2 with exp2), applies the mask and the ragged end
   of the chunk as -inf, updates an online softmax (running max m, sum l, value sums acc [G, BLOCK_V]) and adds
   the block's p·V. Scores and value sums are `tl.dot` with G padded to 16 (G > 4), else a broadcasting multiply
   and a sum. float32 `tl.dot` runs as "tf32x3" (near-float32 accuracy on tensor cores) on NVIDIA GPUs of
   compute capability ≥ 8.0, "ieee" elsewhere. Rows wider than a tile are re-read by each value tile of the same
   rows (they run side by side, so mostly from L2); a shared K = V row of one tile is decoded once.
2. `_merge_kernel`, grid (B·H·G,): combines the chunks' (m, l, acc) by log-sum-exp into the output. With a single
   chunk (short N) the first kernel normalises and writes the output itself and this launch is skipped.

No host synchronisation: CUDA-graph capturable.

Tested in Triton's CPU interpreter (TRITON_INTERPRET=1, tests/ops/test_lowbit_attention_triton.py) and compiled
offline for sm_80 / sm_90 (float / int8 / int4, shared or not, widths 20…1024, G 1…64: at most 231 registers a
thread, one spill of 16 bytes, at most 37 KiB of shared memory; the column-table formats, session 21, in the
interpreter only), but not yet run or timed on a GPU: the tile sizes
(`_plan`) and the split heuristics are first choices. Rows wider than MAX_WIDTH numbers are not handled here
(decode_attention_triton raises, `supported` says which calls fit, and the op runs `reference` for them).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from .. import quant

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # the op falls back to lowbit_attention.reference on CUDA
    triton = tl = None
    HAVE_TRITON = False

_KIND = {"float": 0, "int8": 8, "int4": 4}  # any other kind (int2, int3, bands): KIND 1, decoded via column_table
_LOG2E = 1.4426950408889634
MAX_WIDTH = 1024  # widest latent row (numbers) handled here: the widest checked (tiles do not grow with it)
_MIN_CHUNK = 256  # tokens per split-K chunk at least (partial results cost G·(Rv + 2) floats a chunk)


def _pow2(x: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, int(x) - 1).bit_length())


def _code_bytes(kind: str, width: int) -> int:
    return width if kind == "int8" else (width + 1) // 2 if kind == "int4" else 0


@functools.lru_cache(maxsize=None)  # called every decode step and layer: parse each format once
def _row_elems(kind: str, width: int) -> int:
    return width if kind == "float" else quant.row_bytes(kind, width)


@functools.lru_cache(maxsize=None)
def handles(kind: str) -> bool:
    """Whether the kernel decodes rows of this format (every kvfx format but e8 codes: float latents, whole-row codes,
    bands)."""
    if kind in _KIND:
        return True
    try:
        quant.check(kind)
    except ValueError:
        return False
    return "|" not in kind and not quant.lattice_coded(kind)  # e8: dequantized and attended by the reference


_TABLES: dict = {}


def column_table(kind: str, width: int, device: torch.device) -> torch.Tensor:
    """[8, width] int32, per latent column of a stored row: byte of its low code bits, their shift and count, byte
    of int3 / int5's sign-plane bit, its shift and count (0: none), mid-rise (1) or not, byte of its scale code. A code
    reads u = (low bits) | (high bit << low count), sign-extended over all its bits; the number is
    (q + ½·mid-rise)·2^(e/8). Memoised per (format, width, device): built before a CUDA graph captures the step."""
    key = (kind, width, str(device))
    if key not in _TABLES:
        cols, off = [], 0
        for fmt, w in quant.layout(kind, width):
            nb = fmt.code_bytes(w)
            for c in range(w):
                scale = off + nb + (0 if fmt.group is None else c // fmt.group)
                if fmt.bits in quant.PLANES:  # two planes: the low bits as int2 / int4 codes, then the sign bits
                    low = fmt.bits - 1
                    per = 8 // low
                    cols.append((off + c // per, low * (c % per), low, off + -(-w * low // 8) + c // 8, c % 8, 1, 1,
                                 scale))
                else:
                    per = 8 // fmt.bits
                    lo = off + c // per
                    cols.append((lo, fmt.bits * (c % per), fmt.bits, lo, 0, 0, int(fmt.midrise), scale))
            off += fmt.row_bytes(w)
        _TABLES[key] = torch.tensor(cols, dtype=torch.int32).T.contiguous().to(device)
    return _TABLES[key]


def supported(rk: int, rv: int, shared: bool = False) -> bool:
    """Whether decode_attention_triton handles rows of these widths."""
    return 1 <= rk <= MAX_WIDTH and (shared or 1 <= rv <= MAX_WIDTH)


class Plan(NamedTuple):
    use_dot: bool  # scores and value sums by tl.dot (G padded to >= 16), else broadcast multiply + sum
    g_pad: int  # query rows, padded to a power of two
    block_n: int  # cached rows per step
    block_r: int  # key columns per score step (the score loop over Rk)
    block_v: int  # value columns per program (grid axis 0)
    num_warps: int
    num_stages: int


def _plan(g: int, rk: int, rv: int) -> Plan:
    """Tile sizes for G query rows and row widths Rk, Rv. Chosen from ptxas reports of the kernel compiled for
    sm_90 (no register spills, modest shared memory, for widths up to 1024 and G up to 64); not timed on a GPU."""
    g_pad = _pow2(g)
    cols = 64 if g_pad <= 16 else 32
    block_r, block_v = min(_pow2(rk, 16), cols), min(_pow2(rv, 16), cols)
    if g_pad <= 4:  # broadcast products [G, BLOCK_N, columns]
        block_n = max(16, min(64, 2048 // (g_pad * max(block_r, block_v))))
        return Plan(False, g_pad, block_n, block_r, block_v,
                    8 if g_pad * block_n * max(block_r, block_v) >= 2048 else 4, 1)
    g_pad = max(16, g_pad)
    # one stage: software pipelining of the (gathered, decoded) loads only added registers and spills
    return Plan(True, g_pad, 32 if g_pad <= 16 else 16, block_r, block_v, 8, 1)


def _dot_precision(device: torch.device) -> str:
    if device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 0):
        return "tf32x3"
    return "ieee"


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # Triton's interpreter: one chunk unless asked


def decode_attention_triton(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, rk: int, rv: int, kind: str,
                            scale: float, mask: torch.Tensor | None, shared: bool,
                            exact_keys: torch.Tensor | None = None, exact_values: torch.Tensor | None = None,
                            positions: torch.Tensor | None = None, *,
                            chunk_tokens: int | None = None, plan: Plan | None = None) -> torch.Tensor:
    """softmax(scale·q·Kᵀ + mask)·V over stored latent rows; q [B, H, G, Rk] -> [B, H, G, Rv] in q's dtype.

    Arguments as `torch.ops.kvfx.decode_attention` (see the module docstring). `chunk_tokens` fixes the split-K
    chunk length (rounded up to a whole number of row blocks; tests use it to force several chunks); by default
    chunks of at least 256 tokens, enough of them for about two programs per streaming multiprocessor. `plan`
    replaces the tile sizes `_plan(G, Rk, Rv)` picks (for tuning, and for tests in the slow interpreter).
    Tensors must be on a CUDA device, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1).
    """
    if positions is None:
        return _codes_attention(q, kc, vc, rk, rv, kind, scale, mask, shared, chunk_tokens, plan)[0]
    from .exact_merge import attend_exact, held_index, merge, without_held
    n = kc.shape[2]
    held = held_index(positions.to(q.device), n)
    out, lse = _codes_attention(q, kc, vc, rk, rv, kind, scale, without_held(mask, held, n), shared,
                                chunk_tokens, plan, lse=True)
    exact_out, exact_lse = attend_exact(q, exact_keys, exact_keys if shared else exact_values, held, n, scale, mask)
    return merge(out, lse * math.log(2.0), exact_out, exact_lse).to(q.dtype)


def _codes_attention(q, kc, vc, rk, rv, kind, scale, mask, shared, chunk_tokens, plan, lse: bool = False):
    """(out [B, H, G, Rv], its log2-sum-exp2 [B, H, G] float32 when `lse`, else None) over the stored rows."""
    if not HAVE_TRITON:
        raise RuntimeError("decode_attention_triton needs triton (pip install triton)")
    if not handles(kind):
        raise RuntimeError(f"kind must be 'float' or a kvfx row format without exact rows (kvfx.quant), got {kind!r}")
    if q.dim() != 4 or kc.dim() != 4:
        raise RuntimeError("q must be [B, H, G, R] and the cache [B, H, N, row]")
    if shared:
        rv, vc = rk, kc
    if not supported(rk, rv, shared):
        raise RuntimeError(f"row widths {rk}, {rv} outside 1..{MAX_WIDTH} (Triton decode kernel)")
    B, H, G, _ = q.shape
    N = kc.shape[2]
    if kind == "float":
        if kc.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise RuntimeError("float latents must be float32, bfloat16 or float16")
    elif kc.dtype != torch.int8:
        raise RuntimeError("codes must be int8")
    if not shared and vc.dtype != kc.dtype:
        raise RuntimeError("keys and values must share a dtype")
    if kc.shape[3] != _row_elems(kind, rk):
        raise RuntimeError(f"key rows hold {kc.shape[3]} elements, expected {_row_elems(kind, rk)}")
    if vc.shape[3] != _row_elems(kind, rv):
        raise RuntimeError(f"value rows hold {vc.shape[3]} elements, expected {_row_elems(kind, rv)}")
    if q.shape[3] != rk:
        raise RuntimeError(f"q has {q.shape[3]} columns, the key rows {rk}")
    if kc.stride(3) != 1:
        kc = kc.contiguous()
    if vc.stride(3) != 1:
        vc = vc.contiguous()
    if q.stride(3) != 1:
        q = q.contiguous()

    out = torch.empty((B, H, G, rv), dtype=torch.float32 if lse else q.dtype, device=q.device)
    lse_out = torch.full((B, H, G), -math.inf, dtype=torch.float32, device=q.device) if lse else None
    if out.numel() == 0:
        return out, lse_out
    if N == 0:  # no keys at all: SDPA's NaN
        return out.fill_(math.nan), lse_out
    code = _KIND.get(kind, 1)
    tk = column_table(kind, rk, q.device) if code == 1 else kc  # (not read unless KIND 1)
    tv = tk if shared else column_table(kind, rv, q.device) if code == 1 else vc

    mask_kind, mask_arg, smb = 0, kc, 0  # mask_arg: any tensor when there is no mask (never read)
    if mask is not None:
        m = mask.reshape(mask.shape[0], N)
        if m.shape[0] not in (1, B):
            raise RuntimeError(f"mask must be [B|1, 1, 1, N], got {tuple(mask.shape)}")
        if m.stride(1) != 1:
            m = m.contiguous()
        if m.dtype == torch.bool:
            mask_kind, mask_arg = 1, m.view(torch.uint8)
        else:
            mask_kind, mask_arg = 2, m
        smb = 0 if m.shape[0] == 1 else m.stride(0)

    plan = plan or _plan(G, rk, rv)
    rk_pad = triton.cdiv(rk, plan.block_r) * plan.block_r
    v_tiles = triton.cdiv(rv, plan.block_v)
    blocks = triton.cdiv(N, plan.block_n)
    if chunk_tokens is None:
        chunks = max(1, min(triton.cdiv(N, _MIN_CHUNK), triton.cdiv(_target_programs(q.device), B * H * v_tiles)))
        chunk_blocks = triton.cdiv(blocks, chunks)
    else:
        chunk_blocks = max(1, triton.cdiv(chunk_tokens, plan.block_n))
    chunk = chunk_blocks * plan.block_n
    chunks = triton.cdiv(N, chunk)
    single = chunks == 1
    if single:
        part_m = part_l = part_o = out  # not written
    else:
        part_m = torch.empty((B * H * chunks * G,), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_o = torch.empty((B * H * chunks * G * rv,), dtype=torch.float32, device=q.device)
    # value-column tiles vary fastest: the programs that read the same rows run side by side (L2 hits)
    _partial_kernel[(v_tiles, B * H, chunks)](
        q, kc, vc, tk, tv, mask_arg, out, lse_out if lse else out, part_m, part_l, part_o,
        N, H, G, chunk, chunks, float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        kc.stride(0), kc.stride(1), kc.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2),
        smb, out.stride(0), out.stride(1), out.stride(2),
        KIND=code, RK=rk, RV=rv, NBK=_code_bytes(kind, rk), NBV=_code_bytes(kind, rv),
        RK_PAD=rk_pad, BLOCK_R=plan.block_r, BLOCK_V=plan.block_v, G_PAD=plan.g_pad, BLOCK_N=plan.block_n,
        REUSE_K=shared and rk_pad == plan.block_r == plan.block_v, MASK=mask_kind, USE_DOT=plan.use_dot,
        PRECISION=_dot_precision(q.device), SINGLE=single, LSE=lse, num_warps=plan.num_warps, num_stages=plan.num_stages)
    if not single:
        rv_pad = _pow2(rv, 16)
        block_c = max(2, min(_pow2(chunks), 32, 4096 // rv_pad))
        _merge_kernel[(B * H * G,)](
            part_m, part_l, part_o, out, lse_out if lse else out, H, G, chunks, out.stride(0), out.stride(1),
            out.stride(2), RV=rv, RV_PAD=rv_pad, BLOCK_C=block_c, LSE=lse, num_warps=4 if rv_pad <= 256 else 8)
    return out, lse_out


if HAVE_TRITON:

    @triton.jit
    def _decoded(base, tab, rows, row_ok, stride_n, c0, KIND: tl.constexpr, R: tl.constexpr, NB: tl.constexpr,
                 BLOCK: tl.constexpr):
        """Columns c0 .. c0 + BLOCK of rows `rows` of one head's stored cache, decoded: float32 [BLOCK_N, BLOCK]
        (zero where not valid). `tab`: the format's column_table (KIND 1)."""
        cols = c0 + tl.arange(0, BLOCK)
        ok = row_ok[:, None] & (cols < R)[None, :]
        row_ptr = base + rows.to(tl.int64)[:, None] * stride_n
        if KIND == 0:  # float latents, as stored
            x = tl.load(row_ptr + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        elif KIND == 8:  # R codes, then the row's scale code
            codes = tl.load(row_ptr + cols[None, :], mask=ok, other=0).to(tl.float32)
            e = tl.load(base + rows.to(tl.int64) * stride_n + NB, mask=row_ok, other=0).to(tl.float32)
            x = codes * tl.exp2(e * 0.125)[:, None]
        elif KIND == 4:  # int4: column j is the low (j even) or high nibble of byte j // 2; scale code j // 32
            byte = tl.load(row_ptr + (cols // 2)[None, :], mask=ok, other=0).to(tl.int32)  # sign-extended
            code = tl.where((cols % 2 == 0)[None, :], (byte << 28) >> 28, byte >> 4)
            e = tl.load(row_ptr + NB + (cols // 32)[None, :], mask=ok, other=0).to(tl.float32)
            x = code.to(tl.float32) * tl.exp2(e * 0.125)
        else:  # KIND 1, any format: each column's bytes, shifts and scale from its column_table entry
            c_ok = cols < R
            lo_byte = tl.load(tab + cols, mask=c_ok, other=0)[None, :]
            lo_shift = tl.load(tab + R + cols, mask=c_ok, other=0)[None, :]
            lo_bits = tl.load(tab + 2 * R + cols, mask=c_ok, other=1)[None, :]
            hi_byte = tl.load(tab + 3 * R + cols, mask=c_ok, other=0)[None, :]
            hi_shift = tl.load(tab + 4 * R + cols, mask=c_ok, other=0)[None, :]
            hi_bits = tl.load(tab + 5 * R + cols, mask=c_ok, other=0)[None, :]
            half = tl.load(tab + 6 * R + cols, mask=c_ok, other=0)[None, :].to(tl.float32) * 0.5
            scale_byte = tl.load(tab + 7 * R + cols, mask=c_ok, other=0)[None, :]
            lo = tl.load(row_ptr + lo_byte, mask=ok, other=0).to(tl.int32) & 0xFF
            hi = tl.load(row_ptr + hi_byte, mask=ok, other=0).to(tl.int32) & 0xFF
            u = ((lo >> lo_shift) & ((1 << lo_bits) - 1)) | (((hi >> hi_shift) & hi_bits) << lo_bits)
            nbits = lo_bits + hi_bits
            q = u - (((u >> (nbits - 1)) & 1) << nbits)  # two's complement over the code's bits
            e = tl.load(row_ptr + scale_byte, mask=ok, other=0).to(tl.float32)
            x = (q.to(tl.float32) + half) * tl.exp2(e * 0.125)
        return x

    @triton.jit
    def _product(a, b, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
        """a [M, K] · b [K, N] in float32: tl.dot, or a broadcasting multiply and a sum (M below 16)."""
        if USE_DOT:
            r = tl.dot(a, b, input_precision=PRECISION)
        else:
            r = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
        return r

    @triton.jit
    def _partial_kernel(q_ptr, k_ptr, v_ptr, tk_ptr, tv_ptr, mask_ptr, out_ptr, lse_ptr, m_ptr, l_ptr, o_ptr,
                        N, H, G, chunk, num_chunks, qscale,
                        sqb, sqh, sqg, skb, skh, skn, svb, svh, svn, smb, sob, soh, sog,
                        KIND: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, NBK: tl.constexpr,
                        NBV: tl.constexpr, RK_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
                        G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, REUSE_K: tl.constexpr, MASK: tl.constexpr,
                        USE_DOT: tl.constexpr, PRECISION: tl.constexpr, SINGLE: tl.constexpr, LSE: tl.constexpr):
        """One (value-column tile, batch·head, token chunk): online softmax over the chunk's rows, BLOCK_N at a
        time; the scores over all Rk columns, BLOCK_R at a time; value sums for this program's BLOCK_V columns.
        With LSE (and SINGLE) also each query row's log2-sum-exp2 of its scores (base 2, scale folded in)."""
        vt = tl.program_id(0)
        bh = tl.program_id(1)
        c = tl.program_id(2)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        gs = tl.arange(0, G_PAD)
        g_ok = gs < G
        cr = tl.arange(0, BLOCK_R)
        v0 = vt * BLOCK_V
        cv = v0 + tl.arange(0, BLOCK_V)
        # the softmax scale and log2(e) folded into the query rows: scores in base 2
        q_rows = q_ptr + b * sqb + h * sqh + gs[:, None] * sqg
        q0 = tl.load(q_rows + cr[None, :], mask=g_ok[:, None] & (cr < RK)[None, :], other=0.0).to(tl.float32) * qscale
        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, BLOCK_V], tl.float32)
        n_start = c * chunk
        n_end = tl.minimum(N, n_start + chunk)
        for n0 in range(n_start, n_end, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            in_chunk = rows < n_end
            k = _decoded(k_base, tk_ptr, rows, in_chunk, skn, 0, KIND, RK, NBK, BLOCK_R)
            s = _product(q0, tl.trans(k), USE_DOT, PRECISION)
            for r0 in range(BLOCK_R, RK_PAD, BLOCK_R):  # wide keys: the other column blocks (a loop, not unrolled)
                qr = tl.load(q_rows + r0 + cr[None, :], mask=g_ok[:, None] & (r0 + cr < RK)[None, :],
                             other=0.0).to(tl.float32) * qscale
                kr = _decoded(k_base, tk_ptr, rows, in_chunk, skn, r0, KIND, RK, NBK, BLOCK_R)
                s += _product(qr, tl.trans(kr), USE_DOT, PRECISION)
            if REUSE_K:  # V is K and this program has all of it decoded already
                v = k
            else:
                v = _decoded(v_base, tv_ptr, rows, in_chunk, svn, v0, KIND, RV, NBV, BLOCK_V)
            visible = in_chunk
            if MASK == 1:  # bool: True = attend
                keep = tl.load(mask_ptr + b * smb + rows, mask=in_chunk, other=0)
                visible = visible & (keep != 0)
            elif MASK == 2:  # additive, in base 2 like the scores
                add = tl.load(mask_ptr + b * smb + rows, mask=in_chunk, other=0.0).to(tl.float32)
                s = s + (add * 1.4426950408889634)[None, :]
            s = tl.where(visible[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: keep p = 0, not NaN
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _product(p, v, USE_DOT, PRECISION)
            m_i = m_new
        v_ok = g_ok[:, None] & (cv < RV)[None, :]
        if SINGLE:  # the whole row in one chunk: normalise here (no key visible: 0 / 0 = NaN, like SDPA)
            tl.store(out_ptr + b * sob + h * soh + gs[:, None] * sog + cv[None, :], acc / l_i[:, None], mask=v_ok)
            if LSE:
                tl.store(lse_ptr + bh * G + gs, m_i + tl.log2(l_i), mask=g_ok & (gs * 0 + vt == 0))
        else:
            t = (bh * num_chunks + c) * G + gs
            first = g_ok & (gs * 0 + vt == 0)  # every value tile has the same m and l: the first one writes them
            tl.store(m_ptr + t, m_i, mask=first)
            tl.store(l_ptr + t, l_i, mask=first)
            tl.store(o_ptr + t.to(tl.int64)[:, None] * RV + cv[None, :], acc, mask=v_ok)

    @triton.jit
    def _merge_kernel(m_ptr, l_ptr, o_ptr, out_ptr, lse_ptr, H, G, num_chunks, sob, soh, sog,
                      RV: tl.constexpr, RV_PAD: tl.constexpr, BLOCK_C: tl.constexpr, LSE: tl.constexpr):
        """One query row: the chunks' partial results merged by log-sum-exp (base 2)."""
        pid = tl.program_id(0)
        bh = pid // G
        g = pid % G
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        cs = tl.arange(0, BLOCK_C)
        cv = tl.arange(0, RV_PAD)
        mmax = tl.full([BLOCK_C], float("-inf"), tl.float32)
        for c0 in range(0, num_chunks, BLOCK_C):
            idx = c0 + cs
            mmax = tl.maximum(mmax, tl.load(m_ptr + (bh * num_chunks + idx) * G + g, mask=idx < num_chunks,
                                            other=float("-inf")))
        m_all = tl.max(mmax, axis=0)
        m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
        total = tl.zeros([BLOCK_C], tl.float32)
        acc = tl.zeros([BLOCK_C, RV_PAD], tl.float32)
        for c0 in range(0, num_chunks, BLOCK_C):
            idx = c0 + cs
            c_ok = idx < num_chunks
            t = (bh * num_chunks + idx) * G + g
            w = tl.exp2(tl.load(m_ptr + t, mask=c_ok, other=float("-inf")) - m_safe)  # all masked: every w = 0
            total += w * tl.load(l_ptr + t, mask=c_ok, other=0.0)
            o = tl.load(o_ptr + t.to(tl.int64)[:, None] * RV + cv[None, :], mask=c_ok[:, None] & (cv < RV)[None, :],
                        other=0.0)
            acc += w[:, None] * o
        res = tl.sum(acc, axis=0) / tl.sum(total, axis=0)  # no key visible anywhere: 0 / 0 = NaN, like SDPA
        tl.store(out_ptr + b * sob + h * soh + g * sog + cv, res, mask=cv < RV)
        if LSE:
            tl.store(lse_ptr + pid, m_all + tl.log2(tl.sum(total, axis=0)))

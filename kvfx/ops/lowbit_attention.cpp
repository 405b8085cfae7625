// One-token (decode) attention read straight from kvfx's low-bit latent rows (kvfx/quant.py formats).
//
//   out[b, h, g, :] = softmax_n(scale * q[b, h, g, :] . K[b, h, n, :] + mask[b, n]) . V[b, h, :, :]
//
// K and V rows are read where they are consumed, a block of rows at a time into small buffers that stay in cache,
// so each stored byte is read once per step and no float copy of the cache is ever written (the plain-torch form,
// kvfx.ops.lowbit_attention.reference, dequantises the whole cache first). The g query rows of a group share every
// row read. Work is split over (batch, head, token chunk) with an online softmax per chunk and a final log-sum-exp
// merge (FlashDecoding's split-K), so a single latent head still uses every core. A chunk takes one of two paths:
//
// * Integer (int8 / int4 rows and bands, CPUs with AMX-INT8: Sapphire Rapids and later; `integer_path()`; namespace
//   amx; int3 / int5 bands first transcoded to their levels k = 2q + 1, lowbit_attention_amx_bands.h):
//   the codes are never converted to floats. They are only rearranged (a 4-byte transpose for the keys, a 4-row
//   interleave for the values, int4 nibbles split and sign-extended by GF2P8AFFINEQB) into the operand layouts of
//   the tile unit, which computes the scores as int8 dot products of the codes with the query, rounded once per
//   call to integer digits, and the value sums as int8 dot products of the codes with the softmax weights times the
//   rows' scales, rounded per block. Float arithmetic only scales the int32 sums (2^(e/8) per row and group) and
//   runs the softmax. The roundings (query: 1/4064 of its row's largest |q| for int4, 1/65024 for int8; weights:
//   1/65024 of the block's largest) move the output by at most ~1.3e-3 (int4) / ~3e-4 (int8) of its size on
//   SmolLM2's decode inputs, 200 / 80 times less than the cache's own rounding does; see lowbit_attention_amx.h.
//   int4 / int8 rows read by up to 4 query rows a kv head (per-head latents) take AVX-512 VNNI, not the tile unit
//   (lowbit_attention_vnni.h: the same integers and roundings, no tile layouts; KVFX_NO_VNNI=1: the tile unit).
//   CPUs with AVX-512 VNNI / VBMI and GFNI but no AMX (Ice Lake, AMD Zen 4; KVFX_INT without KVFX_AMX): int4 / int8
//   rows and bands take the VNNI blocks for any number of query rows (lowbit_attention_vnni.h,
//   lowbit_attention_vnni_bands.h; KVFX_NO_VNNI=1: the float path).
// * Integer on AVX2, opt-in (KVFX_AVX2_INTEGER=1; int4 / int3 / int2 rows and bands of them, CPUs with AVX2 but not
//   AVX-512: AMD Zen 1-3; namespace avx2i, lowbit_attention_avx2i.h): the codes as 4-bit integers with an offset,
//   VPMADDUBSW against the query rounded to 8 bits per 32-column group (scores) and against the weights p·s rounded to 8 bits per block
//   (value sums); float arithmetic applies the scales and runs the softmax.
// * Float (16/32-bit latents; int8 / int4 rows and bands elsewhere, int3 / int5 bands not whole 16-column
//   runs, or with KVFX_NO_AMX=1): rows decoded to float32 into
//   a buffer, the scores as 16-row tiles (one query row against 16 key rows in registers, reduced by a shuffle
//   tree), the value sums in registers: the reference's numbers up to float32 round-off. Plain C++ (GCC vector
//   extensions) with AVX-512 or AVX2 intrinsics under #if, so it builds for any CPU (AVX2: 16 registers of 8
//   floats, so the scores are tiles of 3 query rows × 4 key rows and the value sums tiles of up to 4 query rows ×
//   24 columns: 12 accumulators each, every loaded vector used 3-4 times). On AVX2, int4 key and value rows whose
//   widths are multiples of 16 skip the buffer: decoded in registers where they are consumed (namespace q4,
//   lowbit_attention_avx2_int4.h).
//
// Row layout (kvfx/quant.py): int8: R codes, then one scale code e (x = q * 2^(e/8));
//                             int4: ceil(R/2) bytes of two codes (low nibble first), then one e per 32 numbers.
// ATen and the op registry only (not torch/extension.h, whose pybind11 and C++-frontend headers took 48 of a 64 s build):
// the functions are registered as ops in a namespace named after the build (torch.ops.<name>, kvfx/ops/lowbit_attention.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
namespace torch {  // the C++ frontend's names for what this file uses (torch/types.h)
using namespace at;
constexpr auto kInt8 = at::kChar;
constexpr auto kFloat32 = at::kFloat;
}  // namespace torch
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef KVFX_STAGE_CYCLES  // benchmarks/kernel.py --stages: the integer path's stage counters (__rdtsc)
#include <atomic>
#include <x86intrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__)
#define KVFX_AVX2 1  // 16 vector registers of 8 floats: scores and value sums in tiles that fit them (AMD Zen 1-3, …)
#endif
// The integer path's shared parts and its AVX-512 VNNI blocks (lowbit_attention_amx.h, lowbit_attention_vnni.h):
// CPUs with AVX-512 BW / VBMI / VNNI and GFNI (Intel Ice Lake and later, AMD Zen 4 and later); the tile unit on top
// of them where the CPU has AMX-INT8 (Sapphire Rapids and later).
#if defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__AVX512VNNI__) && defined(__GFNI__)
#define KVFX_INT 1
#endif
#if KVFX_INT && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define KVFX_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <array>
#include <cstring>
#include <functional>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

namespace {

constexpr int W = 16;  // lanes of one vector (GCC/Clang vector extensions: AVX-512 here, two AVX2 or four NEON ops elsewhere)
typedef float vf __attribute__((vector_size(64)));
typedef float vf_u __attribute__((vector_size(64), aligned(4)));  // for unaligned loads and stores

inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

enum Kind { kInt8, kInt4, kF32, kBF16, kF16, kBands };

#include "lattice_e8.h"  // e8 codes (kvfx/lattice.py in C++), pasted in by lowbit_attention.py

// One band of a bands row (kvfx/quant.py): `width` columns from column `col`, stored from byte `at` as codes of
// `bits` bits (8: symmetric, one scale for the band; 4: symmetric, 5, 3 and 2: mid-rise, one scale per 32 numbers;
// 5 and 3: two planes, the low four / two bits as int4 / int2 codes, then the sign bits).
struct Band {
  int bits, width, col, at, code_bytes;
};
inline bool planes(int bits) { return bits == 3 || bits == 5; }  // stored as a low-bits plane and a sign plane

// One stored row: `row_elems` elements of the cache tensor, decoding to `decoded` floats.
struct Format {
  Kind kind;
  int width, group, code_bytes, row_elems, decoded;
  std::vector<Band> bands;  // kBands: decoded in column order
  Format(const std::vector<int64_t>& spec) : kind(kBands), width(0), group(0), code_bytes(0), row_elems(0) {
    for (size_t i = 0; i + 1 < spec.size(); i += 2) {
      Band b{static_cast<int>(spec[i]), static_cast<int>(spec[i + 1]), width, row_elems, 0};
      b.code_bytes = planes(b.bits) ? (b.width * (b.bits - 1) + 7) / 8 + (b.width + 7) / 8
                   : b.bits == kE8Bits ? b.width / 4 : (b.width * b.bits + 7) / 8;
      bands.push_back(b);
      width += b.width;
      row_elems += b.code_bytes + (b.bits == 8 ? 1 : (b.width + 31) / 32);
    }
    decoded = width;
  }
  Format(Kind kind_, int width_) : kind(kind_), width(width_) {
    if (kind == kInt8 || kind == kInt4) {
      const int bits = kind == kInt8 ? 8 : 4;
      group = bits == 8 ? std::max(width, 1) : 32;
      code_bytes = (width * bits + 7) / 8;
      row_elems = width == 0 ? 0 : code_bytes + (width + group - 1) / group;
      decoded = bits == 8 ? width : 2 * code_bytes;  // int4: [low nibbles | high nibbles] (see decode_row)
    } else {  // a 16- or 32-bit float latent, stored as it is
      group = code_bytes = 0;
      row_elems = decoded = width;
    }
  }
};

// spec's widths of -1: the rows' width (a whole-row int5 / int3 / int2 / e8 format's one band; the
// graph's width symbolic: kvfx/ops/lowbit_attention.py's _static)
std::vector<int64_t> full_width(std::vector<int64_t> spec, int64_t width) {
  for (size_t i = 1; i < spec.size(); i += 2)
    if (spec[i] < 0) spec[i] = width;
  return spec;
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof(float));
  return x;
}

#if defined(__AVX512F__)
// (x0 y0 x1 y1 …): the first 16 of the 32 lanes interleaved, and the last 16
inline void interleave(__m512 x, __m512 y, __m512& lo, __m512& hi) {
  const __m512i a = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i b = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  lo = _mm512_permutex2var_ps(x, a, y), hi = _mm512_permutex2var_ps(x, b, y);
}
// the same for pairs of lanes (64-bit units)
inline void interleave_pairs(__m512 x, __m512 y, __m512& lo, __m512& hi) {
  const __m512i a = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), b = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  lo = _mm512_castpd_ps(_mm512_permutex2var_pd(_mm512_castps_pd(x), a, _mm512_castps_pd(y)));
  hi = _mm512_castpd_ps(_mm512_permutex2var_pd(_mm512_castps_pd(x), b, _mm512_castps_pd(y)));
}
#endif
#if defined(__AVX2__)  // (AVX-512 builds too: int3 groups are decoded 8 lanes at a time everywhere)
// (x0 y0 x1 y1 …): the first 8 of the 16 lanes interleaved, and the last 8
inline void interleave(__m256 x, __m256 y, __m256& lo, __m256& hi) {
  const __m256 a = _mm256_unpacklo_ps(x, y), b = _mm256_unpackhi_ps(x, y);  // [x0 y0 x1 y1 | x4 y4 x5 y5], [x2 …]
  lo = _mm256_permute2f128_ps(a, b, 0x20), hi = _mm256_permute2f128_ps(a, b, 0x31);
}
// the same for pairs of lanes (64-bit units)
inline void interleave_pairs(__m256 x, __m256 y, __m256& lo, __m256& hi) {
  const __m256d a = _mm256_unpacklo_pd(_mm256_castps_pd(x), _mm256_castps_pd(y));
  const __m256d b = _mm256_unpackhi_pd(_mm256_castps_pd(x), _mm256_castps_pd(y));
  lo = _mm256_castpd_ps(_mm256_permute2f128_pd(a, b, 0x20)), hi = _mm256_castpd_ps(_mm256_permute2f128_pd(a, b, 0x31));
}
// 8 codes (int8) from p, sign-extended to 32-bit lanes
inline __m256i load8_epi32(const int8_t* p) {
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 nibble_lo(__m256i w) { return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(w, 28), 28)); }
inline __m256 nibble_hi(__m256i w) { return _mm256_cvtepi32_ps(_mm256_srai_epi32(w, 4)); }
// an int4 group: 16 bytes of codes -> 32 numbers in column order (the low nibble of byte i is column 2i)
inline void int4_group(const int8_t* codes, float scale, float* out) {
  const __m256 s = _mm256_set1_ps(scale);
  for (int h = 0; h < 16; h += 8) {
    const __m256i w = load8_epi32(codes + h);
    __m256 lo, hi;
    interleave(_mm256_mul_ps(s, nibble_lo(w)), _mm256_mul_ps(s, nibble_hi(w)), lo, hi);
    _mm256_storeu_ps(out + 2 * h, lo), _mm256_storeu_ps(out + 2 * h + 8, hi);
  }
}
// 32 numbers from four planes (plane j, lane i: column 4i + j) stored in column order
inline void store_columns(const __m256* p, float* out) {
  __m256 a0, a1, b0, b1, o0, o1, o2, o3;
  interleave(p[0], p[1], a0, a1), interleave(p[2], p[3], b0, b1);
  interleave_pairs(a0, b0, o0, o1), interleave_pairs(a1, b1, o2, o3);
  _mm256_storeu_ps(out, o0), _mm256_storeu_ps(out + 8, o1), _mm256_storeu_ps(out + 16, o2), _mm256_storeu_ps(out + 24, o3);
}
// an int2 group: 8 bytes of codes -> 32 numbers in column order (code j of byte i is column 4i + j)
inline void int2_group(const int8_t* codes, float scale, float* out) {
  const __m256i w = load8_epi32(codes);
  const __m256 s = _mm256_set1_ps(scale);
  __m256 p[4];
  for (int j = 0; j < 4; ++j)  // code j of each byte, sign-extended, at its level (q + 1/2)·s
    p[j] = _mm256_mul_ps(s, _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(w, 30 - 2 * j), 30)),
                                          _mm256_set1_ps(0.5f)));
  store_columns(p, out);
}
// an int3 group: 8 bytes of low bits (int2's layout: bits 2j, 2j + 1 of byte i are column 4i + j) and a 32-bit
// word of sign bits (bit c: column c) -> 32 numbers in column order, at (low - 4·sign + 1/2)·s
inline void int3_group(const int8_t* low, const int8_t* sign, float scale, float* out) {
  const __m256i w = load8_epi32(low), three = _mm256_set1_epi32(3), one = _mm256_set1_epi32(1);
  uint32_t bits;
  std::memcpy(&bits, sign, 4);
  const __m256i sv = _mm256_set1_epi32(static_cast<int>(bits)), at = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256 s = _mm256_set1_ps(scale);
  __m256 p[4];
  for (int j = 0; j < 4; ++j) {  // column 4i + j in lane i
    const __m256i lo = _mm256_and_si256(_mm256_srli_epi32(w, 2 * j), three);
    const __m256i sg = _mm256_and_si256(_mm256_srlv_epi32(sv, _mm256_add_epi32(at, _mm256_set1_epi32(j))), one);
    p[j] = _mm256_mul_ps(s, _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(lo, _mm256_slli_epi32(sg, 2))),
                                          _mm256_set1_ps(0.5f)));
  }
  store_columns(p, out);
}
// an int5 group: 16 bytes of low bits (int4's layout: the low nibble of byte i is column 2i) and a 32-bit word of
// sign bits (bit c: column c) -> 32 numbers in column order, at (low - 16·sign + 1/2)·s
inline void int5_group(const int8_t* low, const int8_t* sign, float scale, float* out) {
  uint32_t bits;
  std::memcpy(&bits, sign, 4);
  const __m256i sv = _mm256_set1_epi32(static_cast<int>(bits)), fifteen = _mm256_set1_epi32(15),
                one = _mm256_set1_epi32(1), even = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256 s = _mm256_set1_ps(scale), half = _mm256_set1_ps(0.5f);
  for (int h = 0; h < 16; h += 8) {  // bytes h .. h + 7: columns 2h .. 2h + 15
    const __m256i w = load8_epi32(low + h), at = _mm256_add_epi32(even, _mm256_set1_epi32(2 * h));
    __m256 v[2];
    for (int j = 0; j < 2; ++j) {  // nibble j of each byte: column 2i + j
      const __m256i lo = _mm256_and_si256(_mm256_srli_epi32(w, 4 * j), fifteen);
      const __m256i sg = _mm256_and_si256(_mm256_srlv_epi32(sv, _mm256_add_epi32(at, _mm256_set1_epi32(j))), one);
      v[j] = _mm256_mul_ps(s, _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(lo, _mm256_slli_epi32(sg, 4))), half));
    }
    __m256 a, b;
    interleave(v[0], v[1], a, b);
    _mm256_storeu_ps(out + 2 * h, a), _mm256_storeu_ps(out + 2 * h + 8, b);
  }
}
// a band's last, partial group (`cols` < 32 columns from `code_bytes` bytes): decoded from a zero-padded copy
template <void (*group)(const int8_t*, float, float*)>
inline void partial_group(const int8_t* codes, int code_bytes, float scale, int cols, float* out) {
  alignas(32) int8_t pad[16] = {};
  alignas(32) float tmp[32];
  std::memcpy(pad, codes, code_bytes);
  group(pad, scale, tmp);
  std::memcpy(out, tmp, cols * sizeof(float));
}
#endif

// One band of a bands row into out[0, width), in column order.
inline void decode_band(const int8_t* __restrict row, const Band& b, const float* lut, float* __restrict out) {
  const int8_t* codes = row + b.at;
  const int8_t* e = codes + b.code_bytes;
  int c = 0;
  if (b.bits == kE8Bits) return e8_decode_band(codes, e, b.width, lut, out);
  if (b.bits == 8) {
    const float s = lut[e[0] + 128];
#if defined(__AVX512F__)
    const __m512 sv = _mm512_set1_ps(s);
    for (; c + 16 <= b.width; c += 16)
      _mm512_storeu_ps(out + c, _mm512_mul_ps(sv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + c))))));
#elif KVFX_AVX2
    const __m256 sv = _mm256_set1_ps(s);
    for (; c + 8 <= b.width; c += 8)
      _mm256_storeu_ps(out + c, _mm256_mul_ps(sv, _mm256_cvtepi32_ps(load8_epi32(codes + c))));
#endif
    for (; c < b.width; ++c) out[c] = s * static_cast<float>(codes[c]);
    return;
  }
  if (b.bits == 4) {
#if defined(__AVX512F__)
    for (; c + 32 <= b.width; c += 32) {  // a group: 16 bytes, 32 numbers
      const __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + c / 2)));
      const __m512 s = _mm512_set1_ps(lut[e[c / 32] + 128]);
      __m512 lo, hi;
      interleave(_mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 28), 28))),
                 _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_srai_epi32(w, 4))), lo, hi);
      _mm512_storeu_ps(out + c, lo), _mm512_storeu_ps(out + c + 16, hi);
    }
#elif KVFX_AVX2
    for (; c + 32 <= b.width; c += 32) int4_group(codes + c / 2, lut[e[c / 32] + 128], out + c);
    if (c < b.width) {
      partial_group<int4_group>(codes + c / 2, b.code_bytes - c / 2, lut[e[c / 32] + 128], b.width - c, out + c);
      return;
    }
#endif
    for (; c < b.width; ++c) {
      const int8_t byte = codes[c / 2];
      out[c] = lut[e[c / 32] + 128] * static_cast<float>(c % 2 ? byte >> 4 : static_cast<int8_t>(byte << 4) >> 4);
    }
    return;
  }
  if (planes(b.bits)) {  // int3 / int5: the low-bits plane (int2's / int4's layout), the sign plane, then the scales
    const int low = b.bits - 1, per = 8 / low, m = 1 << low;
    const int8_t* sign = codes + (b.width * low + 7) / 8;
#if defined(__AVX2__)
    for (; c + 32 <= b.width; c += 32) {
      if (low == 2) int3_group(codes + c / per, sign + c / 8, lut[e[c / 32] + 128], out + c);
      else int5_group(codes + c / per, sign + c / 8, lut[e[c / 32] + 128], out + c);
    }
#endif
    for (; c < b.width; ++c) {  // the last, partial group (without AVX2: every group)
      const int q = ((codes[c / per] >> (low * (c % per))) & (m - 1)) - m * ((sign[c / 8] >> (c % 8)) & 1);
      out[c] = lut[e[c / 32] + 128] * (static_cast<float>(q) + 0.5f);
    }
    return;
  }
#if defined(__AVX512F__)  // int2: 16 bytes = 64 numbers = two groups
  for (; c + 64 <= b.width; c += 64) {
    const __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + c / 4)));
    const __m512 s = _mm512_insertf32x8(_mm512_set1_ps(lut[e[c / 32] + 128]),
                                        _mm256_set1_ps(lut[e[c / 32 + 1] + 128]), 1);
    __m512 p[4];
    for (int j = 0; j < 4; ++j)  // code j of each byte, sign-extended, at its level (q + 1/2)·s
      p[j] = _mm512_mul_ps(s, _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 30 - 2 * j), 30)),
                                            _mm512_set1_ps(0.5f)));
    __m512 a0, a1, b0, b1, o0, o1, o2, o3;
    interleave(p[0], p[1], a0, a1), interleave(p[2], p[3], b0, b1);
    interleave_pairs(a0, b0, o0, o1), interleave_pairs(a1, b1, o2, o3);
    _mm512_storeu_ps(out + c, o0), _mm512_storeu_ps(out + c + 16, o1);
    _mm512_storeu_ps(out + c + 32, o2), _mm512_storeu_ps(out + c + 48, o3);
  }
#elif KVFX_AVX2  // int2: 8 bytes = 32 numbers = a group
  for (; c + 32 <= b.width; c += 32) int2_group(codes + c / 4, lut[e[c / 32] + 128], out + c);
  if (c < b.width) {
    partial_group<int2_group>(codes + c / 4, b.code_bytes - c / 4, lut[e[c / 32] + 128], b.width - c, out + c);
    return;
  }
#endif
  for (; c < b.width; ++c) {
    const int q = static_cast<int8_t>(codes[c / 4] << (6 - 2 * (c % 4))) >> 6;
    out[c] = lut[e[c / 32] + 128] * (static_cast<float>(q) + 0.5f);
  }
}

// int8: out = the row's R numbers. int4: out = [even columns | odd columns] (the low and high nibbles of the
// code bytes, each a contiguous run: the loops vectorise); the caller permutes q and the output to match.
// Bands: each band's columns in order. Floats: the row converted to float32.
inline void decode_row(const char* __restrict raw, const Format& f, const float* lut, float* __restrict out) {
  if (f.kind == kBands) {
    for (const Band& b : f.bands) decode_band(reinterpret_cast<const int8_t*>(raw), b, lut, out + b.col);
    return;
  }
  if (f.kind == kF32) {
    std::memcpy(out, raw, f.width * sizeof(float));
    return;
  }
  if (f.kind == kBF16 || f.kind == kF16) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(raw);
    int c = 0;
#if defined(__AVX512F__)
    for (; c + 16 <= f.width; c += 16) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + c));
      _mm512_storeu_ps(out + c, f.kind == kF16 ? _mm512_cvtph_ps(x)
                                               : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16)));
    }
#elif KVFX_AVX2
    for (; c + 8 <= f.width; c += 8) {
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + c));
      _mm256_storeu_ps(out + c, f.kind == kF16 ? _mm256_cvtph_ps(x)
                                               : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16)));
    }
#endif
    for (; c < f.width; ++c)
      out[c] = f.kind == kBF16 ? bf16_to_float(h[c]) : static_cast<float>(c10::Half(h[c], c10::Half::from_bits()));
    return;
  }
  const int8_t* row = reinterpret_cast<const int8_t*>(raw);
  const int8_t* e = row + f.code_bytes;
  if (f.kind == kInt8) {  // one band of int8 codes
    decode_band(row, Band{8, f.width, 0, 0, f.code_bytes}, lut, out);
    return;
  }
  float* lo = out;
  float* hi = out + f.code_bytes;
  int j0 = 0;
#if defined(__AVX512F__)  // GCC 12 scalarises __builtin_convertvector from int8 lanes: widen with intrinsics
  for (int gi = 0; j0 + 16 <= f.code_bytes; j0 += 16, ++gi) {  // 16 bytes = a group of 32 numbers, a vector a half
    const __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j0)));
    const __m512 s = _mm512_set1_ps(lut[e[gi] + 128]);
    _mm512_storeu_ps(lo + j0, _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 28), 28))));
    _mm512_storeu_ps(hi + j0, _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_srai_epi32(w, 4))));
  }
#elif KVFX_AVX2
  for (int gi = 0; j0 + 16 <= f.code_bytes; j0 += 16, ++gi) {
    const __m256 s = _mm256_set1_ps(lut[e[gi] + 128]);
    for (int h = 0; h < 16; h += 8) {
      const __m256i w = load8_epi32(row + j0 + h);
      _mm256_storeu_ps(lo + j0 + h, _mm256_mul_ps(s, nibble_lo(w)));
      _mm256_storeu_ps(hi + j0 + h, _mm256_mul_ps(s, nibble_hi(w)));
    }
  }
#endif
  for (int j = j0; j < f.code_bytes; ++j) {  // the last, shorter group (without AVX-512 or AVX2: every group)
    const float s = lut[e[j / 16] + 128];
    const int8_t byte = row[j];
    lo[j] = s * static_cast<float>(static_cast<int8_t>(byte << 4) >> 4);
    hi[j] = s * static_cast<float>(byte >> 4);
  }
}

#if KVFX_AVX2
// The 4 horizontal sums of a[0..3] (lane j = sum of a[j])
inline __m128 reduce4(const __m256* a) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

// Scores of GQ query rows (row stride ldq) against 4 decoded key rows (stride ld), n8 vectors of 8 each: 4·GQ
// accumulators, the GQ query vectors and one key vector in registers (GQ = 3: all 16), 4 + GQ loads per 4·GQ FMAs.
template <int GQ>
inline void score_tile(const float* __restrict q, int64_t ldq, const float* __restrict k, int64_t ld, int64_t n8,
                       const float* add, float* __restrict s, int64_t lds) {
  __m256 acc[GQ][4];
#pragma GCC unroll 3
  for (int g = 0; g < GQ; ++g)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[g][j] = _mm256_setzero_ps();
  for (int64_t v = 0; v < n8; ++v) {
    __m256 qv[GQ];
#pragma GCC unroll 3
    for (int g = 0; g < GQ; ++g) {
      qv[g] = _mm256_loadu_ps(q + g * ldq + 8 * v);
      asm("" : "+x"(qv[g]));
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      __m256 kv = _mm256_loadu_ps(k + j * ld + 8 * v);
      asm("" : "+x"(kv));  // one load, used GQ times (GCC would fold it into each FMA)
#pragma GCC unroll 3
      for (int g = 0; g < GQ; ++g) acc[g][j] = _mm256_fmadd_ps(qv[g], kv, acc[g][j]);
    }
  }
  const __m128 a = _mm_loadu_ps(add);
#pragma GCC unroll 3
  for (int g = 0; g < GQ; ++g) _mm_storeu_ps(s + g * lds, _mm_add_ps(reduce4(acc[g]), a));
}

// Scores of G query rows against 16 decoded key rows: s[g * lds + j] = q[g] . k[j] + add[j].
inline void scores16(const float* q, int64_t ldq, int64_t G, const float* k, int64_t ld, int64_t nv, const float* add,
                     float* s, int64_t lds) {
  const int64_t n8 = 2 * nv;
  for (int j = 0; j < 16; j += 4) {
    int64_t g = 0;
    for (; g + 3 <= G; g += 3) score_tile<3>(q + g * ldq, ldq, k + j * ld, ld, n8, add + j, s + g * lds + j, lds);
    if (G - g == 2) score_tile<2>(q + g * ldq, ldq, k + j * ld, ld, n8, add + j, s + g * lds + j, lds);
    if (G - g == 1) score_tile<1>(q + g * ldq, ldq, k + j * ld, ld, n8, add + j, s + g * lds + j, lds);
  }
}
#else
// The 16 horizontal sums of a[0..15], as one vector (lane j = sum of a[j]): a shuffle-and-add tree, 15 adds.
inline vf reduce16(const vf* a) {
  vf b[8], c[4], d[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Scores of one query row against 16 decoded key rows (row stride ld, nv vectors each): 16 accumulators in registers.
inline vf dot16(const float* __restrict q, const float* __restrict k, int64_t ld, int64_t nv) {
  vf acc[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) acc[j] = vf{};
  for (int64_t v = 0; v < nv; ++v) {
    const vf qv = load(q + v * W);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) acc[j] += qv * load(k + j * ld + v * W);
  }
  return reduce16(acc);
}

// Scores of G query rows against 16 decoded key rows: s[g * lds + j] = q[g] . k[j] + add[j].
inline void scores16(const float* q, int64_t ldq, int64_t G, const float* k, int64_t ld, int64_t nv, const float* add,
                     float* s, int64_t lds) {
  const vf av = load(add);
  for (int64_t g = 0; g < G; ++g) store(s + g * lds, dot16(q + g * ldq, k, ld, nv) + av);
}
#endif

#if KVFX_AVX2
// o[g, 0:8·T8] += sum_r p[g, r] * v[r, 0:8·T8] for GT query rows: GT·T8 accumulators, T8 value vectors and one
// broadcast weight in registers (GT·T8 + T8 + 1 <= 16), T8 + GT loads per GT·T8 FMAs.
template <int GT, int T8>
void accumulate8(const float* __restrict p, int64_t ldp, const float* __restrict v, int64_t ldv, int rows,
                 float* __restrict o, int64_t ldo) {
  __m256 acc[GT][T8];
  for (int g = 0; g < GT; ++g)
    for (int t = 0; t < T8; ++t) acc[g][t] = _mm256_loadu_ps(o + g * ldo + 8 * t);
  for (int r = 0; r < rows; ++r) {
    __m256 vv[T8];
    for (int t = 0; t < T8; ++t) {
      vv[t] = _mm256_loadu_ps(v + r * ldv + 8 * t);
      asm("" : "+x"(vv[t]));  // one load, used GT times (GCC would fold it into each FMA)
    }
    for (int g = 0; g < GT; ++g) {
      const __m256 pg = _mm256_broadcast_ss(p + g * ldp + r);
      for (int t = 0; t < T8; ++t) acc[g][t] = _mm256_fmadd_ps(pg, vv[t], acc[g][t]);
    }
  }
  for (int g = 0; g < GT; ++g)
    for (int t = 0; t < T8; ++t) _mm256_storeu_ps(o + g * ldo + 8 * t, acc[g][t]);
}

// GT (<= 4) query rows over nv vectors of 16 columns: 24 columns at a time (12 accumulators for 4 rows) an even
// number of times, then 16 at a time (368 = 14 · 24 + 2 · 16; 32 = 2 · 16).
template <int GT>
void accumulate_cols(const float* p, int64_t ldp, const float* v, int64_t ldv, int rows, float* o, int64_t ldo,
                     int64_t nv) {
  const int64_t cols = nv * W;
  const int64_t wide = (cols / 24) & ~int64_t(1);  // an even count of 24s leaves a multiple of 16
  int64_t c = 0;
  for (; c < 24 * wide; c += 24) accumulate8<GT, 3>(p, ldp, v + c, ldv, rows, o + c, ldo);
  for (; c < cols; c += 16) accumulate8<GT, 2>(p, ldp, v + c, ldv, rows, o + c, ldo);
}
#else
// o[g, t] += sum_r p[g, r] * v[r, t] for GT query rows and T vectors of output columns, accumulated in registers.
template <int GT, int T>
void accumulate(const float* __restrict p, int64_t ldp, const float* __restrict v, int64_t ldv, int rows,
                float* __restrict o, int64_t ldo) {
  vf acc[GT][T];
  for (int g = 0; g < GT; ++g)
    for (int t = 0; t < T; ++t) acc[g][t] = load(o + g * ldo + t * W);
  for (int r = 0; r < rows; ++r) {
    vf vv[T];
    for (int t = 0; t < T; ++t) vv[t] = load(v + r * ldv + t * W);
    for (int g = 0; g < GT; ++g) {
      const vf pg = vf{} + p[g * ldp + r];
      for (int t = 0; t < T; ++t) acc[g][t] += pg * vv[t];
    }
  }
  for (int g = 0; g < GT; ++g)
    for (int t = 0; t < T; ++t) store(o + g * ldo + t * W, acc[g][t]);
}

template <int GT>
void accumulate_cols(const float* p, int64_t ldp, const float* v, int64_t ldv, int rows, float* o, int64_t ldo,
                     int64_t nv) {
  int64_t t = 0;
  for (; t + 4 <= nv; t += 4) accumulate<GT, 4>(p, ldp, v + t * W, ldv, rows, o + t * W, ldo);
  switch (nv - t) {
    case 3: accumulate<GT, 3>(p, ldp, v + t * W, ldv, rows, o + t * W, ldo); break;
    case 2: accumulate<GT, 2>(p, ldp, v + t * W, ldv, rows, o + t * W, ldo); break;
    case 1: accumulate<GT, 1>(p, ldp, v + t * W, ldv, rows, o + t * W, ldo); break;
    default: break;
  }
}

#endif

// The block's value sum for all G query rows, a few at a time.
void accumulate_values(const float* p, int64_t ldp, const float* v, int64_t ldv, int rows, float* o, int64_t ldo,
                       int64_t G, int64_t nv) {
  int64_t g = 0;
#if KVFX_AVX2  // groups of at most 4 rows, as even as possible (9: 3 + 3 + 3)
  const int64_t groups = (G + 3) / 4;
  for (int64_t i = 0; i < groups; ++i) {
    const int64_t n = (G - g + groups - i - 1) / (groups - i);
    const float* pg = p + g * ldp;
    float* og = o + g * ldo;
    switch (n) {
      case 4: accumulate_cols<4>(pg, ldp, v, ldv, rows, og, ldo, nv); break;
      case 3: accumulate_cols<3>(pg, ldp, v, ldv, rows, og, ldo, nv); break;
      case 2: accumulate_cols<2>(pg, ldp, v, ldv, rows, og, ldo, nv); break;
      default: accumulate_cols<1>(pg, ldp, v, ldv, rows, og, ldo, nv); break;
    }
    g += n;
  }
#else
  for (; g + 4 <= G; g += 4) accumulate_cols<4>(p + g * ldp, ldp, v, ldv, rows, o + g * ldo, ldo, nv);
  switch (G - g) {
    case 3: accumulate_cols<3>(p + g * ldp, ldp, v, ldv, rows, o + g * ldo, ldo, nv); break;
    case 2: accumulate_cols<2>(p + g * ldp, ldp, v, ldv, rows, o + g * ldo, ldo, nv); break;
    case 1: accumulate_cols<1>(p + g * ldp, ldp, v, ldv, rows, o + g * ldo, ldo, nv); break;
    default: break;
  }
#endif
}

// exp(x) for x <= 0 in plain arithmetic (2^n by exponent bits, 2^f by a degree-6 polynomial, rel. error ~2e-7), so
// the loops over a block of scores vectorise (libm's expf does not). x below -87 (masked: -inf) gives ~1e-38.
// 2^f on [0, 1): a degree-6 polynomial's coefficients, highest first
constexpr float kExp2Poly[7] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                                5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f, 1.0f};
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.0f) * 1.4426950408889634f;
  const float n = std::floor(t);
  const float f = t - n;
  float p = kExp2Poly[0];
  for (int i = 1; i < 7; ++i) p = p * f + kExp2Poly[i];
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return p * two_n;
}


#if KVFX_AVX2
// exp_nonpositive on 8 lanes (the same arithmetic)
inline __m256 exp_nonpositive8(__m256 x) {
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(1.4426950408889634f));
  const __m256 n = _mm256_floor_ps(t);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 6
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
inline float hmax8(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}
#endif

// The online softmax of a block of scores (G query rows, stride lds; rows valid of `padded`, a multiple of 16): the
// running max m and sum l per query row, the accumulators o (stride ldo) rescaled where the max moves, and the
// block's probabilities exp(s - m) written over its scores (0 for the spare rows and for a block wholly masked).
void softmax_block(float* s, int64_t lds, int rows, int padded, int64_t G, float* m, float* l, float* o, int64_t ldo) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * lds;
#if KVFX_AVX2
    __m256 vmax = _mm256_set1_ps(kNegInf);  // spare rows hold -inf
    for (int r = 0; r < padded; r += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(sg + r));
    const float bmax = hmax8(vmax);
#else
    vf vmax = vf{} + kNegInf;  // spare rows hold -inf
    for (int r = 0; r < padded; r += 16) { const vf x = load(sg + r); vmax = x > vmax ? x : vmax; }
    float bmax = kNegInf;
    for (int j = 0; j < W; ++j) bmax = std::max(bmax, vmax[j]);
#endif
    if (bmax == kNegInf) {  // every row of the block masked
      std::fill(sg, sg + padded, 0.0f);
      continue;
    }
    const float mnew = std::max(m[g], bmax);
    if (m[g] != mnew) {
      const float corr = exp_nonpositive(m[g] - mnew);
      l[g] *= corr;
      float* og = o + g * ldo;
      for (int64_t i = 0; i < ldo; ++i) og[i] *= corr;
    }
    m[g] = mnew;
#if KVFX_AVX2
    const __m256 vm = _mm256_set1_ps(mnew);
    __m256 vsum = _mm256_setzero_ps();
    int r = 0;
    for (; r + 8 <= rows; r += 8) {
      const __m256 p = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(sg + r), vm));
      _mm256_storeu_ps(sg + r, p);
      vsum = _mm256_add_ps(vsum, p);
    }
    float sum = hsum8(vsum);
    for (; r < padded; ++r) {
      sg[r] = r < rows ? exp_nonpositive(sg[r] - mnew) : 0.0f;
      sum += sg[r];
    }
#else
    float sum = 0.0f;
    for (int r = 0; r < padded; ++r) {
      sg[r] = r < rows ? exp_nonpositive(sg[r] - mnew) : 0.0f;
      sum += sg[r];
    }
#endif
    l[g] += sum;
  }
}


// Asks for `rows` rows (stride ld, `bytes` each) to be brought into the cache: the next block's, while this one is
// computed (the integer paths read its codes group by group across the rows, or transcode them a row at a time: an
// order the hardware prefetcher follows late).
inline void prefetch_rows(const char* base, int64_t rows, int64_t ld, int64_t bytes) {
  if (rows > 0 && ld <= bytes + 64) {  // rows packed densely (narrow rows): their span, a line at a time
    for (int64_t at = 0; at < (rows - 1) * ld + bytes; at += 64) __builtin_prefetch(base + at, 0, 3);
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(base + r * ld + at, 0, 3);
}

#include "lowbit_attention_amx.h"    // the integer path on AMX (namespace amx), pasted in by lowbit_attention.py
#include "lowbit_attention_avx2i.h"  // the integer path on AVX2 (namespace avx2i), likewise
#include "lowbit_attention_avx2_int4.h"  // int4 rows decoded in registers (namespace q4), likewise
#include "decode_linear.h"           // a decode step's linear layers (linear_rows), likewise
#include "decode_matmul.h"           // a decode step's small matmuls by kvfx constants (small_matmul), likewise

}  // namespace

// Which integer path int4 / int2 rows and bands take here: 1, AMX (int8 rows too; built with AMX-INT8, AVX-512 VBMI
// / VNNI and GFNI, and the CPU and the OS allow it at run time), 3, AVX-512 VNNI without the tile unit (int4 and int8
// rows and bands: the VNNI blocks, AMX's integers and roundings; built with AVX-512 VBMI / VNNI and GFNI: Ice Lake,
// Zen 4 and later), 2, AVX2 (built with AVX2 but not AVX-512, and asked for:
// KVFX_AVX2_INTEGER=1; its 8-bit roundings move the output more than AMX's, see lowbit_attention_avx2i.h), or 0
// where there is none or the environment variable KVFX_NO_AMX is set (not "0"): rows are decoded to float32 like
// the 16/32-bit latents (the portable path; KVFX_NO_AMX=1 forces it, for tests and benchmarks, on either CPU).
inline bool env_set(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::strcmp(v, "0") != 0;
}
// The integer path's stage counters, read and reset: cycles of each stage of a block and the rows (zeros unless built
// with -DKVFX_STAGE_CYCLES; the stages: lowbit_attention_amx.h).
torch::Tensor stage_cycles() {
  torch::Tensor out = at::zeros({6}, at::kLong);
#if KVFX_INT && defined(KVFX_STAGE_CYCLES)
  for (int i = 0; i < 6; ++i) out[i] = static_cast<int64_t>(amx::stage_cycles[i].exchange(0));
#endif
  return out;
}

int64_t integer_path() {
  if (env_set("KVFX_NO_AMX")) return 0;
#if KVFX_AMX
  if (amx::ready()) return 1;
#endif
#if KVFX_INT
  return 3;
#elif KVFX_AVX2
  return env_set("KVFX_AVX2_INTEGER") ? 2 : 0;
#else
  return 0;
#endif
}

// The 256 scales 2^(e/8), e = -128 … 127, that rows are decoded with (kvfx.ops.lowbit_attention._scales: torch's
// exp2, so decoded rows are quant.dequantize's numbers).
inline const float* scale_table(const torch::Tensor& scales) {
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.numel() == 256 && scales.is_contiguous(),
              "scales must be 256 contiguous float32 numbers");
  return scales.data_ptr<float>();
}

// A decoded float32 row finished into the output: `off` (the latent the rows were rounded around; none: nullptr)
// added, then stored as float32 or rounded once to bfloat16 (to nearest, ties to even: c10::BFloat16's rounding).
inline void finish_row(const float* __restrict x, const float* __restrict off, bool bf16, char* __restrict out,
                       int width) {
  float* of = reinterpret_cast<float*>(out);
  uint16_t* ob = reinterpret_cast<uint16_t*>(out);
  int c = 0;
#if defined(__AVX512F__)
  const __m512i one = _mm512_set1_epi32(1), round = _mm512_set1_epi32(0x7FFF), nan = _mm512_set1_epi32(0x7FC0);
  for (; c + 16 <= width; c += 16) {
    __m512 v = _mm512_loadu_ps(x + c);
    if (off) v = _mm512_add_ps(v, _mm512_loadu_ps(off + c));
    if (!bf16) {
      _mm512_storeu_ps(of + c, v);
      continue;
    }
    const __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(round, _mm512_and_si512(_mm512_srli_epi32(u, 16), one))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), nan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ob + c), _mm512_cvtepi32_epi16(r));
  }
#endif
  for (; c < width; ++c) {
    const float v = off ? x[c] + off[c] : x[c];
    if (bf16) ob[c] = c10::BFloat16(v).x;
    else of[c] = v;
  }
}

// Stored rows [..., row_elems] (int8 / int4 rows, bits 8 / 4, or bands, bits -1 with `spec` = (bits, columns, …))
// as float32 [..., width] in column order: kvfx::dequantize, the read of a prefill or a chunk (many query rows,
// where SDPA over float rows is the right kernel); decode steps never call it. The rows may be a strided view (the
// cache's [:, :, :N] of its storage); the last dimension must be contiguous. `scales` [256]: 2^(e/8) for e = -128 …
// 127 as torch computes it (its vectorised exp2 differs from std::exp2 in the last bit for some e; the same bits
// keep the cache's numbers those of quant.fake_quant in compiled code: rounding downstream would amplify a last-bit
// difference). One multiply by the scale a number, as quant.dequantize.
// dequantize_rows_as: the same, plus `offset` (float32, [..., width] broadcast to the rows' leading sizes, e.g. an
// expand of [h, 1, width]: a row's offset is read through its strides) added to every row, and the result in
// out_type (float32 or bfloat16: each number rounded once, from its float32 sum with the offset).
torch::Tensor dequantize_rows_as(torch::Tensor stored, int64_t width, int64_t bits, std::vector<int64_t> spec,
                                 torch::Tensor scales, c10::optional<torch::Tensor> offset_opt,
                                 at::ScalarType out_type) {
  TORCH_CHECK(stored.scalar_type() == torch::kInt8 && stored.device().is_cpu() && stored.dim() >= 1,
              "dequantize_rows: stored rows must be an int8 CPU tensor");
  TORCH_CHECK(out_type == torch::kFloat32 || out_type == torch::kBFloat16,
              "dequantize_rows: a float32 or bfloat16 result");
  std::vector<Band> bands;
  int row_elems = 0;
  if (bits == 8 || bits == 4) {
    const int w = static_cast<int>(width), cb = (w * static_cast<int>(bits) + 7) / 8;
    if (w > 0) bands.push_back(Band{static_cast<int>(bits), w, 0, 0, cb});
    row_elems = w == 0 ? 0 : cb + (bits == 8 ? 1 : (w + 31) / 32);
  } else {
    const Format f(full_width(spec, width));
    TORCH_CHECK(f.width == width, "dequantize_rows: the bands span ", f.width, " columns, not ", width);
    bands = f.bands, row_elems = f.row_elems;
  }
  TORCH_CHECK(stored.size(-1) == row_elems, "dequantize_rows: rows of ", stored.size(-1), " bytes, the format has ",
              row_elems);
  TORCH_CHECK(stored.stride(-1) == 1 || row_elems <= 1, "dequantize_rows: the last dimension must be contiguous");
  const bool has_offset = offset_opt.has_value() && offset_opt->defined();
  if (has_offset) {
    const torch::Tensor& o = *offset_opt;
    TORCH_CHECK(o.scalar_type() == torch::kFloat32 && o.device().is_cpu() && o.dim() == stored.dim() &&
                    o.size(-1) == width && (o.stride(-1) == 1 || width <= 1),
                "dequantize_rows: the offset must be float32 [..., width] with a contiguous last dimension");
    for (int64_t d = 0; d + 1 < stored.dim(); ++d)
      TORCH_CHECK(o.size(d) == stored.size(d), "dequantize_rows: the offset's size ", o.size(d), " in dimension ", d,
                  " is not the rows' ", stored.size(d), " (expand it)");
  }
  std::vector<int64_t> sizes = stored.sizes().vec();
  sizes.back() = width;
  auto out = torch::empty(sizes, stored.options().dtype(out_type));
  const int64_t lead = stored.dim() - 1, rows = width == 0 ? 0 : out.numel() / width;
  if (rows == 0) return out;
  const float* lut = scale_table(scales);
  const int8_t* base = stored.data_ptr<int8_t>();
  const float* obase = has_offset ? offset_opt->data_ptr<float>() : nullptr;
  char* op = static_cast<char*>(out.data_ptr());
  const bool bf16 = out_type == torch::kBFloat16, direct = !bf16 && !has_offset;  // decoded straight into out
  const int64_t row_bytes = width * out.element_size();
  const std::vector<int64_t> sz(stored.sizes().begin(), stored.sizes().end() - 1),
      st(stored.strides().begin(), stored.strides().end() - 1),
      ost = has_offset ? std::vector<int64_t>(offset_opt->strides().begin(), offset_opt->strides().end() - 1)
                       : std::vector<int64_t>(lead, 0);
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(direct ? 0 : width);
    for (int64_t i = begin; i < end; ++i) {
      int64_t off = 0, ooff = 0, rest = i;
      for (int64_t d = lead - 1; d >= 0; --d) off += (rest % sz[d]) * st[d], ooff += (rest % sz[d]) * ost[d], rest /= sz[d];
      float* dst = direct ? reinterpret_cast<float*>(op + i * row_bytes) : tmp.data();
      for (const Band& b : bands) decode_band(base + off, b, lut, dst + b.col);
      if (!direct) finish_row(dst, has_offset ? obase + ooff : nullptr, bf16, op + i * row_bytes, width);
    }
  });
  return out;
}

torch::Tensor dequantize_rows(torch::Tensor stored, int64_t width, int64_t bits, std::vector<int64_t> spec,
                              torch::Tensor scales) {
  return dequantize_rows_as(std::move(stored), width, bits, std::move(spec), std::move(scales), c10::nullopt,
                            torch::kFloat32);
}

#include "quantize_rows.h"  // kvfx::quantize's encoder (quantize_rows), pasted in likewise

// q [B, H, G, Rk] float32; kc [B, H, N, kb] and vc [B, H, N, vb], any strides with contiguous rows (vc is ignored
// when shared: V = K rows): int8 rows of codes (bits 8 or 4, kvfx/quant.py) or, bits 0, float32 / bfloat16 / float16
// latents of width Rk / Rv; mask: None or [B or 1, N], bool (true = attend) or float32 (added to the scores).
// Returns [B, H, G, Rv] float32. int4 rows decode as [even columns | odd columns] (decode_row), and the integer path
// has its own column order (amx): the query is gathered into that order and the output scattered back here.
// decode_attention_as: the same, the result in out_type (float32, or a query's bfloat16 / float16: each number
// rounded once from its float32 sum, without a float32 result and a cast after it).
torch::Tensor decode_attention_as(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, int64_t rk, int64_t rv,
                                  int64_t bits, double scale, c10::optional<torch::Tensor> mask_opt, bool shared,
                                  std::vector<int64_t> kbands, std::vector<int64_t> vbands, torch::Tensor scales,
                                  c10::optional<torch::Tensor> ek_opt, c10::optional<torch::Tensor> ev_opt,
                                  c10::optional<torch::Tensor> epos_opt, at::ScalarType out_type) {
  TORCH_CHECK(q.dim() == 4 && kc.dim() == 4 && q.scalar_type() == torch::kFloat32, "q must be [B, H, G, R] float32");
  Kind kind;
  if (bits == -1) {  // bands (kbands / vbands: bits, width, bits, width, …; a width of -1: rk / rv)
    TORCH_CHECK(kc.scalar_type() == torch::kInt8, "codes must be int8");
    kind = kBands;
    kbands = full_width(std::move(kbands), rk), vbands = full_width(std::move(vbands), shared ? rk : rv);
  } else if (bits == 8 || bits == 4) {
    TORCH_CHECK(kc.scalar_type() == torch::kInt8, "codes must be int8");
    kind = bits == 8 ? kInt8 : kInt4;
  } else {
    TORCH_CHECK(bits == 0, "bits must be 8, 4, -1 (bands) or 0 (float latents)");
    const auto t = kc.scalar_type();
    TORCH_CHECK(t == torch::kFloat32 || t == torch::kBFloat16 || t == torch::kHalf,
                "float latents must be float32, bfloat16 or float16");
    kind = t == torch::kFloat32 ? kF32 : t == torch::kBFloat16 ? kBF16 : kF16;
  }
  TORCH_CHECK(shared || vc.scalar_type() == kc.scalar_type(), "keys and values must share a dtype");
  // The cache hands over views of its reserved storage ([:, :, :N] of [B, H, capacity, row]): read them in place
  // through their strides (a contiguous copy would write the whole cache every step).
  q = q.contiguous();
  if (kc.stride(3) != 1) kc = kc.contiguous();
  if (vc.stride(3) != 1) vc = vc.contiguous();
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), N = kc.size(2);
  if (shared) rv = rk;
  const Format fk = kind == kBands ? Format(kbands) : Format(kind, rk);
  const Format fv = kind == kBands ? Format(shared ? kbands : vbands) : Format(kind, rv);
  TORCH_CHECK(fk.width == rk && fv.width == rv, "bands span ", fk.width, " / ", fv.width, " columns, expected ", rk,
              " / ", rv);
  TORCH_CHECK(kc.size(3) == fk.row_elems, "key rows hold ", kc.size(3), " elements, expected ", fk.row_elems);
  TORCH_CHECK(shared || vc.size(3) == fv.row_elems, "value rows hold ", vc.size(3), " elements, expected ",
              fv.row_elems);
  TORCH_CHECK(q.size(3) == rk, "q has ", q.size(3), " columns, the key rows ", rk);
  torch::Tensor mask;
  const bool has_mask = mask_opt.has_value() && mask_opt->numel() > 0;
  if (has_mask) {
    mask = mask_opt->contiguous();
    TORCH_CHECK(mask.dim() == 2 && mask.size(1) == N && (mask.size(0) == 1 || mask.size(0) == B) &&
                (mask.scalar_type() == torch::kFloat32 || mask.scalar_type() == torch::kBool),
                "mask must be [B|1, N], bool or float32");
  }
  const bool bool_mask = has_mask && mask.scalar_type() == torch::kBool;
  const int64_t mask_b = has_mask ? mask.size(0) : 0;
  const int64_t Rk = fk.decoded, Rv = fv.decoded;
  // decoded column j holds original column src(j): int8 j; int4 2j (low nibbles), then 2(j - half) + 1
  auto source = [&](const Format& f, int64_t j) -> int64_t {
    if (f.kind != kInt4) return j;
    const int64_t col = j < f.code_bytes ? 2 * j : 2 * (j - f.code_bytes) + 1;
    return col < f.width ? col : -1;  // the padding nibble of an odd width
  };
  auto odd_planes = [](const Format& f) {
    return std::any_of(f.bands.begin(), f.bands.end(),
                       [](const Band& b) { return planes(b.bits) && b.width % 16; });
  };  // the AMX path transcodes int3 / int5 bands of whole 16-column runs (kvfx.allocate_bits' edges); others: float32
      // (e8 bands of any width: transcoded a point at a time)
  // exact rows (16-bit latents a format keeps beside its codes, quant.exact_of): the code rows at their positions
  // are skipped (score -inf) and the exact rows make one more partial softmax, merged with the split-K chunks'
  torch::Tensor ek, ev, epos;
  std::vector<int64_t> held;      // the slots whose position is a cached row
  std::vector<uint8_t> excluded;  // per cached row: 1 if an exact row stands for its codes
  if (epos_opt.has_value() && epos_opt->numel() > 0) {
    TORCH_CHECK(ek_opt.has_value() && (shared || ev_opt.has_value()), "exact rows need their keys and values");
    epos = epos_opt->to(torch::kLong).contiguous();
    ek = ek_opt->to(torch::kFloat).contiguous();
    ev = shared ? ek : ev_opt->to(torch::kFloat).contiguous();
    const int64_t E = epos.size(0);
    TORCH_CHECK(ek.dim() == 4 && ek.size(0) == B && ek.size(1) == H && ek.size(2) == E && ek.size(3) == rk &&
                ev.dim() == 4 && ev.size(0) == B && ev.size(1) == H && ev.size(2) == E && ev.size(3) == rv,
                "exact rows must be [B, H, slots, R] with one position a slot");
    excluded.assign(N, 0);
    const int64_t* pp = epos.data_ptr<int64_t>();
    for (int64_t j = 0; j < E; ++j)
      if (pp[j] >= 0 && pp[j] < N && !excluded[pp[j]]) excluded[pp[j]] = 1, held.push_back(j);
  }
  const uint8_t* skip = held.empty() ? nullptr : excluded.data();
  const int64_t path = integer_path();  // the environment's switches, read once a call
  // the VNNI blocks (int4 / int8 rows; KVFX_NO_VNNI=1: the tile unit on AMX, the float path without it)
  bool vnni = false;
#if KVFX_INT
  vnni = (path == 1 || path == 3) && rk > 0 && rv > 0 && !env_set("KVFX_NO_VNNI") &&
         (kind == kBands ? path == 3 && !odd_planes(fk) && !odd_planes(fv)  // bands: without AMX (with: the tile unit)
                         : amx::vnni_fits(kind, G, fk.code_bytes, fv.code_bytes, path));
#endif
  // the integer path (namespace amx): the tile unit (path 1) or the VNNI blocks
  const bool use_amx = vnni || ((kind == kInt8 || kind == kInt4 || kind == kBands) && rk > 0 && rv > 0 &&
                                !odd_planes(fk) && !odd_planes(fv) && path == 1);
#if KVFX_AVX2
  // the AVX2 integer path: int4 rows and bands (a plan each for the key and value rows; none: the float path)
  std::unique_ptr<avx2i::Plan> kplan_i, vplan_i;
  if ((kind == kInt4 || kind == kBands) && rk > 0 && rv > 0 && path == 2) {
    kplan_i = avx2i::plan_of(fk);
    if (!shared) vplan_i = avx2i::plan_of(fv);
    if (!shared && !vplan_i) kplan_i.reset();
  }
  const avx2i::Plan* vplan_avx2 = kplan_i ? (shared ? kplan_i.get() : vplan_i.get()) : nullptr;
#endif
#if KVFX_INT
  // bands on the integer path: units, scale groups and column orders of the key and value rows
  std::shared_ptr<const amx::BandPlans> plans;
  if (use_amx && kind == kBands) plans = amx::band_plans(fk, fv, kbands, shared ? kbands : vbands, vnni);
  const amx::BandPlan* kplan = plans ? &plans->keys : nullptr;
  const amx::BandPlan* vplan = plans ? &plans->values : nullptr;
#endif
  // decoded rows are zero-padded to whole vectors; a block of rows (a multiple of 16) stays within ~24 KiB. The
  // integer path accumulates whole value tiles: int4 32 columns a group, int8 64 a chunk.
  const int64_t Rkp = round_up(std::max<int64_t>(Rk, 1), W);
  int64_t Rvp = !use_amx ? round_up(std::max<int64_t>(Rv, 1), W) : round_up(rv, kind == kInt4 ? 32 : 64);
#if KVFX_INT
  if (vplan) Rvp = 16 * vplan->ctiles;
#endif
#if KVFX_AVX2
  if (vplan_avx2) Rvp = 32 * vplan_avx2->slots;
#endif
  // the output column of each accumulated one (-1: padding)
  std::vector<int64_t> columns(Rvp);
  for (int64_t j = 0; j < Rvp; ++j) {
    int64_t col = j < Rv ? source(fv, j) : -1;
    if (use_amx) {  // int4: tile (group, nibble) lane i = column 32·group + 2i + nibble; int8 see value_tiles (the
                    // VNNI blocks: column order)
      const int64_t tile = j / 16, lane = j % 16;
      col = kind == kInt4 ? 32 * (tile / 2) + 2 * lane + tile % 2
          : kind == kInt8 ? (vnni ? j : 64 * (tile / 4) + 16 * (lane / 4) + 4 * (tile % 4) + lane % 4) : -1;
#if KVFX_INT
      if (vplan) col = vplan->columns[j];
#endif
    }
#if KVFX_AVX2
    if (vplan_avx2) col = vplan_avx2->columns[j];
#endif
    columns[j] = col < rv ? col : -1;
  }
  const int64_t nvk = Rkp / W, nvv = Rvp / W;
  const int64_t row_floats = Rkp + (shared ? 0 : Rvp);
  const int block = static_cast<int>(std::clamp<int64_t>(24576 / (4 * row_floats) / 16 * 16, 16, 128));

  const float* lut = scale_table(scales);  // 2^(e/8) as torch computes them: dequantize_rows' numbers

  // split-K: chunks of >= 256 tokens, enough tasks for every thread
  const int64_t threads = at::get_num_threads();
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((N + 255) / 256, (2 * threads + B * H - 1) / (B * H)));
  const int64_t chunk = (N + chunks - 1) / chunks;
  chunks = (N + chunk - 1) / chunk;
  std::vector<float> part_m(B * H * chunks * G), part_l(B * H * chunks * G), part_o(B * H * chunks * G * Rvp);

  const float* qp = q.data_ptr<float>();
  const int64_t es = kc.element_size();  // strides in bytes
  const char* kp = static_cast<const char*>(kc.data_ptr());
  const char* vp = shared ? kp : static_cast<const char*>(vc.data_ptr());
  const int64_t ksb = kc.stride(0) * es, ksh = kc.stride(1) * es, ksn = kc.stride(2) * es;
  const int64_t vsb = shared ? ksb : vc.stride(0) * es, vsh = shared ? ksh : vc.stride(1) * es,
                vsn = shared ? ksn : vc.stride(2) * es;
  const float* mp = has_mask && !bool_mask ? mask.data_ptr<float>() : nullptr;
  const bool* mbp = bool_mask ? mask.data_ptr<bool>() : nullptr;
  const float sc = static_cast<float>(scale);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  // a split-K task of the float and AVX2 paths: its (batch, head), rows and token range, and its partial results
  // (running max, sum and value accumulators) initialised
  struct Task {
    int64_t bh, b, n0, n1;
    const char *krows, *vrows;
    float *m, *l, *o;
  };
  auto start_task = [&](int64_t task) {
    Task t;
    t.bh = task / chunks, t.b = t.bh / H;
    const int64_t h = t.bh % H;
    t.krows = kp + t.b * ksb + h * ksh, t.vrows = vp + t.b * vsb + h * vsh;
    t.n0 = task % chunks * chunk, t.n1 = std::min(N, t.n0 + chunk);
    t.m = &part_m[task * G], t.l = &part_l[task * G], t.o = &part_o[task * G * Rvp];
    std::fill(t.m, t.m + G, kNegInf);
    std::fill(t.l, t.l + G, 0.0f);
    std::fill(t.o, t.o + G * Rvp, 0.0f);
    return t;
  };

#if KVFX_INT
  if (use_amx) {
    amx::Problem pr;
    pr.kind = kind, pr.shared = shared, pr.B = B, pr.H = H, pr.G = G, pr.N = N, pr.chunk = chunk, pr.chunks = chunks;
    pr.rk = rk, pr.rv = rv, pr.cbk = fk.code_bytes, pr.cbv = fv.code_bytes;
    pr.ngk = kind == kInt4 ? (rk + 31) / 32 : 1, pr.ngv = kind == kInt4 ? (rv + 31) / 32 : 1;
    pr.ktiles = kind == kInt4 ? pr.ngk : (rk + 63) / 64, pr.vtiles = Rvp / 16, pr.Rvp = Rvp;
    pr.cslots = kind == kInt4 ? pr.ngk : 2;
    for (int64_t i = 0; i < (kind == kInt4 ? pr.ngv : (pr.vtiles + 1) / 2); ++i)  // C tile pairs, weight groups
      pr.item_ct.push_back(static_cast<int>(2 * i)), pr.item_ws.push_back(kind == kInt4 ? static_cast<int>(i) : 0);
    if (kplan) {
      pr.plan = kplan, pr.vplan = vplan;
      pr.ngk = kplan->groups.size(), pr.ngv = vplan->groups.size(), pr.ktiles = kplan->units.size();
      pr.cslots = kplan->slots, pr.item_ct = vplan->item_ct, pr.item_ws = vplan->item_ws;
      pr.ktrans = kplan->trans_bytes, pr.vtrans = vplan->trans_bytes;
    }
    pr.Gb = static_cast<int>(std::min<int64_t>(G, 16)), pr.NGB = static_cast<int>((G + pr.Gb - 1) / pr.Gb);
    std::vector<int8_t> qdigits(B * H * pr.NGB * pr.ktiles * pr.digits() * pr.Gb * 64 + 64, 0);
    std::vector<float> qscales(B * H * G);
    int8_t* qa = reinterpret_cast<int8_t*>(round_up(reinterpret_cast<int64_t>(qdigits.data()), 64));
    pr.qa = qa, pr.qsc = qscales.data();
    (kplan ? amx::quantize_band_queries : amx::quantize_queries)(pr, qp, sc, qa, qscales.data());
    pr.kp = kp, pr.vp = vp;
    pr.ksb = ksb, pr.ksh = ksh, pr.ksn = ksn, pr.vsb = vsb, pr.vsh = vsh, pr.vsn = vsn;
    pr.krow = fk.row_elems * es, pr.vrow = fv.row_elems * es;
    pr.mp = mp, pr.mbp = mbp, pr.mask_b = mask_b, pr.lut = lut, pr.skip = skip;
    pr.plain_scales = path == 3;
    pr.part_m = part_m.data(), pr.part_l = part_l.data(), pr.part_o = part_o.data();
    at::parallel_for(0, B * H * chunks, 1, [&](int64_t begin, int64_t end) {
      if (vnni) {
        amx::VnniWorker worker(pr);
        for (int64_t task = begin; task < end; ++task) worker.run(task);
        return;
      }
#if KVFX_AMX
      amx::Worker worker(pr);
      for (int64_t task = begin; task < end; ++task) worker.run(task);
#endif
    });
  } else
#endif
#if KVFX_AVX2
  if (vplan_avx2) {
    const avx2i::Plan& kpl = *kplan_i;
    const avx2i::Plan& vpl = *vplan_avx2;
    const int64_t ngk = kpl.groups.size(), ngv = vpl.groups.size();
    avx2i::Queries qq;
    avx2i::round_queries(kpl, qp, B * H * G, rk, sc, qq);
    at::parallel_for(0, B * H * chunks, 1, [&](int64_t begin, int64_t end) {
      avx2i::Buffers buf(ngk, ngv);
      constexpr int BN = avx2i::BN;
      std::vector<float> s(G * BN);
      alignas(32) float add[BN];
      for (int64_t task = begin; task < end; ++task) {
        const Task t = start_task(task);
        const int64_t bh = t.bh, b = t.b, n1 = t.n1;
        const char *krows = t.krows, *vrows = t.vrows;
        float *m = t.m, *l = t.l, *o = t.o;
        for (int64_t r0 = t.n0; r0 < n1; r0 += BN) {
          const int rows = static_cast<int>(std::min<int64_t>(BN, n1 - r0));
          const int padded = static_cast<int>(round_up(rows, 16));
          const int64_t next = std::min<int64_t>(BN, n1 - r0 - rows);
          prefetch_rows(krows + (r0 + rows) * ksn, next, ksn, fk.row_elems);
          if (!shared) prefetch_rows(vrows + (r0 + rows) * vsn, next, vsn, fv.row_elems);
          avx2i::decode_block(krows + r0 * ksn, ksn, rows, padded, kpl, lut, true, shared, buf);
          if (!shared) avx2i::decode_block(vrows + r0 * vsn, vsn, rows, padded, vpl, lut, false, true, buf);
          const int64_t moff = (mask_b == 1 ? 0 : b) * N + r0;
          for (int j = 0; j < padded; ++j)
            add[j] = j >= rows || (skip && skip[r0 + j]) ? kNegInf
                   : mp ? mp[moff + j] : mbp && !mbp[moff + j] ? kNegInf : 0.0f;
          avx2i::scores(qq, bh * G, G, ngk, buf, padded, add, s.data(), BN);
          softmax_block(s.data(), BN, rows, padded, G, m, l, o, Rvp);
          for (int64_t g = 0; g < G; ++g) avx2i::values(vpl, &s[g * BN], padded, buf, o + g * Rvp);
        }
      }
    });
  } else
#endif
#if KVFX_AVX2
  if (!use_amx && !vplan_avx2 && q4::takes(fk, fv, shared)) {  // int4 rows decoded in registers
    at::parallel_for(0, B * H * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qs(G * rk);
      for (int64_t task = begin; task < end; ++task) {
        const Task t = start_task(task);
        for (int64_t g = 0; g < G; ++g)  // the softmax scale folded into the query rows, in decode_row's order
          for (int64_t j = 0; j < rk; ++j) qs[g * rk + j] = sc * qp[(t.bh * G + g) * rk + source(fk, j)];
        const int64_t moff = (mask_b == 1 ? 0 : t.b) * N;
        auto add_of = [&](int64_t r0, int rows, int padded, float* add) {  // simple loops: they vectorise
          if (mp) std::copy(mp + moff + r0, mp + moff + r0 + rows, add);
          else if (mbp) for (int j = 0; j < rows; ++j) add[j] = mbp[moff + r0 + j] ? 0.0f : kNegInf;
          else std::fill(add, add + rows, 0.0f);
          if (skip) for (int j = 0; j < rows; ++j) add[j] = skip[r0 + j] ? kNegInf : add[j];
          std::fill(add + rows, add + padded, kNegInf);
        };
        q4::run_task(qs.data(), G, reinterpret_cast<const int8_t*>(t.krows), ksn,
                     reinterpret_cast<const int8_t*>(t.vrows), vsn, fk, fv, t.n0, t.n1, lut, add_of, t.m, t.l, t.o);
      }
    });
  } else
#endif
  at::parallel_for(0, B * H * chunks, 1, [&](int64_t begin, int64_t end) {
    // zero-initialised: the padding columns stay zero (decode_row writes the first Rk / Rv columns only)
    std::vector<float> kbuf(block * Rkp, 0.0f), vbuf(shared ? 0 : block * Rvp, 0.0f), s(G * block), qs(G * Rkp, 0.0f);
    const float* vb = shared ? kbuf.data() : vbuf.data();
    const int64_t ldv = shared ? Rkp : Rvp;
    for (int64_t task = begin; task < end; ++task) {
      const Task t = start_task(task);
      const int64_t bh = t.bh, b = t.b, n1 = t.n1;
      const char *krows = t.krows, *vrows = t.vrows;
      float *m = t.m, *l = t.l, *o = t.o;
      for (int64_t g = 0; g < G; ++g)  // the softmax scale folded into the query rows
        for (int64_t j = 0; j < Rk; ++j) {
          const int64_t col = source(fk, j);
          qs[g * Rkp + j] = col < 0 ? 0.0f : sc * qp[(bh * G + g) * rk + col];
        }
      for (int64_t r0 = t.n0; r0 < n1; r0 += block) {
        const int rows = static_cast<int>(std::min<int64_t>(block, n1 - r0));
        const int padded = static_cast<int>(round_up(rows, 16));
        for (int r = 0; r < rows; ++r)
          decode_row(krows + (r0 + r) * ksn, fk, lut, &kbuf[r * Rkp]);
        if (!shared)
          for (int r = 0; r < rows; ++r) decode_row(vrows + (r0 + r) * vsn, fv, lut, &vbuf[r * Rvp]);
        if (padded > rows) {  // the last tile's spare rows: zero keys and values, score -inf
          std::fill(&kbuf[rows * Rkp], &kbuf[padded * Rkp], 0.0f);
          if (!shared) std::fill(&vbuf[rows * Rvp], &vbuf[padded * Rvp], 0.0f);
        }
        const int64_t moff = (mask_b == 1 ? 0 : b) * N + r0;
        const float* mrow = mp ? mp + moff : nullptr;
        const bool* mbrow = mbp ? mbp + moff : nullptr;
        for (int t = 0; t < padded; t += 16) {
          alignas(64) float add[16];
          for (int j = 0; j < 16; ++j)
            add[j] = t + j >= rows || (skip && skip[r0 + t + j]) ? kNegInf
                   : mrow ? mrow[t + j] : mbrow && !mbrow[t + j] ? kNegInf : 0.0f;
          scores16(qs.data(), Rkp, G, &kbuf[t * Rkp], Rkp, nvk, add, &s[t], block);
        }
        softmax_block(s.data(), block, rows, padded, G, m, l, o, Rvp);  // then the block's values
        accumulate_values(s.data(), block, vb, ldv, padded, o, Rvp, G, nvv);
      }
    }
  });

  // the exact rows' partial softmax, one per query row (a few dozen rows: plain loops)
  std::vector<float> ex_m(held.empty() ? 0 : B * H * G, kNegInf), ex_l(ex_m.size(), 0.0f), ex_o(ex_m.size() * Rvp);
  if (!held.empty()) {
    const int64_t E = epos.size(0);
    const float *ekp = ek.data_ptr<float>(), *evp = ev.data_ptr<float>();
    const int64_t* pp = epos.data_ptr<int64_t>();
    at::parallel_for(0, B * H * G, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> s(held.size());
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bh = i / G, b = bh / H;
        const float* qrow = qp + i * rk;
        float mx = kNegInf;
        for (size_t e = 0; e < held.size(); ++e) {
          const int64_t pos = pp[held[e]], moff = (mask_b == 1 ? 0 : b) * N + pos;
          const float* krow = ekp + (bh * E + held[e]) * rk;
          float dot = 0.0f;
          for (int64_t c = 0; c < rk; ++c) dot += qrow[c] * krow[c];
          s[e] = sc * dot + (mp ? mp[moff] : mbp && !mbp[moff] ? kNegInf : 0.0f);
          mx = std::max(mx, s[e]);
        }
        ex_m[i] = mx;
        if (mx == kNegInf) continue;
        float* o = &ex_o[i * Rvp];
        for (size_t e = 0; e < held.size(); ++e) {
          const float p = std::exp(s[e] - mx);
          ex_l[i] += p;
          const float* vrow = evp + (bh * E + held[e]) * rv;
          for (int64_t j = 0; j < Rvp; ++j)
            if (columns[j] >= 0) o[j] += p * vrow[columns[j]];
        }
      }
    });
  }

  TORCH_CHECK(out_type == torch::kFloat32 || out_type == torch::kBFloat16 || out_type == torch::kHalf,
              "decode_attention: a float32, bfloat16 or float16 result");
  auto out = torch::empty({B, H, G, rv}, q.options().dtype(out_type));
  char* const obase = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, B * H * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(Rvp), row(out_type == torch::kFloat32 ? 0 : rv);
    for (int64_t i = begin; i < end; ++i) {
      float* dst = out_type == torch::kFloat32 ? reinterpret_cast<float*>(obase) + i * rv : row.data();
      const auto round_row = [&] {  // a 16-bit result: the row's float32 numbers rounded once
        if (out_type == torch::kBFloat16)
          std::copy(row.begin(), row.end(), reinterpret_cast<at::BFloat16*>(obase) + i * rv);
        else if (out_type == torch::kHalf)
          std::copy(row.begin(), row.end(), reinterpret_cast<at::Half*>(obase) + i * rv);
      };
      const int64_t bh = i / G, g = i % G;
      float mmax = kNegInf;
      for (int64_t c = 0; c < chunks; ++c) mmax = std::max(mmax, part_m[(bh * chunks + c) * G + g]);
      if (!held.empty()) mmax = std::max(mmax, ex_m[i]);
      if (mmax == kNegInf) {  // every key masked: SDPA gives NaN
        std::fill(dst, dst + rv, std::numeric_limits<float>::quiet_NaN());
        round_row();
        continue;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      float total = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t t = (bh * chunks + c) * G + g;
        const float w = std::exp(part_m[t] - mmax);
        if (w == 0.0f) continue;
        total += w * part_l[t];
        const float* src = &part_o[t * Rvp];
        for (int64_t j = 0; j < Rvp; ++j) acc[j] += w * src[j];
      }
      if (!held.empty() && ex_m[i] != kNegInf) {
        const float w = std::exp(ex_m[i] - mmax);
        total += w * ex_l[i];
        for (int64_t j = 0; j < Rvp; ++j) acc[j] += w * ex_o[i * Rvp + j];
      }
      const float inv = 1.0f / total;  // one division a row: a division a column cost ~1 us a call
      for (int64_t j = 0; j < Rvp; ++j)
        if (columns[j] >= 0) dst[columns[j]] = acc[j] * inv;
      round_row();
    }
  });
  return out;
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, int64_t rk, int64_t rv,
                               int64_t bits, double scale, c10::optional<torch::Tensor> mask_opt, bool shared,
                               std::vector<int64_t> kbands, std::vector<int64_t> vbands, torch::Tensor scales,
                               c10::optional<torch::Tensor> ek_opt, c10::optional<torch::Tensor> ev_opt,
                               c10::optional<torch::Tensor> epos_opt) {
  return decode_attention_as(q, kc, vc, rk, rv, bits, scale, std::move(mask_opt), shared, std::move(kbands),
                             std::move(vbands), std::move(scales), std::move(ek_opt), std::move(ev_opt),
                             std::move(epos_opt), torch::kFloat32);
}

// The scale table as kvfx.ops.lowbit_attention._scales computes it (torch's exp2 of e / 8), made once a process.
const torch::Tensor& default_scales() {
  static const torch::Tensor* table = new torch::Tensor(at::exp2(at::arange(-128, 128, at::kFloat) / 8));
  return *table;
}

// decode_attention as one op, with what kvfx::decode_attention (Python) does around the kernel: SDPA's mask as the
// graph holds it ([B|1, 1, 1, N], bool or additive of any float dtype) reshaped to [B|1, N], q of any float dtype
// (computed in float32, returned in q's dtype), the default scale table. The graph pass passes/decode_kernel.py puts
// it in place of the Python op, whose dispatch costs ~250 us a call; this one costs the dispatcher's few us.
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc, int64_t rk, int64_t rv,
                     int64_t bits, double scale, const std::optional<torch::Tensor>& mask, bool shared,
                     std::vector<int64_t> kbands, std::vector<int64_t> vbands,
                     const std::optional<torch::Tensor>& exact_keys, const std::optional<torch::Tensor>& exact_values,
                     const std::optional<torch::Tensor>& positions) {
  std::optional<torch::Tensor> m;
  if (mask.has_value() && mask->defined() && mask->numel() > 0) {
    TORCH_CHECK(mask->dim() >= 1 && mask->numel() == mask->size(0) * kc.size(2),
                "attend: the mask must hold one number per batch row (or one row) and cached token");
    torch::Tensor x = mask->reshape({mask->size(0), kc.size(2)});
    m = x.scalar_type() == torch::kBool || x.scalar_type() == torch::kFloat32 ? x : x.to(torch::kFloat32);
  }
  const auto t = q.scalar_type();
  const bool direct = t == torch::kFloat32 || t == torch::kBFloat16 || t == torch::kHalf;  // else a cast after
  const torch::Tensor out =
      decode_attention_as(t == torch::kFloat32 ? q : q.to(torch::kFloat32), kc, vc, rk, rv, bits, scale, m, shared,
                          std::move(kbands), std::move(vbands), default_scales(), exact_keys,
                          shared ? std::nullopt : exact_values, positions, direct ? t : torch::kFloat32);
  return direct ? out : out.to(t);
}

torch::Tensor attend_meta(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc, int64_t rk,
                          int64_t rv, int64_t bits, double scale, const std::optional<torch::Tensor>& mask, bool shared,
                          std::vector<int64_t> kbands, std::vector<int64_t> vbands,
                          const std::optional<torch::Tensor>& exact_keys,
                          const std::optional<torch::Tensor>& exact_values,
                          const std::optional<torch::Tensor>& positions) {
  return at::empty_symint({q.sym_size(0), q.sym_size(1), q.sym_size(2), c10::SymInt(shared ? rk : rv)}, q.options());
}

// kvfx::quantize and kvfx::dequantize as C++ ops (passes/decode_kernel.py puts them in the Python ops' place: their
// dispatch costs ~20-250 us a call, one or two a layer and step or prompt; these the dispatcher's few us), with what
// the Python ops do around quantize_rows / dequantize_rows_as: any float dtype and strides, the default tables, a
// held position's exact row written over its decoded one.
const torch::Tensor& default_down_scales() {  // 2^(-e/8): kvfx.ops.lowbit_attention._scales(-1)
  static const torch::Tensor* table = new torch::Tensor(at::exp2(-at::arange(-128, 128, at::kFloat) / 8));
  return *table;
}

int64_t row_bytes_of(int64_t width, int64_t bits, const std::vector<int64_t>& spec) {
  return bits == 8 || bits == 4 ? Format(bits == 8 ? kInt8 : kInt4, static_cast<int>(width)).row_elems
                                : Format(spec).row_elems;
}

torch::Tensor encode(const torch::Tensor& x, int64_t bits, std::vector<int64_t> spec) {
  spec = full_width(std::move(spec), x.size(-1));
  const auto t = x.scalar_type();
  const torch::Tensor rows = t == torch::kFloat32 || t == torch::kBFloat16 ? x.contiguous()
                                                                          : x.to(torch::kFloat32).contiguous();
  return quantize_rows(rows, x.size(-1), bits, std::move(spec), default_scales(), default_down_scales());
}

torch::Tensor encode_meta(const torch::Tensor& x, int64_t bits, std::vector<int64_t> spec) {
  std::vector<c10::SymInt> sizes(x.sym_sizes().begin(), x.sym_sizes().end());
  sizes.back() = c10::SymInt(row_bytes_of(x.size(-1), bits, full_width(spec, x.size(-1))));
  return at::empty_symint(sizes, x.options().dtype(torch::kInt8));
}

torch::Tensor decode(const torch::Tensor& stored, int64_t width, int64_t bits, std::vector<int64_t> spec,
                     at::ScalarType dtype, const std::optional<torch::Tensor>& exact_rows,
                     const std::optional<torch::Tensor>& positions, const std::optional<torch::Tensor>& offset) {
  const bool direct = dtype == torch::kFloat32 || dtype == torch::kBFloat16;  // else a cast after
  std::optional<torch::Tensor> off;
  if (offset.has_value() && offset->defined()) {
    std::vector<int64_t> sizes = stored.sizes().vec();
    sizes.back() = width;
    off = offset->to(torch::kFloat32).expand(sizes);
  }
  torch::Tensor out = dequantize_rows_as(stored, width, bits, std::move(spec), default_scales(), off,
                                         direct ? dtype : torch::kFloat32);
  if (!direct) out = out.to(dtype);
  if (positions.has_value() && positions->defined()) {  // kvfx.ops.lowbit_attention._put_exact
    const torch::Tensor& p = *positions;
    const torch::Tensor held = p.ge(0).logical_and(p.lt(out.size(2)));
    torch::Tensor rows = off ? exact_rows->to(torch::kFloat32) + offset->to(torch::kFloat32) : *exact_rows;
    out.index_copy_(2, p.masked_select(held), rows.index_select(2, held.nonzero().flatten()).to(out.scalar_type()));
  }
  return out;
}

torch::Tensor decode_meta(const torch::Tensor& stored, int64_t width, int64_t bits, std::vector<int64_t> spec,
                          at::ScalarType dtype, const std::optional<torch::Tensor>& exact_rows,
                          const std::optional<torch::Tensor>& positions, const std::optional<torch::Tensor>& offset) {
  std::vector<c10::SymInt> sizes(stored.sym_sizes().begin(), stored.sym_sizes().end());
  sizes.back() = c10::SymInt(width);
  return at::empty_symint(sizes, stored.options().dtype(dtype));
}

// One op namespace per build (TORCH_EXTENSION_NAME: kvfx_lowbit_attention, kvfx_lowbit_attention_x86_64_v2, …), so
// builds for several -march values load side by side. (An indirection: TORCH_LIBRARY pastes its argument unexpanded.)
#define KVFX_REGISTER(ns)                                \
  TORCH_LIBRARY(ns, m) {                                 \
    m.def("decode_attention", &decode_attention);       \
    m.def("dequantize_rows", &dequantize_rows);         \
    m.def("dequantize_rows_as", &dequantize_rows_as);   \
    m.def("quantize_rows", &quantize_rows);             \
    m.def("integer_path", &integer_path);               \
    m.def("stage_cycles", &stage_cycles);               \
    m.def("linear_rows", &linear_rows);                 \
    m.def("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor"); \
    m.def("linears(Tensor x, Tensor[] weights) -> Tensor[]"); \
    m.def("small_matmul(Tensor x, Tensor C) -> Tensor"); \
    m.def("attend(Tensor q, Tensor kc, Tensor vc, int rk, int rv, int bits, float scale, Tensor? mask, "   \
          "bool shared, int[] kbands, int[] vbands, Tensor? exact_keys=None, Tensor? exact_values=None, " \
          "Tensor? positions=None) -> Tensor");          \
    m.def("encode(Tensor x, int bits, int[] spec) -> Tensor"); \
    m.def("decode(Tensor stored, int width, int bits, int[] spec, ScalarType dtype, Tensor? exact_rows=None, " \
          "Tensor? positions=None, Tensor? offset=None) -> Tensor"); \
  }                                                      \
  TORCH_LIBRARY_IMPL(ns, CPU, m) {                       \
    m.impl("linear", &linear_op);                        \
    m.impl("linears", &linears_op);                      \
    m.impl("small_matmul", &small_matmul);               \
    m.impl("attend", &attend);                           \
    m.impl("encode", &encode);                           \
    m.impl("decode", &decode);                           \
  }                                                      \
  TORCH_LIBRARY_IMPL(ns, Meta, m) {                      \
    m.impl("linear", &linear_meta);                      \
    m.impl("linears", &linears_meta);                    \
    m.impl("small_matmul", &small_matmul_meta);          \
    m.impl("attend", &attend_meta);                      \
    m.impl("encode", &encode_meta);                      \
    m.impl("decode", &decode_meta);                      \
  }
KVFX_REGISTER(TORCH_EXTENSION_NAME)

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
// * Integer (int8 / int4 rows, CPUs with AMX-INT8: Sapphire Rapids and later; `integer_path()`; namespace amx):
//   the codes are never converted to floats. They are only rearranged (a 4-byte transpose for the keys, a 4-row
//   interleave for the values, int4 nibbles split and sign-extended by GF2P8AFFINEQB) into the operand layouts of
//   the tile unit, which computes the scores as int8 dot products of the codes with the query, rounded once per
//   call to integer digits, and the value sums as int8 dot products of the codes with the softmax weights times the
//   rows' scales, rounded per block. Float arithmetic only scales the int32 sums (2^(e/8) per row and group) and
//   runs the softmax. The roundings (query: 1/4064 of its row's largest |q| for int4, 1/65024 for int8; weights:
//   1/65024 of the block's largest) move the output by at most ~1.3e-3 (int4) / ~3e-4 (int8) of its size on
//   SmolLM2's decode inputs, 200 / 80 times less than the cache's own rounding does; see the amx namespace.
// * Float (16/32-bit latents; int8 / int4 rows elsewhere, or with KVFX_NO_AMX=1): rows decoded to float32 into
//   a buffer, the scores as 16-row tiles (one query row against 16 key rows in registers, reduced by a shuffle
//   tree), the value sums in registers: the reference's numbers up to float32 round-off. Plain C++ (GCC vector
//   extensions) with AVX-512 intrinsics under #if, so it builds for any CPU.
//
// Row layout (kvfx/quant.py): int8: R codes, then one scale code e (x = q * 2^(e/8));
//                             int4: ceil(R/2) bytes of two codes (low nibble first), then one e per 32 numbers.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512BW__) && defined(__AVX512VBMI__) && \
    defined(__GFNI__) && defined(__linux__)
#define KVFX_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstring>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

namespace {

constexpr int W = 16;  // lanes of one vector (GCC/Clang vector extensions: AVX-512 here, two AVX2 or four NEON ops elsewhere)
typedef float vf __attribute__((vector_size(64)));
typedef float vf_u __attribute__((vector_size(64), aligned(4)));  // for unaligned loads and stores

inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

enum Kind { kInt8, kInt4, kF32, kBF16, kF16 };

// One stored row: `row_elems` elements of the cache tensor, decoding to `decoded` floats.
struct Format {
  Kind kind;
  int width, group, code_bytes, row_elems, decoded;
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

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof(float));
  return x;
}

// int8: out = the row's R numbers. int4: out = [even columns | odd columns] (the low and high nibbles of the
// code bytes, each a contiguous run: the loops vectorise); the caller permutes q and the output to match.
// Floats: the row converted to float32.
inline void decode_row(const char* __restrict raw, const Format& f, const float* lut, float* __restrict out) {
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
#endif
    for (; c < f.width; ++c)
      out[c] = f.kind == kBF16 ? bf16_to_float(h[c]) : static_cast<float>(c10::Half(h[c], c10::Half::from_bits()));
    return;
  }
  const int8_t* row = reinterpret_cast<const int8_t*>(raw);
  const int8_t* e = row + f.code_bytes;
  if (f.kind == kInt8) {
    const float s = lut[e[0] + 128];
    int c = 0;
#if defined(__AVX512F__)
    const __m512 sv = _mm512_set1_ps(s);
    for (; c + 16 <= f.width; c += 16)
      _mm512_storeu_ps(out + c, _mm512_mul_ps(sv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c))))));
#endif
    for (; c < f.width; ++c) out[c] = s * static_cast<float>(row[c]);
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
#endif
  for (int j = j0; j < f.code_bytes; ++j) {  // the last, shorter group (without AVX-512: every group)
    const float s = lut[e[j / 16] + 128];
    const int8_t byte = row[j];
    lo[j] = s * static_cast<float>(static_cast<int8_t>(byte << 4) >> 4);
    hi[j] = s * static_cast<float>(byte >> 4);
  }
}

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

// The block's value sum for all G query rows, four at a time.
void accumulate_values(const float* p, int64_t ldp, const float* v, int64_t ldv, int rows, float* o, int64_t ldo,
                       int64_t G, int64_t nv) {
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) accumulate_cols<4>(p + g * ldp, ldp, v, ldv, rows, o + g * ldo, ldo, nv);
  switch (G - g) {
    case 3: accumulate_cols<3>(p + g * ldp, ldp, v, ldv, rows, o + g * ldo, ldo, nv); break;
    case 2: accumulate_cols<2>(p + g * ldp, ldp, v, ldv, rows, o + g * ldo, ldo, nv); break;
    case 1: accumulate_cols<1>(p + g * ldp, ldp, v, ldv, rows, o + g * ldo, ldo, nv); break;
    default: break;
  }
}

// exp(x) for x <= 0 in plain arithmetic (2^n by exponent bits, 2^f by a degree-6 polynomial, rel. error ~2e-7), so
// the loops over a block of scores vectorise (libm's expf does not). x below -87 (masked: -inf) gives ~1e-38.
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.0f) * 1.4426950408889634f;
  const float n = std::floor(t);
  const float f = t - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return p * two_n;
}


#if KVFX_AMX
// ---------------------------------------------------------------------------------------------------------------
// Integer path (int8 / int4 rows on CPUs with AMX-INT8): the dot products of the scores and of the value sums run
// on the AMX tile unit (TDPBSSD / TDPBUSD: int8 x int8 -> int32, an M x 64 by 64 x 16 product per instruction,
// M <= 16 query rows) straight on the stored codes; float arithmetic only applies the scales.
//
// Scores. Each query row, softmax scale folded in, is rounded once per call to integers x with one scale per row,
// |x| <= 2032 (int4) or 32512 (int8), written as two int8 digits: x = 16·hi + lo (int4, lo in [-8, 7]) or
// 256·hi + lo (int8). int4 puts both digits in one 64-byte A row against a B tile holding the group's key codes
// times 16 (the nibble moved up: exact in int8) and times 1, so one instruction sums k·x over a 32-column group;
// int8 runs the two digits through two accumulators. The int32 sums are scaled by the key scale 2^(e/8) of each row
// and group, summed in float, then scaled by the query's. Rounding: half a step, 1/4064 (int4) or 1/65024 (int8)
// of the row's largest |scale·q|.
//
// Values. out[g, c] = sum_n p[g, n] · s_v[n, grp(c)] · v[n, c], with p = exp(score - the block's max) <= 1. Per
// block of BN rows, query row and value group the weights w = p · s_v are rounded to x = w · 32512 / max_n w
// (exact max: masked or tiny rows cost the others no precision), two digits x = 256·hi + lo (hi = x >> 8 signed,
// lo = x & 255 unsigned) summed by two accumulators (TDPBSSD, TDPBUSD), and the int32 sums scaled back into the
// float accumulators with the online softmax's correction. Rounding: 1/65024 of the block's largest weight.
//
// Layouts (TDP takes A = M x 64 bytes row-major and B = 16 rows of 16 columns x 4 consecutive K values): key codes
// are transposed 4 bytes at a time (a 16 x 16 dword transpose of 16 rows), value codes interleaved 4 rows at a
// time, probabilities packed so that their row order matches. Columns come out permuted (int4: the even, then the
// odd columns of each group; int8: the unpack order); q is permuted to match and the caller scatters the output
// back (`columns`). Tile loads and stores do not overlap with vector work on Sapphire Rapids (TDP does): the code
// keeps both few.
namespace amx {

constexpr int BN = 128;                  // rows per block: a multiple of 64 (one K step of the value tiles)
constexpr int kQ4 = 2032, kQ8 = 32512;   // |x| bounds of the two-digit operands: 16·127, 256·127

// AMX needs the kernel's permission once per process (Linux >= 5.16) and the CPU to have it at run time (the
// extension is built with -march=native, but its build cache could outlive a change of machine).
inline bool ready() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// GF2P8AFFINEQB matrices (one byte-wise op): output bit i = input bit src[i], or 0 for -1.
constexpr uint64_t affine(const int (&src)[8]) {
  uint64_t m = 0;
  for (int i = 0; i < 8; ++i)
    if (src[i] >= 0) m |= uint64_t(1) << (8 * (7 - i) + src[i]);
  return m;
}
constexpr int kLoSrc[8] = {0, 1, 2, 3, 3, 3, 3, 3};       // the low nibble, sign-extended
constexpr int kHiSrc[8] = {4, 5, 6, 7, 7, 7, 7, 7};       // the high nibble, sign-extended
constexpr int kLo16Src[8] = {-1, -1, -1, -1, 0, 1, 2, 3};  // 16 · the low nibble (16 · the high one: byte & 0xF0)
inline __m512i lo4(__m512i x) { return _mm512_gf2p8affine_epi64_epi8(x, _mm512_set1_epi64(affine(kLoSrc)), 0); }
inline __m512i hi4(__m512i x) { return _mm512_gf2p8affine_epi64_epi8(x, _mm512_set1_epi64(affine(kHiSrc)), 0); }
inline __m512i lo4x16(__m512i x) { return _mm512_gf2p8affine_epi64_epi8(x, _mm512_set1_epi64(affine(kLo16Src)), 0); }
inline __m512i hi4x16(__m512i x) { return _mm512_and_si512(x, _mm512_set1_epi8(static_cast<char>(0xF0))); }

inline __mmask64 first_bytes(int64_t n) {  // the first n lanes (n may be <= 0 or >= 64)
  return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << std::max<int64_t>(n, 0)) - 1;
}
inline void put(int8_t* p, __m512i v) { _mm512_store_si512(p, v); }

// exp(x) for x <= 0, 16 lanes (exp_nonpositive's arithmetic; 2^n by VSCALEFPS)
inline __m512 exp_nonpositive16(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 16 x 16 dwords: r[i] = row i  ->  r[d] = dword d of rows 0..15 (lane i = row i).
inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4a + e], 128-bit lane L: dword 4L + e of rows 4a .. 4a + 3
  for (int e = 0; e < 4; ++e) {
    const __m512i b0 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x44), b1 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xEE);
    const __m512i b2 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x44),
                  b3 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xEE);
    t[e] = _mm512_shuffle_i32x4(b0, b2, 0x88);
    t[4 + e] = _mm512_shuffle_i32x4(b0, b2, 0xDD);
    t[8 + e] = _mm512_shuffle_i32x4(b1, b3, 0x88);
    t[12 + e] = _mm512_shuffle_i32x4(b1, b3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Byte permutations for the int4 value layout: four rows' 64 code bytes (4 groups of 16) -> per group its 16
// bytes of the 4 rows interleaved (byte 4i + k = row k's byte i).
struct Perm4 {
  __m512i a, b, c0, c1;
  Perm4() {
    alignas(64) int8_t ia[64], ib[64], ic0[64], ic1[64];
    for (int jj = 0; jj < 2; ++jj)
      for (int i = 0; i < 16; ++i)
        for (int k = 0; k < 2; ++k) {
          ia[32 * jj + 2 * i + k] = static_cast<int8_t>(16 * jj + i + 64 * k);
          ib[32 * jj + 2 * i + k] = static_cast<int8_t>(16 * (jj + 2) + i + 64 * k);
        }
    for (int i = 0; i < 16; ++i)
      for (int k = 0; k < 4; ++k) {
        ic0[4 * i + k] = static_cast<int8_t>(k < 2 ? 2 * i + k : 64 + 2 * i + k - 2);
        ic1[4 * i + k] = static_cast<int8_t>(ic0[4 * i + k] + 32);
      }
    a = _mm512_load_si512(ia), b = _mm512_load_si512(ib), c0 = _mm512_load_si512(ic0), c1 = _mm512_load_si512(ic1);
  }
};

struct Problem {
  Kind kind;
  bool shared;
  int64_t B, H, G, N, chunk, chunks;
  int64_t rk, rv, cbk, cbv, ngk, ngv;  // widths, code bytes, scale groups (int8: 1)
  int64_t ktiles, vtiles, Rvp;         // key units (int4: groups; int8: 64-column chunks), value C tiles, 16·vtiles
  int Gb, NGB;                         // query rows per tile (M <= 16), g-blocks
  const int8_t* qa;                    // query digits of every (b, h), see quantize_queries
  const float* qsc;                    // their scales [b, h, g]
  const char *kp, *vp;
  int64_t ksb, ksh, ksn, vsb, vsh, vsn;
  const float* mp;
  const bool* mbp;
  int64_t mask_b;
  const float* lut;
  float *part_m, *part_l, *part_o;

  int digits() const { return kind == kInt4 ? 1 : 2; }  // A tiles per key unit (int4: both digits in one row)
  int64_t qoffset(int64_t bh, int gb, int64_t unit, int digit) const {
    return (((bh * NGB + gb) * ktiles + unit) * digits() + digit) * Gb * 64;
  }
  const int8_t* qtile(int64_t bh, int gb, int64_t unit, int digit) const { return qa + qoffset(bh, gb, unit, digit); }
};

// The query rows as A tiles of int8 digits, softmax scale folded in, one scale per row (qsc = max |y| / bound):
// int4, per group j, a 64-byte row [hi | lo] of x = 16·hi + lo (|x| <= 2032) in the key tiles' column order
// (byte 4r + t: column 32j + 8(r/2) + 2t + r%2, the low then high nibble of the group's dword r/2); int8, per
// 64-column chunk, two tiles hi and lo of x = 256·hi + lo (|x| <= 32512).
void quantize_queries(const Problem& P, const float* q, float sc, int8_t* qa, float* qsc) {
  const bool i4 = P.kind == kInt4;
  const float bound = i4 ? kQ4 : kQ8;
  const int64_t rk = P.rk;
  alignas(64) int32_t perm[32];
  for (int k = 0; k < 32; ++k) perm[k] = 8 * (k / 8) + 2 * (k % 4) + (k / 4) % 2;
  const __m512i p0 = _mm512_load_si512(perm), p1 = _mm512_load_si512(perm + 16);
  for (int64_t bh = 0; bh < P.B * P.H; ++bh)
    for (int64_t g = 0; g < P.G; ++g) {
      const int gb = static_cast<int>(g / P.Gb), gr = static_cast<int>(g % P.Gb);
      const float* qg = q + (bh * P.G + g) * rk;
      __m512 mx = _mm512_setzero_ps();
      for (int64_t c = 0; c < rk; c += 16) {
        const __mmask16 m = static_cast<__mmask16>(first_bytes(rk - c));
        mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, qg + c)));
      }
      const float amax = _mm512_reduce_max_ps(mx) * std::abs(sc);
      qsc[bh * P.G + g] = amax / bound;
      const __m512 inv = _mm512_set1_ps(amax > 0 ? sc * bound / amax : 0.0f);
      auto load = [&](int64_t c) {  // 16 columns from c, zero past the row, times sc · bound / amax
        return _mm512_mul_ps(_mm512_maskz_loadu_ps(static_cast<__mmask16>(first_bytes(rk - c)), qg + c), inv);
      };
      for (int64_t u = 0; u < P.ktiles; ++u) {
        if (i4) {
          const __m512 a = load(32 * u), b = load(32 * u + 16);
          int8_t* row = qa + P.qoffset(bh, gb, u, 0) + gr * 64;
          for (int v = 0; v < 2; ++v) {
            const __m512i x = _mm512_cvtps_epi32(_mm512_permutex2var_ps(a, v ? p1 : p0, b));
            const __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(8)), 4);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 16 * v), _mm512_cvtepi32_epi8(hi));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 32 + 16 * v),
                             _mm512_cvtepi32_epi8(_mm512_sub_epi32(x, _mm512_slli_epi32(hi, 4))));
          }
        } else {
          int8_t* hrow = qa + P.qoffset(bh, gb, u, 0) + gr * 64;
          int8_t* lrow = qa + P.qoffset(bh, gb, u, 1) + gr * 64;
          for (int v = 0; v < 4; ++v) {
            const __m512i x = _mm512_cvtps_epi32(load(64 * u + 16 * v));
            const __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(128)), 8);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(hrow + 16 * v), _mm512_cvtepi32_epi8(hi));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(lrow + 16 * v),
                             _mm512_cvtepi32_epi8(_mm512_sub_epi32(x, _mm512_slli_epi32(hi, 8))));
          }
        }
      }
    }
}

// One thread's tiles and buffers (thread-local, reused across calls); run(task) = one (batch, head, chunk of rows).
class Worker {
 public:
  explicit Worker(const Problem& p) : P(p), i4(p.kind == kInt4), Gb(p.Gb), NGB(p.NGB) {
    for (int t = 0; t < 6; ++t) cfg.rows[t] = static_cast<uint8_t>(Gb), cfg.colsb[t] = 64;  // C 0-3, A 4-5
    for (int t = 6; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;                         // B 6-7
    size_t used = 0;
    auto take = [&](size_t bytes) { const size_t at = used; used += round_up(bytes, 64); return at; };
    const size_t o_ks = take(4 * P.ngk * BN), o_vs = take(P.shared ? 0 : 4 * P.ngv * BN),
                 o_sb = take(2 * P.ktiles * 1024), o_cs = take(2 * 4 * std::max<int64_t>(P.ktiles, 2) * Gb * 16),
                 o_s = take(4 * P.G * BN), o_vb = take(2 * P.vtiles * (BN / 64) * 1024),
                 o_av = take(NGB * P.ngv * 2 * (BN / 64) * Gb * 64), o_ps = take(4 * P.G * P.ngv),
                 o_cv = take(2 * 4 * 4 * Gb * 16), o_pf = take(4 * P.G);
    static thread_local std::vector<char> scratch;
    if (scratch.size() < used + 64) scratch.resize(used + 64);
    char* base = reinterpret_cast<char*>(round_up(reinterpret_cast<int64_t>(scratch.data()), 64));
    ks = reinterpret_cast<float*>(base + o_ks);
    vs = P.shared ? ks : reinterpret_cast<float*>(base + o_vs);
    sb = reinterpret_cast<int8_t*>(base + o_sb);
    cs = reinterpret_cast<int32_t*>(base + o_cs);
    s_ = reinterpret_cast<float*>(base + o_s);
    vb = reinterpret_cast<int8_t*>(base + o_vb);
    av = reinterpret_cast<int8_t*>(base + o_av);
    ps = reinterpret_cast<float*>(base + o_ps);
    cv = reinterpret_cast<int32_t*>(base + o_cv);
    pf = reinterpret_cast<float*>(base + o_pf);
    const int gn = static_cast<int>(P.G - (NGB - 1) * Gb);  // rows of the last g-block: the rest of its A rows stay 0
    for (int64_t i = 0; i < P.ngv * 2 * (BN / 64); ++i)
      std::memset(av + (((NGB - 1) * P.ngv * 2 * (BN / 64) + i) * Gb + gn) * 64, 0, (Gb - gn) * 64);
    alignas(64) float l8[16] = {};
    for (int b = 0; b < 8; ++b) l8[b] = P.lut[128 + b];
    lut8 = _mm512_load_ps(l8);
    _tile_loadconfig(&cfg);
  }
  ~Worker() { _tile_release(); }
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  void run(int64_t task);

 private:
  const Problem& P;
  const bool i4;
  const int Gb, NGB;
  TileConfig cfg;
  Perm4 perm;
  __m512 lut8;
  int8_t *sb, *vb, *av;
  float *ks, *vs, *s_, *ps, *pf;
  int32_t *cs, *cv;

  int64_t block = 0;  // blocks done (for vb_at)

  void scales(const char* const* rows, int64_t cb, int64_t ng, float* out) const;
  void key_tiles(const char* const* rows, int t);
  void value_tiles(const char* const* rows, int t);
  // double buffers: what the tile unit may still be reading is not overwritten by the vector work that follows
  int8_t* sb_at(int t) const { return sb + (t % 2) * P.ktiles * 1024; }
  int8_t* vb_at(int64_t b) const { return vb + (b % 2) * P.vtiles * (BN / 64) * 1024; }
  int32_t* cs_at(int t) const { return cs + (t % 2) * std::max<int64_t>(P.ktiles, 2) * Gb * 16; }
  int32_t* cv_at(int64_t i) const { return cv + (i % 2) * 4 * Gb * 16; }
  void score_tiles(int64_t bh, int gb, int t);
  void score_sums(int64_t bh, int gb, int t, const float* add);
  void softmax(float* m, float* l, float* o);
  void weights(int gb, int64_t j);
  void value_sums(int gb, int64_t i, float* o);
  void value_tile_ops(int gb, int64_t i);
};

// The block's scale codes -> out[j * BN + r] = 2^(e/8), 0 for missing rows. Several groups: 16 rows at a time,
// transposed, 2^(e/8) = 2^((e&7) / 8) · 2^(e>>3) by a permute and VSCALEFPS.
void Worker::scales(const char* const* rows, int64_t cb, int64_t ng, float* out) const {
  if (ng == 1) {
    for (int r = 0; r < BN; ++r) out[r] = rows[r] ? P.lut[reinterpret_cast<const int8_t*>(rows[r])[cb] + 128] : 0.0f;
    return;
  }
  const __m512 l8 = lut8;
  for (int r0 = 0; r0 < BN; r0 += 16) {
    __mmask16 valid = 0;
    for (int n = 0; n < 16; ++n) valid |= static_cast<__mmask16>(rows[r0 + n] != nullptr) << n;
    for (int64_t j0 = 0; j0 < ng; j0 += 64) {
      const __mmask64 m = first_bytes(ng - j0);
      __m512i z[16];
      for (int n = 0; n < 16; ++n)
        z[n] = rows[r0 + n] ? _mm512_maskz_loadu_epi8(m, rows[r0 + n] + cb + j0) : _mm512_setzero_si512();
      transpose16(z);
      for (int64_t j = j0; j < std::min(ng, j0 + 64); ++j) {
        const int b = static_cast<int>((j - j0) % 4);
        const __m512i e = _mm512_srai_epi32(_mm512_slli_epi32(z[(j - j0) / 4], 24 - 8 * b), 24);
        const __m512 s = _mm512_scalef_ps(_mm512_permutexvar_ps(_mm512_and_si512(e, _mm512_set1_epi32(7)), l8),
                                          _mm512_cvtepi32_ps(_mm512_srai_epi32(e, 3)));
        _mm512_store_ps(out + j * BN + r0, _mm512_maskz_mov_ps(valid, s));
      }
    }
  }
}

// The B tiles of 16 key rows: sb[unit * 1024], 16 rows of 64 bytes, row i byte 4n + b = key row n's code of
// column col(i, b). int4 group j: rows 2d, 2d + 1 = 16 · the low, high nibbles of the group's dword d, rows 8 + 2d,
// 9 + 2d the same unscaled. int8 chunk c: row d = columns 64c + 4d .. 64c + 4d + 3.
void Worker::key_tiles(const char* const* rows, int t) {
  int8_t* __restrict const sbp = sb_at(t);
  const int64_t ngk = P.ngk, cbk = P.cbk, nch = i4 ? (16 * ngk + 63) / 64 : (P.rk + 63) / 64;
  for (int64_t c = 0; c < nch; ++c) {
    const __mmask64 m = first_bytes(cbk - 64 * c);
    __m512i z[16];
    for (int n = 0; n < 16; ++n) z[n] = rows[n] ? _mm512_maskz_loadu_epi8(m, rows[n] + 64 * c) : _mm512_setzero_si512();
    transpose16(z);
    if (i4) {
      const int64_t groups = std::min<int64_t>(4, ngk - 4 * c);
      for (int64_t jj = 0; jj < groups; ++jj) {
        int8_t* tile = sbp + (4 * c + jj) * 1024;
        for (int d = 0; d < 4; ++d) {
          const __m512i x = z[4 * jj + d];
          put(tile + (2 * d) * 64, lo4x16(x));
          put(tile + (2 * d + 1) * 64, hi4x16(x));
          put(tile + (8 + 2 * d) * 64, lo4(x));
          put(tile + (9 + 2 * d) * 64, hi4(x));
        }
      }
    } else {
      for (int d = 0; d < 16; ++d) put(sbp + c * 1024 + d * 64, z[d]);
    }
  }
}

// The B tiles of the block's values, 16 rows at a time: vb[(tile * (BN / 64) + step) * 1024], K steps of 64 rows.
// Rows n0..n0+3 fill one tile row (byte 4i + k = row n0 + k, column i); tile row 4L + m holds rows 16m + 4L .. of
// the step, the order in which weights() packs the weights. int4 tiles (group j, nibble): column i = 32j + 2i +
// nibble; int8 tiles (chunk c, i): lane 4L + t = column 64c + 16L + 4i + t (the unpack order).
void Worker::value_tiles(const char* const* rows, int t) {  // rows 16t .. 16t + 15 of the block
  const int u0 = 4 * t;
  int8_t* __restrict const vbp = vb_at(block);
  const int64_t nch = i4 ? (16 * P.ngv + 63) / 64 : (P.rv + 63) / 64, ngv = P.ngv, cbv = P.cbv;
  const __m512i pa = perm.a, pb = perm.b, pc0 = perm.c0, pc1 = perm.c1;
  for (int64_t c = 0; c < nch; ++c) {
    const __mmask64 m = first_bytes(cbv - 64 * c);
    const int64_t groups = std::min<int64_t>(4, ngv - 4 * c);
    for (int u = u0; u < u0 + 4; ++u) {
      const char* const* r4 = rows + 4 * (u - u0);
      int8_t* dst = vbp + ((u / 16) * 1024 + (4 * (u % 4) + (u % 16) / 4) * 64);
      __m512i z[4];
      for (int k = 0; k < 4; ++k) z[k] = r4[k] ? _mm512_maskz_loadu_epi8(m, r4[k] + 64 * c) : _mm512_setzero_si512();
      if (i4) {
        const __m512i p01a = _mm512_permutex2var_epi8(z[0], pa, z[1]), p01b = _mm512_permutex2var_epi8(z[0], pb, z[1]);
        const __m512i p23a = _mm512_permutex2var_epi8(z[2], pa, z[3]), p23b = _mm512_permutex2var_epi8(z[2], pb, z[3]);
        const __m512i y[4] = {_mm512_permutex2var_epi8(p01a, pc0, p23a), _mm512_permutex2var_epi8(p01a, pc1, p23a),
                              _mm512_permutex2var_epi8(p01b, pc0, p23b), _mm512_permutex2var_epi8(p01b, pc1, p23b)};
        for (int64_t jj = 0; jj < groups; ++jj) {
          int8_t* lo = dst + (2 * (4 * c + jj)) * (BN / 64) * 1024;
          put(lo, lo4(y[jj]));
          put(lo + (BN / 64) * 1024, hi4(y[jj]));
        }
      } else {
        const __m512i a = _mm512_unpacklo_epi8(z[0], z[1]), b = _mm512_unpackhi_epi8(z[0], z[1]);
        const __m512i cc = _mm512_unpacklo_epi8(z[2], z[3]), d = _mm512_unpackhi_epi8(z[2], z[3]);
        put(dst + (4 * c + 0) * (BN / 64) * 1024, _mm512_unpacklo_epi16(a, cc));
        put(dst + (4 * c + 1) * (BN / 64) * 1024, _mm512_unpackhi_epi16(a, cc));
        put(dst + (4 * c + 2) * (BN / 64) * 1024, _mm512_unpacklo_epi16(b, d));
        put(dst + (4 * c + 3) * (BN / 64) * 1024, _mm512_unpackhi_epi16(b, d));
      }
    }
  }
}

// Scores of key rows 16t .. 16t + 15 (B tiles in sb) for the query rows of g-block gb: the tile unit's part,
// int32 sums into cs_at(t) (int4: one tile per group; int8: hi and lo digits' sums).
void Worker::score_tiles(int64_t bh, int gb, int t) {
  const int8_t* __restrict const sbp = sb_at(t);
  int32_t* __restrict const csp = cs_at(t);
  const int64_t ngk = P.ngk, ktiles = P.ktiles;
  const int G8 = Gb;
  if (i4) {
    for (int64_t j = 0; j < ngk; j += 2) {
      _tile_loadd(4, P.qtile(bh, gb, j, 0), 64);
      _tile_loadd(6, sbp + j * 1024, 64);
      _tile_zero(0);
      _tile_dpbssd(0, 4, 6);
      if (j + 1 < ngk) {
        _tile_loadd(5, P.qtile(bh, gb, j + 1, 0), 64);
        _tile_loadd(7, sbp + (j + 1) * 1024, 64);
        _tile_zero(1);
        _tile_dpbssd(1, 5, 7);
      }
      _tile_stored(0, csp + j * G8 * 16, 64);
      if (j + 1 < ngk) _tile_stored(1, csp + (j + 1) * G8 * 16, 64);
    }
  } else {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t c = 0; c < ktiles; ++c) {
      _tile_loadd(4, P.qtile(bh, gb, c, 0), 64);
      _tile_loadd(5, P.qtile(bh, gb, c, 1), 64);
      _tile_loadd(6, sbp + c * 1024, 64);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 5, 6);
    }
    _tile_stored(0, csp, 64);
    _tile_stored(1, csp + G8 * 16, 64);
  }
}

// ... and the vector part: s_[g * BN + 16t ..] = q scale · sum over groups of key scale · int32 sum, plus `add`.
void Worker::score_sums(int64_t bh, int gb, int t, const float* add) {
  const __m512 addv = _mm512_loadu_ps(add);
  const int32_t* __restrict const csp = cs_at(t);
  const float* __restrict const kst = ks + 16 * t;
  float* __restrict const st = s_ + 16 * t;
  const float* qs = P.qsc + bh * P.G;
  const int64_t ngk = P.ngk;
  const int G8 = Gb, g0 = gb * G8, gn = static_cast<int>(std::min<int64_t>(G8, P.G - g0));
  if (i4) {
    for (int gr = 0; gr < gn; ++gr) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t j = 0; j < ngk; ++j)
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(csp + (j * G8 + gr) * 16)),
                              _mm512_load_ps(kst + j * BN), acc);
      _mm512_store_ps(st + (g0 + gr) * BN, _mm512_fmadd_ps(acc, _mm512_set1_ps(qs[g0 + gr]), addv));
    }
  } else {
    const __m512 kv = _mm512_load_ps(kst);
    for (int gr = 0; gr < gn; ++gr) {
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_load_si512(csp + gr * 16));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_load_si512(csp + (G8 + gr) * 16));
      _mm512_store_ps(st + (g0 + gr) * BN, _mm512_fmadd_ps(_mm512_fmadd_ps(hi, _mm512_set1_ps(256.0f), lo),
                                                           _mm512_mul_ps(kv, _mm512_set1_ps(qs[g0 + gr])), addv));
    }
  }
}

// Online softmax over the block: s_ becomes exp(score - the block's max) (<= 1: what weights() rounds), pf[g]
// the factor to the running max m; l and o are rescaled when m grows.
void Worker::softmax(float* m, float* l, float* o) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t Rvp = P.Rvp;
  for (int64_t g = 0; g < P.G; ++g) {
    float* sg = s_ + g * BN;
    __m512 vmax = _mm512_set1_ps(kNegInf);
    for (int r = 0; r < BN; r += 16) vmax = _mm512_max_ps(vmax, _mm512_load_ps(sg + r));
    const float bmax = _mm512_reduce_max_ps(vmax);
    if (bmax == kNegInf) {  // every row of the block masked
      std::fill(sg, sg + BN, 0.0f);
      pf[g] = 0.0f;
      continue;
    }
    const float mnew = std::max(m[g], bmax);
    if (m[g] != mnew) {
      const __m512 corr = _mm512_set1_ps(exp_nonpositive(m[g] - mnew));
      l[g] *= corr[0];
      float* og = o + g * Rvp;
      for (int64_t i = 0; i < Rvp; i += 16) _mm512_storeu_ps(og + i, _mm512_mul_ps(_mm512_loadu_ps(og + i), corr));
      m[g] = mnew;
    }
    const __m512 bm = _mm512_set1_ps(bmax);
    __m512 sum = _mm512_setzero_ps();
    for (int r = 0; r < BN; r += 16) {
      const __m512 p = exp_nonpositive16(_mm512_sub_ps(_mm512_load_ps(sg + r), bm));
      _mm512_store_ps(sg + r, p);
      sum = _mm512_add_ps(sum, p);
    }
    pf[g] = exp_nonpositive(bmax - mnew);
    l[g] += pf[g] * _mm512_reduce_add_ps(sum);
  }
}

// The block's value sums, o[g, :] += sum_n p · s_v · v. Per query row g and value group j (int8: one) the weights
// w = p · s_v are rounded to x = w · 32512 / max_n w, as two digits x = 256·hi + lo (hi = x >> 8 signed, lo =
// x & 255 unsigned) summed by two accumulators (TDPBSSD, TDPBUSD). Work item i = a pair of C tiles (int4: group i,
// its low and high nibbles; int8: C tiles 2i, 2i + 1 of the one group).

// A rows of group j for g-block gb: av[((gb * ngv + j) * 2 + digit) * (BN / 64) + step]. Packing four 16-lane
// vectors m keeps byte 16L + 4m + k = lane 4L + k of vector m, i.e. row 16m + 4L + k of the step (value_tiles'
// row order); the digits are split on 16-bit lanes.
void Worker::weights(int gb, int64_t j) {
  const int64_t ngv = P.ngv;
  const int G8 = Gb, g0 = gb * G8, gn = static_cast<int>(std::min<int64_t>(G8, P.G - g0));
  const float* __restrict const vj = vs + j * BN;
  int8_t* __restrict const a0 = av + ((gb * ngv + j) * 2 * (BN / 64)) * G8 * 64;
  const __m512i ff = _mm512_set1_epi16(255);
  for (int gr = 0; gr < gn; ++gr) {
    const int64_t g = g0 + gr;
    const float* pg = s_ + g * BN;
    __m512 w[BN / 16];
    __m512 mx = _mm512_setzero_ps();
    for (int v = 0; v < BN / 16; ++v) {
      w[v] = _mm512_mul_ps(_mm512_load_ps(pg + 16 * v), _mm512_load_ps(vj + 16 * v));
      mx = _mm512_max_ps(mx, w[v]);
    }
    const float wmax = _mm512_reduce_max_ps(mx);  // 0: the block's rows are masked or missing for g
    ps[g * ngv + j] = pf[g] * wmax / kQ8;
    const __m512 f = _mm512_set1_ps(wmax > 0 ? kQ8 / wmax : 0.0f);
    int8_t* a = a0 + gr * 64;
    for (int step = 0; step < BN / 64; ++step) {
      __m512i x[4];
      for (int v = 0; v < 4; ++v) x[v] = _mm512_cvtps_epi32(_mm512_mul_ps(w[4 * step + v], f));
      const __m512i x01 = _mm512_packs_epi32(x[0], x[1]), x23 = _mm512_packs_epi32(x[2], x[3]);
      put(a + step * G8 * 64, _mm512_packs_epi16(_mm512_srli_epi16(x01, 8), _mm512_srli_epi16(x23, 8)));
      put(a + ((BN / 64) + step) * G8 * 64, _mm512_packus_epi16(_mm512_and_si512(x01, ff), _mm512_and_si512(x23, ff)));
    }
  }
}

// The tile unit's part of work item i: int32 sums of C tiles (ct, ct + 1) by digit into cv_at(i).
void Worker::value_tile_ops(int gb, int64_t i) {
  const int64_t j = i4 ? i : 0, ct = 2 * i;
  const bool two = ct + 1 < P.vtiles;
  const int G8 = Gb;
  const int8_t* ahi = av + ((gb * P.ngv + j) * 2 * (BN / 64)) * G8 * 64;
  const int8_t* alo = ahi + (BN / 64) * G8 * 64;
  const int8_t* __restrict const vbp = vb_at(block);
  int32_t* __restrict const cvp = cv_at(i);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int step = 0; step < BN / 64; ++step) {
    _tile_loadd(4, ahi + step * G8 * 64, 64);
    _tile_loadd(5, alo + step * G8 * 64, 64);
    _tile_loadd(6, vbp + (ct * (BN / 64) + step) * 1024, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbusd(1, 5, 6);
    if (two) {
      _tile_loadd(7, vbp + ((ct + 1) * (BN / 64) + step) * 1024, 64);
      _tile_dpbssd(2, 4, 7);
      _tile_dpbusd(3, 5, 7);
    }
  }
  _tile_stored(0, cvp, 64);
  _tile_stored(1, cvp + G8 * 16, 64);
  if (two) {
    _tile_stored(2, cvp + 2 * G8 * 16, 64);
    _tile_stored(3, cvp + 3 * G8 * 16, 64);
  }
}

// ... and the vector part: o += weight scale · (256 · hi + lo).
void Worker::value_sums(int gb, int64_t i, float* o) {
  const int64_t ngv = P.ngv, Rvp = P.Rvp, j = i4 ? i : 0, ct = 2 * i;
  const bool two = ct + 1 < P.vtiles;
  const int G8 = Gb, g0 = gb * G8, gn = static_cast<int>(std::min<int64_t>(G8, P.G - g0));
  const int32_t* __restrict const cvp = cv_at(i);
  for (int gr = 0; gr < gn; ++gr) {
    const __m512 f = _mm512_set1_ps(ps[(g0 + gr) * ngv + j]);
    for (int k = 0; k < (two ? 2 : 1); ++k) {
      float* og = o + (g0 + gr) * Rvp + (ct + k) * 16;
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_load_si512(cvp + ((2 * k) * G8 + gr) * 16));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_load_si512(cvp + ((2 * k + 1) * G8 + gr) * 16));
      _mm512_storeu_ps(og, _mm512_fmadd_ps(_mm512_fmadd_ps(hi, _mm512_set1_ps(256.0f), lo), f, _mm512_loadu_ps(og)));
    }
  }
}

void Worker::run(int64_t task) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t G = P.G, N = P.N;
  const int64_t bh = task / P.chunks, c = task % P.chunks, b = bh / P.H, h = bh % P.H;
  const char* krows = P.kp + b * P.ksb + h * P.ksh;
  const char* vrows = P.vp + b * P.vsb + h * P.vsh;
  const int64_t n0 = c * P.chunk, n1 = std::min(N, n0 + P.chunk);
  float* m = P.part_m + task * G;
  float* l = P.part_l + task * G;
  float* o = P.part_o + task * G * P.Rvp;
  std::fill(m, m + G, kNegInf);
  std::fill(l, l + G, 0.0f);
  std::fill(o, o + G * P.Rvp, 0.0f);
  const char* kr[BN];
  const char* vr[BN];
  alignas(64) float add[BN];
  for (int64_t r0 = n0; r0 < n1; r0 += BN) {
    const int rows = static_cast<int>(std::min<int64_t>(BN, n1 - r0));
    for (int r = 0; r < BN; ++r) {
      kr[r] = r < rows ? krows + (r0 + r) * P.ksn : nullptr;
      vr[r] = r < rows ? vrows + (r0 + r) * P.vsn : nullptr;
    }
    const int64_t moff = (P.mask_b == 1 ? 0 : b) * N + r0;
    for (int r = 0; r < BN; ++r)
      add[r] = r >= rows ? kNegInf : P.mp ? P.mp[moff + r] : P.mbp && !P.mbp[moff + r] ? kNegInf : 0.0f;
    scales(kr, P.cbk, P.ngk, ks);
    if (!P.shared) scales(vr, P.cbv, P.ngv, vs);
    // Tile instructions run one after another on the tile unit; each batch is followed in program order by
    // vector work that does not wait for it (the next rows' layouts, the previous batch's sums), so the two overlap.
    const int T = (rows + 15) / 16;
    for (int t = 0; t < BN / 16; ++t) {
      if (t < T) {
        key_tiles(kr + 16 * t, t);
        for (int gb = 0; gb < NGB; ++gb) {
          score_tiles(bh, gb, t);
          if (gb + 1 < NGB) score_sums(bh, gb, t, add + 16 * t);
        }
      } else {  // missing rows
        for (int64_t g = 0; g < G; ++g) std::fill(s_ + g * BN + 16 * t, s_ + g * BN + 16 * t + 16, kNegInf);
      }
      value_tiles((P.shared ? kr : vr) + 16 * t, t);
      if (t > 0 && t - 1 < T) score_sums(bh, NGB - 1, t - 1, add + 16 * (t - 1));
    }
    if (T == BN / 16) score_sums(bh, NGB - 1, T - 1, add + 16 * (T - 1));
    softmax(m, l, o);
    const int64_t items = i4 ? P.ngv : (P.vtiles + 1) / 2;
    for (int gb = 0; gb < NGB; ++gb) {
      weights(gb, 0);
      for (int64_t i = 0; i < items; ++i) {
        value_tile_ops(gb, i);
        if (i4 && i + 1 < items) weights(gb, i + 1);
        if (i > 0) value_sums(gb, i - 1, o);
      }
      value_sums(gb, items - 1, o);
    }
    ++block;
  }
}

}  // namespace amx
#endif  // KVFX_AMX

}  // namespace

// Whether int8 / int4 rows take the integer path here: built with AMX-INT8 (and AVX-512 VBMI, GFNI), the CPU and the
// OS allow it at run time, and the environment variable KVFX_NO_AMX is unset (or "0"). Otherwise they are decoded to
// float32 like the 16/32-bit latents (the portable path; KVFX_NO_AMX=1 forces it, for tests and benchmarks).
bool integer_path() {
#if KVFX_AMX
  const char* off = std::getenv("KVFX_NO_AMX");
  return !(off && *off && std::strcmp(off, "0") != 0) && amx::ready();
#else
  return false;
#endif
}

// q [B, H, G, Rk] float32; kc [B, H, N, kb] and vc [B, H, N, vb], any strides with contiguous rows (vc is ignored
// when shared: V = K rows): int8 rows of codes (bits 8 or 4, kvfx/quant.py) or, bits 0, float32 / bfloat16 / float16
// latents of width Rk / Rv; mask: None or [B or 1, N], bool (true = attend) or float32 (added to the scores).
// Returns [B, H, G, Rv] float32. int4 rows decode as [even columns | odd columns] (decode_row), and the integer path
// has its own column order (amx): the query is gathered into that order and the output scattered back here.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, int64_t rk, int64_t rv,
                               int64_t bits, double scale, c10::optional<torch::Tensor> mask_opt, bool shared) {
  TORCH_CHECK(q.dim() == 4 && kc.dim() == 4 && q.scalar_type() == torch::kFloat32, "q must be [B, H, G, R] float32");
  Kind kind;
  if (bits == 8 || bits == 4) {
    TORCH_CHECK(kc.scalar_type() == torch::kInt8, "codes must be int8");
    kind = bits == 8 ? kInt8 : kInt4;
  } else {
    TORCH_CHECK(bits == 0, "bits must be 8, 4 or 0 (float latents)");
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
  const Format fk(kind, rk), fv(kind, rv);
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
  const bool use_amx = (kind == kInt8 || kind == kInt4) && rk > 0 && rv > 0 && integer_path();
  // decoded rows are zero-padded to whole vectors; a block of rows (a multiple of 16) stays within ~24 KiB. The
  // integer path accumulates whole value tiles: int4 32 columns a group, int8 64 a chunk.
  const int64_t Rkp = round_up(std::max<int64_t>(Rk, 1), W);
  const int64_t Rvp = !use_amx ? round_up(std::max<int64_t>(Rv, 1), W) : round_up(rv, kind == kInt4 ? 32 : 64);
  // the output column of each accumulated one (-1: padding)
  std::vector<int64_t> columns(Rvp);
  for (int64_t j = 0; j < Rvp; ++j) {
    int64_t col = j < Rv ? source(fv, j) : -1;
    if (use_amx) {  // int4: tile (group, nibble) lane i = column 32·group + 2i + nibble; int8 see value_tiles
      const int64_t tile = j / 16, lane = j % 16;
      col = kind == kInt4 ? 32 * (tile / 2) + 2 * lane + tile % 2
                          : 64 * (tile / 4) + 16 * (lane / 4) + 4 * (tile % 4) + lane % 4;
    }
    columns[j] = col < rv ? col : -1;
  }
  const int64_t nvk = Rkp / W, nvv = Rvp / W;
  const int64_t row_floats = Rkp + (shared ? 0 : Rvp);
  const int block = static_cast<int>(std::clamp<int64_t>(24576 / (4 * row_floats) / 16 * 16, 16, 128));

  float lut[256];
  for (int e = -128; e < 128; ++e) lut[e + 128] = std::exp2(static_cast<float>(e) / 8.0f);

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

#if KVFX_AMX
  if (use_amx) {
    amx::Problem pr;
    pr.kind = kind, pr.shared = shared, pr.B = B, pr.H = H, pr.G = G, pr.N = N, pr.chunk = chunk, pr.chunks = chunks;
    pr.rk = rk, pr.rv = rv, pr.cbk = fk.code_bytes, pr.cbv = fv.code_bytes;
    pr.ngk = kind == kInt4 ? (rk + 31) / 32 : 1, pr.ngv = kind == kInt4 ? (rv + 31) / 32 : 1;
    pr.ktiles = kind == kInt4 ? pr.ngk : (rk + 63) / 64, pr.vtiles = Rvp / 16, pr.Rvp = Rvp;
    pr.Gb = static_cast<int>(std::min<int64_t>(G, 16)), pr.NGB = static_cast<int>((G + pr.Gb - 1) / pr.Gb);
    std::vector<int8_t> qdigits(B * H * pr.NGB * pr.ktiles * pr.digits() * pr.Gb * 64 + 64, 0);
    std::vector<float> qscales(B * H * G);
    int8_t* qa = reinterpret_cast<int8_t*>(round_up(reinterpret_cast<int64_t>(qdigits.data()), 64));
    pr.qa = qa, pr.qsc = qscales.data();
    amx::quantize_queries(pr, qp, sc, qa, qscales.data());
    pr.kp = kp, pr.vp = vp;
    pr.ksb = ksb, pr.ksh = ksh, pr.ksn = ksn, pr.vsb = vsb, pr.vsh = vsh, pr.vsn = vsn;
    pr.mp = mp, pr.mbp = mbp, pr.mask_b = mask_b, pr.lut = lut;
    pr.part_m = part_m.data(), pr.part_l = part_l.data(), pr.part_o = part_o.data();
    at::parallel_for(0, B * H * chunks, 1, [&](int64_t begin, int64_t end) {
      amx::Worker worker(pr);
      for (int64_t task = begin; task < end; ++task) worker.run(task);
    });
  } else
#endif
  at::parallel_for(0, B * H * chunks, 1, [&](int64_t begin, int64_t end) {
    // zero-initialised: the padding columns stay zero (decode_row writes the first Rk / Rv columns only)
    std::vector<float> kbuf(block * Rkp, 0.0f), vbuf(shared ? 0 : block * Rvp, 0.0f), s(G * block), qs(G * Rkp, 0.0f);
    const float* vb = shared ? kbuf.data() : vbuf.data();
    const int64_t ldv = shared ? Rkp : Rvp;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / chunks, c = task % chunks, b = bh / H, h = bh % H;
      const char* krows = kp + b * ksb + h * ksh;
      const char* vrows = vp + b * vsb + h * vsh;
      const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
      for (int64_t g = 0; g < G; ++g)  // the softmax scale folded into the query rows
        for (int64_t j = 0; j < Rk; ++j) {
          const int64_t col = source(fk, j);
          qs[g * Rkp + j] = col < 0 ? 0.0f : sc * qp[(bh * G + g) * rk + col];
        }
      float* m = &part_m[task * G];
      float* l = &part_l[task * G];
      float* o = &part_o[task * G * Rvp];
      std::fill(m, m + G, kNegInf);
      std::fill(l, l + G, 0.0f);
      std::fill(o, o + G * Rvp, 0.0f);
      for (int64_t r0 = n0; r0 < n1; r0 += block) {
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
            add[j] = t + j >= rows ? kNegInf : mrow ? mrow[t + j] : mbrow && !mbrow[t + j] ? kNegInf : 0.0f;
          const vf av = load(add);
          for (int64_t g = 0; g < G; ++g) store(&s[g * block + t], dot16(&qs[g * Rkp], &kbuf[t * Rkp], Rkp, nvk) + av);
        }
        // online softmax per query row (the block's probabilities overwrite its scores), then the block's values
        for (int64_t g = 0; g < G; ++g) {
          float* sg = &s[g * block];
          vf vmax = vf{} + kNegInf;  // spare rows hold -inf
          for (int r = 0; r < padded; r += 16) { const vf x = load(sg + r); vmax = x > vmax ? x : vmax; }
          float bmax = kNegInf;
          for (int j = 0; j < W; ++j) bmax = std::max(bmax, vmax[j]);
          if (bmax == kNegInf) {  // every row of the block masked
            std::fill(sg, sg + padded, 0.0f);
            continue;
          }
          const float mnew = std::max(m[g], bmax);
          if (m[g] != mnew) {
            const float corr = exp_nonpositive(m[g] - mnew);
            l[g] *= corr;
            float* og = o + g * Rvp;
            for (int64_t i = 0; i < Rvp; ++i) og[i] *= corr;
          }
          m[g] = mnew;
          float sum = 0.0f;
          for (int r = 0; r < padded; ++r) {
            sg[r] = r < rows ? exp_nonpositive(sg[r] - mnew) : 0.0f;
            sum += sg[r];
          }
          l[g] += sum;
        }
        accumulate_values(s.data(), block, vb, ldv, padded, o, Rvp, G, nvv);
      }
    }
  });

  auto out = torch::empty({B, H, G, rv}, q.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(Rvp);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / G, g = i % G;
      float mmax = kNegInf;
      for (int64_t c = 0; c < chunks; ++c) mmax = std::max(mmax, part_m[(bh * chunks + c) * G + g]);
      float* dst = op + i * rv;
      if (mmax == kNegInf) {  // every key masked: SDPA gives NaN
        std::fill(dst, dst + rv, std::numeric_limits<float>::quiet_NaN());
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
      const float inv = 1.0f / total;  // one division a row: a division a column cost ~1 us a call
      for (int64_t j = 0; j < Rvp; ++j)
        if (columns[j] >= 0) dst[columns[j]] = acc[j] * inv;
    }
  });
  return out;
}

// The integer path of kvfx's decode kernel (int8 / int4 rows on the AMX tile unit). Not a standalone header:
// lowbit_attention.py pastes it into lowbit_attention.cpp where that file says `#include "lowbit_attention_amx.h"`
// (inside its anonymous namespace, after its includes and float helpers), so the build's source hash covers it.
// Built where the CPU has AVX-512 VBMI / VNNI and GFNI (KVFX_INT): the parts every integer block shares (Problem,
// the query digits, block scales, the online softmax) and the VNNI blocks; the tile unit's Worker and the bands on
// top of them only with AMX-INT8 (KVFX_AMX).
#if KVFX_INT
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

// Where a block's time goes: time-stamp-counter cycles of each stage, summed over the threads, and the rows
// (benchmarks/kernel.py --stages builds with -DKVFX_STAGE_CYCLES; other builds count nothing). The VNNI blocks count
// 0 scale codes, 1 key scores, 2 softmax, 3 weights, 4 value sums; the tile unit's (Worker) 0 transcoding and scale
// codes, 1 key and value layouts with the key products and score sums, 2 softmax, 4 weights with the value products.
#ifdef KVFX_STAGE_CYCLES
std::atomic<uint64_t> stage_cycles[6];  // scale codes, key scores, softmax, weights, value sums; rows
inline uint64_t stage_clock() { return __rdtsc(); }
#else
inline uint64_t stage_clock() { return 0; }
#endif
// A block of `rows` rows whose stage slots[i] ran from clock at[i] to at[i + 1].
template <size_t N>
inline void stage_counts(const uint64_t (&at)[N], const int (&slots)[N - 1], int rows) {
#ifdef KVFX_STAGE_CYCLES
  for (size_t i = 0; i + 1 < N; ++i) stage_cycles[slots[i]].fetch_add(at[i + 1] - at[i], std::memory_order_relaxed);
  stage_cycles[5].fetch_add(rows, std::memory_order_relaxed);
#endif
}

#if KVFX_AMX
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
#endif  // KVFX_AMX

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

// Controls of transcode_rows (lowbit_attention_bands.h): int3 / int5 band codes -> k = 2q + 1.
constexpr int kT3Src[8] = {-1, 0, 1, 4, -1, 2, 3, 5};  // bits 0, 4 set by the constant 0x11
constexpr int kT5Src[8] = {-1, 0, 1, 2, 3, 4, 4, 4};   // bit 0 set by the constant 0x01
struct TransCtl {
  __m512i idx3, idx5, a3, b3, a5, b5, pair5;
  TransCtl() {
    alignas(64) int8_t i3[64], i5[64], sa3[64], sb3[64], sa5[64], sb5[64], p5[64];
    for (int k = 0; k < 64; ++k)  // lane L: columns 8L .. 8L + 7 of the first 32, then of the second
      p5[k] = static_cast<int8_t>((k % 16 < 8 ? 0 : 32) + k / 16 * 8 + k % 8);
    for (int q = 0; q < 8; ++q)
      for (int j = 0; j < 8; ++j) {
        const int k = 8 * q + j;
        i3[k] = static_cast<int8_t>(j < 4 ? 4 * q + j : j < 6 ? 64 + 2 * q + j - 4 : 0);
        i5[k] = static_cast<int8_t>(j < 4 ? 4 * q + j : j == 4 ? 64 + q : 0);
        sa3[k] = sa5[k] = static_cast<int8_t>(4 * j);  // the low bits of columns 2j, 2j + 1 (int3) / of column j (int5)
        sb3[k] = static_cast<int8_t>(28 + 2 * j);      // bits 4, 5 <- sign bits 2j, 2j + 1
        sb5[k] = static_cast<int8_t>(28 + j);          // bit 4 <- sign bit j
      }
    idx3 = _mm512_load_si512(i3), idx5 = _mm512_load_si512(i5);
    a3 = _mm512_load_si512(sa3), b3 = _mm512_load_si512(sb3), a5 = _mm512_load_si512(sa5), b5 = _mm512_load_si512(sb5);
    pair5 = _mm512_load_si512(p5);
  }
};
inline const TransCtl& trans_ctl() {  // built once a process
  static const TransCtl t;
  return t;
}
struct BandPlan;  // bands (lowbit_attention_bands.h)
inline void shared_value_scales(const float* ks, const BandPlan& K, const BandPlan& V, float* vs);

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
  int64_t krow = 0, vrow = 0;         // bytes of a stored key / value row (what is read of it)
  const float* mp;
  const bool* mbp;
  int64_t mask_b;
  const float* lut;
  const uint8_t* skip = nullptr;    // per cached row: 1 where an exact row stands for its codes (score -inf)
  bool plain_scales = false;        // VNNI blocks without AMX: one-scale rows' codes by plain loads (VnniWorker::scales)
  int ktrans = 0, vtrans = 0;       // bands: bytes of a transcoded key / value row (int3 / int5 bands; 0: none)
  float *part_m, *part_l, *part_o;
  const BandPlan* plan = nullptr;   // bands: the key rows' units (ktiles of them) and score groups (ngk)
  const BandPlan* vplan = nullptr;  // bands: the value rows' (vtiles C tiles, ngv weight groups)
  int64_t cslots;                   // int32 C slots of one batch of scores (int4: ngk; int8: 2; bands: plan)
  std::vector<int> item_ct, item_ws;  // value work items: C tiles (ct, ct + 1 if < vtiles) and their weight group

  int digits() const { return kind == kInt4 ? 1 : 2; }  // A tiles per key unit (int4: both digits in one row;
                                                        // bands: two, the 4/2-bit units use the first)
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

// 2^(e/8) of 16 scale codes e (int32 lanes) = 2^((e&7) / 8) · 2^(e>>3): a permute of l8 (lut[128 .. 135], see
// lut8_of) and VSCALEFPS.
inline __m512 scale_of(__m512i e, __m512 l8) {
  return _mm512_scalef_ps(_mm512_permutexvar_ps(_mm512_and_si512(e, _mm512_set1_epi32(7)), l8),
                          _mm512_cvtepi32_ps(_mm512_srai_epi32(e, 3)));
}
inline __m512 lut8_of(const float* lut) {
  alignas(64) float l8[16] = {};
  for (int b = 0; b < 8; ++b) l8[b] = lut[128 + b];
  return _mm512_load_ps(l8);
}

// The block's scale codes -> out[j * BN + r] = 2^(e/8), 0 for missing rows. Several groups: 16 rows at a time,
// transposed, scale_of each.
void block_scales(const char* const* rows, int64_t cb, int64_t ng, const float* lut, __m512 l8, float* out) {
  if (ng == 1) {
    for (int r = 0; r < BN; ++r) out[r] = rows[r] ? lut[reinterpret_cast<const int8_t*>(rows[r])[cb] + 128] : 0.0f;
    return;
  }
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
        _mm512_store_ps(out + j * BN + r0, _mm512_maskz_mov_ps(valid, scale_of(e, l8)));
      }
    }
  }
}

// Online softmax over a block of BN rows (s_ [G, BN]): s_ becomes exp(score - the block's max) (<= 1: what the
// weights' rounding takes), pf[g] the factor to the running max m; l and o are rescaled when m grows.
void block_softmax(float* s_, float* pf, int64_t G, int64_t Rvp, float* m, float* l, float* o) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t g = 0; g < G; ++g) {
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

// A split-K task's (batch, head), rows and token range, and its partial results (running max, sum and value
// accumulators) initialised: what Worker::run and VnniWorker::run start from.
struct TaskRows {
  int64_t bh, b, n0, n1;
  const char *krows, *vrows;
  float *m, *l, *o;
};
inline TaskRows task_rows(const Problem& P, int64_t task) {
  TaskRows t;
  t.bh = task / P.chunks, t.b = t.bh / P.H;
  const int64_t c = task % P.chunks, h = t.bh % P.H;
  t.krows = P.kp + t.b * P.ksb + h * P.ksh, t.vrows = P.vp + t.b * P.vsb + h * P.vsh;
  t.n0 = c * P.chunk, t.n1 = std::min(P.N, t.n0 + P.chunk);
  t.m = P.part_m + task * P.G, t.l = P.part_l + task * P.G, t.o = P.part_o + task * P.G * P.Rvp;
  std::fill(t.m, t.m + P.G, -std::numeric_limits<float>::infinity());
  std::fill(t.l, t.l + P.G, 0.0f);
  std::fill(t.o, t.o + P.G * P.Rvp, 0.0f);
  return t;
}

// o[0 .. 16) += f · (256 · hi + lo): a C tile's two digits' int32 sums of the value weights, scaled into the float
// accumulators.
inline void add_digit_sums(float* og, __m512i hi, __m512i lo, __m512 f) {
  _mm512_storeu_ps(og, _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_set1_ps(256.0f),
                                                       _mm512_cvtepi32_ps(lo)), f, _mm512_loadu_ps(og)));
}

// A block's value weights w = p · s_v of one query row and value group (p: the softmax's, s_v: the rows' scales),
// 16 rows a vector; returns their largest.
inline float value_weights(const float* p, const float* sv, __m512* w) {
  __m512 mx = _mm512_setzero_ps();
  for (int v = 0; v < BN / 16; ++v) {
    w[v] = _mm512_mul_ps(_mm512_load_ps(p + 16 * v), _mm512_load_ps(sv + 16 * v));
    mx = _mm512_max_ps(mx, w[v]);
  }
  return _mm512_reduce_max_ps(mx);
}

// What a block's scores add: the mask's, -inf for rows skipped (exact rows) or missing (past `rows`).
inline void block_add(const Problem& P, int64_t b, int64_t r0, int rows, float* add) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t moff = (P.mask_b == 1 ? 0 : b) * P.N + r0;
  if (!P.skip && !P.mp && !P.mbp) {
    std::fill(add, add + rows, 0.0f);
  } else {
    for (int r = 0; r < rows; ++r)
      add[r] = P.skip && P.skip[r0 + r] ? kNegInf : P.mp ? P.mp[moff + r] : P.mbp && !P.mbp[moff + r] ? kNegInf : 0.0f;
  }
  std::fill(add + rows, add + BN, kNegInf);
}

#if KVFX_AMX
// One thread's tiles and buffers (thread-local, reused across calls); run(task) = one (batch, head, chunk of rows).
class Worker {
 public:
  explicit Worker(const Problem& p) : P(p), i4(p.kind == kInt4), Gb(p.Gb), NGB(p.NGB) {
    for (int t = 0; t < 6; ++t) cfg.rows[t] = static_cast<uint8_t>(Gb), cfg.colsb[t] = 64;  // C 0-3, A 4-5
    for (int t = 6; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;                         // B 6-7
    size_t used = 0;
    auto take = [&](size_t bytes) { const size_t at = used; used += round_up(bytes, 64); return at; };
    const bool same_scales = P.shared && !P.plan;  // bands: the key scales carry multipliers (BandPlan::Scales)
    const size_t o_ks = take(4 * P.ngk * BN), o_vs = take(same_scales ? 0 : 4 * P.ngv * BN),
                 o_sb = take(2 * P.ktiles * 1024), o_cs = take(2 * 4 * std::max<int64_t>(P.cslots, 2) * Gb * 16),
                 o_s = take(4 * P.G * BN), o_vb = take(2 * P.vtiles * (BN / 64) * 1024),
                 o_av = take(NGB * P.ngv * 2 * (BN / 64) * Gb * 64), o_ps = take(4 * P.G * P.ngv),
                 o_cv = take(2 * 4 * 4 * Gb * 16), o_pf = take(4 * P.G),
                 o_tk = take(BN * P.ktrans), o_tv = take(P.shared ? 0 : BN * P.vtrans);
    static thread_local std::vector<char> scratch;
    if (scratch.size() < used + 64) scratch.resize(used + 64);
    char* base = reinterpret_cast<char*>(round_up(reinterpret_cast<int64_t>(scratch.data()), 64));
    ks = reinterpret_cast<float*>(base + o_ks);
    vs = same_scales ? ks : reinterpret_cast<float*>(base + o_vs);
    sb = reinterpret_cast<int8_t*>(base + o_sb);
    cs = reinterpret_cast<int32_t*>(base + o_cs);
    s_ = reinterpret_cast<float*>(base + o_s);
    vb = reinterpret_cast<int8_t*>(base + o_vb);
    av = reinterpret_cast<int8_t*>(base + o_av);
    ps = reinterpret_cast<float*>(base + o_ps);
    cv = reinterpret_cast<int32_t*>(base + o_cv);
    pf = reinterpret_cast<float*>(base + o_pf);
    tk = reinterpret_cast<int8_t*>(base + o_tk);
    tv = reinterpret_cast<int8_t*>(base + o_tv);
    const int gn = static_cast<int>(P.G - (NGB - 1) * Gb);  // rows of the last g-block: the rest of its A rows stay 0
    for (int64_t i = 0; i < P.ngv * 2 * (BN / 64); ++i)
      std::memset(av + (((NGB - 1) * P.ngv * 2 * (BN / 64) + i) * Gb + gn) * 64, 0, (Gb - gn) * 64);
    lut8 = lut8_of(P.lut);
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
  int8_t *sb, *vb, *av, *tk, *tv;  // tk, tv: a block's transcoded key / value rows (bands with int3 / int5)
  float *ks, *vs, *s_, *ps, *pf;
  int32_t *cs, *cv;

  int64_t block = 0;  // blocks done (for vb_at)

  void scales(const char* const* rows, int64_t cb, int64_t ng, float* out) const {
    block_scales(rows, cb, ng, P.lut, lut8, out);
  }
  void key_tiles(const char* const* rows, int8_t* sbp, bool four, int64_t at, int64_t cb, int64_t n);
  void value_tiles(const char* const* rows, int t, bool four, int64_t at, int64_t cb, int64_t n, int64_t ct0);
  // double buffers: what the tile unit may still be reading is not overwritten by the vector work that follows
  int8_t* sb_at(int t) const { return sb + (t % 2) * P.ktiles * 1024; }
  int8_t* vb_at(int64_t b) const { return vb + (b % 2) * P.vtiles * (BN / 64) * 1024; }
  int32_t* cs_at(int t) const { return cs + (t % 2) * std::max<int64_t>(P.cslots, 2) * Gb * 16; }
  int32_t* cv_at(int64_t i) const { return cv + (i % 2) * 4 * Gb * 16; }
  void score_tiles(int64_t bh, int gb, int t);
  void score_sums(int64_t bh, int gb, int t, const float* add);
  void softmax(float* m, float* l, float* o) { block_softmax(s_, pf, P.G, P.Rvp, m, l, o); }
  void weights(int gb, int64_t j);
  void value_sums(int gb, int64_t i, float* o);
  void value_tile_ops(int gb, int64_t i);
  // bands (lowbit_attention_amx_bands.h)
  void band_scales(const char* const* rows, const BandPlan& plan, float* out) const;
  void band_key_tiles(const char* const* rows, const char* const* trows, int t);
  void band_value_tiles(const char* const* rows, const char* const* trows, int t);
  void transcode(const char* const* rows, int n, const BandPlan& plan, int8_t* buf, const char** out, bool keys,
                 bool values) const;
  void band_score_tiles(int64_t bh, int gb, int t);
  void band_sums(const int32_t* csp, const float* kst, float* st, const float* qs, int g0, int gn, __m512 addv) const;
};

// The B tiles of 16 key rows: sb[unit * 1024], 16 rows of 64 bytes, row i byte 4n + b = key row n's code of
// column col(i, b). int4 group j: rows 2d, 2d + 1 = 16 · the low, high nibbles of the group's dword d, rows 8 + 2d,
// 9 + 2d the same unscaled. int8 chunk c: row d = columns 64c + 4d .. 64c + 4d + 3.
// (A run of int4 or int8 codes from byte `at` of each row, `cb` bytes: `n` groups (int4) or columns (int8), into
// the tiles from sbp; bands call it per band, lowbit_attention_amx_bands.h.)
void Worker::key_tiles(const char* const* rows, int8_t* __restrict sbp, bool four, int64_t at, int64_t cb, int64_t n) {
  const int64_t ngk = n, nch = four ? (16 * n + 63) / 64 : (n + 63) / 64;
  for (int64_t c = 0; c < nch; ++c) {
    const __mmask64 m = first_bytes(cb - 64 * c);
    __m512i z[16];
    for (int r = 0; r < 16; ++r)
      z[r] = rows[r] ? _mm512_maskz_loadu_epi8(m, rows[r] + at + 64 * c) : _mm512_setzero_si512();
    transpose16(z);
    if (four) {
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
// (Arguments as key_tiles'; the tiles from C tile ct0.)
void Worker::value_tiles(const char* const* rows, int t, bool four, int64_t at, int64_t cbv, int64_t n,
                         int64_t ct0) {  // rows 16t .. 16t + 15 of the block
  const int u0 = 4 * t;
  int8_t* __restrict const vbp = vb_at(block) + ct0 * (BN / 64) * 1024;
  const int64_t nch = four ? (16 * n + 63) / 64 : (n + 63) / 64, ngv = n;
  const __m512i pa = perm.a, pb = perm.b, pc0 = perm.c0, pc1 = perm.c1;
  for (int64_t c = 0; c < nch; ++c) {
    const __mmask64 m = first_bytes(cbv - 64 * c);
    const int64_t groups = std::min<int64_t>(4, ngv - 4 * c);
    for (int u = u0; u < u0 + 4; ++u) {
      const char* const* r4 = rows + 4 * (u - u0);
      int8_t* dst = vbp + ((u / 16) * 1024 + (4 * (u % 4) + (u % 16) / 4) * 64);
      __m512i z[4];
      for (int k = 0; k < 4; ++k)
        z[k] = r4[k] ? _mm512_maskz_loadu_epi8(m, r4[k] + at + 64 * c) : _mm512_setzero_si512();
      if (four) {
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
  if (P.plan) {  // bands: per score group its sum (8-bit groups: 256 · hi + lo) times the group's key scale
    band_sums(csp, kst, st, qs, g0, gn, addv);
  } else if (i4) {
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
    __m512 w[BN / 16];
    const float wmax = value_weights(s_ + g * BN, vj, w);  // 0: the block's rows are masked or missing for g
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
  const int64_t j = P.item_ws[i], ct = P.item_ct[i];
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
  const int64_t ngv = P.ngv, Rvp = P.Rvp, j = P.item_ws[i], ct = P.item_ct[i];
  const bool two = ct + 1 < P.vtiles;
  const int G8 = Gb, g0 = gb * G8, gn = static_cast<int>(std::min<int64_t>(G8, P.G - g0));
  const int32_t* __restrict const cvp = cv_at(i);
  for (int gr = 0; gr < gn; ++gr) {
    const __m512 f = _mm512_set1_ps(ps[(g0 + gr) * ngv + j]);
    for (int k = 0; k < (two ? 2 : 1); ++k) {
      add_digit_sums(o + (g0 + gr) * Rvp + (ct + k) * 16, _mm512_load_si512(cvp + ((2 * k) * G8 + gr) * 16),
                     _mm512_load_si512(cvp + ((2 * k + 1) * G8 + gr) * 16), f);
    }
  }
}

void Worker::run(int64_t task) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const TaskRows T0 = task_rows(P, task);
  const int64_t G = P.G, bh = T0.bh, b = T0.b, n0 = T0.n0, n1 = T0.n1;
  const char *krows = T0.krows, *vrows = T0.vrows;
  float *m = T0.m, *l = T0.l, *o = T0.o;
  const char* kr[BN];
  const char* vr[BN];
  const char* tkr[BN];  // transcoded rows (bands with int3 / int5)
  const char* tvr[BN];
  alignas(64) float add[BN];
  for (int64_t r0 = n0; r0 < n1; r0 += BN) {
    const int rows = static_cast<int>(std::min<int64_t>(BN, n1 - r0));
    for (int r = 0; r < BN; ++r) {
      kr[r] = r < rows ? krows + (r0 + r) * P.ksn : nullptr;
      vr[r] = r < rows ? vrows + (r0 + r) * P.vsn : nullptr;
    }
    const int64_t next = std::min<int64_t>(BN, n1 - r0 - rows);  // the next block's rows, while this one is worked on
    prefetch_rows(krows + (r0 + rows) * P.ksn, next, P.ksn, P.krow);
    if (!P.shared) prefetch_rows(vrows + (r0 + rows) * P.vsn, next, P.vsn, P.vrow);
    block_add(P, b, r0, rows, add);
    const uint64_t c0 = stage_clock();
    if (P.plan) {
      transcode(kr, rows, *P.plan, tk, tkr, true, P.shared);  // a shared latent's values read the key rows
      if (!P.shared) transcode(vr, rows, *P.vplan, tv, tvr, false, true);

      band_scales(kr, *P.plan, ks);
      if (P.shared) shared_value_scales(ks, *P.plan, *P.vplan, vs);
      else band_scales(vr, *P.vplan, vs);
    } else {
      scales(kr, P.cbk, P.ngk, ks);
      if (!P.shared) scales(vr, P.cbv, P.ngv, vs);
    }
    const uint64_t c1 = stage_clock();
    // Tile instructions run one after another on the tile unit; each batch is followed in program order by
    // vector work that does not wait for it (the next rows' layouts, the previous batch's sums), so the two overlap.
    const int T = (rows + 15) / 16;
    for (int t = 0; t < BN / 16; ++t) {
      if (t < T) {
        if (P.plan) band_key_tiles(kr + 16 * t, tkr + 16 * t, t);
        else key_tiles(kr + 16 * t, sb_at(t), i4, 0, P.cbk, i4 ? P.ngk : P.rk);
        for (int gb = 0; gb < NGB; ++gb) {
          P.plan ? band_score_tiles(bh, gb, t) : score_tiles(bh, gb, t);
          if (gb + 1 < NGB) score_sums(bh, gb, t, add + 16 * t);
        }
      } else {  // missing rows
        for (int64_t g = 0; g < G; ++g) std::fill(s_ + g * BN + 16 * t, s_ + g * BN + 16 * t + 16, kNegInf);
      }
      const char* const* vrows16 = (P.shared ? kr : vr) + 16 * t;
      if (P.plan) band_value_tiles(vrows16, (P.shared ? tkr : tvr) + 16 * t, t);
      else value_tiles(vrows16, t, i4, 0, P.cbv, i4 ? P.ngv : P.rv, 0);
      if (t > 0 && t - 1 < T) score_sums(bh, NGB - 1, t - 1, add + 16 * (t - 1));
    }
    if (T == BN / 16) score_sums(bh, NGB - 1, T - 1, add + 16 * (T - 1));
    const uint64_t c2 = stage_clock();
    softmax(m, l, o);
    const uint64_t c3 = stage_clock();
    const int64_t items = static_cast<int64_t>(P.item_ct.size());
    for (int gb = 0; gb < NGB; ++gb) {
      weights(gb, P.item_ws[0]);
      for (int64_t i = 0; i < items; ++i) {
        value_tile_ops(gb, i);
        if (i + 1 < items && P.item_ws[i + 1] != P.item_ws[i]) weights(gb, P.item_ws[i + 1]);
        if (i > 0) value_sums(gb, i - 1, o);
      }
      value_sums(gb, items - 1, o);
    }
    stage_counts({c0, c1, c2, c3, stage_clock()}, {0, 1, 2, 4}, rows);
    ++block;
  }
}

#endif  // KVFX_AMX
#include "lowbit_attention_bands.h"  // bands: units, transcoding, query digits; pasted in by lowbit_attention.py
#if KVFX_AMX
#include "lowbit_attention_amx_bands.h"  // bands on the tile unit, likewise
#endif  // KVFX_AMX
#include "lowbit_attention_vnni.h"        // int4 / int8 rows on AVX-512 VNNI, likewise
#include "lowbit_attention_vnni_bands.h"  // bands on AVX-512 VNNI, likewise
}  // namespace amx
#endif  // KVFX_INT

// int4 rows decoded in registers (AVX2, float arithmetic): pasted into lowbit_attention.cpp by lowbit_attention.py.
//
// Whole-row int4 codes (kvfx/quant.py: R / 2 bytes of two codes, low nibble first, then one scale code per 32
// numbers), R a multiple of 16, keys and values in their own rows. The float path decodes a block of rows into a
// float32 buffer and reads it back; on this project's CPU (AMD EPYC, which GCC's -march=native takes for Zen 1:
// 128-bit units, one store a cycle) writing that buffer — two 128-bit stores per 8 numbers — was most of a decode
// step's attention. Here 8 code bytes become 16 floats in registers (sign-extend, shift, convert) where they are
// consumed: a key row's meet the query rows at once (scaled by their group's scale), a value row's are weighted by
// p · s (the softmax weight times the row's group scale). The same numbers as the float path up to float32
// round-off (another order of the same products); nothing is rounded.
#if KVFX_AVX2
namespace q4 {

// Scores of GQ (<= 3) query rows against 4 key rows: s[g * lds + j] = q[g] . k[j] + add[j]. q (stride ldq) is in
// decode_row's order ([low nibbles | high nibbles]: column 2i at i, column 2i + 1 at cb + i) and scaled; rows of
// cb code bytes and their scale codes, ld bytes apart.
template <int GQ>
inline void scores4(const float* __restrict q, int64_t ldq, const int8_t* __restrict row, int64_t ld, int cb,
                    const float* lut, const float* add, float* __restrict s, int64_t lds) {
  __m256 acc[GQ][4];
#pragma GCC unroll 3
  for (int g = 0; g < GQ; ++g)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[g][j] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const int8_t* r = row + j * ld;
    for (int c = 0; c < cb; c += 8) {  // 8 code bytes: 8 low nibbles and 8 high ones of one scale group
      const __m256 sc = _mm256_set1_ps(lut[r[cb + c / 16] + 128]);
      const __m256i w = load8_epi32(r + c);
      const __m256 lo = _mm256_mul_ps(sc, nibble_lo(w)), hi = _mm256_mul_ps(sc, nibble_hi(w));
#pragma GCC unroll 3
      for (int g = 0; g < GQ; ++g) {
        acc[g][j] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(q + g * ldq + c), acc[g][j]);
        acc[g][j] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(q + g * ldq + cb + c), acc[g][j]);
      }
    }
  }
  const __m128 a = _mm_loadu_ps(add);
#pragma GCC unroll 3
  for (int g = 0; g < GQ; ++g) _mm_storeu_ps(s + g * lds, _mm_add_ps(reduce4(acc[g]), a));
}

// o[g, ·] += sum_r p[g, r] · (row r's numbers) for GT (<= 3) query rows, over the 16 numbers of code bytes
// [c, c + 8) of n value rows (decode_row's order: the low nibbles' at o + c, the high ones' at o + cb + c).
template <int GT>
inline void values8(const float* __restrict p, int64_t ldp, const int8_t* __restrict rows, int64_t ld, int n, int cb,
                    int c, const float* lut, float* __restrict o, int64_t ldo) {
  __m256 acc[GT][2];
#pragma GCC unroll 3
  for (int g = 0; g < GT; ++g)
    acc[g][0] = _mm256_loadu_ps(o + g * ldo + c), acc[g][1] = _mm256_loadu_ps(o + g * ldo + cb + c);
  for (int r = 0; r < n; ++r) {
    const int8_t* row = rows + r * ld;
    const __m256i w = load8_epi32(row + c);
    const __m256 lo = nibble_lo(w), hi = nibble_hi(w);
    const float sc = lut[row[cb + c / 16] + 128];
#pragma GCC unroll 3
    for (int g = 0; g < GT; ++g) {
      const __m256 pg = _mm256_set1_ps(p[g * ldp + r] * sc);
      acc[g][0] = _mm256_fmadd_ps(pg, lo, acc[g][0]);
      acc[g][1] = _mm256_fmadd_ps(pg, hi, acc[g][1]);
    }
  }
#pragma GCC unroll 3
  for (int g = 0; g < GT; ++g)
    _mm256_storeu_ps(o + g * ldo + c, acc[g][0]), _mm256_storeu_ps(o + g * ldo + cb + c, acc[g][1]);
}

// G query rows in tiles of at most 3 (9: 3 + 3 + 3; 4: 3 + 1)
template <typename F>
inline void tiles3(int64_t G, F&& f) {
  int64_t g = 0;
  for (; g + 3 <= G; g += 3) f(std::integral_constant<int, 3>{}, g);
  if (G - g == 2) f(std::integral_constant<int, 2>{}, g);
  if (G - g == 1) f(std::integral_constant<int, 1>{}, g);
}

// Whether rows of these formats take this path: int4 keys and values in their own rows, widths multiples of 16
// (whole 8-byte runs of codes: no padding nibble).
inline bool takes(const Format& fk, const Format& fv, bool shared) {
  return fk.kind == kInt4 && fv.kind == kInt4 && !shared && fk.width % 16 == 0 && fv.width % 16 == 0 &&
         fk.width > 0 && fv.width > 0;
}

constexpr int BN = 64;  // rows a block: its scores (G × BN floats) stay in L1

// One split-K task's rows [n0, n1): scores a tile of 4 key rows at a time, the block's online softmax, then its
// value sums. qs: the task's query rows in decode_row's order, scaled (G × rk); add(r0, rows, padded, out) writes a
// block's additive mask (-inf for the spare rows); m, l, o (G × rv): the task's running max, sum and accumulators.
template <typename Add>
void run_task(const float* qs, int64_t G, const int8_t* krows, int64_t ksn, const int8_t* vrows, int64_t vsn,
              const Format& fk, const Format& fv, int64_t n0, int64_t n1, const float* lut, Add&& add_of, float* m,
              float* l, float* o) {
  const int cbk = fk.code_bytes, cbv = fv.code_bytes;
  const int64_t rk = fk.width, rv = fv.width;
  std::vector<float> s(G * BN);
  alignas(32) float add[BN];
  std::vector<int8_t> tail(4 * fk.row_elems, 0);  // a block's last rows (fewer than 4), zero-padded
  for (int64_t r0 = n0; r0 < n1; r0 += BN) {
    const int rows = static_cast<int>(std::min<int64_t>(BN, n1 - r0));
    const int padded = static_cast<int>(round_up(rows, 16));
    add_of(r0, rows, padded, add);
    for (int t = 0; t < padded; t += 4) {
      if (t >= rows) {  // spare rows: their scores are the mask's -inf
        for (int64_t g = 0; g < G; ++g) std::copy(add + t, add + t + 4, &s[g * BN + t]);
        continue;
      }
      const int8_t* base = krows + (r0 + t) * ksn;
      int64_t ld = ksn;
      if (t + 4 > rows) {  // never read past the view's last row
        std::fill(tail.begin(), tail.end(), 0);
        for (int j = 0; j < rows - t; ++j) std::memcpy(&tail[j * fk.row_elems], base + j * ksn, fk.row_elems);
        base = tail.data(), ld = fk.row_elems;
      }
      tiles3(G, [&](auto gq, int64_t g) {
        scores4<decltype(gq)::value>(qs + g * rk, rk, base, ld, cbk, lut, add + t, &s[g * BN + t], BN);
      });
    }
    softmax_block(s.data(), BN, rows, padded, G, m, l, o, rv);
    const int8_t* vb = vrows + r0 * vsn;
    for (int c = 0; c < cbv; c += 8)
      tiles3(G, [&](auto gt, int64_t g) {
        values8<decltype(gt)::value>(&s[g * BN], BN, vb, vsn, rows, cbv, c, lut, o + g * rv, rv);
      });
  }
}

}  // namespace q4
#endif

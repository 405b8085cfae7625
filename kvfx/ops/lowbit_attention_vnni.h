// int4 and int8 rows read by a few query rows (G <= kVnniG: per-head latents, e.g. SmolLM2's 3 query heads a kv
// head) on AVX-512 VNNI instead of the tile unit. Not a standalone header: lowbit_attention.py pastes it into
// lowbit_attention_amx.h where that file says `#include "lowbit_attention_vnni.h"` (inside namespace amx, after
// class Worker: the same Problem, query digits, block scales and online softmax).
//
// Why: a tile product takes up to 16 query rows; with 3 of them and one 32-column group a row the tile unit idles
// while each 16-row tile is laid out, loaded, multiplied and stored in turn (~0.5-0.7 ms a SmolLM2 layer at 16k
// tokens). VPDPBUSD (u8 x s8 -> int32, 4 products a lane) reads the rows as they are stored, a lane a row (keys) or
// a lane a column (values), with no tile layout in memory.
//
// Same integers, same roundings as the tile path (Worker): the query digits x = 16·hi + lo of quantize_queries and
// the value weights' two 8-bit digits of a block of BN rows; only the float sums' order may differ.
// * Scores, 16 rows a vector: the rows' dwords transposed (a 4 x 4 dword transpose in each 128-bit lane), each
//   nibble read unsigned, u = k + 8 (and 16·u, exact in u8), against the broadcast query digits: sum u·x; the int32
//   sum minus 8 · sum x (a constant of the query row and group) is the tile path's sum k·x.
// * Values, 4 rows a step: byte i of 4 rows gathered in one dword (VPERMB), its nibbles sign-extended (columns 2i,
//   2i + 1 of the group), against the broadcast weights' digits of the 4 rows (hi and lo, u8): the tile path's sums.
// * int8 rows (key_scores8 / value_sums8): the keys' 64-column chunks transposed 16 rows at a time, u = k + 128
//   against each of the query's two digits; the values interleaved 4 rows a dword by the tile path's own unpacks.
#if defined(__AVX512VNNI__)
#define KVFX_VNNI 1
constexpr int kVnniG = 4;  // query rows a kv head up to which VNNI beats the tile unit here (SmolLM2: 3)

// (code bytes >= 3: the scale gather reads the dword ending at a code; <= 64 int4 groups: `corr`'s room)
inline bool vnni_takes(const Problem& P) {
  return (P.kind == kInt4 || P.kind == kInt8) && !P.plan && P.G <= kVnniG && P.cbk >= 3 && P.cbv >= 3 &&
         P.ngk <= 64;
}

// 16 code bytes of 4 rows, row k in 128-bit lane k (the first bytes of m only; all 16: plain loads).
inline __m512i rows4(const char* a, const char* b, const char* c, const char* d, __mmask16 m, bool plain) {
  auto load = [&](const char* p) {
    return plain ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)) : _mm_maskz_loadu_epi8(m, p);
  };
  __m512i z = _mm512_castsi128_si512(load(a));
  z = _mm512_inserti32x4(z, load(b), 1);
  z = _mm512_inserti32x4(z, load(c), 2);
  return _mm512_inserti32x4(z, load(d), 3);
}

// acc[0..3] += the weights' hi / lo digits of 4 rows (w: hi at w, lo at w + BN, u8) times two vectors of the rows'
// codes (4 rows a dword, s8): (a, hi), (a, lo), (b, hi), (b, lo).
inline void weigh4(__m512i* acc, const uint8_t* w, __m512i a, __m512i b) {
  const __m512i wh = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(w));
  const __m512i wl = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(w + BN));
  acc[0] = _mm512_dpbusd_epi32(acc[0], wh, a);
  acc[1] = _mm512_dpbusd_epi32(acc[1], wl, a);
  acc[2] = _mm512_dpbusd_epi32(acc[2], wh, b);
  acc[3] = _mm512_dpbusd_epi32(acc[3], wl, b);
}

class VnniWorker {
 public:
  explicit VnniWorker(const Problem& p) : P(p) {
    size_t used = 0;
    auto take = [&](size_t bytes) { const size_t at = used; used += round_up(bytes, 64); return at; };
    const size_t o_ks = take(4 * P.ngk * BN), o_vs = take(P.shared ? 0 : 4 * P.ngv * BN), o_s = take(4 * P.G * BN),
                 o_pf = take(4 * P.G), o_ps = take(4 * P.G * P.ngv), o_wd = take(P.G * P.ngv * 2 * BN),
                 o_z = take(std::max(P.cbk, P.cbv) + 64);
    static thread_local std::vector<char> scratch;
    if (scratch.size() < used + 64) scratch.resize(used + 64);
    char* base = reinterpret_cast<char*>(round_up(reinterpret_cast<int64_t>(scratch.data()), 64));
    ks = reinterpret_cast<float*>(base + o_ks);
    vs = P.shared ? ks : reinterpret_cast<float*>(base + o_vs);
    s_ = reinterpret_cast<float*>(base + o_s);
    pf = reinterpret_cast<float*>(base + o_pf);
    ps = reinterpret_cast<float*>(base + o_ps);
    wd = reinterpret_cast<uint8_t*>(base + o_wd);
    zero = base + o_z;
    std::memset(zero, 0, std::max(P.cbk, P.cbv) + 64);
    lut8 = lut8_of(P.lut);
  }
  void run(int64_t task);

 private:
  const Problem& P;
  __m512 lut8;
  float *ks, *vs, *s_, *pf, *ps;
  uint8_t* wd;       // the block's weight digits [g][group][hi, lo][BN], u8 in row order
  char* zero;        // a zero row: what missing rows read
  int32_t corr[kVnniG * 64];  // what the codes' offset adds to each int32 sum (int4: 8 · sum of x over a group,
                              // <= 64 groups; int8: 128 · sum of each digit over the row)

  // rows r of the block: base + r · ld for r < rows, else the zero row
  struct Rows {
    const char* base;
    int64_t ld;
    int rows;
    const char* zero;
    const char* operator[](int r) const { return r < rows ? base + r * ld : zero; }
  };
  void scales(const Rows& r, int64_t cb, int64_t ng, float* out) const;
  template <int G> void key_scores(const Rows& r, int t, int64_t bh, const float* add);
  template <int G> void key_scores8(const Rows& r, int t, int64_t bh, const float* add);
  void weights();
  template <int G> void value_sums(const Rows& r, int n, float* o);
  template <int G> void value_sums8(const Rows& r, int n, float* o);
  template <int G> void block(const Rows& kr, const Rows& vr, int64_t bh, const float* add, float* m, float* l,
                              float* o);
};

// The block's scale codes -> out[j * BN + r] = 2^(e/8) (block_scales' numbers, a gather of 16 rows at a time), 0
// for missing rows.
void VnniWorker::scales(const Rows& r, int64_t cb, int64_t ng, float* out) const {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int r0 = 0; r0 < BN; r0 += 16) {
    const __mmask16 valid = static_cast<__mmask16>(first_bytes(r.rows - r0));
    const __m512i off = _mm512_mullo_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(r0)),
                                           _mm512_set1_epi32(static_cast<int>(r.ld)));
    for (int64_t j = 0; j < ng; ++j) {  // the dword that ends with the code (no read past the row; cb >= 3)
      const __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, off, r.base + cb + j - 3, 1);
      const __m512i e = _mm512_srai_epi32(w, 24);
      _mm512_store_ps(out + j * BN + r0, _mm512_maskz_mov_ps(valid, scale_of(e, lut8)));
    }
  }
}

// 16 rows' scores: s_[g * BN + 16t + lane] (lane = row 16t + lane).
template <int G>
void VnniWorker::key_scores(const Rows& rr, int t, int64_t bh, const float* add) {
  const char* r[16];
  for (int i = 0; i < 16; ++i) r[i] = rr[16 * t + i];
  const float* qs = P.qsc + bh * P.G;
  const __m512i x88 = _mm512_set1_epi8(static_cast<char>(0x88)), f0 = _mm512_set1_epi8(0x0F),
                hf = _mm512_set1_epi8(static_cast<char>(0xF0));
  __m512 accf[kVnniG];
  for (int g = 0; g < G; ++g) accf[g] = _mm512_setzero_ps();
  for (int64_t j = 0; j < P.ngk; ++j) {
    const __mmask16 m = static_cast<__mmask16>(first_bytes(P.cbk - 16 * j));
    __m512i z[4];
    for (int a = 0; a < 4; ++a) {  // z[a], 128-bit lane L: row 4L + a's 16 code bytes of group j
      z[a] = rows4(r[a] + 16 * j, r[4 + a] + 16 * j, r[8 + a] + 16 * j, r[12 + a] + 16 * j, m, m == 0xFFFF);
    }
    const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]),
                  t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
    const __m512i y[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                          _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};  // lane n: row n's dword d
    __m512i ah[kVnniG], al[kVnniG];  // the hi and lo digits' sums (two chains a row)
    for (int g = 0; g < G; ++g) ah[g] = al[g] = _mm512_setzero_si512();
    for (int d = 0; d < 4; ++d) {
      const __m512i x = _mm512_xor_si512(y[d], x88);  // both nibbles + 8: unsigned
      const __m512i lo = _mm512_and_si512(x, f0), lo16 = _mm512_and_si512(_mm512_slli_epi32(x, 4), hf),
                    hi = _mm512_and_si512(_mm512_srli_epi32(x, 4), f0), hi16 = _mm512_and_si512(x, hf);
      for (int g = 0; g < G; ++g) {
        const int32_t* q = reinterpret_cast<const int32_t*>(P.qtile(bh, 0, j, 0) + g * 64);  // [hi | lo] digits
        ah[g] = _mm512_dpbusd_epi32(ah[g], lo16, _mm512_set1_epi32(q[2 * d]));
        ah[g] = _mm512_dpbusd_epi32(ah[g], hi16, _mm512_set1_epi32(q[2 * d + 1]));
        al[g] = _mm512_dpbusd_epi32(al[g], lo, _mm512_set1_epi32(q[8 + 2 * d]));
        al[g] = _mm512_dpbusd_epi32(al[g], hi, _mm512_set1_epi32(q[8 + 2 * d + 1]));
      }
    }
    const __m512 kv = _mm512_load_ps(ks + j * BN + 16 * t);
    for (int g = 0; g < G; ++g) {
      const __m512i sum = _mm512_sub_epi32(_mm512_add_epi32(ah[g], al[g]), _mm512_set1_epi32(corr[g * P.ngk + j]));
      accf[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), kv, accf[g]);
    }
  }
  const __m512 addv = _mm512_load_ps(add);
  for (int g = 0; g < G; ++g)
    _mm512_store_ps(s_ + g * BN + 16 * t, _mm512_fmadd_ps(accf[g], _mm512_set1_ps(qs[g]), addv));
}

// Per query row and value group the block's weights w = p · s_v rounded as Worker::weights rounds them (x = w ·
// 32512 / max w, x = 256·hi + lo), the digits in row order.
void VnniWorker::weights() {
  const int64_t ngv = P.ngv;
  for (int64_t g = 0; g < P.G; ++g)
    for (int64_t j = 0; j < ngv; ++j) {
      __m512 w[BN / 16];
      const float wmax = value_weights(s_ + g * BN, vs + j * BN, w);
      ps[g * ngv + j] = pf[g] * wmax / kQ8;
      const __m512 f = _mm512_set1_ps(wmax > 0 ? kQ8 / wmax : 0.0f);
      uint8_t* hi = wd + (g * ngv + j) * 2 * BN;
      for (int v = 0; v < BN / 16; ++v) {
        const __m512i x = _mm512_cvtps_epi32(_mm512_mul_ps(w[v], f));
        _mm_store_si128(reinterpret_cast<__m128i*>(hi + 16 * v), _mm512_cvtepi32_epi8(_mm512_srli_epi32(x, 8)));
        _mm_store_si128(reinterpret_cast<__m128i*>(hi + BN + 16 * v), _mm512_cvtepi32_epi8(x));
      }
    }
}

// o[g] += the block's value sums over its first n rows (n a multiple of 4; rows past the block's read zero rows).
template <int G>
void VnniWorker::value_sums(const Rows& r, int n, float* o) {
  alignas(64) int8_t ix[64];  // byte 4i + k <- row k's byte i (128-bit lane k)
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 4; ++k) ix[4 * i + k] = static_cast<int8_t>(16 * k + i);
  const __m512i idx = _mm512_load_si512(ix);
  for (int64_t j = 0; j < P.ngv; ++j) {
    const __mmask16 m = static_cast<__mmask16>(first_bytes(P.cbv - 16 * j));
    __m512i acc[kVnniG][4];  // even columns hi, lo; odd columns hi, lo
    for (int g = 0; g < G; ++g)
      for (int k = 0; k < 4; ++k) acc[g][k] = _mm512_setzero_si512();
    for (int n0 = 0; n0 < n; n0 += 4) {
      const __m512i z = rows4(r[n0] + 16 * j, r[n0 + 1] + 16 * j, r[n0 + 2] + 16 * j, r[n0 + 3] + 16 * j, m,
                              m == 0xFFFF);
      const __m512i y = _mm512_permutexvar_epi8(idx, z);
      const __m512i ev = lo4(y), od = hi4(y);  // lane i: columns 32j + 2i, 32j + 2i + 1 of the 4 rows, signed
      for (int g = 0; g < G; ++g) {
        weigh4(acc[g], wd + (g * P.ngv + j) * 2 * BN + n0, ev, od);
      }
    }
    for (int g = 0; g < G; ++g) {  // columns as the tile path accumulates them: group j's even, then odd columns
      const __m512 f = _mm512_set1_ps(ps[g * P.ngv + j]);
      for (int k = 0; k < 2; ++k) {
        add_digit_sums(o + g * P.Rvp + 32 * j + 16 * k, acc[g][2 * k], acc[g][2 * k + 1], f);
      }
    }
  }
}

// int8 rows: 16 rows' scores. The rows' 64-column chunks transposed (lane = row), u = k + 128 against each query
// digit (hi, lo: x = 256·hi + lo): the tile path's two int32 sums, scaled as Worker::score_sums scales them.
template <int G>
void VnniWorker::key_scores8(const Rows& rr, int t, int64_t bh, const float* add) {
  const float* qs = P.qsc + bh * P.G;
  const __m512i x80 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i ah[G], al[G];
  for (int g = 0; g < G; ++g) ah[g] = al[g] = _mm512_setzero_si512();
  for (int64_t c = 0; c < P.ktiles; ++c) {
    const int64_t bytes = std::min<int64_t>(64, P.cbk - 64 * c);
    const __mmask64 m = first_bytes(bytes);
    __m512i z[16];
    for (int r = 0; r < 16; ++r) z[r] = _mm512_maskz_loadu_epi8(m, rr[16 * t + r] + 64 * c);
    transpose16(z);  // z[d] lane n: row n's columns 64c + 4d .. 64c + 4d + 3
    const int32_t* qh[G];
    const int32_t* ql[G];
    for (int g = 0; g < G; ++g) {
      qh[g] = reinterpret_cast<const int32_t*>(P.qtile(bh, 0, c, 0) + g * 64);
      ql[g] = reinterpret_cast<const int32_t*>(P.qtile(bh, 0, c, 1) + g * 64);
    }
    for (int d = 0; d < (bytes + 3) / 4; ++d) {
      const __m512i u = _mm512_xor_si512(z[d], x80);
      for (int g = 0; g < G; ++g) {
        ah[g] = _mm512_dpbusd_epi32(ah[g], u, _mm512_set1_epi32(qh[g][d]));
        al[g] = _mm512_dpbusd_epi32(al[g], u, _mm512_set1_epi32(ql[g][d]));
      }
    }
  }
  const __m512 kv = _mm512_load_ps(ks + 16 * t), addv = _mm512_load_ps(add);
  for (int g = 0; g < G; ++g) {
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(ah[g], _mm512_set1_epi32(corr[2 * g]))),
                 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(al[g], _mm512_set1_epi32(corr[2 * g + 1])));
    _mm512_store_ps(s_ + g * BN + 16 * t, _mm512_fmadd_ps(_mm512_fmadd_ps(hi, _mm512_set1_ps(256.0f), lo),
                                                          _mm512_mul_ps(kv, _mm512_set1_ps(qs[g])), addv));
  }
}

// int8 rows: o[g] += the block's value sums over its first n rows. 4 rows' bytes interleaved by the tile path's
// unpacks (Worker::value_tiles: lane i of C tile 4c + k = its column order), against the weights' digits; two
// passes (C tiles 4c, 4c + 1, then 4c + 2, 4c + 3) so the sums stay in registers.
template <int G>
void VnniWorker::value_sums8(const Rows& r, int n, float* o) {
  for (int64_t c = 0; c < (P.cbv + 63) / 64; ++c) {
    const __mmask64 m = first_bytes(P.cbv - 64 * c);
    for (int half = 0; half < 2; ++half) {
      __m512i acc[G][4];  // C tile 4c + 2·half: hi, lo; 4c + 2·half + 1: hi, lo
      for (int g = 0; g < G; ++g)
        for (int k = 0; k < 4; ++k) acc[g][k] = _mm512_setzero_si512();
      for (int n0 = 0; n0 < n; n0 += 4) {
        const __m512i z0 = _mm512_maskz_loadu_epi8(m, r[n0] + 64 * c),
                      z1 = _mm512_maskz_loadu_epi8(m, r[n0 + 1] + 64 * c),
                      z2 = _mm512_maskz_loadu_epi8(m, r[n0 + 2] + 64 * c),
                      z3 = _mm512_maskz_loadu_epi8(m, r[n0 + 3] + 64 * c);
        const __m512i a = half ? _mm512_unpackhi_epi8(z0, z1) : _mm512_unpacklo_epi8(z0, z1);
        const __m512i b = half ? _mm512_unpackhi_epi8(z2, z3) : _mm512_unpacklo_epi8(z2, z3);
        const __m512i v0 = _mm512_unpacklo_epi16(a, b), v1 = _mm512_unpackhi_epi16(a, b);
        for (int g = 0; g < G; ++g) {
          weigh4(acc[g], wd + g * 2 * BN + n0, v0, v1);
        }
      }
      for (int g = 0; g < G; ++g) {
        const __m512 f = _mm512_set1_ps(ps[g]);
        for (int k = 0; k < 2; ++k) {
          add_digit_sums(o + g * P.Rvp + (4 * c + 2 * half + k) * 16, acc[g][2 * k], acc[g][2 * k + 1], f);
        }
      }
    }
  }
}

void VnniWorker::run(int64_t task) {
  const TaskRows T0 = task_rows(P, task);
  const int64_t G = P.G, bh = T0.bh, b = T0.b, n0 = T0.n0, n1 = T0.n1;
  const char *krows = T0.krows, *vrows = T0.vrows;
  float *m = T0.m, *l = T0.l, *o = T0.o;
  if (P.kind == kInt4) {
    for (int64_t g = 0; g < G; ++g)  // 8 · sum of x = 16·hi + lo over each group's columns
      for (int64_t j = 0; j < P.ngk; ++j) {
        const int8_t* q = P.qtile(bh, 0, j, 0) + g * 64;
        int32_t sx = 0;
        for (int i = 0; i < 32; ++i) sx += 16 * q[i] + q[32 + i];
        corr[g * P.ngk + j] = 8 * sx;
      }
  } else {
    for (int64_t g = 0; g < G; ++g)  // 128 · sum of each digit over every chunk (the sums run over all of them)
      for (int digit = 0; digit < 2; ++digit) {
        int32_t sx = 0;
        for (int64_t c = 0; c < P.ktiles; ++c)
          for (int i = 0; i < 64; ++i) sx += P.qtile(bh, 0, c, digit)[g * 64 + i];
        corr[2 * g + digit] = 128 * sx;
      }
  }
  alignas(64) float add[BN];
  for (int64_t r0 = n0; r0 < n1; r0 += BN) {
    const int rows = static_cast<int>(std::min<int64_t>(BN, n1 - r0));
    const Rows kr{krows + r0 * P.ksn, P.ksn, rows, zero}, vr{vrows + r0 * P.vsn, P.vsn, rows, zero};
    const int64_t next = std::min<int64_t>(BN, n1 - r0 - rows);
    prefetch_rows(krows + (r0 + rows) * P.ksn, next, P.ksn, P.krow);
    if (!P.shared) prefetch_rows(vrows + (r0 + rows) * P.vsn, next, P.vsn, P.vrow);
    block_add(P, b, r0, rows, add);
    switch (G) {
      case 1: block<1>(kr, vr, bh, add, m, l, o); break;
      case 2: block<2>(kr, vr, bh, add, m, l, o); break;
      case 3: block<3>(kr, vr, bh, add, m, l, o); break;
      default: block<4>(kr, vr, bh, add, m, l, o); break;
    }
  }
}

template <int G>
void VnniWorker::block(const Rows& kr, const Rows& vr, int64_t bh, const float* add, float* m, float* l, float* o) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const uint64_t c0 = stage_clock();
  scales(kr, P.cbk, P.ngk, ks);
  if (!P.shared) scales(vr, P.cbv, P.ngv, vs);
  const uint64_t c1 = stage_clock();
  const int T = (kr.rows + 15) / 16;
  const bool i4 = P.kind == kInt4;
  for (int t = 0; t < T; ++t) i4 ? key_scores<G>(kr, t, bh, add + 16 * t) : key_scores8<G>(kr, t, bh, add + 16 * t);
  for (int g = 0; g < G; ++g) std::fill(s_ + g * BN + 16 * T, s_ + (g + 1) * BN, kNegInf);
  const uint64_t c2 = stage_clock();
  block_softmax(s_, pf, G, P.Rvp, m, l, o);
  const uint64_t c3 = stage_clock();
  weights();
  const uint64_t c4 = stage_clock();
  const int n = static_cast<int>(round_up(kr.rows, 4));
  i4 ? value_sums<G>(P.shared ? kr : vr, n, o) : value_sums8<G>(P.shared ? kr : vr, n, o);
  stage_counts({c0, c1, c2, c3, c4, stage_clock()}, {0, 1, 2, 3, 4}, kr.rows);
}
#endif  // __AVX512VNNI__

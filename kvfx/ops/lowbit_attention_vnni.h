// int4 and int8 rows on AVX-512 VNNI: on AMX CPUs for rows read by a few query rows (G <= kVnniG: per-head latents,
// e.g. SmolLM2's 3 query heads a kv head), where the tile unit idles; on CPUs with AVX-512 VNNI but no tile unit
// (Ice Lake, AMD Zen 4; `integer_path()` 3) for any G (a shared latent's 9 query rows too). Not a
// standalone header: lowbit_attention.py pastes it into lowbit_attention_amx.h where that file says
// `#include "lowbit_attention_vnni.h"` (inside namespace amx, after the shared parts: the same Problem, query
// digits, block scales and online softmax).
//
// Why: a tile product takes up to 16 query rows; with 3 of them and one 32-column group a row the tile unit idles
// while each 16-row tile is laid out, loaded, multiplied and stored in turn (~0.5-0.7 ms a SmolLM2 layer at 16k
// tokens). VPDPBUSD (u8 x s8 -> int32, 4 products a lane) reads the rows as they are stored, a lane a row (keys) or
// a lane a column (values), with no tile layout in memory. Without a tile unit it does the work of the float path
// (rows decoded to float32, 16 products an FMA) with 64 products an instruction.
//
// Same integers, same roundings as the tile path (Worker): the query digits x = 16·hi + lo of quantize_queries and
// the value weights' two 8-bit digits of a block of BN rows; only the float sums' order may differ.
// * Scores, 16 rows a vector: the rows' dwords transposed (a 4 x 4 dword transpose in each 128-bit lane), each
//   nibble read unsigned, u = k + 8 (and 16·u, exact in u8), against the broadcast query digits: sum u·x; the int32
//   sum minus 8 · sum x (a constant of the query row and group) is the tile path's sum k·x.
// * Values, 4 rows a step: byte i of 4 rows gathered in one dword (VPERMB), its nibbles sign-extended (columns 2i,
//   2i + 1 of the group), against the broadcast weights' digits of the 4 rows (hi and lo, u8): the tile path's sums.
// * int8 rows (key_scores8 / value_sums8): the keys' 64-column chunks transposed 16 rows at a time, u = k + 128
//   against each of the query's two digits; the values 4 rows a dword by two byte permutes of 32 columns, 16
//   columns a C tile in column order (the tile path's unpack order would leave padding lanes in narrow rows).
// * More than 4 query rows: passes of up to 4 (sizes as even as possible: 9 = 3 + 3 + 3), so each pass's int32 sums
//   stay in registers, over operands laid out once: keys' per group (int4; the passes' float sums go to s_) or
//   64-column chunk (int8; the int32 sums wait in `iacc` between chunks), values' by the first pass into `vop`.
// * Bands: lowbit_attention_vnni_bands.h, with these operands per unit.
// Built with the rest of namespace amx (KVFX_INT: AVX-512 BW / VBMI / VNNI and GFNI).
constexpr int kVnniG = 4;  // query rows a kv head up to which VNNI beats the tile unit on AMX CPUs (SmolLM2: 3)

// Whether the VNNI blocks take int4 / int8 rows of `G` query rows a kv head: on AMX CPUs (path 1) up to kVnniG (the
// tile unit beyond), without (path 3) any G. (code bytes >= 3: the scale gather reads the dword ending at a code.)
inline bool vnni_fits(Kind kind, int64_t G, int64_t cbk, int64_t cbv, int64_t path) {
  return (kind == kInt4 || kind == kInt8) && (path != 1 || G <= kVnniG) && cbk >= 3 && cbv >= 3;
}

// The passes of G query rows: pass p takes rows pass_at(G, p) .. pass_at(G, p + 1) - 1, at most 4 of them.
inline int passes_of(int64_t G) { return static_cast<int>((G + 3) / 4); }
inline int pass_at(int64_t G, int p) { return static_cast<int>(G * p / passes_of(G)); }

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

// acc += u (u8) · the dword at q broadcast (s8): VPDPBUSD with the broadcast folded in (m32bcst), which GCC does not
// emit for the intrinsic (a separate VPBROADCASTD each; the key scores' broadcasts are as many as their products:
// Zen 4, one layer warm, key scores 2-6 % faster).
inline __m512i dpbusd_b(__m512i acc, __m512i u, const void* q) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*static_cast<const int32_t*>(q)));
  return acc;
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

// weigh4 with one vector of codes: acc[0..1] += (a, hi), (a, lo).
inline void weigh2(__m512i* acc, const uint8_t* w, __m512i a) {
  acc[0] = _mm512_dpbusd_epi32(acc[0], _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(w)), a);
  acc[1] = _mm512_dpbusd_epi32(acc[1], _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(w + BN)), a);
}

// Calls CALL(CG, g0) for each pass of G query rows (CG = its rows, 1 .. 4, a constant; g0 its first). The passes'
// loops over their CG rows carry `#pragma GCC unroll`: unrolled only late, GCC 12 keeps an array of accumulators in
// memory (a 64-byte store after every VPDPBUSD, moves around it); the value sums ran 1.5-2x slower that way (Zen 4,
// 16k rows of a 360-wide shared latent, scratch A/B of the two builds).
#define KVFX_EACH_PASS(G, CALL)                                                  \
  for (int p_ = 0; p_ < passes_of(G); ++p_) {                                    \
    const int g0_ = pass_at(G, p_);                                              \
    switch (pass_at(G, p_ + 1) - g0_) {                                          \
      case 1: CALL(1, g0_); break;                                               \
      case 2: CALL(2, g0_); break;                                               \
      case 3: CALL(3, g0_); break;                                               \
      default: CALL(4, g0_); break;                                              \
    }                                                                            \
  }

class VnniWorker {
 public:
  explicit VnniWorker(const Problem& p) : P(p), NP(passes_of(p.G)) {
    size_t used = 0;
    auto take = [&](size_t bytes) { const size_t at = used; used += round_up(bytes, 64); return at; };
    const bool same_scales = P.shared && !P.plan;  // bands: the key scales carry multipliers (BandPlan::Scales)
    const int64_t zb = std::max({P.cbk, P.cbv, P.krow, P.vrow, int64_t{P.ktrans}, int64_t{P.vtrans}}) + 64;
    const size_t o_ks = take(4 * P.ngk * BN), o_vs = take(same_scales ? 0 : 4 * P.ngv * BN), o_s = take(4 * P.G * BN),
                 o_pf = take(4 * P.G), o_ps = take(4 * P.G * P.ngv), o_wd = take(P.G * P.ngv * 2 * BN),
                 o_z = take(zb), o_ia = take(2 * 64 * P.G),
                 o_co = take(4 * P.G * std::max<int64_t>(P.ngk, 2)), o_c2 = take(P.plan ? 4 * P.G * P.ngk * 2 : 0),
                 o_vo = take(NP > 1 ? 64 * 2 * (BN / 4) : 0),
                 o_tk = take(BN * P.ktrans), o_tv = take(P.shared ? 0 : BN * P.vtrans);
    static thread_local std::vector<char> scratch;
    if (scratch.size() < used + 64) scratch.resize(used + 64);
    char* base = reinterpret_cast<char*>(round_up(reinterpret_cast<int64_t>(scratch.data()), 64));
    ks = reinterpret_cast<float*>(base + o_ks);
    vs = same_scales ? ks : reinterpret_cast<float*>(base + o_vs);
    s_ = reinterpret_cast<float*>(base + o_s);
    pf = reinterpret_cast<float*>(base + o_pf);
    ps = reinterpret_cast<float*>(base + o_ps);
    wd = reinterpret_cast<uint8_t*>(base + o_wd);
    zero = base + o_z;
    iacc = reinterpret_cast<__m512i*>(base + o_ia);
    corr = reinterpret_cast<int32_t*>(base + o_co);
    corr8 = reinterpret_cast<int32_t*>(base + o_c2);
    vop = reinterpret_cast<__m512i*>(base + o_vo);
    tk = reinterpret_cast<int8_t*>(base + o_tk);
    tv = reinterpret_cast<int8_t*>(base + o_tv);
    std::memset(zero, 0, zb);
    lut8 = lut8_of(P.lut);
    qg_.resize(P.G);
    qunit_ = P.qoffset(0, 0, 1, 0) - P.qoffset(0, 0, 0, 0), qdigit_ = P.qoffset(0, 0, 0, 1) - P.qoffset(0, 0, 0, 0);
  }
  void run(int64_t task);

 private:
  const Problem& P;
  const int NP;      // passes over the query rows (passes_of)
  __m512 lut8;
  float *ks, *vs, *s_, *pf, *ps;
  uint8_t* wd;       // the block's weight digits [g][group][hi, lo][BN], u8 in row order
  char* zero;        // a zero row: what missing rows read
  __m512i* iacc;     // int8 keys: each query row's two int32 sums of 16 rows, between the passes of a chunk
  __m512i* vop;      // values, more than one pass: a pair of C tiles' operands as the first pass made them
  int32_t* corr;     // what the codes' offset adds to each int32 sum (int4: 8 · sum of x over a group, [g][group];
                     // int8: 128 · sum of each digit over the row, [g][digit]; bands: 4/2-bit groups, [g][group])
  int32_t* corr8;    // bands: 8-bit groups' 128 · sum of each digit over the group, [g][group][digit]
  int8_t *tk, *tv;   // bands: a block's rows with their int3 / int5 bands transcoded (keys; values if not shared)
  std::vector<const int8_t*> qg_;  // query row g's digits of unit 0, digit 0, for the task's (b, h) (set_queries)
  int64_t qunit_, qdigit_;         // qa's strides between a row's units and digits

  // rows r of the block: base + r · ld for r < rows, else the zero row
  struct Rows {
    const char* base;
    int64_t ld;
    int rows;
    const char* zero;
    const char* operator[](int r) const { return r < rows ? base + r * ld : zero; }
  };
  // query row g's digits of key unit j (int4: [hi | lo] of group j; int8: digit `digit` of chunk j), 64 bytes, of
  // the task's (b, h) (run's start sets them, set_queries): no division in the passes (g / Gb cost ~1/4 of the key
  // scores of a shared latent, an IDIV a query row, group and 16 rows)
  const int32_t* qrow(int64_t g, int64_t j, int digit) const {
    return reinterpret_cast<const int32_t*>(qg_[g] + j * qunit_ + digit * qdigit_);
  }
  void set_queries(int64_t bh) {
    for (int64_t g = 0; g < P.G; ++g) qg_[g] = P.qtile(bh, static_cast<int>(g / P.Gb), 0, 0) + (g % P.Gb) * 64;
  }
  // a pair of C tiles' codes: `bytes` from byte `at` of each row (4-bit: a group's 32 columns; 2-bit: a bands
  // unit's; 8-bit: 32 columns, 16 a tile), weighted by group j, into the accumulated columns col .. col + 31
  struct Codes {
    int64_t at, bytes, j, col;
  };
  void scales(const Rows& r, int64_t cb, int64_t ng, float* out) const;
  void key_scores(const Rows& r, int t, int64_t bh, const float* add);
  template <int CG> void key_pass(const __m512i* op, int t, int64_t unit, int64_t j, int g0);
  void key_scores8(const Rows& r, int t, int64_t bh, const float* add);
  template <int CG> void key_pass8(const __m512i* z, int64_t unit, int dwords, int g0, bool first);
  void weights();
  void value_sums(const Rows& r, int n, float* o);
  template <int CG, int Bits> void value_pass(const Rows& r, int n, const Codes& c, int g0, float* o);
  void value_sums8(const Rows& r, int n, float* o);
  void block(const Rows& kr, const Rows& vr, int64_t bh, const float* add, float* m, float* l, float* o);
  // bands (lowbit_attention_vnni_bands.h)
  void band_corrections();
  void band_scales(const Rows& r, const BandPlan& plan, float* out) const;
  Rows transcode(const Rows& r, const BandPlan& plan, int8_t* buf) const;
  void band_key_scores(const Rows& r, const Rows& tr, int t, int64_t bh, const float* add);
  void band_value_sums(const Rows& r, const Rows& tr, int n, float* o);
  void band_rows(const Rows& kr, const Rows& vr, Rows& tkr, Rows& tvr);
};

// The block's scale codes -> out[j * BN + r] = 2^(e/8) (block_scales' numbers, a gather of 16 rows at a time), 0
// for missing rows. Without AMX (P.plain_scales) a row's one code is read with a plain load where rows lie >= 16
// bytes apart: on the Zen 4 VM per-head int4 rank 32 (17-byte rows) 1.27-1.32x faster blocks, int8 1.05-1.09x, than
// the gather; 9-byte rows 4-6 % slower, so they keep it (scratch interleaved A/B, 16k rows, 30 layers).
void VnniWorker::scales(const Rows& r, int64_t cb, int64_t ng, float* out) const {
  if ((P.plain_scales && ng == 1 && r.ld >= 16) || cb < 3) {  // plain loads (cb < 3: a band's codes at the start)
    for (int64_t j = 0; j < ng; ++j)
      for (int i = 0; i < BN; ++i)
        out[j * BN + i] = i < r.rows ? P.lut[reinterpret_cast<const int8_t*>(r.base + i * r.ld)[cb + j] + 128] : 0.0f;
    return;
  }
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

// y[d], lane n = row n's dword d of the `bytes` (<= 16) code bytes from byte `at` of rows r[0 .. 15] (d < 4; only
// the first `dwords` are made).
inline void dwords16(const char* const* r, int64_t at, int64_t bytes, __m512i* y, int dwords = 4) {
  const __mmask16 m = static_cast<__mmask16>(first_bytes(bytes));
  __m512i z[4];
  for (int a = 0; a < 4; ++a)  // z[a], 128-bit lane L: row 4L + a's 16 code bytes
    z[a] = rows4(r[a] + at, r[4 + a] + at, r[8 + a] + at, r[12 + a] + at, m, m == 0xFFFF);
  const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t2 = _mm512_unpacklo_epi32(z[2], z[3]);
  y[0] = _mm512_unpacklo_epi64(t0, t2), y[1] = _mm512_unpackhi_epi64(t0, t2);
  if (dwords <= 2) return;
  const __m512i t1 = _mm512_unpackhi_epi32(z[0], z[1]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
  y[2] = _mm512_unpacklo_epi64(t1, t3), y[3] = _mm512_unpackhi_epi64(t1, t3);
}

// key_pass's operands of an int4 group (16 code bytes from byte `at`) of rows r[0 .. 15]: per dword d the 16·lo,
// 16·hi, lo, hi nibbles plus 8 (u8).
inline void int4_operands(const char* const* r, int64_t at, int64_t bytes, __m512i* op) {
  const __m512i x88 = _mm512_set1_epi8(static_cast<char>(0x88)), f0 = _mm512_set1_epi8(0x0F),
                hf = _mm512_set1_epi8(static_cast<char>(0xF0));
  __m512i y[4];
  dwords16(r, at, bytes, y);
  for (int d = 0; d < 4; ++d) {
    const __m512i x = _mm512_xor_si512(y[d], x88);  // both nibbles + 8: unsigned
    op[4 * d] = _mm512_and_si512(_mm512_slli_epi32(x, 4), hf);
    op[4 * d + 1] = _mm512_and_si512(x, hf);
    op[4 * d + 2] = _mm512_and_si512(x, f0);
    op[4 * d + 3] = _mm512_and_si512(_mm512_srli_epi32(x, 4), f0);
  }
}

// 16 rows' scores: s_[g * BN + 16t + lane] (lane = row 16t + lane). Per group: the rows' operands laid out once
// for every pass (int4_operands); each pass adds its rows' sums into s_.
void VnniWorker::key_scores(const Rows& rr, int t, int64_t bh, const float* add) {
  const char* r[16];
  for (int i = 0; i < 16; ++i) r[i] = rr[16 * t + i];
  for (int64_t g = 0; g < P.G; ++g) _mm512_store_ps(s_ + g * BN + 16 * t, _mm512_setzero_ps());
  for (int64_t j = 0; j < P.ngk; ++j) {
    __m512i op[16];
    int4_operands(r, 16 * j, P.cbk - 16 * j, op);
#define KVFX_KEY_PASS(CG, g0) key_pass<CG>(op, t, j, j, g0)
    KVFX_EACH_PASS(P.G, KVFX_KEY_PASS)
#undef KVFX_KEY_PASS
  }
  const float* qs = P.qsc + bh * P.G;
  const __m512 addv = _mm512_load_ps(add);
  for (int64_t g = 0; g < P.G; ++g) {
    float* sg = s_ + g * BN + 16 * t;
    _mm512_store_ps(sg, _mm512_fmadd_ps(_mm512_load_ps(sg), _mm512_set1_ps(qs[g]), addv));
  }
}

// s_ (16 rows of query rows g0 .. g0 + CG - 1) += group j's int32 sums (the hi and lo digits' chains, against the
// digits of key unit `unit`) times the rows' key scales.
template <int CG>
inline void VnniWorker::key_pass(const __m512i* op, int t, int64_t unit, int64_t j, int g0) {
  __m512i ah[CG], al[CG];
  const int32_t* q[CG];  // [hi | lo] digits
  for (int g = 0; g < CG; ++g) ah[g] = al[g] = _mm512_setzero_si512(), q[g] = qrow(g0 + g, unit, 0);
  for (int d = 0; d < 4; ++d)
    for (int g = 0; g < CG; ++g) {
      ah[g] = dpbusd_b(ah[g], op[4 * d], &q[g][2 * d]);
      ah[g] = dpbusd_b(ah[g], op[4 * d + 1], &q[g][2 * d + 1]);
      al[g] = dpbusd_b(al[g], op[4 * d + 2], &q[g][8 + 2 * d]);
      al[g] = dpbusd_b(al[g], op[4 * d + 3], &q[g][8 + 2 * d + 1]);
    }
  const __m512 kv = _mm512_load_ps(ks + j * BN + 16 * t);
  for (int g = 0; g < CG; ++g) {
    const __m512i sum =
        _mm512_sub_epi32(_mm512_add_epi32(ah[g], al[g]), _mm512_set1_epi32(corr[(g0 + g) * P.ngk + j]));
    float* sg = s_ + (g0 + g) * BN + 16 * t;
    _mm512_store_ps(sg, _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), kv, _mm512_load_ps(sg)));
  }
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

// byte 4i + k <- row k's byte i (128-bit lane k): 4 rows' byte i in one dword
alignas(64) constexpr int8_t kRows4Bytes[64] = {0, 16, 32, 48, 1, 17, 33, 49, 2, 18, 34, 50, 3, 19, 35, 51,
                                                4, 20, 36, 52, 5, 21, 37, 53, 6, 22, 38, 54, 7, 23, 39, 55,
                                                8, 24, 40, 56, 9, 25, 41, 57, 10, 26, 42, 58, 11, 27, 43, 59,
                                                12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};

// byte 4i + k <- byte i of row k, rows 0, 1 at bytes 0, 32 of one table and rows 2, 3 of the other (VPERMT2B)
alignas(64) constexpr int8_t kRows4Bytes32[64] = {0, 32, 64, 96, 1, 33, 65, 97, 2, 34, 66, 98, 3, 35, 67, 99,
                                                  4, 36, 68, 100, 5, 37, 69, 101, 6, 38, 70, 102, 7, 39, 71, 103,
                                                  8, 40, 72, 104, 9, 41, 73, 105, 10, 42, 74, 106, 11, 43, 75, 107,
                                                  12, 44, 76, 108, 13, 45, 77, 109, 14, 46, 78, 110, 15, 47, 79, 111};

// o[g] += the block's value sums over its first n rows (n a multiple of 4; rows past the block's read zero rows).
void VnniWorker::value_sums(const Rows& r, int n, float* o) {
  for (int64_t j = 0; j < P.ngv; ++j) {
    const Codes c{16 * j, P.cbv - 16 * j, j, 32 * j};
#define KVFX_VALUE_PASS(CG, g0) value_pass<CG, 4>(r, n, c, g0, o)
    KVFX_EACH_PASS(P.G, KVFX_VALUE_PASS)
#undef KVFX_VALUE_PASS
  }
}

// The value sums of query rows g0 .. g0 + CG - 1 over a pair of C tiles: 4-bit codes (int4 group: lane i = columns
// 2i, 2i + 1), 2-bit codes (a bands' unit: lane 4L + m = columns 4m + L, 4(4 + m) + L, value_z's order) or 8-bit
// codes (lane i = columns i, 16 + i), signed, 4 rows a dword (byte permutes of the rows' codes); the first pass unpacks
// the rows (and keeps them in vop when there are more passes), the others read vop. 8-bit codes of 16 columns or
// fewer: the first tile alone.
template <int CG, int Bits>
inline void VnniWorker::value_pass(const Rows& r, int n, const Codes& c, int g0, float* o) {
  const __m512i idx = _mm512_load_si512(kRows4Bytes);
  const __mmask16 m = static_cast<__mmask16>(first_bytes(c.bytes));
  const __mmask32 m32 = static_cast<__mmask32>(first_bytes(c.bytes));
  const __m512i i8lo = _mm512_load_si512(kRows4Bytes32), i8hi = _mm512_add_epi8(i8lo, _mm512_set1_epi8(16));
  const bool first = g0 == 0, keep = first && NP > 1, one = Bits == 8 && c.bytes <= 16;
  __m512i acc[CG][4];  // first C tile hi, lo; second C tile hi, lo
#pragma GCC unroll 4
  for (int g = 0; g < CG; ++g)
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) acc[g][k] = _mm512_setzero_si512();
  for (int n0 = 0; n0 < n; n0 += 4) {
    __m512i ev, od;  // the two C tiles' operands
    if (first) {
      if (Bits == 4) {
        const __m512i z = rows4(r[n0] + c.at, r[n0 + 1] + c.at, r[n0 + 2] + c.at, r[n0 + 3] + c.at, m, m == 0xFFFF);
        const __m512i y = _mm512_permutexvar_epi8(idx, z);
        ev = lo4(y), od = hi4(y);
      } else if (Bits == 8) {  // rows 0, 1 and 2, 3 in one vector each, 32 bytes a row; two VPERMT2B
        auto pair = [&](const char* p, const char* q) {
          return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_maskz_loadu_epi8(m32, p + c.at)),
                                    _mm256_maskz_loadu_epi8(m32, q + c.at), 1);
        };
        const __m512i z01 = pair(r[n0], r[n0 + 1]), z23 = pair(r[n0 + 2], r[n0 + 3]);
        ev = _mm512_permutex2var_epi8(z01, i8lo, z23);
        od = one ? _mm512_setzero_si512() : _mm512_permutex2var_epi8(z01, i8hi, z23);
      } else {
        const __m512i a = _mm512_unpacklo_epi8(value_z(c.at, c.bytes, r[n0]), value_z(c.at, c.bytes, r[n0 + 1]));
        const __m512i b = _mm512_unpacklo_epi8(value_z(c.at, c.bytes, r[n0 + 2]), value_z(c.at, c.bytes, r[n0 + 3]));
        ev = _mm512_unpacklo_epi16(a, b), od = _mm512_unpackhi_epi16(a, b);
      }
      if (keep) _mm512_store_si512(vop + n0 / 2, ev), _mm512_store_si512(vop + n0 / 2 + 1, od);
    } else {
      ev = _mm512_load_si512(vop + n0 / 2), od = _mm512_load_si512(vop + n0 / 2 + 1);
    }
    if (one) {
#pragma GCC unroll 4
      for (int g = 0; g < CG; ++g) weigh2(acc[g], wd + ((g0 + g) * P.ngv + c.j) * 2 * BN + n0, ev);
    } else {
#pragma GCC unroll 4
      for (int g = 0; g < CG; ++g) weigh4(acc[g], wd + ((g0 + g) * P.ngv + c.j) * 2 * BN + n0, ev, od);
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < CG; ++g) {  // columns as the tile path accumulates them (int4: the even, then odd columns)
    const __m512 f = _mm512_set1_ps(ps[(g0 + g) * P.ngv + c.j]);
    float* og = o + (g0 + g) * P.Rvp + c.col;  // (constant indices into acc: it stays in registers)
    add_digit_sums(og, acc[g][0], acc[g][1], f);
    if (!one) add_digit_sums(og + 16, acc[g][2], acc[g][3], f);
  }
}

// int8 rows: 16 rows' scores. The rows' 64-column chunks transposed (lane = row), u = k + 128 against each query
// digit (hi, lo: x = 256·hi + lo): the tile path's two int32 sums (kept in iacc between chunks), scaled as
// Worker::score_sums scales them.
void VnniWorker::key_scores8(const Rows& rr, int t, int64_t bh, const float* add) {
  const float* qs = P.qsc + bh * P.G;
  for (int64_t c = 0; c < P.ktiles; ++c) {
    const int64_t bytes = std::min<int64_t>(64, P.cbk - 64 * c);
    const __mmask64 m = first_bytes(bytes);
    __m512i z[16];
    for (int r = 0; r < 16; ++r) z[r] = _mm512_maskz_loadu_epi8(m, rr[16 * t + r] + 64 * c);
    transpose16(z);  // z[d] lane n: row n's columns 64c + 4d .. 64c + 4d + 3
    const int dwords = static_cast<int>((bytes + 3) / 4);
#define KVFX_KEY_PASS8(CG, g0) key_pass8<CG>(z, c, dwords, g0, c == 0)
    KVFX_EACH_PASS(P.G, KVFX_KEY_PASS8)
#undef KVFX_KEY_PASS8
  }
  const __m512 kv = _mm512_load_ps(ks + 16 * t), addv = _mm512_load_ps(add);
  for (int64_t g = 0; g < P.G; ++g) {
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(iacc[2 * g], _mm512_set1_epi32(corr[2 * g]))),
                 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(iacc[2 * g + 1], _mm512_set1_epi32(corr[2 * g + 1])));
    _mm512_store_ps(s_ + g * BN + 16 * t, _mm512_fmadd_ps(_mm512_fmadd_ps(hi, _mm512_set1_ps(256.0f), lo),
                                                          _mm512_mul_ps(kv, _mm512_set1_ps(qs[g])), addv));
  }
}

// Key unit `unit`'s sums (z: its dwords, 16 rows transposed) of query rows g0 .. g0 + CG - 1, added to iacc
// (started at the first unit of the sum).
template <int CG>
inline void VnniWorker::key_pass8(const __m512i* z, int64_t unit, int dwords, int g0, bool first) {
  const __m512i x80 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i ah[CG], al[CG];
  const int32_t* qh[CG];
  const int32_t* ql[CG];
#pragma GCC unroll 4
  for (int g = 0; g < CG; ++g) {
    ah[g] = first ? _mm512_setzero_si512() : iacc[2 * (g0 + g)];
    al[g] = first ? _mm512_setzero_si512() : iacc[2 * (g0 + g) + 1];
    qh[g] = qrow(g0 + g, unit, 0), ql[g] = qrow(g0 + g, unit, 1);
  }
  for (int d = 0; d < dwords; ++d) {
    const __m512i u = _mm512_xor_si512(z[d], x80);
#pragma GCC unroll 4
    for (int g = 0; g < CG; ++g) {
      ah[g] = dpbusd_b(ah[g], u, &qh[g][d]);
      al[g] = dpbusd_b(al[g], u, &ql[g][d]);
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < CG; ++g) iacc[2 * (g0 + g)] = ah[g], iacc[2 * (g0 + g) + 1] = al[g];
}

// int8 rows: o[g] += the block's value sums over its first n rows, 32 columns (two C tiles in column order) at a
// time (value_pass<., 8>).
void VnniWorker::value_sums8(const Rows& r, int n, float* o) {
  for (int64_t c = 0; c < (P.cbv + 31) / 32; ++c) {
    const Codes cc{32 * c, P.cbv - 32 * c, 0, 32 * c};
#define KVFX_VALUE_PASS(CG, g0) value_pass<CG, 8>(r, n, cc, g0, o)
    KVFX_EACH_PASS(P.G, KVFX_VALUE_PASS)
#undef KVFX_VALUE_PASS
  }
}

void VnniWorker::run(int64_t task) {
  const TaskRows T0 = task_rows(P, task);
  const int64_t G = P.G, bh = T0.bh, b = T0.b, n0 = T0.n0, n1 = T0.n1;
  const char *krows = T0.krows, *vrows = T0.vrows;
  float *m = T0.m, *l = T0.l, *o = T0.o;
  set_queries(bh);
  if (P.plan) {
    band_corrections();
  } else if (P.kind == kInt4) {
    for (int64_t g = 0; g < G; ++g)  // 8 · sum of x = 16·hi + lo over each group's columns
      for (int64_t j = 0; j < P.ngk; ++j) {
        const int8_t* q = reinterpret_cast<const int8_t*>(qrow(g, j, 0));
        int32_t sx = 0;
        for (int i = 0; i < 32; ++i) sx += 16 * q[i] + q[32 + i];
        corr[g * P.ngk + j] = 8 * sx;
      }
  } else {
    for (int64_t g = 0; g < G; ++g)  // 128 · sum of each digit over every chunk (the sums run over all of them)
      for (int digit = 0; digit < 2; ++digit) {
        int32_t sx = 0;
        for (int64_t c = 0; c < P.ktiles; ++c) {
          const int8_t* q = reinterpret_cast<const int8_t*>(qrow(g, c, digit));
          for (int i = 0; i < 64; ++i) sx += q[i];
        }
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
    block(kr, vr, bh, add, m, l, o);
  }
}

// A block of rows: scale codes (bands: and their transcoding), scores, softmax, weights, value sums.
void VnniWorker::block(const Rows& kr, const Rows& vr, int64_t bh, const float* add, float* m, float* l, float* o) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const uint64_t c0 = stage_clock();
  Rows tkr = kr, tvr = vr;  // bands: the rows with their int3 / int5 bands transcoded
  if (P.plan) {
    band_rows(kr, vr, tkr, tvr);
  } else {
    scales(kr, P.cbk, P.ngk, ks);
    if (!P.shared) scales(vr, P.cbv, P.ngv, vs);
  }
  const uint64_t c1 = stage_clock();
  const int T = (kr.rows + 15) / 16;
  const bool i4 = P.kind == kInt4;
  for (int t = 0; t < T; ++t) {
    if (P.plan) band_key_scores(kr, tkr, t, bh, add + 16 * t);
    else i4 ? key_scores(kr, t, bh, add + 16 * t) : key_scores8(kr, t, bh, add + 16 * t);
  }
  for (int64_t g = 0; g < P.G; ++g) std::fill(s_ + g * BN + 16 * T, s_ + (g + 1) * BN, kNegInf);
  const uint64_t c2 = stage_clock();
  block_softmax(s_, pf, P.G, P.Rvp, m, l, o);
  const uint64_t c3 = stage_clock();
  weights();
  const uint64_t c4 = stage_clock();
  const int n = static_cast<int>(round_up(kr.rows, 4));
  if (P.plan) band_value_sums(P.shared ? kr : vr, tvr, n, o);
  else i4 ? value_sums(P.shared ? kr : vr, n, o) : value_sums8(P.shared ? kr : vr, n, o);
  stage_counts({c0, c1, c2, c3, c4, stage_clock()}, {0, 1, 2, 3, 4}, kr.rows);
}

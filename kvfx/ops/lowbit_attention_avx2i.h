// The AVX2 integer path of kvfx's decode kernel (int4 rows and bands of int4 / int3 / int2 codes, on CPUs with AVX2
// but not AVX-512: AMD Zen 1-3, Intel before Skylake-X, …). Not a standalone header: lowbit_attention.py
// pastes it into lowbit_attention.cpp where that file says `#include "lowbit_attention_avx2i.h"` (inside its
// anonymous namespace, after its float helpers), so the build's source hash covers it.
//
// Why: a shared latent read by all query heads of a layer is arithmetic-bound on such a CPU (9 query rows × 368
// columns × 2 per cached row at 16k tokens is ~1.1 ms a layer at the FP32 FMA peak). VPMADDUBSW multiplies 32
// unsigned by 32 signed bytes and adds pairs into 16-bit lanes: 4× the multiply-adds of an 8-float FMA per
// instruction. Codes stay integers; float arithmetic only applies the scales. Measured on AMD EPYC (Zen 2,
// benchmarks/kernel.py, 16k rows): bands of int4 / int3 / int2 and per-head int4 rows 28-30 % faster than decoding
// them to float32, a 360-wide int4 latent the same; bands with an int8 band stay on the float path (their int8
// columns as two 4-bit digits cost more than they save here), like whole int8 rows.
//
// Opt-in (KVFX_AVX2_INTEGER=1): its 8-bit roundings (below) move SmolLM2's attention outputs by ~1 % of their size
// (median; up to ~4.5 %; about 60 % of it the query's rounding) and its logits by up to ~1.8, so greedy generation
// can leave the float path's after a few tokens (benchmarks/integer_agreement.py, RESULTS "integer-agreement") — far
// more than AMX's 16-bit roundings, whose effect is ~200× below the cache's own. Measure a model's quality with it.
//
// Codes. Every row is cut into groups of at most 32 columns ("vgroups"). Each vgroup's codes become 32 bytes u in
// [0, 15] with number = (u + off)·s (s: the group's scale 2^(e/8)): int4 u = c + 8, off -8; int2 / int3 (mid-rise)
// u = q + 8, off -7.5. Keys are kept transposed, 4 bytes of 8 rows a vector (VPMADDUBSW's rows × 4 columns); values
// as pairs of rows interleaved byte by byte, as d = u - 8 in [-8, 7].
//
// Scores. Each query row, the softmax scale folded in, is rounded per vgroup to x in [-127, 127] (one scale per
// vgroup: max |scale·q| / 127 over its columns). Per 8 rows and vgroup 8 VPMADDUBSW (u·x, |pair| <= 3810) sum in
// 16-bit lanes (<= 30480), VPMADDWD widens them; the score adds s·(sum + off·Σx)·(query scale) in float.
// Rounding: half a step, 1/254 of the vgroup's largest |scale·q|.
//
// Values. out[g, c] = Σ_n p[g, n]·s[n, grp(c)]·(d[n, c] + 8 + off). Per block of BN rows, query row and vgroup the
// weights w = p·s are rounded to x in [0, 255] of their largest (x = w·255 / max w: masked or tiny rows cost the
// others no precision); VPMADDUBSW sums x·d over row pairs (|pair| <= 4080, 8 pairs <= 32640 in 16-bit lanes), then
// 32-bit lanes; the float accumulators get (max w / 255)·(sums + (8 + off)·Σx). Rounding: 1/510 of the block's
// largest weight. Both are ~1/16 of an int4 code's own rounding (tests/ops/test_lowbit_attention.py bounds them).
#if KVFX_AVX2
namespace avx2i {

constexpr int BN = 64;  // rows per block: a multiple of 16 (8 row pairs per 16-bit accumulation)

enum Code { kC4, kC2, kC3 };

struct VGroup {
  Code code;
  int codes_at, sign_at, scale_at;  // byte offsets in the row: codes (int3: its low-bits plane), int3 signs, scale
  int cols, col0;                   // real columns (<= 32) from column col0
  int code_bytes, sign_bytes;       // bytes a partial group reads (the rest is zero-padded)
  float off;                        // number = (u + off)·s
  int slot;                         // value accumulators 32·slot … 32·slot + 31
};

struct Plan {
  std::vector<VGroup> groups;
  int slots = 0;
  std::vector<int64_t> columns;  // 32·slots: the real column of each value accumulator, or -1
};

// byte position p of a vgroup's 32 codes -> its column in the group, per code kind
inline int column_of(Code c, int p) {
  if (c == kC4) return p < 16 ? 2 * p : 2 * (p - 16) + 1;        // low nibbles, then high nibbles
  return 4 * (p & 7) + (p >> 3);                                 // int2 / int3 plane j (p = 8j + i): column 4i + j
}
// value accumulator lane -> byte position (the order VPUNPCKL/HBW and the 16 -> 32-bit widening leave them in)
inline int position_of_slot(int s) { return s < 8 ? s : s < 16 ? s + 8 : s < 24 ? s - 8 : s; }

// The plan of a row format, or nullptr where this path has none (int8 rows or bands, float latents).
inline std::unique_ptr<Plan> plan_of(const Format& f) {
  std::vector<Band> bands;
  if (f.kind == kInt4) bands.push_back(Band{4, f.width, 0, 0, f.code_bytes});
  else if (f.kind == kBands) bands = f.bands;
  else return nullptr;
  if (std::any_of(bands.begin(), bands.end(),
                  [](const Band& b) { return b.bits == 8 || b.bits == 5 || b.bits == kE8Bits; }))
    return nullptr;
  auto plan = std::make_unique<Plan>();
  for (const Band& b : bands) {
    for (int gi = 0; 32 * gi < b.width; ++gi) {
      VGroup g{};
      g.cols = std::min(32, b.width - 32 * gi), g.col0 = b.col + 32 * gi;
      g.scale_at = b.at + b.code_bytes + gi, g.slot = plan->slots++;
      if (b.bits == 4) g.code = kC4, g.codes_at = b.at + 16 * gi, g.code_bytes = (g.cols + 1) / 2, g.off = -8.0f;
      if (b.bits == 2) g.code = kC2, g.codes_at = b.at + 8 * gi, g.code_bytes = (g.cols + 3) / 4, g.off = -7.5f;
      if (b.bits == 3) {
        g.code = kC3, g.codes_at = b.at + 8 * gi, g.code_bytes = (g.cols + 3) / 4, g.off = -7.5f;
        g.sign_at = b.at + (b.width + 3) / 4 + 4 * gi, g.sign_bytes = (g.cols + 7) / 8;
      }
      plan->groups.push_back(g);
    }
  }
  plan->columns.assign(32 * plan->slots, -1);
  for (const VGroup& g : plan->groups)
    for (int s = 0; s < 32; ++s) {
      const int c = column_of(g.code, position_of_slot(s));
      if (c < g.cols) plan->columns[32 * g.slot + s] = g.col0 + c;
    }
  return plan;
}

// The 32 codes u of one vgroup of a row, in byte order p.
inline __m256i codes_of(const int8_t* row, const VGroup& g) {
  alignas(32) int8_t pad[32], sign_pad[4];
  const int8_t* c = row + g.codes_at;
  const int8_t* sg = row + g.sign_at;
  if (g.cols < 32) {  // a band's last group: its bytes only, zero-padded (the query's x is 0 there)
    std::memset(pad, 0, sizeof(pad)), std::memcpy(pad, c, g.code_bytes), c = pad;
    if (g.code == kC3) std::memset(sign_pad, 0, 4), std::memcpy(sign_pad, sg, g.sign_bytes), sg = sign_pad;
  }
  switch (g.code) {
    case kC4: {  // 16 bytes: u = nibble ^ 8 (c + 8 for c in [-8, 7]); low nibbles, then high nibbles
      const __m128i t = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)), _mm_set1_epi8(0x88 - 256));
      const __m128i m = _mm_set1_epi8(0x0F);
      return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(t, 4), m), _mm_and_si128(t, m));
    }
    default: {  // int2 / int3: 8 bytes, code j of byte i (2 bits) -> byte 8j + i
      uint64_t w;
      std::memcpy(&w, c, 8);
      const __m256i f = _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(static_cast<int64_t>(w)),
                                                           _mm256_setr_epi64x(0, 2, 4, 6)),
                                         _mm256_set1_epi8(3));
      if (g.code == kC2)  // two's complement q in [-2, 1]: q + 2 = f ^ 2, u = q + 8
        return _mm256_add_epi8(_mm256_xor_si256(f, _mm256_set1_epi8(2)), _mm256_set1_epi8(6));
      // int3: q = low - 4·sign, u = q + 8 = low + 4 + 4·(1 - sign); the sign of column 4i + j is bit 4i + j
      uint32_t bits;
      std::memcpy(&bits, sg, 4);
      const __m256i idx = _mm256_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 1, 1, 2, 2, 3, 3,
                                           0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 1, 1, 2, 2, 3, 3);
      const __m256i bit = _mm256_setr_epi8(1, 16, 1, 16, 1, 16, 1, 16, 2, 32, 2, 32, 2, 32, 2, 32,
                                           4, 64, 4, 64, 4, 64, 4, 64, 8, -128, 8, -128, 8, -128, 8, -128);
      const __m256i set = _mm256_cmpeq_epi8(
          _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), idx), bit), bit);
      return _mm256_add_epi8(_mm256_add_epi8(f, _mm256_set1_epi8(4)), _mm256_andnot_si256(set, _mm256_set1_epi8(4)));
    }
  }
}

// A call's query rows rounded per vgroup: x [rows][groups][32] (byte order p), scale [rows][groups] (max / 127),
// corr [rows][groups] = off·Σx. q [rows, rk] float32, times `sc` (the softmax scale).
struct Queries {
  std::vector<int8_t> x;
  std::vector<float> scale, corr;
};
inline void round_queries(const Plan& plan, const float* q, int64_t rows, int64_t rk, float sc, Queries& out) {
  const int64_t ng = plan.groups.size();
  out.x.assign(rows * ng * 32, 0), out.scale.assign(rows * ng, 0.0f), out.corr.assign(rows * ng, 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t gi = 0; gi < ng; ++gi) {
      const VGroup& g = plan.groups[gi];
      float v[32] = {}, amax = 0.0f;
      for (int p = 0; p < 32; ++p) {
        const int c = column_of(g.code, p);
        if (c < g.cols) v[p] = sc * q[r * rk + g.col0 + c], amax = std::max(amax, std::abs(v[p]));
      }
      if (amax == 0.0f) continue;
      const float inv = 127.0f / amax;
      int sum = 0;
      int8_t* x = &out.x[(r * ng + gi) * 32];
      for (int p = 0; p < 32; ++p) x[p] = static_cast<int8_t>(std::nearbyint(v[p] * inv)), sum += x[p];
      out.scale[r * ng + gi] = amax / 127.0f, out.corr[r * ng + gi] = g.off * static_cast<float>(sum);
    }
}

// One task's buffers (a worker's, reused across its tasks).
struct Buffers {
  std::vector<uint8_t> kt;    // [groups][8][BN][4]: key codes, 4 bytes of 8 rows a vector
  std::vector<int8_t> vp;     // [groups][BN / 2][64]: value codes d, row pairs interleaved (two 32-byte halves)
  std::vector<float> ks, vs;  // [groups][BN]: scales of the key / value rows
  std::vector<uint8_t> xw;    // [groups][BN]: one query row's rounded weights
  Buffers(int64_t kg, int64_t vg)
      : kt(kg * 8 * BN * 4), vp(vg * BN / 2 * 64), ks(kg * BN), vs(vg * BN), xw(vg * BN) {}
};

// 8 rows' codes u of one vgroup -> the keys' transposed layout (dword c of the 8 rows: one vector)
inline void store_keys(const __m256i* u, uint8_t* kt) {
  __m256i t[8], s[8];
  for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_epi32(u[i], u[i + 1]), t[i + 1] = _mm256_unpackhi_epi32(u[i], u[i + 1]);
  for (int i = 0; i < 8; i += 4) {
    s[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]), s[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    s[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]), s[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(kt + c * BN * 4), _mm256_permute2x128_si256(s[c], s[c + 4], 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(kt + (c + 4) * BN * 4), _mm256_permute2x128_si256(s[c], s[c + 4], 0x31));
  }
}
// 8 rows' codes u of one vgroup -> 4 value row pairs: d = u - 8, the two rows' bytes interleaved
inline void store_values(const __m256i* u, int8_t* vp) {
  const __m256i eight = _mm256_set1_epi8(8);
  for (int i = 0; i < 8; i += 2) {
    const __m256i a = _mm256_sub_epi8(u[i], eight), b = _mm256_sub_epi8(u[i + 1], eight);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(vp + 32 * i), _mm256_unpacklo_epi8(a, b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(vp + 32 * i + 32), _mm256_unpackhi_epi8(a, b));
  }
}

// Rows r0 … r0 + rows - 1 (stride ld bytes) of one slot into the buffers, padded to `padded` rows (u = 8, scale 0).
// keys / values: which layouts to write (a shared latent writes both from one decoding).
inline void decode_block(const char* base, int64_t ld, int rows, int padded, const Plan& plan, const float* lut,
                         bool keys, bool values, Buffers& buf) {
  const int64_t ng = plan.groups.size();
  for (int64_t gi = 0; gi < ng; ++gi) {
    const VGroup& g = plan.groups[gi];
    float* ks = keys ? &buf.ks[gi * BN] : nullptr;
    float* vs = values ? &buf.vs[gi * BN] : nullptr;
    for (int r8 = 0; r8 < padded; r8 += 8) {
      __m256i u[8];
      for (int t = 0; t < 8; ++t) {
        const int r = r8 + t;
        float s = 0.0f;
        if (r < rows) {
          const int8_t* row = reinterpret_cast<const int8_t*>(base + r * ld);
          u[t] = codes_of(row, g), s = lut[row[g.scale_at] + 128];
        } else {
          u[t] = _mm256_set1_epi8(8);
        }
        if (ks) ks[r] = s;
        if (vs) vs[r] = s;
      }
      if (keys) store_keys(u, &buf.kt[(gi * 8 * BN + r8) * 4]);
      if (values) store_values(u, &buf.vp[(gi * BN / 2 + r8 / 2) * 64]);
    }
  }
}

// Scores of GQ query rows (x: their rounded digits, stride ldx bytes; scale / corr stride ng) against 8 key rows
// from r8: s[g * lds + r8 + j] = Σ_groups qscale·ks·(Σ u·x + corr) + add[r8 + j].
template <int GQ>
inline void score_tile(const int8_t* x, int64_t ldx, const float* qs, const float* qc, int64_t ng, const Buffers& buf,
                       int r8, const float* add, float* s, int64_t lds) {
  __m256 accf[GQ];
  for (int g = 0; g < GQ; ++g) accf[g] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t gi = 0; gi < ng; ++gi) {
    __m256i acc[GQ];
    for (int g = 0; g < GQ; ++g) acc[g] = _mm256_setzero_si256();
    const uint8_t* kt = &buf.kt[(gi * 8 * BN + r8) * 4];
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kt + c * BN * 4));
      asm("" : "+x"(kv));  // one load, used GQ times
      for (int g = 0; g < GQ; ++g) {
        int32_t w;
        std::memcpy(&w, x + g * ldx + gi * 32 + 4 * c, 4);
        acc[g] = _mm256_add_epi16(acc[g], _mm256_maddubs_epi16(kv, _mm256_set1_epi32(w)));
      }
    }
    const __m256 sv = _mm256_loadu_ps(&buf.ks[gi * BN + r8]);
    for (int g = 0; g < GQ; ++g) {
      const __m256 f = _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(acc[g], ones)), _mm256_set1_ps(qc[g * ng + gi]));
      accf[g] = _mm256_fmadd_ps(f, _mm256_mul_ps(sv, _mm256_set1_ps(qs[g * ng + gi])), accf[g]);
    }
  }
  const __m256 a = _mm256_loadu_ps(add + r8);
  for (int g = 0; g < GQ; ++g) _mm256_storeu_ps(s + g * lds + r8, _mm256_add_ps(accf[g], a));
}

inline void scores(const Queries& q, int64_t row0, int64_t G, int64_t ng, const Buffers& buf, int padded,
                   const float* add, float* s, int64_t lds) {
  const int8_t* x = &q.x[row0 * ng * 32];
  const float* qs = &q.scale[row0 * ng];
  const float* qc = &q.corr[row0 * ng];
  const int64_t ldx = ng * 32;
  for (int r8 = 0; r8 < padded; r8 += 8) {
    int64_t g = 0;
    for (; g + 3 <= G; g += 3) score_tile<3>(x + g * ldx, ldx, qs + g * ng, qc + g * ng, ng, buf, r8, add, s + g * lds, lds);
    if (G - g == 2) score_tile<2>(x + g * ldx, ldx, qs + g * ng, qc + g * ng, ng, buf, r8, add, s + g * lds, lds);
    if (G - g == 1) score_tile<1>(x + g * ldx, ldx, qs + g * ng, qc + g * ng, ng, buf, r8, add, s + g * lds, lds);
  }
}

// 8 int32 lanes of each of 4 vectors -> 32 bytes in row order (values <= 255)
inline __m256i pack_bytes(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i x = _mm256_packus_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  return _mm256_permutevar8x32_epi32(x, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// o[slot columns] += the block's value sums for one query row (p: its weights, 0 for padding rows), every vgroup.
inline void values(const Plan& plan, const float* p, int padded, Buffers& buf, float* o) {
  const int64_t ng = plan.groups.size();
  for (int64_t gi = 0; gi < ng; ++gi) {
    const VGroup& g = plan.groups[gi];
    const float* vs = &buf.vs[gi * BN];
    __m256 mx = _mm256_setzero_ps();
    for (int r = 0; r < padded; r += 8) mx = _mm256_max_ps(mx, _mm256_mul_ps(_mm256_loadu_ps(p + r), _mm256_loadu_ps(vs + r)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float m = std::max(_mm_cvtss_f32(m4), _mm_cvtss_f32(_mm_shuffle_ps(m4, m4, 1)));
    if (m == 0.0f) continue;  // every row of the block masked (or zero scales)
    const __m256 k = _mm256_set1_ps(255.0f / m);
    uint8_t* xw = buf.xw.data();
    __m256i total = _mm256_setzero_si256();
    for (int r = 0; r < padded; r += 32) {  // padded is a multiple of 16: the last 16 rows may be a half
      __m256i w[4];
      for (int j = 0; j < 4; ++j)
        w[j] = r + 8 * j < padded ? _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(p + r + 8 * j),
                                                                                   _mm256_loadu_ps(vs + r + 8 * j)), k))
                                  : _mm256_setzero_si256();
      const __m256i bytes = pack_bytes(w[0], w[1], w[2], w[3]);
      total = _mm256_add_epi64(total, _mm256_sad_epu8(bytes, _mm256_setzero_si256()));
      if (r + 32 <= padded) _mm256_storeu_si256(reinterpret_cast<__m256i*>(xw + r), bytes);
      else _mm_storeu_si128(reinterpret_cast<__m128i*>(xw + r), _mm256_castsi256_si128(bytes));
    }
    alignas(32) int64_t t4[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t4), total);
    const float xsum = static_cast<float>(t4[0] + t4[1] + t4[2] + t4[3]);
    __m256i a32[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    const int8_t* vp = &buf.vp[gi * BN / 2 * 64];
    for (int r = 0; r < padded; r += 16) {  // 8 row pairs in 16-bit lanes (<= 8 · 4080), then 32-bit ones
      __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int k2 = 0; k2 < 8; ++k2) {
        int16_t pair;
        std::memcpy(&pair, xw + r + 2 * k2, 2);
        const __m256i wv = _mm256_set1_epi16(pair);
        const int8_t* v = vp + (r / 2 + k2) * 64;
        lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v))));
        hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32))));
      }
      a32[0] = _mm256_add_epi32(a32[0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo)));
      a32[1] = _mm256_add_epi32(a32[1], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo, 1)));
      a32[2] = _mm256_add_epi32(a32[2], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi)));
      a32[3] = _mm256_add_epi32(a32[3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi, 1)));
    }
    const float step = m / 255.0f;
    const __m256 sv = _mm256_set1_ps(step), base = _mm256_set1_ps(step * (8.0f + g.off) * xsum);
    float* og = o + 32 * g.slot;
    for (int j = 0; j < 4; ++j)
      _mm256_storeu_ps(og + 8 * j, _mm256_add_ps(_mm256_loadu_ps(og + 8 * j),
                                                 _mm256_fmadd_ps(_mm256_cvtepi32_ps(a32[j]), sv, base)));
  }
}

}  // namespace avx2i
#endif

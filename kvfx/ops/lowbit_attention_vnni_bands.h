// Bands on AVX-512 VNNI (CPUs with VNNI but no tile unit: Intel Ice Lake, AMD Zen 4; `integer_path()` 3): the VNNI
// blocks' methods for band rows. Not a standalone header: lowbit_attention.py pastes it into lowbit_attention_amx.h
// where that file says `#include "lowbit_attention_vnni_bands.h"` (inside namespace amx, after
// lowbit_attention_vnni.h).
//
// The tile unit's units, query digits and roundings (lowbit_attention_bands.h: BandPlan, quantize_band_queries, the
// int3 / int5 transcoding), with the VNNI blocks' operands:
// * a 4-bit unit (int4, int3 transcoded to nibbles): the int4 format's (int4_operands, key_pass, value_pass<., 4>);
// * a 2-bit unit: key operands u = k + 4 = 2q + 5 in [1, 7] and 16·u, each from one GF2P8AFFINEQB of the rows'
//   dwords (the offset in its constant), paired with the query's dwords as the tile path's B rows pair with its A
//   row (BandPlan::query_entry), so key_pass sums u·x and the offset takes 4 · sum x; values k = 2q + 1 from
//   value_z, 4 rows a dword in value_z's column order (value_pass<., 2>);
// * an 8-bit unit (an int8 band's 64-column chunk, an int5 band's 32-column group transcoded): the int8 format's
//   (key_pass8, the sums of a band's units kept in iacc; value_pass<., 8>, 16 columns a C tile in column order:
//   BandPlan::rows16, so int5 values read the keys' transcoded copy, not the tile unit's paired chunks).
// The int32 sums are scaled and summed in float as the tile path's (band_sums, weights): the same numbers but for
// the order of the float sums.

// GF2P8AFFINEQB matrices of the 2-bit field f: 16·(q + 2) and 2·(q + 2) (q's sign bit flipped: q + 2 in [0, 3]);
// the constants 0x50 / 0x05 add the mid-rise 16 / 1 and flip the bit back in place: 16·u and u, u = 2q + 5.
constexpr int kU16Src[4][8] = {{-1, -1, -1, -1, -1, 0, 1, -1}, {-1, -1, -1, -1, -1, 2, 3, -1},
                               {-1, -1, -1, -1, -1, 4, 5, -1}, {-1, -1, -1, -1, -1, 6, 7, -1}};
constexpr int kU1Src[4][8] = {{-1, 0, 1, -1, -1, -1, -1, -1}, {-1, 2, 3, -1, -1, -1, -1, -1},
                              {-1, 4, 5, -1, -1, -1, -1, -1}, {-1, 6, 7, -1, -1, -1, -1, -1}};
constexpr uint64_t kU16[4] = {affine(kU16Src[0]), affine(kU16Src[1]), affine(kU16Src[2]), affine(kU16Src[3])};
constexpr uint64_t kU1[4] = {affine(kU1Src[0]), affine(kU1Src[1]), affine(kU1Src[2]), affine(kU1Src[3])};

// key_pass's operands of a 2-bit unit (8 code bytes from byte `at`) of rows r[0 .. 15]. Query dword 4w + f pairs with
// 16·u of field f of the rows' code dword w, dword 8 + 4w + f with u (the tile path's B rows); key_pass pairs
// op[4d], op[4d + 1] with dwords 2d, 2d + 1 and op[4d + 2], op[4d + 3] with dwords 8 + 2d, 9 + 2d.
inline void int2_operands(const char* const* r, int64_t at, int64_t bytes, __m512i* op) {
  __m512i y[2];
  dwords16(r, at, bytes, y, 2);
  for (int d = 0; d < 4; ++d)
    for (int e = 0; e < 2; ++e) {
      const int w = (2 * d + e) / 4, f = (2 * d + e) % 4;
      op[4 * d + e] = _mm512_gf2p8affine_epi64_epi8(y[w], _mm512_set1_epi64(kU16[f]), 0x50);
      op[4 * d + 2 + e] = _mm512_gf2p8affine_epi64_epi8(y[w], _mm512_set1_epi64(kU1[f]), 0x05);
    }
}

// What the codes' offsets add to each int32 sum of the task's query rows (set_queries): a 4-bit group's 8 · sum x,
// a 2-bit group's 4 · sum x (x = 16·hi + lo) into corr, an 8-bit group's 128 · sum of each digit over its units into
// corr8.
void VnniWorker::band_corrections() {
  const BandPlan& K = *P.plan;
  for (int64_t g = 0; g < P.G; ++g)
    for (int64_t j = 0; j < P.ngk; ++j) {
      const BandPlan::Group& s = K.groups[j];
      if (s.i8) {
        for (int digit = 0; digit < 2; ++digit) {
          int32_t sx = 0;
          for (int u = s.u0; u < s.u1; ++u) {
            const int8_t* q = reinterpret_cast<const int8_t*>(qrow(g, u, digit));
            for (int i = 0; i < 64; ++i) sx += q[i];
          }
          corr8[(g * P.ngk + j) * 2 + digit] = 128 * sx;
        }
      } else {
        const int8_t* q = reinterpret_cast<const int8_t*>(qrow(g, s.u0, 0));
        int32_t sx = 0;
        for (int i = 0; i < 32; ++i) sx += 16 * q[i] + q[32 + i];
        corr[g * P.ngk + j] = (K.units[s.u0].bits == 2 ? 4 : 8) * sx;
      }
    }
}

// The block's scale codes of the bands (ks, or vs for values) times their multipliers.
void VnniWorker::band_scales(const Rows& r, const BandPlan& plan, float* out) const {
  for (const BandPlan::Scales& s : plan.scales) {
    scales(r, s.at, s.n, out + s.first * BN);
    apply_multiplier(s, out);
  }
}

// The block's rows with their int3 / int5 bands transcoded into buf (plan.trans_bytes a row): int5 as the keys read
// it, which the values read too (BandPlan::rows16; the tile unit's paired copy is not written); the rows as they are
// for bands without them.
VnniWorker::Rows VnniWorker::transcode(const Rows& r, const BandPlan& plan, int8_t* buf) const {
  if (plan.trans.empty()) return r;
  transcode_rows(trans_ctl(), plan.trans, [&](int i) { return r[i]; }, r.rows, buf, plan.trans_bytes, true, false);
  return Rows{reinterpret_cast<const char*>(buf), plan.trans_bytes, r.rows, zero};
}

// 16 rows' scores (key_scores' for bands): per score group its units' int32 sums (8-bit: 256·hi + lo) times the
// group's key scales, summed in s_; tr: the transcoded rows (int3 / int5 units).
void VnniWorker::band_key_scores(const Rows& rr, const Rows& tr, int t, int64_t bh, const float* add) {
  const BandPlan& K = *P.plan;
  const char* r[16];
  const char* x[16];
  for (int i = 0; i < 16; ++i) r[i] = rr[16 * t + i], x[i] = tr[16 * t + i];
  for (int64_t g = 0; g < P.G; ++g) _mm512_store_ps(s_ + g * BN + 16 * t, _mm512_setzero_ps());
  for (int64_t j = 0; j < P.ngk; ++j) {
    const BandPlan::Group& s = K.groups[j];
    if (!s.i8) {
      const BandPlan::Unit& un = K.units[s.u0];
      __m512i op[16];
      if (un.bits == 2)  // two calls, not one through a pointer: inlined, the operands stay in registers
        int2_operands(un.tr ? x : r, un.at, un.bytes, op);
      else
        int4_operands(un.tr ? x : r, un.at, un.bytes, op);
#define KVFX_KEY_PASS(CG, g0) key_pass<CG>(op, t, s.u0, j, g0)
      KVFX_EACH_PASS(P.G, KVFX_KEY_PASS)
#undef KVFX_KEY_PASS
      continue;
    }
    for (int u = s.u0; u < s.u1; ++u) {
      const BandPlan::Unit& un = K.units[u];
      const char* const* src = un.tr ? x : r;
      const int dwords = (un.bytes + 3) / 4;
      __m512i z[16];  // z[d], lane n: row n's dword d
      if (un.bytes <= 16) {
        dwords16(src, un.at, un.bytes, z, dwords);
      } else if (un.bytes <= 32) {
        dwords16(src, un.at, 16, z, 4);
        dwords16(src, un.at + 16, un.bytes - 16, z + 4, dwords - 4);
      } else {
        for (int i = 0; i < 16; ++i) z[i] = _mm512_maskz_loadu_epi8(first_bytes(un.bytes), src[i] + un.at);
        transpose16(z);
      }
#define KVFX_KEY_PASS8(CG, g0) key_pass8<CG>(z, u, dwords, g0, u == s.u0)
      KVFX_EACH_PASS(P.G, KVFX_KEY_PASS8)
#undef KVFX_KEY_PASS8
    }
    const __m512 kv = _mm512_load_ps(ks + j * BN + 16 * t);
    for (int64_t g = 0; g < P.G; ++g) {
      const int32_t* c = corr8 + (g * P.ngk + j) * 2;
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(iacc[2 * g], _mm512_set1_epi32(c[0]))),
                   lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(iacc[2 * g + 1], _mm512_set1_epi32(c[1])));
      float* sg = s_ + g * BN + 16 * t;
      _mm512_store_ps(sg, _mm512_fmadd_ps(_mm512_fmadd_ps(hi, _mm512_set1_ps(256.0f), lo), kv, _mm512_load_ps(sg)));
    }
  }
  const float* qs = P.qsc + bh * P.G;
  const __m512 addv = _mm512_load_ps(add);
  for (int64_t g = 0; g < P.G; ++g) {
    float* sg = s_ + g * BN + 16 * t;
    _mm512_store_ps(sg, _mm512_fmadd_ps(_mm512_load_ps(sg), _mm512_set1_ps(qs[g]), addv));
  }
}

// o[g] += the block's value sums over its first n rows (a multiple of 4), a pair of C tiles (BandPlan's items) at a
// time; tr: the transcoded rows (int3 / int5 units).
void VnniWorker::band_value_sums(const Rows& r, const Rows& tr, int n, float* o) {
  const BandPlan& V = *P.vplan;
  for (size_t i = 0; i < V.item_ct.size(); ++i) {
    const BandPlan::Unit& un = V.units[V.item_unit[i]];
    const Rows& src = un.tr ? tr : r;
    const int ct = V.item_ct[i], skip = 16 * (ct - un.ct);  // an 8-bit unit's pairs: 32 columns (bytes) each
    const Codes c{un.at + skip, un.bytes - skip, V.item_ws[i], 16 * ct};
    if (un.bits == 4) {
#define KVFX_VALUE_PASS(CG, g0) value_pass<CG, 4>(src, n, c, g0, o)
      KVFX_EACH_PASS(P.G, KVFX_VALUE_PASS)
#undef KVFX_VALUE_PASS
    } else if (un.bits == 2) {
#define KVFX_VALUE_PASS(CG, g0) value_pass<CG, 2>(src, n, c, g0, o)
      KVFX_EACH_PASS(P.G, KVFX_VALUE_PASS)
#undef KVFX_VALUE_PASS
    } else {
#define KVFX_VALUE_PASS(CG, g0) value_pass<CG, 8>(src, n, c, g0, o)
      KVFX_EACH_PASS(P.G, KVFX_VALUE_PASS)
#undef KVFX_VALUE_PASS
    }
  }
}
#undef KVFX_EACH_PASS

// block()'s first stage for bands: the rows' int3 / int5 bands transcoded (tkr, tvr; a shared latent's values read
// the key rows) and their scale codes times the plans' multipliers (ks, vs).
void VnniWorker::band_rows(const Rows& kr, const Rows& vr, Rows& tkr, Rows& tvr) {
  const BandPlan &K = *P.plan, &V = *P.vplan;
  tkr = transcode(kr, K, tk);
  tvr = P.shared ? tkr : transcode(vr, V, tv);
  band_scales(kr, K, ks);
  if (P.shared) shared_value_scales(ks, K, V, vs);
  else band_scales(vr, V, vs);
}

// Bands on the tile unit: Worker's methods for band rows (units, plans and query digits: lowbit_attention_bands.h).
// Not a standalone header: lowbit_attention.py pastes it into lowbit_attention_amx.h where that file says
// `#include "lowbit_attention_amx_bands.h"` (inside namespace amx, after class Worker; built with KVFX_AMX).

// The block's rows with their int3 / int5 bands transcoded (into buf, plan.trans_bytes a row; out[r] = its row,
// nullptr where rows[r] is) for the key tiles and / or the value tiles; nothing to do for bands without them.
void Worker::transcode(const char* const* rows, int n, const BandPlan& plan, int8_t* buf, const char** out,
                       bool keys, bool values) const {
  if (plan.trans.empty()) return;
  for (int r = 0; r < BN; ++r) out[r] = r < n ? reinterpret_cast<const char*>(buf + r * plan.trans_bytes) : nullptr;
  transcode_rows(trans_ctl(), plan.trans, [&](int i) { return rows[i]; }, n, buf, plan.trans_bytes, keys, values);
}

// The block's scale codes of the bands (ks, or vs for values) times their multipliers.
void Worker::band_scales(const char* const* rows, const BandPlan& plan, float* out) const {
  for (const BandPlan::Scales& s : plan.scales) {
    scales(rows, s.at, s.n, out + s.first * BN);
    apply_multiplier(s, out);
  }
}

// B tiles of key rows 16t .. 16t + 15: unit u's at sb_at(t) + u · 1024. int8 and int4 bands as those formats';
// int2 bands 64 code bytes (8 groups) at a time, transposed, group j's dwords 2j + w (w = 0, 1) giving tile rows
// 4w + f = 16·k of field f and 8 + 4w + f = k: byte 4r + i of an A row is column 16(r' / 4) + 4i + r' % 4 of the
// group (r' = r % 8), the hi digit for r < 8.
void Worker::band_key_tiles(const char* const* rows, const char* const* trows, int t) {
  int8_t* __restrict const sbp = sb_at(t);
  for (const BandPlan::Run& b : P.plan->runs) {
    int8_t* tiles = sbp + b.u0 * 1024;
    if (b.bits != 2) {
      key_tiles(b.tr ? trows : rows, tiles, b.bits == 4, b.at, b.cb, b.n);
      continue;
    }
    for (int64_t c = 0; c < (b.cb + 63) / 64; ++c) {
      const __mmask64 m = first_bytes(b.cb - 64 * c);
      __m512i z[16];
      for (int r = 0; r < 16; ++r)
        z[r] = rows[r] ? _mm512_maskz_loadu_epi8(m, rows[r] + b.at + 64 * c) : _mm512_setzero_si512();
      transpose16(z);
      for (int64_t j = 0; j < std::min<int64_t>(8, b.n - 8 * c); ++j) {
        int8_t* tile = tiles + (8 * c + j) * 1024;
        for (int w = 0; w < 2; ++w)
          for (int f = 0; f < 4; ++f) {
            const __m512i x = z[2 * j + w];
            put(tile + (4 * w + f) * 64, _mm512_or_si512(_mm512_gf2p8affine_epi64_epi8(
                x, _mm512_set1_epi64(affine(kF16Src[f])), 0), _mm512_set1_epi8(16)));
            put(tile + (8 + 4 * w + f) * 64, _mm512_or_si512(_mm512_gf2p8affine_epi64_epi8(
                x, _mm512_set1_epi64(affine(kF1Src[f])), 0), _mm512_set1_epi8(1)));
          }
      }
    }
  }
}

// B tiles of the block's values (rows 16t .. 16t + 15), value_tiles' row order; C tiles per unit as BandPlan.
void Worker::band_value_tiles(const char* const* rows, const char* const* trows, int t) {
  const int u0 = 4 * t;
  int8_t* __restrict const vbp = vb_at(block);
  const BandPlan& V = *P.vplan;
  constexpr int64_t kTile = (BN / 64) * 1024;
  for (const BandPlan::Run& b : V.runs)
    if (b.bits != 2) value_tiles(b.tr ? trows : rows, t, b.bits == 4, b.at, b.cb, b.n, b.ct0);
  for (const BandPlan::Unit& x : V.units) {
    if (x.bits != 2) continue;
    for (int u = u0; u < u0 + 4; ++u) {
      const char* const* r4 = rows + 4 * (u - u0);
      int8_t* dst = vbp + x.ct * kTile + ((u / 16) * 1024 + (4 * (u % 4) + (u % 16) / 4) * 64);
      __m512i z[4];
      for (int k = 0; k < 4; ++k) z[k] = r4[k] ? value_z(x.at, x.bytes, r4[k]) : _mm512_setzero_si512();
      const __m512i a = _mm512_unpacklo_epi8(z[0], z[1]), c = _mm512_unpacklo_epi8(z[2], z[3]);
      put(dst, _mm512_unpacklo_epi16(a, c));
      put(dst + kTile, _mm512_unpackhi_epi16(a, c));
    }
  }
}

// Scores of key rows 16t .. 16t + 15 for g-block gb: per score group its int32 sums into cs_at(t). Two 4/2-bit
// groups at a time on two accumulators (C 0, 1 from A 4, 5 and B 6, 7), as score_tiles does for int4; an 8-bit
// group's digits on C 2, 3.
void Worker::band_score_tiles(int64_t bh, int gb, int t) {
  const int8_t* __restrict const sbp = sb_at(t);
  int32_t* __restrict const csp = cs_at(t);
  const auto& groups = P.plan->groups;
  for (size_t j = 0; j < groups.size(); ++j) {
    const BandPlan::Group& s = groups[j];
    if (s.i8) {
      _tile_zero(2);
      _tile_zero(3);
      for (int u = s.u0; u < s.u1; ++u) {
        _tile_loadd(4, P.qtile(bh, gb, u, 0), 64);
        _tile_loadd(5, P.qtile(bh, gb, u, 1), 64);
        _tile_loadd(6, sbp + u * 1024, 64);
        _tile_dpbssd(2, 4, 6);
        _tile_dpbssd(3, 5, 6);
      }
      _tile_stored(2, csp + s.slot * Gb * 16, 64);
      _tile_stored(3, csp + (s.slot + 1) * Gb * 16, 64);
      continue;
    }
    const bool two = j + 1 < groups.size() && !groups[j + 1].i8;
    _tile_loadd(4, P.qtile(bh, gb, s.u0, 0), 64);
    _tile_loadd(6, sbp + s.u0 * 1024, 64);
    _tile_zero(0);
    _tile_dpbssd(0, 4, 6);
    if (two) {
      _tile_loadd(5, P.qtile(bh, gb, groups[j + 1].u0, 0), 64);
      _tile_loadd(7, sbp + groups[j + 1].u0 * 1024, 64);
      _tile_zero(1);
      _tile_dpbssd(1, 5, 7);
    }
    _tile_stored(0, csp + s.slot * Gb * 16, 64);
    if (two) _tile_stored(1, csp + groups[++j].slot * Gb * 16, 64);
  }
}

// score_sums' part for bands: st[g] = q scale · sum over score groups of key scale · int32 sum (8-bit: 256·hi + lo)
// + add, for the gn query rows of the g-block from g0.
void Worker::band_sums(const int32_t* csp, const float* kst, float* st, const float* qs, int g0, int gn,
                       __m512 addv) const {
  const auto& groups = P.plan->groups;
  for (int gr = 0; gr < gn; ++gr) {
    __m512 acc = _mm512_setzero_ps();
    for (size_t j = 0; j < groups.size(); ++j) {
      __m512 x = _mm512_cvtepi32_ps(_mm512_load_si512(csp + (groups[j].slot * Gb + gr) * 16));
      if (groups[j].i8)
        x = _mm512_fmadd_ps(x, _mm512_set1_ps(256.0f),
                            _mm512_cvtepi32_ps(_mm512_load_si512(csp + ((groups[j].slot + 1) * Gb + gr) * 16)));
      acc = _mm512_fmadd_ps(x, _mm512_load_ps(kst + j * BN), acc);
    }
    _mm512_store_ps(st + (g0 + gr) * BN, _mm512_fmadd_ps(acc, _mm512_set1_ps(qs[g0 + gr]), addv));
  }
}

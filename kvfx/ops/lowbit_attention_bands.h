// Bands on the integer path (kvfx/quant.py bands: int8 / int5 / int4 / int3 / int2 runs of columns in one row):
// what the tile unit (lowbit_attention_amx_bands.h) and the VNNI blocks (lowbit_attention_vnni_bands.h) share: the
// row's units and column orders (BandPlan), the int3 / int5 transcoding and the query digits. Not a standalone header:
// lowbit_attention.py pastes it into lowbit_attention_amx.h where that file says `#include "lowbit_attention_bands.h"`
// (inside namespace amx, built with KVFX_INT).
//
// A band row is cut into units the tile unit takes as they are:
// * a 4-bit or 2-bit unit: one scale group (32 columns of the band). Its codes become one 64-byte operand row per
//   key row: 16·k for the group's 32 columns, then k (int4: the nibbles, sign-extended; int2: k = 2q + 1 for the
//   mid-rise level q + ½, so x = k · 2^(e/8) / 2, exact), against one A row of the query's two digits x = 16·hi + lo
//   (|x| <= 2032) in the same column order: one TDPBSSD sums k·x over the group, as the int4 format's path does.
// * an 8-bit unit: 64 columns of an int8 band (one scale for the band): the codes as they are, against the two
//   digits of x = 256·hi + lo (|x| <= 32512), two accumulators, as the int8 format's path does; the units of one
//   band sum into the same accumulators.
// One scale per query row, for a row with an 8-bit band 1/32512 of its largest |scale·q| (its 4/2-bit units round
// the query to 16 of those steps, 1/2032, and their sums count 16×), else 1/2032. Values: each unit's codes as
// int8 (the same k) in tiles of 16 output columns (2 per 4/2-bit unit, 4 per 8-bit unit), weighted per value
// scale group as the other formats' (weights() and value_sums(), per item = a pair of C tiles and its group).
// * int3 and int5 bands (codes stored as a low-bits plane and a sign plane) are transcoded first, a block of rows at
//   a time (transcode_rows: a byte permute, two bit-field extracts and one GF2P8AFFINEQB per 64 output bytes), into
//   the mid-rise level k = 2q + 1 (x = k · 2^(e/8) / 2, exact): int3's k in [-7, 7] as int4 nibbles, taken as a
//   4-bit unit; int5's k in [-31, 31] as bytes, for the keys one 8-bit unit per 32-column group (its own scale),
//   for the values a second copy with two groups in one 64-byte chunk (each 128-bit lane: 8 columns of one, then 8
//   of the other), so that the int8 format's value tiles give each group two C tiles of its own (not four, half of
//   them padding). Their scale codes are read from the stored row.

// A bands row's units, scale groups and column orders (keys or values; built once per call from its Format).
struct BandPlan {
  struct Unit {
    int bits, at, bytes, col, cols;  // codes from byte `at` (`bytes` of them), band columns col .. col + cols
    bool tr;                         // codes in the transcoded row (int3 / int5), else in the stored row
    int ct;                          // values: its C tiles ct .. ct + nt - 1
    int nt;                          // values: 2 a 4/2-bit unit or int5 group, 4 an 8-bit one (rows16: 2 per 32 columns)
    int half = 0;                    // values, int5: which group of its paired chunk (the chunk's 128-bit lane halves)
  };
  struct Group {
    bool i8;
    int u0, u1, slot;  // units [u0, u1); int32 sums in C slots slot (4/2-bit) or slot, slot + 1 (8-bit digits)
  };
  struct Run {  // one band: its units u0 .. and value C tiles ct0 ..; n = groups (4/2-bit) or columns (8-bit)
    int bits, at, cb, n, u0, ct0;
    bool tr;
  };
  struct Trans {  // an int3 / int5 band: codes at byte `at` of a stored row -> k = 2q + 1 at byte `to`, int5's
    int bits, at, width, to, to2;  // paired value chunks at `to2` (transcode_rows)
  };
  struct Scales {
    int at, n, first;  // n scale codes from byte `at` -> rows first .. first + n - 1 of ks / vs
    float mult;        // times this (int2: ½; a 4/2-bit key group beside an 8-bit band: ×16, see the top)
  };
  std::vector<Unit> units;
  std::vector<Group> groups;  // keys: score groups; values: weight groups (one per Scales row)
  std::vector<Scales> scales;
  std::vector<Run> runs;
  std::vector<Trans> trans;
  int trans_bytes = 0;  // a transcoded row's bytes (a multiple of 64)
  bool has8 = false;
  int slots = 0, ctiles = 0;
  std::vector<int> item_ct, item_ws;  // values: C tile pairs and their weight group
  std::vector<int> item_unit;         // values: the unit each pair belongs to (the VNNI blocks read its codes)
  std::vector<int> gather;            // keys: A row byte (u, tile, K) <- digits[gather[..]] (quantize_band_queries)
  std::vector<int64_t> columns;       // values: the output column of accumulated column j, -1 for padding

  BandPlan() = default;
  bool rows16 = false;  // values as the VNNI blocks take them: 8-bit codes 16 columns a C tile, in column order

  // keys: the key rows' plan, else the value rows'; rows16: the VNNI blocks' value layout (8-bit units: int8 chunks
  // and int5 groups, the latter from the keys' transcoded copy; else the tile unit's, see the top)
  BandPlan(const Format& f, bool keys, bool rows16_) : rows16(!keys && rows16_) {
    for (const Band& b : f.bands) has8 |= b.bits == 8 || b.bits == 5;
    int to = 0;  // transcoded bytes so far
    for (const Band& b : f.bands) {
      const int first = static_cast<int>(groups.size());
      const int sat = b.at + b.code_bytes;  // the band's scale codes in the stored row
      if (b.bits == 5) {  // keys: an 8-bit unit (its own run, score group) per 32 columns; values: paired chunks
        const int to2 = to + b.width;
        for (int c = 0; c < b.width; c += 32) {
          const int cols = std::min(32, b.width - c), u = static_cast<int>(units.size());
          if (keys) {
            runs.push_back({8, to + c, cols, cols, u, ctiles, true});
          } else if (rows16) {  // the group's codes as the keys read them: 2 C tiles
            ctiles += 2;
          } else if (c % 64 == 0) {  // one int8 value chunk a pair of groups: 4 C tiles, 2 for each
            runs.push_back({8, to2 + c, 64, 64, u, ctiles, true});
            ctiles += 4;
          }
          groups.push_back({true, u, u + 1, slots});
          slots += 2;
          if (keys || rows16)
            units.push_back({keys ? 8 : 5, to + c, cols, b.col + c, cols, true, keys ? 0 : ctiles - 2, 2});
          else
            units.push_back({5, to2 + c / 64 * 64, cols, b.col + c, cols, true, ctiles - 4 + 2 * (c / 32 % 2), 2,
                             c / 32 % 2});
        }
        scales.push_back({sat, (b.width + 31) / 32, first, 0.5f});
        trans.push_back({5, b.at, b.width, to, to2});
        to = to2 + 64 * ((b.width + 63) / 64);
        continue;
      }
      const bool t3 = b.bits == 3 || b.bits == kE8Bits;  // transcoded to int4 nibbles (e8: its points' u = 2x)
      const int bits = t3 ? 4 : b.bits, at = t3 ? to : b.at, cb = t3 ? b.width / 2 : b.code_bytes;
      runs.push_back({bits, at, cb, bits == 8 ? b.width : (b.width + 31) / 32, static_cast<int>(units.size()), ctiles,
                      t3});
      if (bits == 8) {
        const int u0 = static_cast<int>(units.size());
        for (int c = 0; c < b.width; c += 64) {
          const int cols = std::min(64, b.width - c), nt = rows16 ? 2 * ((cols + 31) / 32) : 4;
          units.push_back({8, b.at + c, cols, b.col + c, cols, false, ctiles, nt});
          ctiles += nt;
        }
        groups.push_back({true, u0, static_cast<int>(units.size()), slots});
        slots += 2;
        scales.push_back({sat, 1, first, 1.0f});
      } else {
        const int per = 8 / bits;
        for (int c = 0; c < b.width; c += 32, ctiles += 2) {
          const int cols = std::min(32, b.width - c);
          groups.push_back({false, static_cast<int>(units.size()), static_cast<int>(units.size()) + 1, slots++});
          units.push_back({bits, at + c / per, (cols + per - 1) / per, b.col + c, cols, t3, ctiles, 2});
        }
        const float mult = (b.bits == 2 || t3 ? 0.5f : 1.0f) * (keys && has8 ? 16.0f : 1.0f);
        scales.push_back({sat, (b.width + 31) / 32, first, mult});
        if (t3) trans.push_back({b.bits, b.at, b.width, to, 0}), to += b.width / 2;
      }
    }
    trans_bytes = static_cast<int>(round_up(to, 64));
    for (size_t g = 0; g < groups.size(); ++g)  // values: each unit's C tiles in pairs
      for (int u = groups[g].u0; u < groups[g].u1; ++u)
        for (int k = 0; k < units[u].nt; k += 2)
          item_ct.push_back(units[u].ct + k), item_ws.push_back(static_cast<int>(g)), item_unit.push_back(u);
    const int rk = f.width, pad = 4 * rk;  // digits[d * rk + c]: digit d (query_entry) of column c; [pad] = 0
    if (keys)
      for (size_t u = 0; u < units.size(); ++u)
        for (int t = 0; t < 2; ++t)
          for (int k = 0; k < 64; ++k) {
            const int e = query_entry(static_cast<int>(u), t, k);
            gather.push_back(e < 0 ? pad : (e % 4) * rk + e / 4);
          }
    else
      for (int64_t j = 0; j < 16 * ctiles; ++j) columns.push_back(column(j));
  }

  // The value column of accumulated column j (C tile j / 16, lane j % 16), -1 for padding.
  int64_t column(int64_t j) const {
    for (const Unit& u : units) {
      if (j / 16 >= u.ct && j / 16 < u.ct + u.nt) {
        const int t = static_cast<int>(j / 16) - u.ct, lane = static_cast<int>(j % 16), L = lane / 4, m = lane % 4;
        // 8-bit: the int8 format's unpack order (rows16: column order); int5 (paired chunk): its 8 columns of lane
        // L; 4-bit: the int4 format's (nibble t); 2-bit: byte (L, 4t + m) of value_z
        const bool i8 = u.bits == 8 || u.bits == 5;
        const int local = rows16 && i8 ? 16 * t + lane : u.bits == 8 ? 16 * L + 4 * t + m
                        : u.bits == 5 ? 8 * L + 4 * t + m : u.bits == 4 ? 2 * lane + t : 4 * (4 * t + m) + L;
        return local < u.cols ? u.col + local : -1;
      }
    }
    return -1;
  }

  // Key unit u's operand row: byte K pairs with query column key_column(u, K) and digit `digit`.
  // Returns column * 4 + digit (0/1: hi/lo of the 4/2-bit rounding, 2/3: hi/lo of the 8-bit one), -1 for padding.
  int query_entry(int u, int tile, int K) const {
    const Unit& x = units[u];
    int local, digit;
    if (x.bits == 8) {
      local = K, digit = 2 + tile;
    } else {
      if (tile == 1) return -1;
      const int k = K % 32, r = K / 4 % 8;  // int4: the int4 format's order; int2: see int2_key_tiles
      local = x.bits == 4 ? 8 * (k / 8) + 2 * (k % 4) + (k / 4) % 2 : 16 * (r / 4) + 4 * (K % 4) + r % 4;
      digit = K / 32;
    }
    return local < x.cols ? (x.col + local) * 4 + digit : -1;
  }
};

// The key and value plans of a call's band formats, built once per process and format (a decode step calls the
// kernel once per layer with the same few formats).
struct BandPlans {
  BandPlan keys, values;
};
std::shared_ptr<const BandPlans> band_plans(const Format& fk, const Format& fv, const std::vector<int64_t>& kbands,
                                            const std::vector<int64_t>& vbands, bool vnni) {
  static std::mutex lock;
  static std::map<std::vector<int64_t>, std::shared_ptr<const BandPlans>> made;
  std::vector<int64_t> key(kbands);
  key.push_back(vnni ? -2 : -1);
  key.insert(key.end(), vbands.begin(), vbands.end());
  std::lock_guard<std::mutex> hold(lock);
  auto& plans = made[key];
  if (!plans) plans = std::make_shared<const BandPlans>(BandPlans{BandPlan(fk, true, false), BandPlan(fv, false, vnni)});
  return plans;
}

// GF2P8AFFINEQB matrices of the 2-bit field f: 16·(2q + 1) without its constant bit 4, and 2q + 1 without bit 0.
constexpr int kF16Src[4][8] = {{-1, -1, -1, -1, -1, 0, 1, 1}, {-1, -1, -1, -1, -1, 2, 3, 3},
                               {-1, -1, -1, -1, -1, 4, 5, 5}, {-1, -1, -1, -1, -1, 6, 7, 7}};
constexpr int kF1Src[4][8] = {{-1, 0, 1, 1, 1, 1, 1, 1}, {-1, 2, 3, 3, 3, 3, 3, 3},
                              {-1, 4, 5, 5, 5, 5, 5, 5}, {-1, 6, 7, 7, 7, 7, 7, 7}};

// A 2-bit value unit's codes as int8 k = 2q + 1, 8 in the low half of each 128-bit lane L: byte b = field L of
// code byte b.
inline __m512i value_z(int64_t at, int64_t bytes, const char* row) {  // the unit's codes: `bytes` from byte `at`
  const __m128i x = _mm_maskz_loadu_epi8(static_cast<__mmask16>(first_bytes(bytes)), row + at);
  const __m512i m = _mm512_setr_epi64(affine(kF1Src[0]), 0, affine(kF1Src[1]), 0, affine(kF1Src[2]), 0,
                                      affine(kF1Src[3]), 0);
  return _mm512_or_si512(_mm512_gf2p8affine_epi64_epi8(_mm512_broadcastq_epi64(x), m, 0), _mm512_set1_epi8(1));
}

// n rows' e8 band b (row(i): the stored row i) -> its points' u = 2x as int4 nibbles (k = u: x = k · 2^(e/8) / 2,
// as int3's transcoded levels), row i's at out + b.to + i · ld: per 16 points one gather of their codebook dwords.
template <class RowFn>
inline void transcode_e8(const BandPlan::Trans& b, RowFn row, int n, int8_t* out, int64_t ld) {
  const uint32_t* nib = e8_book().nibble.data();
  const int pts = b.width / 8;
  for (int i = 0; i < n; ++i) {
    const char* codes = row(i) + b.at;
    int8_t* o = out + b.to + i * ld;
    int p = 0;
    for (; p + 16 <= pts; p += 16) {
      const __m512i idx = _mm512_min_epu32(  // (an index past the codebook, not written by kvfx: its last point)
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 2 * p))),
          _mm512_set1_epi32(kE8Size - 1));
      _mm512_storeu_si512(o + 4 * p, _mm512_i32gather_epi32(idx, nib, 4));
    }
    for (; p < pts; ++p) {
      uint16_t idx;
      std::memcpy(&idx, codes + 2 * p, 2);
      std::memcpy(o + 4 * p, &nib[std::min<int>(idx, kE8Size - 1)], 4);
    }
  }
}

// n rows' int3 / int5 bands (row(i): the stored row i) -> their codes k = 2q + 1 (BandPlan::trans; widths multiples
// of 16), row i's at out + i · ld. A chunk of a band (int3: 128 columns, int5: 64) becomes 64 output bytes: per
// output qword a permute gathers its codes' low-plane dword and sign bits, two VPMULTISHIFTQB take each output
// byte's bits (low bits at 0-3, signs at 4-5), and GF2P8AFFINEQB puts them in place with the constant bits. int3:
// byte = two nibbles 1 | low << 1 | sign << 3 (columns 2i, 2i + 1: the int4 format's packing); int5: byte = 1 |
// low << 1 | (sign ? 0xE0 : 0). keys / values: write int5's copy for the key operands / the paired one for the value
// operands (int3's serves both). A chunk at a time over the rows, its controls and masks held in registers.
template <class RowFn>
inline void transcode_rows(const TransCtl& t, const std::vector<BandPlan::Trans>& trans, RowFn row, int n,
                           int8_t* out, int64_t ld, bool keys, bool values) {
  for (const BandPlan::Trans& b : trans) {
    if (b.bits == kE8Bits) {  // e8: each point's 8 numbers u = 2x in [-6, 6] as int4 nibbles, one dword a point
      transcode_e8(b, row, n, out, ld);
      continue;
    }
    const bool three = b.bits == 3;
    const int per = three ? 128 : 64, lowb = three ? b.width / 4 : b.width / 2;  // columns a chunk, low-plane bytes
    const __m512i idx = three ? t.idx3 : t.idx5, sa = three ? t.a3 : t.a5, sb = three ? t.b3 : t.b5,
                  f0 = _mm512_set1_epi8(0x0F), mat = _mm512_set1_epi64(affine(three ? kT3Src : kT5Src));
    for (int c = 0; c < b.width; c += per) {
      const int cols = std::min(per, b.width - c);
      const __mmask64 ml = first_bytes(three ? cols / 4 : cols / 2), ms = first_bytes(cols / 8),
                      mo = first_bytes(three ? cols / 2 : cols);
      const int64_t lo_at = b.at + (three ? c / 4 : c / 2), sg_at = b.at + lowb + c / 8;
      int8_t* key_out = out + b.to + (three ? c / 2 : c);
      int8_t* pair_out = out + b.to2 + c;
      for (int i = 0; i < n; ++i) {
        const char* r = row(i);
        const __m512i x = _mm512_permutex2var_epi8(_mm512_maskz_loadu_epi8(ml, r + lo_at), idx,
                                                   _mm512_maskz_loadu_epi8(ms, r + sg_at));
        const __m512i y = _mm512_ternarylogic_epi32(f0, _mm512_multishift_epi64_epi8(sa, x),
                                                    _mm512_multishift_epi64_epi8(sb, x), 0xCA);  // mask ? lo : sg
        const __m512i k = three ? _mm512_gf2p8affine_epi64_epi8(y, mat, 0x11) : _mm512_gf2p8affine_epi64_epi8(y, mat, 0x01);
        if (three || keys) _mm512_mask_storeu_epi8(key_out + i * ld, mo, k);
        if (!three && values)  // lane L = columns 8L .. 8L + 7 of the chunk's first group, then of its second
          _mm512_storeu_si512(pair_out + i * ld, _mm512_permutexvar_epi8(t.pair5, _mm512_maskz_mov_epi8(mo, k)));
      }
    }
  }
}

// The query rows as A tiles: per key unit two 64-byte rows (digits; a 4/2-bit unit uses the first), in its columns'
// order (BandPlan::query_entry), one scale per row (qsc).
void quantize_band_queries(const Problem& P, const float* q, float sc, int8_t* qa, float* qsc) {
  const BandPlan& K = *P.plan;
  const float bound = K.has8 ? kQ8 : kQ4;
  const int64_t rk = P.rk;
  std::vector<int8_t> digits(4 * rk + 1, 0);  // BandPlan::gather's source
  for (int64_t bh = 0; bh < P.B * P.H; ++bh)
    for (int64_t g = 0; g < P.G; ++g) {
      const int gb = static_cast<int>(g / P.Gb), gr = static_cast<int>(g % P.Gb);
      const float* qg = q + (bh * P.G + g) * rk;
      float amax = 0.0f;
      for (int64_t c = 0; c < rk; ++c) amax = std::max(amax, std::abs(qg[c]));
      amax *= std::abs(sc);
      qsc[bh * P.G + g] = amax / bound;
      const float inv4 = amax > 0 ? sc * kQ4 / amax : 0.0f, inv8 = amax > 0 ? sc * kQ8 / amax : 0.0f;
      for (int64_t c = 0; c < rk; c += 16) {  // x = 16·hi + lo (|x| <= 2032), 256·hi + lo (|x| <= 32512)
        const __mmask16 m = static_cast<__mmask16>(first_bytes(rk - c));
        const __m512 y = _mm512_maskz_loadu_ps(m, qg + c);
        const __m512i x4 = _mm512_cvtps_epi32(_mm512_mul_ps(y, _mm512_set1_ps(inv4)));
        const __m512i x8 = _mm512_cvtps_epi32(_mm512_mul_ps(y, _mm512_set1_ps(inv8)));
        const __m512i h4 = _mm512_srai_epi32(_mm512_add_epi32(x4, _mm512_set1_epi32(8)), 4);
        const __m512i h8 = _mm512_srai_epi32(_mm512_add_epi32(x8, _mm512_set1_epi32(128)), 8);
        _mm512_mask_cvtepi32_storeu_epi8(&digits[c], m, h4);
        _mm512_mask_cvtepi32_storeu_epi8(&digits[rk + c], m, _mm512_sub_epi32(x4, _mm512_slli_epi32(h4, 4)));
        _mm512_mask_cvtepi32_storeu_epi8(&digits[2 * rk + c], m, h8);
        _mm512_mask_cvtepi32_storeu_epi8(&digits[3 * rk + c], m, _mm512_sub_epi32(x8, _mm512_slli_epi32(h8, 8)));
      }
      for (size_t u = 0; u < K.units.size(); ++u)
        for (int t = 0; t < 2; ++t) {
          int8_t* row = qa + P.qoffset(bh, gb, static_cast<int64_t>(u), t) + gr * 64;
          const int* src = &K.gather[(u * 2 + t) * 64];
          for (int k = 0; k < 64; ++k) row[k] = digits[src[k]];
        }
    }
}

// out[first·BN ..] (a Scales entry's n rows of scales) times its multiplier.
inline void apply_multiplier(const BandPlan::Scales& s, float* out) {
  if (s.mult == 1.0f) return;
  for (int64_t i = s.first * BN; i < (s.first + s.n) * BN; i += 16)
    _mm512_store_ps(out + i, _mm512_mul_ps(_mm512_load_ps(out + i), _mm512_set1_ps(s.mult)));
}

// A shared latent's value scales from its key scales (ks, the key plan's scales with their multipliers): the same
// scale codes, the value plan's multipliers instead of the key plan's (powers of two: exact). Each Scales entry of V
// names the rows of its band in vs as the key plan's entry of the same band does in ks.
inline void shared_value_scales(const float* ks, const BandPlan& K, const BandPlan& V, float* vs) {
  for (size_t i = 0; i < V.scales.size(); ++i) {
    const BandPlan::Scales &k = K.scales[i], &v = V.scales[i];
    const __m512 f = _mm512_set1_ps(v.mult / k.mult);
    for (int64_t j = 0; j < v.n * BN; j += 16)
      _mm512_store_ps(vs + v.first * BN + j, _mm512_mul_ps(_mm512_load_ps(ks + k.first * BN + j), f));
  }
}

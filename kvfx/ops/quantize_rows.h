// Rows of float32 latents -> stored int8 rows [codes | scale codes] (kvfx/quant.py's formats): kvfx::quantize, the
// write of a prefill or a chunk into kvfx's low-bit cache. quant.quantize's torch ops (a split, an amax, a log2, an
// exp2, a round and a pack per 32-column group) compile to a kernel Inductor does not vectorise: 2.5 ms a layer for
// 1024 tokens of a 360-wide int4 latent (7 % of a float32 prefill of SmolLM2, more in bfloat16); this is one pass.
//
// Numbers: a group's scale code e is the smallest in [-128, 127] with amax / top <= 2^(e/8), read off the same table
// of 2^(e/8) the decoder uses (torch's exp2; quant.quantize takes ceil(8 log2(amax / top)), which differs from it by
// one step only where 8 log2 lies within float round-off of an integer, ~1e-5 of groups); codes are x · 2^(-e/8)
// (torch's exp2 again), rounded half to even (symmetric int8 / int4, |q| <= 2^(bits-1) - 1) or down (mid-rise int5 /
// int3 / int2, -2^(bits-1) <= q < 2^(bits-1)), packed as quant._pack / _pack_planes pack them.

// One group of n numbers: its scale code, and its codes as int8 into q (rounded half to even, or down if midrise,
// then clamped to [lo, hi]).
inline int8_t encode_group(const float* __restrict x, int n, int top, bool midrise, float lo, float hi,
                           const float* up, const float* down, int8_t* __restrict q) {
  float amax = 0.f;
  int c = 0;
#if defined(__AVX512F__)
  __m512 m = _mm512_setzero_ps();
  for (; c < n; c += 16)
    m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(n - c >= 16 ? 0xFFFF : (1u << (n - c)) - 1, x + c)));
  amax = _mm512_reduce_max_ps(m);
#else
  for (; c < n; ++c) amax = std::max(amax, std::fabs(x[c]));
#endif
  const float r = std::max(amax, 1e-30f) / static_cast<float>(top);
  int e = std::min(127, std::max(-128, static_cast<int>(std::ceil(std::log2(r) * 8.f))));
  while (e < 127 && r > up[e + 128]) ++e;  // the table decides (see above)
  while (e > -128 && r <= up[e + 127]) --e;
  const float s = down[e + 128];
  c = 0;
#if defined(__AVX512F__)
  const __m512 sv = _mm512_set1_ps(s), lv = _mm512_set1_ps(lo), hv = _mm512_set1_ps(hi);
  for (; c < n; c += 16) {
    const __mmask16 k = n - c >= 16 ? 0xFFFF : (1u << (n - c)) - 1;
    const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + c), sv);
    const __m512 r = midrise ? _mm512_roundscale_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)
                             : _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm512_mask_cvtepi32_storeu_epi8(q + c, k, _mm512_cvtps_epi32(_mm512_min_ps(hv, _mm512_max_ps(lv, r))));
  }
#else
  for (; c < n; ++c)
    q[c] = static_cast<int8_t>(std::min(hi, std::max(lo, midrise ? std::floor(x[c] * s) : std::nearbyint(x[c] * s))));
#endif
  return static_cast<int8_t>(e);
}

// n bfloat16 numbers (their bits) as float32: the bits 16 places up, exact (bf16_to_float, 16 at a time).
inline void widen_bf16(const uint16_t* __restrict x, int n, float* __restrict out) {
  int c = 0;
#if defined(__AVX512F__)
  for (; c + 16 <= n; c += 16)
    _mm512_storeu_ps(out + c, _mm512_castsi512_ps(_mm512_slli_epi32(
                                  _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + c))), 16)));
#endif
  for (; c < n; ++c) out[c] = bf16_to_float(x[c]);
}

// quant._pack: `bits`-wide codes, 8 / bits a byte, code j of a byte in bits j·bits … (the last byte zero-padded).
inline void pack_codes(const int8_t* __restrict q, int width, int bits, int8_t* __restrict out) {
  const int per = 8 / bits, full = width / per, mask = (1 << bits) - 1;
  if (bits == 4)
    for (int i = 0; i < full; ++i) out[i] = static_cast<int8_t>((q[2 * i] & 15) | (q[2 * i + 1] << 4));
  else if (bits == 2)
    for (int i = 0; i < full; ++i)
      out[i] = static_cast<int8_t>((q[4 * i] & 3) | (q[4 * i + 1] & 3) << 2 | (q[4 * i + 2] & 3) << 4 | q[4 * i + 3] << 6);
  else
    for (int i = 0; i < full; ++i) {
      unsigned byte = 0;
      for (int j = 0; j < per; ++j) byte |= static_cast<unsigned>(q[per * i + j] & mask) << (bits * j);
      out[i] = static_cast<int8_t>(static_cast<uint8_t>(byte));
    }
  if (full * per < width) {
    unsigned byte = 0;
    for (int j = 0; full * per + j < width; ++j) byte |= static_cast<unsigned>(q[per * full + j] & mask) << (bits * j);
    out[full] = static_cast<int8_t>(static_cast<uint8_t>(byte));
  }
}

// One band of one row: `x` its b.width floats, `row` the stored row (the band's bytes start at b.at); `q` scratch
// of b.width bytes.
inline void encode_band(const float* __restrict x, const Band& b, const float* up, const float* down,
                        int8_t* __restrict row, int8_t* __restrict q) {
  int8_t* codes = row + b.at;
  int8_t* scale_codes = codes + b.code_bytes;
  if (b.bits == kE8Bits) {  // lattice points of 8, a scale code per 32 numbers (lattice_e8.h)
    for (int g0 = 0; g0 < b.width; g0 += 32)
      scale_codes[g0 / 32] = e8_encode_group(x + g0, std::min(32, b.width - g0), down, codes + g0 / 4);
    return;
  }
  const int group = b.bits == 8 ? std::max(b.width, 1) : 32;
  const bool midrise = b.bits != 8 && b.bits != 4;
  const int top = midrise ? 1 << (b.bits - 1) : (1 << (b.bits - 1)) - 1;
  const float lo = -static_cast<float>(top), hi = static_cast<float>(midrise ? top - 1 : top);
  for (int g0 = 0, gi = 0; g0 < b.width; g0 += group, ++gi)
    scale_codes[gi] = encode_group(x + g0, std::min(group, b.width - g0), top, midrise, lo, hi, up, down, q + g0);
  if (b.bits == 8) {
    std::memcpy(codes, q, b.width);
  } else if (!planes(b.bits)) {
    pack_codes(q, b.width, b.bits, codes);
  } else {  // int3 / int5: q = low + m·sign (low in [0, m), sign in {-1, 0}): the low bits as int2 / int4 codes,
    const int m = 1 << (b.bits - 1);  // then the signs, one bit each
    int8_t* sign = q + b.width;
    for (int c = 0; c < b.width; ++c) sign[c] = q[c] < 0, q[c] &= m - 1;
    pack_codes(q, b.width, b.bits - 1, codes);
    pack_codes(sign, b.width, 1, codes + (b.width * (b.bits - 1) + 7) / 8);
  }
}

// x [..., width] float32 or bfloat16, contiguous -> [..., row_elems] int8 (bits 8 / 4, or -1: bands `spec` =
// (bits, columns, …)); a bfloat16 row is widened to float32 (exactly) first. up, down [256]: 2^(e/8) and 2^(-e/8)
// for e = -128 … 127, as torch computes them.
torch::Tensor quantize_rows(torch::Tensor x, int64_t width, int64_t bits, std::vector<int64_t> spec,
                            torch::Tensor up, torch::Tensor down) {
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK((x.scalar_type() == torch::kFloat32 || bf16) && x.device().is_cpu() && x.dim() >= 1 &&
                  x.size(-1) == width && x.is_contiguous(),
              "quantize_rows: rows must be a contiguous float32 or bfloat16 CPU tensor [..., width]");
  const Format f(bits == 8 || bits == 4 ? std::vector<int64_t>{bits, width} : spec);  // a whole row: one band
  TORCH_CHECK(f.width == width, "quantize_rows: the bands span ", f.width, " columns, not ", width);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = f.row_elems;
  auto out = torch::empty(sizes, x.options().dtype(torch::kInt8));
  const int64_t rows = width == 0 ? 0 : x.numel() / width;
  const float *U = scale_table(up), *D = scale_table(down);
  const float* xf = bf16 ? nullptr : x.data_ptr<float>();
  const uint16_t* xb = bf16 ? reinterpret_cast<const uint16_t*>(x.data_ptr()) : nullptr;
  int8_t* op = out.data_ptr<int8_t>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> q(2 * width);  // a band's codes (and int3 / int5 signs) before packing
    std::vector<float> wide(bf16 ? width : 0);
    for (int64_t i = begin; i < end; ++i) {
      const float* row = xf ? xf + i * width : wide.data();
      if (bf16) widen_bf16(xb + i * width, static_cast<int>(width), wide.data());
      for (const Band& b : f.bands) encode_band(row + b.col, b, U, D, op + i * f.row_elems, q.data());
    }
  });
  return out;
}

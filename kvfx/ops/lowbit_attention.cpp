// One-token (decode) attention read straight from kvfx's low-bit latent rows (kvfx/quant.py formats).
//
//   out[b, h, g, :] = softmax_n(scale * q[b, h, g, :] . K[b, h, n, :] + mask[b, n]) . V[b, h, :, :]
//
// K and V rows are decoded where they are consumed, a block of rows at a time into a small buffer that stays in
// cache, so each stored byte is read once per step and no float copy of the cache is ever written (the plain-torch
// form, kvfx.ops.lowbit_attention.reference, dequantises the whole cache first). The g query rows of a group share
// every decoded row. Work is split over (batch, head, token chunk) with an online softmax per chunk and a final
// log-sum-exp merge (FlashDecoding's split-K), so a single latent head still uses every core.
//
// Row layout (kvfx/quant.py): int8: R codes, then one scale code e (x = q * 2^(e/8));
//                             int4: ceil(R/2) bytes of two codes (low nibble first), then one e per 32 numbers.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int kBlock = 64;   // rows decoded per block

struct Format {
  int bits, width, group, code_bytes, row_bytes, decoded;
  Format(int bits_, int width_) : bits(bits_), width(width_) {
    group = bits == 8 ? std::max(width, 1) : 32;
    code_bytes = (width * bits + 7) / 8;
    row_bytes = width == 0 ? 0 : code_bytes + (width + group - 1) / group;
    decoded = bits == 8 ? width : 2 * code_bytes;  // int4: [low nibbles | high nibbles] (see decode_row)
  }
};

// int8: out = the row's R numbers. int4: out = [even columns | odd columns] (the low and high nibbles of the
// code bytes, each a contiguous run: the loops vectorise); the caller permutes q and the output to match.
inline void decode_row(const int8_t* row, const Format& f, const float* lut, float* out) {
  const int8_t* e = row + f.code_bytes;
  if (f.bits == 8) {
    const float s = lut[e[0] + 128];
    for (int c = 0; c < f.width; ++c) out[c] = s * static_cast<float>(row[c]);
    return;
  }
  float* lo = out;
  float* hi = out + f.code_bytes;
  for (int j0 = 0, gi = 0; j0 < f.code_bytes; j0 += 16, ++gi) {  // 16 bytes = one group of 32 numbers
    const float s = lut[e[gi] + 128];
    const int end = std::min(f.code_bytes, j0 + 16);
    for (int j = j0; j < end; ++j) {
      const int8_t byte = row[j];
      lo[j] = s * static_cast<float>(static_cast<int8_t>(byte << 4) >> 4);
      hi[j] = s * static_cast<float>(byte >> 4);
    }
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

}  // namespace

// q [B, H, G, decoded Rk] float32 (int4: even columns, then odd, zero-padded); kc [B, H, N, kb] int8; vc [B, H, N, vb] int8 (ignored when shared: V = K rows);
// mask: [B or 1, N] float32 additive or an empty tensor. Returns [B, H, G, decoded Rv] float32 (int4: the same order).
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, int64_t rk, int64_t rv,
                               int64_t bits, double scale, torch::Tensor mask, bool shared) {
  TORCH_CHECK(q.dim() == 4 && kc.dim() == 4 && q.scalar_type() == torch::kFloat32, "q must be [B, H, G, R] float32");
  TORCH_CHECK(kc.scalar_type() == torch::kInt8 && vc.scalar_type() == torch::kInt8, "codes must be int8");
  q = q.contiguous(); kc = kc.contiguous(); vc = vc.contiguous();
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), N = kc.size(2);
  const Format fk(bits, rk), fv(bits, shared ? rk : rv);
  TORCH_CHECK(kc.size(3) == fk.row_bytes, "key rows hold ", kc.size(3), " bytes, expected ", fk.row_bytes);
  TORCH_CHECK(shared || vc.size(3) == fv.row_bytes, "value rows hold ", vc.size(3), " bytes, expected ", fv.row_bytes);
  const bool has_mask = mask.numel() > 0;
  if (has_mask) {
    mask = mask.contiguous();
    TORCH_CHECK(mask.size(-1) == N && mask.scalar_type() == torch::kFloat32, "mask must be [B|1, N] float32");
  }
  const int64_t mask_b = has_mask ? mask.size(0) : 0;
  const int64_t Rk = fk.decoded, Rv = fv.decoded;
  TORCH_CHECK(q.size(3) == Rk, "q has ", q.size(3), " columns, the decoded key rows ", Rk);

  float lut[256];
  for (int e = -128; e < 128; ++e) lut[e + 128] = std::exp2(static_cast<float>(e) / 8.0f);

  // split-K: chunks of >= 256 tokens, enough tasks for every thread
  const int64_t threads = at::get_num_threads();
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((N + 255) / 256, (2 * threads + B * H - 1) / (B * H)));
  const int64_t chunk = (N + chunks - 1) / chunks;
  chunks = (N + chunk - 1) / chunk;
  std::vector<float> part_m(B * H * chunks * G), part_l(B * H * chunks * G), part_o(B * H * chunks * G * Rv);

  const float* qp = q.data_ptr<float>();
  const int8_t* kp = kc.data_ptr<int8_t>();
  const int8_t* vp = shared ? kp : vc.data_ptr<int8_t>();
  const int64_t vrow = shared ? fk.row_bytes : fv.row_bytes;
  const float* mp = has_mask ? mask.data_ptr<float>() : nullptr;
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, B * H * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kbuf(kBlock * Rk), vbuf(shared ? 0 : kBlock * Rv), s(G * kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / chunks, c = task % chunks, b = bh / H;
      const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
      const float* qb = qp + bh * G * Rk;
      float* m = &part_m[task * G];
      float* l = &part_l[task * G];
      float* o = &part_o[task * G * Rv];
      std::fill(m, m + G, -std::numeric_limits<float>::infinity());
      std::fill(l, l + G, 0.0f);
      std::fill(o, o + G * Rv, 0.0f);
      for (int64_t r0 = n0; r0 < n1; r0 += kBlock) {
        const int rows = static_cast<int>(std::min<int64_t>(kBlock, n1 - r0));
        for (int r = 0; r < rows; ++r)
          decode_row(kp + (bh * N + r0 + r) * fk.row_bytes, fk, lut, &kbuf[r * Rk]);
        const float* vb = kbuf.data();
        if (!shared) {
          for (int r = 0; r < rows; ++r) decode_row(vp + (bh * N + r0 + r) * vrow, fv, lut, &vbuf[r * Rv]);
          vb = vbuf.data();
        }
        const float* mrow = has_mask ? mp + (mask_b == 1 ? 0 : b) * N + r0 : nullptr;
        // scores of the block: four query rows at a time share each decoded key row
        int64_t g = 0;
        for (; g + 4 <= G; g += 4) {
          const float *q0 = qb + g * Rk, *q1 = q0 + Rk, *q2 = q1 + Rk, *q3 = q2 + Rk;
          for (int r = 0; r < rows; ++r) {
            const float* kr = &kbuf[r * Rk];
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
            for (int64_t i = 0; i < Rk; ++i) {
              const float k = kr[i];
              a0 += q0[i] * k; a1 += q1[i] * k; a2 += q2[i] * k; a3 += q3[i] * k;
            }
            const float add = mrow ? mrow[r] : 0.0f;
            s[(g + 0) * kBlock + r] = a0 * sc + add; s[(g + 1) * kBlock + r] = a1 * sc + add;
            s[(g + 2) * kBlock + r] = a2 * sc + add; s[(g + 3) * kBlock + r] = a3 * sc + add;
          }
        }
        for (; g < G; ++g) {
          const float* qg = qb + g * Rk;
          for (int r = 0; r < rows; ++r) {
            const float* kr = &kbuf[r * Rk];
            float acc = 0.0f;
            for (int64_t i = 0; i < Rk; ++i) acc += qg[i] * kr[i];
            s[g * kBlock + r] = acc * sc + (mrow ? mrow[r] : 0.0f);
          }
        }
        // online softmax per query row, then the block's values
        for (g = 0; g < G; ++g) {
          float* sg = &s[g * kBlock];
          float bmax = -std::numeric_limits<float>::infinity();
          for (int r = 0; r < rows; ++r) bmax = std::max(bmax, sg[r]);
          if (bmax == -std::numeric_limits<float>::infinity()) {  // every row of the block masked
            std::fill(sg, sg + rows, 0.0f);
            continue;
          }
          const float mnew = std::max(m[g], bmax);
          const float corr = exp_nonpositive(m[g] - mnew);
          float* og = o + g * Rv;
          if (m[g] != mnew) {
            l[g] *= corr;
            for (int64_t i = 0; i < Rv; ++i) og[i] *= corr;
          }
          m[g] = mnew;
          float sum = 0.0f;
          for (int r = 0; r < rows; ++r) {
            sg[r] = exp_nonpositive(sg[r] - mnew);
            sum += sg[r];
          }
          l[g] += sum;
        }
        for (g = 0; g < G; ++g) {
          const float* pg = &s[g * kBlock];
          float* og = o + g * Rv;
          for (int r = 0; r < rows; ++r) {
            const float p = pg[r];
            const float* vr = vb + r * Rv;
            for (int64_t i = 0; i < Rv; ++i) og[i] += p * vr[i];
          }
        }
      }
    }
  });

  auto out = torch::empty({B, H, G, Rv}, q.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / G, g = i % G;
      float mmax = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) mmax = std::max(mmax, part_m[(bh * chunks + c) * G + g]);
      float* dst = op + i * Rv;
      std::fill(dst, dst + Rv, 0.0f);
      if (mmax == -std::numeric_limits<float>::infinity()) {  // every key masked: SDPA gives NaN
        std::fill(dst, dst + Rv, std::numeric_limits<float>::quiet_NaN());
        continue;
      }
      float total = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t t = (bh * chunks + c) * G + g;
        const float w = std::exp(part_m[t] - mmax);
        if (w == 0.0f) continue;
        total += w * part_l[t];
        const float* src = &part_o[t * Rv];
        for (int64_t j = 0; j < Rv; ++j) dst[j] += w * src[j];
      }
      for (int64_t j = 0; j < Rv; ++j) dst[j] /= total;
    }
  });
  return out;
}

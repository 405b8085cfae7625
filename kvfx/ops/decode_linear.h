// A decode step's linear layers: y[m, :] = W x[m, :] (+ b) for a few rows m (one token per sequence), float32.
//
// At one token a step, a linear layer is a matrix-vector product: every weight is read once and used for one
// multiply-add per row, so the step costs what reading W costs. ATen's float32 linear (MKL's sgemv here) reads
// SmolLM2's weights at ~9-12 GB/s on this machine's 2 cores against ~20-25 GB/s for a plain sum: the weights, not the
// cache, are most of a compressed decode step's bytes. This reads W once, 4 output rows at a time (each row's 8-float
// vectors against every x row in registers), the output rows split over the threads: ~17-19 GB/s on 2 cores.
// Pasted into lowbit_attention.cpp's build by kvfx/ops/lowbit_attention.py (one .so, one first-use build) and
// registered there as the op `linear` (CPU and Meta kernels, no Python on the way: a Python custom op cost ~100 us
// a call, 211 calls a SmolLM2 step); it takes the kernel for float32 inputs of up to kMaxRows rows and is
// at::linear otherwise. No autograd kernel: passes/decode_linear.py only puts it in graphs compiled without grad.

constexpr int64_t kMaxRows = 8;  // rows (batch × tokens) a call takes; more are a prefill, ATen's GEMM is right there

namespace decode_linear {

inline float dot(const float* w, const float* x, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, a);
  for (float l : lanes) s += l;
#endif
  for (; i < n; ++i) s += w[i] * x[i];
  return s;
}

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// y[m, o .. o+3] for every row m: four weight rows against one x row at a time (4 accumulators, each x vector
// loaded once for the four); the 4 × n weights stay in L1 for the next x row.
inline void four_rows(const float* w, int64_t ws, int64_t n, const float* x, int64_t rows, float* y) {
  const float *w0 = w, *w1 = w + ws, *w2 = w + 2 * ws, *w3 = w + 3 * ws;
  const int64_t body = n - n % 8;
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = x + m * n;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < body; i += 8) {
      const __m256 xv = _mm256_loadu_ps(xm + i);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), xv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), xv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), xv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), xv, a3);
    }
    float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    for (int64_t i = body; i < n; ++i) {
      s[0] += w0[i] * xm[i]; s[1] += w1[i] * xm[i]; s[2] += w2[i] * xm[i]; s[3] += w3[i] * xm[i];
    }
    std::memcpy(y + m * 4, s, sizeof s);
  }
}
#endif

}  // namespace decode_linear

// x [rows, in] float32 (rows <= kMaxRows), weight [out, in] float32 with unit column stride, bias [out] or none.
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "linear_rows: x [rows, in], W [out, in]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "linear_rows: float32 only");
  TORCH_CHECK(x.size(0) <= kMaxRows, "linear_rows: at most ", kMaxRows, " rows");
  const at::Tensor xc = x.contiguous(), wc = weight.stride(1) == 1 ? weight : weight.contiguous();
  const int64_t rows = x.size(0), n = x.size(1), out_n = weight.size(0), ws = wc.stride(0);
  at::Tensor y = at::empty({rows, out_n}, x.options());
  const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t quads = out_n / 4;
  // a task reads >= ~64 KiB of weights, so small layers are not split into tasks that cost more than they do
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, quads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> col(rows * 4);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t o = q * 4;
#if defined(__AVX2__) && defined(__FMA__)
      decode_linear::four_rows(wp + o * ws, ws, n, xp, rows, col.data());
      for (int64_t m = 0; m < rows; ++m) std::memcpy(yp + m * out_n + o, &col[m * 4], 4 * sizeof(float));
#else
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t k = 0; k < 4; ++k) yp[m * out_n + o + k] = decode_linear::dot(wp + (o + k) * ws, xp + m * n, n);
#endif
    }
  });
  for (int64_t o = quads * 4; o < out_n; ++o)  // the last out % 4 rows
    for (int64_t m = 0; m < rows; ++m) yp[m * out_n + o] = decode_linear::dot(wp + o * ws, xp + m * n, n);
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat).reshape({1, out_n}));
  return y;
}

// The op: F.linear(x, weight, bias), x [..., in], with up to kMaxRows float32 rows through linear_rows.
at::Tensor linear_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const int64_t n = x.dim() ? x.size(-1) : 0, rows = n ? x.numel() / n : 0;
  if (x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat || weight.dim() != 2 || rows < 1 ||
      rows > kMaxRows || weight.size(1) != n || (bias.has_value() && bias->defined() && bias->scalar_type() != at::kFloat))
    return at::linear(x, weight, bias);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = weight.size(0);
  return linear_rows(x.reshape({rows, n}), weight, bias).view(sizes);
}

at::Tensor linear_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  std::vector<c10::SymInt> sizes(x.sym_sizes().begin(), x.sym_sizes().end());
  sizes.back() = weight.sym_size(0);
  return at::empty_symint(sizes, x.options());
}

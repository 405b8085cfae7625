// A decode step's linear layers: y[m, :] = W x[m, :] (+ b) for a few rows m (one token per sequence), float32 or
// bfloat16.
//
// At one token a step, a linear layer is a matrix-vector product: every weight is read once and used for one
// multiply-add per row, so the step costs what reading W costs. ATen's float32 linear (MKL's sgemv here) reads
// SmolLM2's weights at ~9-12 GB/s on this machine's 2 cores against ~20-25 GB/s for a plain sum: the weights, not the
// cache, are most of a compressed decode step's bytes. This reads W once, 4 output rows at a time (each row's 8-float
// vectors against every x row in registers), the output rows split over the threads: ~17-19 GB/s on 2 cores (AMD
// EPYC, AVX2). With AVX-512, up to 4 rows one weight row at a time (each thread's weights one sequential stream:
// ~29-31 GB/s float32 on the Zen 4 VM, a plain sum's rate), 5-8 rows 8 weight rows a step, a cache line of each (on
// Intel the lines two steps ahead prefetched: the Sapphire Rapids VM ~21 GB/s, where MKL's sgemv reads ~19-22).
// bfloat16 weights (a bfloat16 model) are read as they are: with AVX512-BF16 by VDPBF16PS against x as stored
// (~27-33 GB/s one row at a time on the Zen 4 VM, where ATen's bfloat16 linear reads ~7-10), else widened in
// registers (a bfloat16 number is the top half of a float32: zero-extend, shift by 16) against x widened once a call;
// summed in float32 and rounded to bfloat16 once at the end, as ATen's bfloat16 linear rounds.
// Pasted into lowbit_attention.cpp's build by kvfx/ops/lowbit_attention.py (one .so, one first-use build) and
// registered there as the ops `linear` and `linears` (several weights of one x in one call; CPU and Meta kernels, no
// Python on the way: a Python custom op cost ~100 us a call, 211 calls a SmolLM2 step); it takes the kernel for float32 or bfloat16 inputs (x and W of one dtype) of
// up to kMaxRows rows and is at::linear otherwise. No autograd kernel: passes/decode_linear.py only puts it in
// graphs compiled without grad.

constexpr int64_t kMaxRows = 8;  // rows (batch × tokens) a call takes; more are a prefill, ATen's GEMM is right there
constexpr int64_t kOneRow = 4;   // up to this many rows, AVX-512 kernels read one weight row at a time (one_row_*)

namespace decode_linear {

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {  // 8 bfloat16 numbers as float32: their bits, 16 places up
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

template <typename T>
inline float dot(const T* w, const float* x, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) a = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, a);
  for (float l : lanes) s += l;
#endif
  for (; i < n; ++i) s += static_cast<float>(w[i]) * x[i];
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
template <typename T>
inline void four_rows(const T* w, int64_t ws, int64_t n, const float* x, int64_t rows, float* y) {
  const T *w0 = w, *w1 = w + ws, *w2 = w + 2 * ws, *w3 = w + 3 * ws;
  const int64_t body = n - n % 8;
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = x + m * n;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < body; i += 8) {
      const __m256 xv = _mm256_loadu_ps(xm + i);
      a0 = _mm256_fmadd_ps(load8(w0 + i), xv, a0);
      a1 = _mm256_fmadd_ps(load8(w1 + i), xv, a1);
      a2 = _mm256_fmadd_ps(load8(w2 + i), xv, a2);
      a3 = _mm256_fmadd_ps(load8(w3 + i), xv, a3);
    }
    float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    for (int64_t i = body; i < n; ++i) {
      const float xi = xm[i];
      s[0] += static_cast<float>(w0[i]) * xi, s[1] += static_cast<float>(w1[i]) * xi;
      s[2] += static_cast<float>(w2[i]) * xi, s[3] += static_cast<float>(w3[i]) * xi;
    }
    std::memcpy(y + m * 4, s, sizeof s);
  }
}
#else
template <typename T>
inline void four_rows(const T* w, int64_t ws, int64_t n, const float* x, int64_t rows, float* y) {
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t k = 0; k < 4; ++k) y[m * 4 + k] = dot(w + k * ws, x + m * n, n);
}
#endif

#if defined(__AVX512F__)
// float32 on CPUs with AVX-512: 16 weights (one cache line) of 8 rows at a time against one x row, on Intel each row's
// line 512 bytes ahead prefetched (MKL's sgemv reads about as fast on Sapphire Rapids; the 8-float AVX2 loop above did
// not). AMD's Zen 4 reads the step's float32 weights faster without them (1.04-1.10x in 5 of 6 interleaved scratch
// A/B runs of benchmarks/linear.py's step, 0.96x in one: its hardware prefetchers follow the 8 rows, the prefetches
// take load slots); its bfloat16 loop below keeps its prefetches (without: 0.92-0.93x).
template <bool Prefetch>
inline void eight_rows_f32(const float* w, int64_t ws, int64_t n, const float* x, int64_t rows, float* y) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = x + m * n;
    __m512 a[8];
    for (int r = 0; r < 8; ++r) a[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
      const __m512 xv = _mm512_maskz_loadu_ps(k, xm + i);
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) {
        if (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + r * ws + i) + 512, _MM_HINT_T0);
        a[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, w + r * ws + i), xv, a[r]);
      }
    }
    for (int r = 0; r < 8; ++r) y[m * 8 + r] = _mm512_reduce_add_ps(a[r]);
  }
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// bfloat16 on CPUs with AVX512-BF16 (Cooper Lake, Sapphire Rapids and later, Zen 4): VDPBF16PS takes 32 weights (one
// cache line) of a row against 32 numbers of x as they are stored, adding pairs of products into 16 float32 sums;
// 8 weight rows at a time against one x row, so each loaded x vector serves the eight. A bfloat16 row of SmolLM2 is
// 18 lines: each line is prefetched a whole step ahead, in the next 8 rows (1.07-1.12x the read rate of prefetching
// 8 lines ahead in the same row: a scratch A/B on benchmarks/linear.py's shapes; float32's 36-line rows gained nothing).
inline void eight_rows_bf16(const at::BFloat16* w, int64_t ws, int64_t n, const at::BFloat16* x, int64_t rows,
                            float* y) {
  for (int64_t m = 0; m < rows; ++m) {
    const at::BFloat16* xm = x + m * n;
    __m512 a[8];
    for (int r = 0; r < 8; ++r) a[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 32) {
      const __mmask32 k = n - i >= 32 ? ~__mmask32(0) : (__mmask32(1) << (n - i)) - 1;
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(k, xm + i);
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (8 + r) * ws + i), _MM_HINT_T0);  // the next 8 rows'
        a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_maskz_loadu_epi16(k, w + r * ws + i), xv);
      }
    }
    for (int r = 0; r < 8; ++r) y[m * 8 + r] = _mm512_reduce_add_ps(a[r]);
  }
}
#endif

#if defined(__AVX512F__)
// float32 on CPUs with AVX-512, up to kOneRow x rows (a decode step of up to 4 sequences): one weight row at a time,
// 32 weights (two cache lines) a step against each of the M x rows in registers, two sums a row. One row at a time
// makes each thread's weights one sequential stream, which the hardware prefetchers follow at the memory's speed: on
// the AMD EPYC Zen 4 VM SmolLM2's step read ~29-31 GB/s, a plain sum's rate, where eight_rows_f32 (8 streams a
// thread, with or without software prefetches) read ~21-25 (benchmarks/linear.py; 1.17x at 1 row and 1.04x at 4 in
// an interleaved scratch A/B, the whole float32 decode step 1.06x); at 8 rows eight_rows_f32 was faster (0.88x: each
// weight line then meets 8 x lines, the loads, not the memory, bound it). Intel CPUs take it too, unmeasured there
// (the Sapphire Rapids VM measured the 8-row kernel; one sequential stream is what their prefetchers follow best).
template <int M>
inline void row_f32(const float* w, int64_t n, const float* x, float* y) {
  __m512 a[M][2];
  for (int m = 0; m < M; ++m) a[m][0] = a[m][1] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 w0 = _mm512_loadu_ps(w + i), w1 = _mm512_loadu_ps(w + i + 16);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      a[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * n + i), a[m][0]);
      a[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * n + i + 16), a[m][1]);
    }
  }
  for (; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 wv = _mm512_maskz_loadu_ps(k, w + i);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) a[m][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(k, x + m * n + i), a[m][0]);
  }
  for (int m = 0; m < M; ++m) y[m] = _mm512_reduce_add_ps(_mm512_add_ps(a[m][0], a[m][1]));
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// bfloat16 with AVX512-BF16, up to kOneRow x rows: eight_rows_bf16's VDPBF16PS, one weight row at a time, 64
// weights a step, as row_f32 (on the Zen 4 VM ~27-33 GB/s where eight_rows_bf16 read ~19: 1.8x at 1 and 4 rows, the
// bfloat16 decode step 1.035x; at 8 rows 0.98x, so eight_rows_bf16 keeps those).
template <int M>
inline void row_bf16(const at::BFloat16* w, int64_t n, const at::BFloat16* x, float* y) {
  __m512 a[M][2];
  for (int m = 0; m < M; ++m) a[m][0] = a[m][1] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + i), w1 = (__m512bh)_mm512_loadu_si512(w + i + 32);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      a[m][0] = _mm512_dpbf16_ps(a[m][0], w0, (__m512bh)_mm512_loadu_si512(x + m * n + i));
      a[m][1] = _mm512_dpbf16_ps(a[m][1], w1, (__m512bh)_mm512_loadu_si512(x + m * n + i + 32));
    }
  }
  for (; i < n; i += 32) {
    const __mmask32 k = n - i >= 32 ? ~__mmask32(0) : (__mmask32(1) << (n - i)) - 1;
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(k, w + i);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
      a[m][0] = _mm512_dpbf16_ps(a[m][0], wv, (__m512bh)_mm512_maskz_loadu_epi16(k, x + m * n + i));
  }
  for (int m = 0; m < M; ++m) y[m] = _mm512_reduce_add_ps(_mm512_add_ps(a[m][0], a[m][1]));
}
#endif

// by_rows' kernel of one output row (K = 1) from a row kernel templated on the number of x rows (1 .. kOneRow).
#define KVFX_ONE_ROW(NAME, ROW, T)                                                                  \
  inline void NAME(const T* w, int64_t, int64_t n, const T* x, int64_t rows, float* y) {            \
    switch (rows) {                                                                                 \
      case 1: return ROW<1>(w, n, x, y);                                                            \
      case 2: return ROW<2>(w, n, x, y);                                                            \
      case 3: return ROW<3>(w, n, x, y);                                                            \
      default: return ROW<4>(w, n, x, y);                                                           \
    }                                                                                               \
  }
#if defined(__AVX512F__)
KVFX_ONE_ROW(one_row_f32, row_f32, float)
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
KVFX_ONE_ROW(one_row_bf16, row_bf16, at::BFloat16)
#endif
#undef KVFX_ONE_ROW

}  // namespace decode_linear

// One weight of a call: W [out_n, in] of T (unit column stride, row stride ws), its bias [out_n] of T or null, and
// where its y [rows, out_n] of Y goes.
template <typename T, typename Y>
struct Part {
  const T* w;
  int64_t ws, out_n;
  const T* bias;
  Y* y;
};

// y = x · Wᵀ (+ bias) for every part (several weights of one x: an attention's q, k, v, an MLP's gate and up):
// `kernel` (four_rows, eight_rows_*, one_row_*) on K output rows at a time, the parts' rows split over the threads as
// one range (one fork and join a call), each sum rounded to Y once, after the bias; x as the kernel takes it (xk) and
// as float32 (xf, for the last out_n % K rows of a part; null when there are none: no float32 copy of a bfloat16 x).
template <int K, typename X, typename T, typename Y, typename Kernel>
void by_rows(Kernel kernel, const X* xk, const float* xf, const std::vector<Part<T, Y>>& parts, int64_t rows,
             int64_t n) {
  const auto put = [&](const Part<T, Y>& p, int64_t m, int64_t o, float v) {
    p.y[m * p.out_n + o] = static_cast<Y>(p.bias ? v + static_cast<float>(p.bias[o]) : v);
  };
  std::vector<int64_t> first(parts.size() + 1, 0);  // the parts' first K-row steps in the one range
  for (size_t i = 0; i < parts.size(); ++i) first[i + 1] = first[i] + parts[i].out_n / K;
  // a task reads >= ~64 KiB of float32 weights, so small layers are not split into tasks that cost more than they do
  const int64_t grain = std::max<int64_t>(1, 65536 / (K * std::max<int64_t>(n, 1)));
  at::parallel_for(0, first.back(), grain, [&](int64_t begin, int64_t end) {
    float col[K * kMaxRows];
    size_t i = 0;
    for (int64_t q = begin; q < end; ++q) {
      while (q >= first[i + 1]) ++i;
      const Part<T, Y>& p = parts[i];
      const int64_t o = (q - first[i]) * K;
      kernel(p.w + o * p.ws, p.ws, n, xk, rows, col);
      for (int64_t m = 0; m < rows; ++m)
        for (int k = 0; k < K; ++k) put(p, m, o + k, col[m * K + k]);
    }
  });
  for (const Part<T, Y>& p : parts)
    for (int64_t o = p.out_n / K * K; o < p.out_n; ++o)  // the last out_n % K rows
      for (int64_t m = 0; m < rows; ++m) put(p, m, o, decode_linear::dot(p.w + o * p.ws, xf + m * n, n));
}

// y_i = x · W_iᵀ (+ b_i) for x [rows, in] and weights [out_i, in] (float32, or all bfloat16) with unit column
// stride, biases [out_i] of x's dtype or undefined; each y in x's dtype, summed in float32 (bfloat16: rounded once,
// after the bias).
std::vector<at::Tensor> linear_parts(const at::Tensor& x, at::TensorList weights, at::TensorList biases) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= kMaxRows, "linear_rows: x [rows, in], at most ", kMaxRows, " rows");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.scalar_type() == at::kFloat || bf16, "linear_rows: float32 or bfloat16 x");
  const int64_t rows = x.size(0), n = x.size(1);
  const at::Tensor xc = x.contiguous();
  std::vector<at::Tensor> ws, bs, ys;
  bool tails = false;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == n && w.scalar_type() == x.scalar_type(),
                "linear_rows: W [out, in] of x's dtype");
    const bool has_bias = i < biases.size() && biases[i].defined();
    TORCH_CHECK(!has_bias || (biases[i].scalar_type() == x.scalar_type() && biases[i].numel() == w.size(0)),
                "linear_rows: a bias of x's dtype, one number an output");
    ws.push_back(w.stride(1) == 1 ? w : w.contiguous());
    bs.push_back(has_bias ? biases[i].contiguous() : at::Tensor());
    ys.push_back(at::empty({rows, w.size(0)}, x.options()));
    tails = tails || w.size(0) % 8 != 0;
  }
  namespace dl = decode_linear;
  const auto parts = [&](auto* t, auto* y) {  // the Part list, T and Y as the pointers' types
    using T = std::remove_pointer_t<decltype(t)>;
    using Y = std::remove_pointer_t<decltype(y)>;
    std::vector<Part<T, Y>> out;
    for (size_t i = 0; i < ws.size(); ++i)
      out.push_back({ws[i].data_ptr<T>(), ws[i].stride(0), ws[i].size(0),
                     bs[i].defined() ? bs[i].data_ptr<T>() : nullptr, ys[i].data_ptr<Y>()});
    return out;
  };
  if (bf16) {
    using B = at::BFloat16;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    if (rows <= kOneRow) {
      by_rows<1>(dl::one_row_bf16, xc.data_ptr<B>(), nullptr, parts(static_cast<B*>(nullptr), static_cast<B*>(nullptr)),
                 rows, n);
    } else {
      const at::Tensor xf = tails ? xc.to(at::kFloat) : at::Tensor();  // float32 x only where it is read
      by_rows<8>(dl::eight_rows_bf16, xc.data_ptr<B>(), xf.defined() ? xf.data_ptr<float>() : nullptr,
                 parts(static_cast<B*>(nullptr), static_cast<B*>(nullptr)), rows, n);
    }
#else
    const at::Tensor xf = xc.to(at::kFloat);
    by_rows<4>(dl::four_rows<B>, xf.data_ptr<float>(), xf.data_ptr<float>(),
               parts(static_cast<B*>(nullptr), static_cast<B*>(nullptr)), rows, n);
#endif
  } else {
    const float* xp = xc.data_ptr<float>();
#if defined(__AVX512F__)
    static const bool amd = __builtin_cpu_is("amd");
    if (rows <= kOneRow)
      by_rows<1>(dl::one_row_f32, xp, xp, parts(static_cast<float*>(nullptr), static_cast<float*>(nullptr)), rows, n);
    else if (amd)
      by_rows<8>(dl::eight_rows_f32<false>, xp, xp, parts(static_cast<float*>(nullptr), static_cast<float*>(nullptr)),
                 rows, n);
    else
      by_rows<8>(dl::eight_rows_f32<true>, xp, xp, parts(static_cast<float*>(nullptr), static_cast<float*>(nullptr)),
                 rows, n);
#else
    by_rows<4>(dl::four_rows<float>, xp, xp, parts(static_cast<float*>(nullptr), static_cast<float*>(nullptr)), rows,
               n);
#endif
  }
  return ys;
}

// x [rows, in], weight [out, in] (float32, or both bfloat16), bias [out] or none: linear_parts of one weight.
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "linear_rows: x [rows, in], W [out, in]");
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
              weight.scalar_type() == x.scalar_type(), "linear_rows: float32 or bfloat16 x and W of one dtype");
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  return linear_parts(x, {weight}, {b})[0];
}

// The op: F.linear(x, weight, bias), x [..., in], with up to kMaxRows float32 or bfloat16 rows through linear_rows.
at::Tensor linear_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const int64_t n = x.dim() ? x.size(-1) : 0, rows = n ? x.numel() / n : 0;
  const auto dt = x.scalar_type();
  if ((dt != at::kFloat && dt != at::kBFloat16) || weight.scalar_type() != dt || weight.dim() != 2 || rows < 1 ||
      rows > kMaxRows || weight.size(1) != n || (bias.has_value() && bias->defined() && bias->scalar_type() != dt))
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

// The op linears(x, weights): [F.linear(x, W) for W in weights], one call for the weights of one x (an attention's
// q, k, v; an MLP's gate and up): one dispatch and one split over the threads for all of them, through linear_parts
// where linear_op would take its kernel for each, else at::linear for each.
std::vector<at::Tensor> linears_op(const at::Tensor& x, at::TensorList weights) {
  const int64_t n = x.dim() ? x.size(-1) : 0, rows = n ? x.numel() / n : 0;
  const auto dt = x.scalar_type();
  bool kernel = (dt == at::kFloat || dt == at::kBFloat16) && rows >= 1 && rows <= kMaxRows;
  for (const at::Tensor& w : weights) kernel = kernel && w.scalar_type() == dt && w.dim() == 2 && w.size(1) == n;
  std::vector<at::Tensor> ys;
  if (!kernel) {
    for (const at::Tensor& w : weights) ys.push_back(at::linear(x, w));
    return ys;
  }
  ys = linear_parts(x.reshape({rows, n}), weights, {});
  for (size_t i = 0; i < ys.size(); ++i) {
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = weights[i].size(0);
    ys[i] = ys[i].view(sizes);
  }
  return ys;
}

std::vector<at::Tensor> linears_meta(const at::Tensor& x, at::TensorList weights) {
  std::vector<at::Tensor> ys;
  for (const at::Tensor& w : weights) ys.push_back(linear_meta(x, w, std::nullopt));
  return ys;
}

// A decode step's small matmuls by kvfx constants: y = x @ C for a few rows of x (passes/decode_matmul.py), with
// x [..., g, d] and C [d, R] (the cache's projection of the new token's keys and values into a joint latent) or
// C [h, d, R] with x [..., h, g, d] (q·B per kv head, o·Dᵀ), float32 or bfloat16, summed in float32 and rounded once.
//
// Written as a multiply and a sum, Inductor's loop recomputes x's producer for every 16 output columns: x is RoPE's
// output, and its cos and sin (of the position) were evaluated (R / 16)·d·g times a layer (13 k for SmolLM2's
// 360-wide latent), ~6 % of a float32 step. As an opaque op its input is computed once, into a buffer; as ATen's
// matmul it costs ~22 µs (float32) / ~48 µs (bfloat16, oneDNN) a call, this ~2-5 µs. Each row: y += x[c] · C[c, :]
// over c, the output row in a float32 scratch row (R <= kMaxMatmulCols), C read from the caches after its first row.
// Pasted into lowbit_attention.cpp's build by kvfx/ops/lowbit_attention.py and registered there as `small_matmul`
// (CPU and Meta kernels); anything it does not take (other dtypes, more rows, wider C) goes to at::matmul.

constexpr int64_t kMaxMatmulRows = 4096;  // rows of x (all heads); the pass sends a decode step's few
constexpr int64_t kMaxMatmulCols = 4096;  // R: the scratch row

namespace decode_matmul {

template <typename T>
inline float widen(T v) { return static_cast<float>(v); }

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // 16 bfloat16 numbers as float32: their bits, 16 places up
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#endif

// acc[0, R) += a · c[0, R)
template <typename T>
inline void axpy(float a, const T* __restrict c, float* __restrict acc, int64_t R) {
  int64_t r = 0;
#if defined(__AVX512F__)
  const __m512 av = _mm512_set1_ps(a);
  for (; r + 16 <= R; r += 16) _mm512_storeu_ps(acc + r, _mm512_fmadd_ps(av, load16(c + r), _mm512_loadu_ps(acc + r)));
#endif
  for (; r < R; ++r) acc[r] += a * widen(c[r]);
}

// Rows split among the threads, each thread's rows whole (C[h] read contiguously): a step's q·B and o·Dᵀ (9 rows of
// SmolLM2, ~250 KB of C a call) cost reading C, and one core reads at about half the machine's rate (~35 % faster
// on 2 threads, C not cached). At least ~64 k multiply-adds a thread, so a tiny product stays on the calling
// thread. (A single row's columns split between threads read C's rows interleaved: slower than one thread here.)
template <typename T>
void rows(const T* x, const T* C, T* y, int64_t H, int64_t G, int64_t d, int64_t R, int64_t lead, bool per_head) {
  const int64_t N = lead * H * G, nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(1, std::min(N / nt, (int64_t{1} << 16) / std::max<int64_t>(1, d * R)));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(R);
    for (int64_t i = begin; i < end; ++i) {  // row i: x[i, :] against C[h] (h = i / G % H) or C
      const T* c = C + (per_head ? (i / G % H) * d * R : 0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = 0; k < d; ++k) axpy(widen(x[i * d + k]), c + k * R, acc.data(), R);
      std::copy(acc.begin(), acc.end(), y + i * R);  // bfloat16: c10's rounding, to nearest even
    }
  });
}

}  // namespace decode_matmul

// The op: torch.matmul(x, C) for C [d, R] or [h, d, R] (x [..., h, g, d]); the kernel for contiguous float32 or
// bfloat16 x and C of one dtype with at most kMaxMatmulRows rows, at::matmul otherwise.
at::Tensor small_matmul(const at::Tensor& x, const at::Tensor& C) {
  TORCH_CHECK(C.dim() == 2 || C.dim() == 3, "small_matmul: C must be [d, R] or [h, d, R]");
  TORCH_CHECK(x.dim() >= C.dim(), "small_matmul: x [..., g, d] needs at least C's dimensions");
  const auto dt = x.scalar_type();
  const bool per_head = C.dim() == 3;
  const int64_t d = C.dim() >= 2 ? C.size(-2) : 0, R = C.dim() >= 2 ? C.size(-1) : 0;
  const int64_t H = per_head ? C.size(0) : 1;
  bool ok = (dt == at::kFloat || dt == at::kBFloat16) && C.scalar_type() == dt && (C.dim() == 2 || per_head) &&
            x.dim() >= (per_head ? 3 : 2) && x.size(-1) == d && d > 0 && R > 0 && R <= kMaxMatmulCols &&
            x.numel() / d <= kMaxMatmulRows && (!per_head || x.size(-3) == H);
  if (!ok) return at::matmul(x, C);
  const at::Tensor xc = x.contiguous(), Cc = C.contiguous();
  const int64_t G = x.size(-2), lead = x.numel() / (d * G * H);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = R;
  at::Tensor y = at::empty(sizes, x.options());
  if (dt == at::kFloat)
    decode_matmul::rows(xc.data_ptr<float>(), Cc.data_ptr<float>(), y.data_ptr<float>(), H, G, d, R, lead, per_head);
  else
    decode_matmul::rows(xc.data_ptr<at::BFloat16>(), Cc.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), H, G, d,
                        R, lead, per_head);
  return y;
}

at::Tensor small_matmul_meta(const at::Tensor& x, const at::Tensor& C) {
  TORCH_CHECK((C.dim() == 2 || C.dim() == 3) && x.dim() >= C.dim(), "small_matmul: x [..., g, d], C [(h,) d, R]");
  std::vector<c10::SymInt> sizes(x.sym_sizes().begin(), x.sym_sizes().end());
  sizes.back() = C.sym_size(-1);
  return at::empty_symint(sizes, x.options());
}

// kvfx.quant's "e8" codes in C++ (kvfx/lattice.py's codebook and rounding, the same numbers): 8 numbers a point
// of the E8 lattice within radius √10, stored as its 16-bit index (low byte, then high), one scale code per 32
// numbers. Pasted into lowbit_attention.cpp's build by kvfx/ops/lowbit_attention.py (after Format).
//
// The codebook: points u = 2·x (integers in [-6, 6], all even or all odd, Σu ≡ 0 mod 4, Σu² <= 40) ordered by the
// key Σ_i (u_i + 6)·13^i, ascending; built once a process (~57 k points, a few ms). Per point also its 8 numbers
// as int4 nibbles (column j in bits 4j … 4j + 3 of a dword: the int4 format's packing), for the integer paths.

constexpr int kE8Bits = 9;  // a band's code in the kernels' band specs (kvfx/ops/lowbit_attention.py's _band_spec)
constexpr int kE8Size = 56881;

struct E8Book {
  std::vector<int8_t> u;         // [kE8Size][8]
  std::vector<float> x;          // [kE8Size][8]: u / 2, the points (one multiply by the step decodes: no rounding
                                 // the build's -fassociative-math could move)
  std::vector<int64_t> key;      // ascending
  std::vector<uint32_t> nibble;  // [kE8Size]
  E8Book() {
    std::vector<std::pair<int64_t, std::array<int8_t, 8>>> pts;
    for (int odd = 0; odd < 2; ++odd) {
      std::array<int8_t, 8> v{};
      // depth-first over the coordinates, pruned by the norm
      std::function<void(int, int)> walk = [&](int i, int norm) {
        if (i == 8) {
          int sum = 0;
          for (int8_t t : v) sum += t;
          if (((sum % 4) + 4) % 4 == 0) {
            int64_t k = 0, p = 1;
            for (int j = 0; j < 8; ++j, p *= 13) k += (v[j] + 6) * p;
            pts.push_back({k, v});
          }
          return;
        }
        for (int t = odd ? -5 : -6; t <= 6; t += 2)
          if (norm + t * t <= 40) v[i] = static_cast<int8_t>(t), walk(i + 1, norm + t * t);
      };
      walk(0, 0);
    }
    std::sort(pts.begin(), pts.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    TORCH_CHECK(static_cast<int>(pts.size()) == kE8Size, "E8 codebook: ", pts.size(), " points");
    u.resize(8 * kE8Size), x.resize(8 * kE8Size), key.resize(kE8Size), nibble.resize(kE8Size);
    for (int i = 0; i < kE8Size; ++i) {
      key[i] = pts[i].first;
      uint32_t n = 0;
      for (int j = 0; j < 8; ++j) {
        u[8 * i + j] = pts[i].second[j], x[8 * i + j] = 0.5f * static_cast<float>(pts[i].second[j]);
        n |= (static_cast<uint32_t>(pts[i].second[j]) & 15u) << (4 * j);
      }
      nibble[i] = n;
    }
  }
};

inline const E8Book& e8_book() {
  static const E8Book book;
  return book;
}

// The nearest point of D8 (each coordinate rounded half to even; an odd sum: the coordinate furthest from its
// integer, the first of equals, moved one step the other way, up where it was exact) to y, into r.
inline void e8_d8(const double* y, double shift, double* r) {
  double sum = 0, worst = -1, dw = 0;
  int at = 0;
  for (int j = 0; j < 8; ++j) {
    r[j] = std::nearbyint(y[j] - shift);
    sum += r[j];
    const double d = y[j] - shift - r[j];
    if (std::fabs(d) > worst) worst = std::fabs(d), at = j, dw = d;
  }
  if (std::fmod(std::fabs(sum), 2.0) != 0) r[at] += dw < 0 ? -1 : 1;
  for (int j = 0; j < 8; ++j) r[j] += shift;
}

inline void e8_plain(const double* y, double* q) {
  double a[8], b[8], da = 0, db = 0;
  e8_d8(y, 0.0, a), e8_d8(y, 0.5, b);
  for (int j = 0; j < 8; ++j) da += (y[j] - a[j]) * (y[j] - a[j]), db += (y[j] - b[j]) * (y[j] - b[j]);
  std::memcpy(q, da <= db ? a : b, sizeof(a));
}

inline double e8_norm(const double* q) {
  double n = 0;
  for (int j = 0; j < 8; ++j) n += q[j] * q[j];
  return n;
}

// kvfx.lattice.nearest: the nearest point, else for y·0.97^k (k <= 4) while outside the ball, else y drawn in to
// radius 2.15.
inline void e8_nearest(double* y, double* q) {
  e8_plain(y, q);
  for (int k = 0; k < 4 && e8_norm(q) > 10; ++k) {
    for (int j = 0; j < 8; ++j) y[j] *= 0.97;
    e8_plain(y, q);
  }
  if (e8_norm(q) > 10) {
    const double pull = std::min(1.0, 2.15 / std::max(std::sqrt(e8_norm(y)), 1e-300));
    for (int j = 0; j < 8; ++j) y[j] *= pull;
    e8_plain(y, q);
  }
}

// One group of n (a multiple of 8, <= 32) numbers -> its scale code and n / 4 code bytes (quant._lattice_codes):
// the step the group's rms, or 1.02 / √10 of its largest 8-vector's length where larger, to the nearest code.
inline int8_t e8_encode_group(const float* __restrict x, int n, const float* down, int8_t* __restrict codes) {
  float ss = 0.f, top = 0.f;
  for (int v = 0; v < n; v += 8) {
    float s = 0.f;
    for (int j = 0; j < 8; ++j) s += x[v + j] * x[v + j];
    ss += s, top = std::max(top, s);
  }
  const float rms = std::max(std::sqrt(ss / static_cast<float>(n)), 1e-30f);
  const float step = std::max(rms, std::max(std::sqrt(top), 1e-30f) * (1.02f / std::sqrt(10.0f)));
  const int e = std::min(127, std::max(-128, static_cast<int>(std::nearbyint(std::log2(step) * 8.f))));
  const float s = down[e + 128];
  const E8Book& book = e8_book();
  for (int v = 0; v < n; v += 8) {
    double y[8], q[8];
    for (int j = 0; j < 8; ++j) y[j] = static_cast<double>(x[v + j] * s);
    e8_nearest(y, q);
    int64_t k = 0, p = 1;
    for (int j = 0; j < 8; ++j, p *= 13) k += (static_cast<int64_t>(std::lround(2 * q[j])) + 6) * p;
    const int idx = static_cast<int>(std::lower_bound(book.key.begin(), book.key.end(), k) - book.key.begin());
    codes[v / 4] = static_cast<int8_t>(idx & 255), codes[v / 4 + 1] = static_cast<int8_t>(idx >> 8);
  }
  return static_cast<int8_t>(e);
}

// An e8 band's `width` columns from its codes and scale codes e (kvfx.quant: x = u · 2^(e/8) / 2).
inline void e8_decode_band(const int8_t* __restrict codes, const int8_t* __restrict e, int width, const float* lut,
                           float* __restrict out) {
  const E8Book& book = e8_book();
  for (int v = 0; v < width; v += 8) {
    const int idx = static_cast<uint8_t>(codes[v / 4]) | static_cast<uint8_t>(codes[v / 4 + 1]) << 8;
    const float s = lut[e[v / 32] + 128];
    const float* x = &book.x[8 * std::min(idx, kE8Size - 1)];
    for (int j = 0; j < 8; ++j) out[v + j] = s * x[j];
  }
}

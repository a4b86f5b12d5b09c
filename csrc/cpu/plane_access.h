// Plane-level access shared by the CPU attention kernels (the AFF tile kernels, aff_combine,
// coord_scale / aff_input): strides read once, one (n, c) plane read in place or gathered,
// and the factor-gradient sums of a flattened plane.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace saffnet_fast {

// Strides of an N×C×H×W tensor and of the factor tensors, read once.
struct Strides4 {
  int64_t n, c, h, w;
  explicit Strides4(const at::Tensor& t)
      : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
  int64_t at(int64_t in, int64_t ic, int64_t ih, int64_t iw) const {
    return in * n + ic * c + ih * h + iw * w;
  }
};
struct Strides3 {
  int64_t n, c, l;
  explicit Strides3(const at::Tensor& t) : n(t.stride(0)), c(t.stride(1)), l(t.stride(2)) {}
};

// A view of one (n, c) plane of an N×C×H×W tensor: read in place when its H·W values are
// dense, else gathered into (or, for outputs, written through) `buffer`.
template <typename T>
struct PlaneAccess {
  const Strides4 s;
  const int64_t H, W;
  explicit PlaneAccess(const at::Tensor& t) : s(t), H(t.size(2)), W(t.size(3)) {}
  bool dense() const { return s.w == 1 && s.h == W; }
  const T* read(const T* base, int64_t n, int64_t c, std::vector<T>& buffer) const {
    const T* p = base + n * s.n + c * s.c;
    if (dense()) return p;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) buffer[h * W + w] = p[h * s.h + w * s.w];
    return buffer.data();
  }
  T* target(T* base, int64_t n, int64_t c, std::vector<T>& buffer) const {
    return dense() ? base + n * s.n + c * s.c : buffer.data();
  }
  void commit(T* base, int64_t n, int64_t c, const std::vector<T>& buffer) const {
    if (dense()) return;
    T* p = base + n * s.n + c * s.c;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) p[h * s.h + w * s.w] = buffer[h * W + w];
  }
};

// The factor gradients of one flattened H·W plane from its per-element products:
// grad_a_h[h] = Σ_w DMW[h·W + w] and grad_a_w[w] = Σ_h DMH[h·W + w], summed in double (they
// cancel, and float32 rounding would depend on the vector width of the clone that ran).
// `col` is W doubles of scratch. aff_combine and coord_scale / aff_input backward share it.
template <typename T, typename out_t>
inline void plane_factor_sums(const T* DMW, const T* DMH, int64_t H, int64_t W,
                              std::vector<double>& col, out_t* grad_a_h, out_t* grad_a_w) {
  std::fill(col.begin(), col.end(), 0.0);
  for (int64_t h = 0; h < H; ++h) {
    const T* dmw = DMW + h * W;
    const T* dmh = DMH + h * W;
    double r0 = 0, r1 = 0;  // two chains: rows are short (W = 12, 24)
    int64_t w = 0;
    for (; w + 1 < W; w += 2) {
      r0 += dmw[w];
      r1 += dmw[w + 1];
    }
    if (w < W) r0 += dmw[w];
    grad_a_h[h] = static_cast<out_t>(r0 + r1);
    for (w = 0; w < W; ++w) col[w] += dmh[w];
  }
  for (int64_t w = 0; w < W; ++w) grad_a_w[w] = static_cast<out_t>(col[w]);
}

}  // namespace saffnet_fast

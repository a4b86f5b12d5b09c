// Strides of N×C×H×W and N×C×L tensors passed by value to the CUDA kernels that index every
// tensor through its own strides (coord_scale, aff_input, aff_combine, aff_pair_combine).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace saffnet_fast {

struct Idx4 {
  int64_t n, c, h, w;
  __host__ __device__ int64_t at(int64_t in, int64_t ic, int64_t ih, int64_t iw) const {
    return in * n + ic * c + ih * h + iw * w;
  }
};
struct Idx3 {
  int64_t n, c, l;
};
inline Idx4 strides4(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}
inline Idx3 strides3(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

}  // namespace saffnet_fast

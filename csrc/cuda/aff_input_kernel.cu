// aff_input CUDA kernels (float32, float64, float16, bfloat16; float32 accumulation for the
// 16-bit types): the coord_scale kernels with offset 1 (coord_scale_kernel.cuh),
// t = x·(1 + a_h ⊗ a_w) written channel-major (aff_input_empty), and its plane sums.
//
// The sums are a separate ATen reduction over t here (one more read of t; the CPU kernel
// forms them in its pass): the elementwise grid-stride kernel has no per-plane owner to sum
// in, and this path has not been timed on a GPU yet.
#include <ATen/core/Tensor.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/aff_checks.h"
#include "../common/layout.h"
#include "coord_scale_kernel.cuh"

namespace saffnet_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> aff_input_cuda(const at::Tensor& x_in, const at::Tensor& a_h,
                                                  const at::Tensor& a_w) {
  check_coord_factors(x_in, a_h, a_w, "aff_input");
  check_cuda_dtype(x_in, "aff_input", "x");
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  at::Tensor t = aff_input_empty(x);
  coord_scale_offset_cuda(x, a_h, a_w, 1.0, t);
  return {t, t.sum({2, 3})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aff_input_backward_cuda(
    const at::Tensor& grad_t, const std::optional<at::Tensor>& grad_sum, const at::Tensor& x_in,
    const at::Tensor& a_h, const at::Tensor& a_w) {
  return coord_scale_offset_backward_cuda(grad_t, x_in, a_h, a_w, 1.0, "aff_input_backward",
                                          "grad_t", grad_sum);
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CUDA, m) {
  m.impl("aff_input", &aff_input_cuda);
  m.impl("aff_input_backward", &aff_input_backward_cuda);
}

}  // namespace saffnet_fast

// aff_input CPU kernels (float32, float64): the coord_scale kernels with offset 1
// (coord_scale_kernel.h), t = x·(1 + a_h ⊗ a_w) written channel-major (aff_input_empty), and
// its plane sums Σ_hw t in the same pass.
//
// Minimum bytes moved: forward reads x once and writes t once (+ N·C·(H+W) factors and N·C
// sums), one pass. Backward reads grad_t and x once and writes grad_x once (+ N·C·(H+W+1)),
// one pass.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/aff_checks.h"
#include "../common/layout.h"
#include "coord_scale_kernel.h"

namespace saffnet_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> aff_input_cpu(const at::Tensor& x_in, const at::Tensor& a_h,
                                                 const at::Tensor& a_w) {
  check_coord_factors(x_in, a_h, a_w, "aff_input");
  check_cpu_dtype(x_in, "aff_input", "x");
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  at::Tensor t = aff_input_empty(x);
  at::Tensor sums = at::empty({x.size(0), x.size(1)}, x.options());
  coord_scale_offset_cpu(x, a_h, a_w, 1.0, t, &sums);
  return {t, sums};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aff_input_backward_cpu(
    const at::Tensor& grad_t, const std::optional<at::Tensor>& grad_sum, const at::Tensor& x,
    const at::Tensor& a_h, const at::Tensor& a_w) {
  return coord_scale_offset_backward_cpu(grad_t, x, a_h, a_w, 1.0, "aff_input_backward",
                                         "grad_t", grad_sum);
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CPU, m) {
  m.impl("aff_input", &aff_input_cpu);
  m.impl("aff_input_backward", &aff_input_backward_cpu);
}

}  // namespace saffnet_fast

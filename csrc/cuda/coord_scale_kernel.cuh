// The coord_scale CUDA kernels with an offset, out = x·(offset + a_h ⊗ a_w): coord_scale runs
// them with offset 0 (coord_scale_kernel.cu), aff_input with offset 1 (aff_input_kernel.cu).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace saffnet_fast {

// out = x·(offset + a_h ⊗ a_w), every tensor through its strides. The caller checks the
// arguments.
void coord_scale_offset_cuda(const at::Tensor& x, const at::Tensor& a_h, const at::Tensor& a_w,
                             double offset, at::Tensor& out);

// (grad_x = g·(offset + a_h·a_w), grad_a_h = Σ_w g·x·a_w, grad_a_w = Σ_h g·x·a_h) with
// g = grad_out + grad_sum[n, c] (grad_sum: the gradient of the plane sums, optional).
// Checks its arguments; `op` and `grad_name` name them in errors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> coord_scale_offset_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& a_h,
    const at::Tensor& a_w, double offset, const char* op, const char* grad_name,
    const std::optional<at::Tensor>& grad_sum = std::nullopt);

}  // namespace saffnet_fast

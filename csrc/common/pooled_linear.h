// pooled_linear's activation codes, per-element math and argument checks, shared by the CPU
// kernel (cpu/pooled_linear_kernel.cpp), the device-generic composite that serves CUDA and
// the autograd function (pooled_linear.cpp).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "checks.h"

namespace saffnet_fast {

// act codes, as in saffnet_fast/ops/native.py (_ACT_*)
enum PooledAct : int64_t { kIdentity = 0, kRelu = 1, kHardSwish = 2, kSigmoid = 3 };

// The reference's h_swish, x·relu6(x + 3)/6, in the same order of operations.
template <typename T>
inline T hard_swish_value(T p) {
  const T r = p + T(3) < T(0) ? T(0) : (p + T(3) > T(6) ? T(6) : p + T(3));
  return p * r / T(6);
}

// d/dp [p·relu6(p + 3)/6] = (relu6(p + 3) + p·[−3 < p < 3]) / 6: what autograd gives for the
// reference's expression (hardtanh passes its gradient strictly inside its range).
template <typename T>
inline T hard_swish_grad(T p) {
  const T r = p + T(3) < T(0) ? T(0) : (p + T(3) > T(6) ? T(6) : p + T(3));
  return (r + (p > T(-3) && p < T(3) ? p : T(0))) / T(6);
}

inline void check_pooled_linear(const at::Tensor& y, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& bn_weight,
                                const std::optional<at::Tensor>& bn_bias, bool batch_norm,
                                int64_t act, const char* op) {
  TORCH_CHECK_VALUE(y.dim() == 2, op, ": y: expected 2-D M×K rows, got shape ", y.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(y.scalar_type()), op,
                   ": y: expected a floating-point tensor, got ", y.scalar_type());
  TORCH_CHECK_VALUE(y.size(0) > 0 && y.size(1) > 0, op, ": y: expected M, K ≥ 1, got shape ",
                    y.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == y.size(1), op,
                    ": weight: expected F×K with K = ", y.size(1), " (y's columns), got shape ",
                    weight.sizes());
  check_like(weight, weight.sizes(), y, op, "weight");
  const int64_t F = weight.size(0);
  if (bias.has_value()) check_like(*bias, {F}, y, op, "bias");
  if (bn_weight.has_value()) check_like(*bn_weight, {F}, y, op, "bn_weight");
  if (bn_bias.has_value()) check_like(*bn_bias, {F}, y, op, "bn_bias");
  TORCH_CHECK_VALUE(act >= kIdentity && act <= kSigmoid, op,
                    ": act: expected 0 (identity), 1 (relu), 2 (h_swish) or 3 (sigmoid), got ",
                    act);
  if (batch_norm) {
    // nn.BatchNorm2d's own condition
    TORCH_CHECK_VALUE(y.size(0) > 1, op,
                      ": Expected more than 1 value per channel when training, got ", y.size(0),
                      " rows");
  } else {
    TORCH_CHECK_VALUE(!bn_weight.has_value() && !bn_bias.has_value(), op,
                      ": bn_weight / bn_bias given with batch_norm=False");
  }
}

// The dtype the statistics and activation are computed in (and normalised / mean / var are
// returned in): float32 for half and bfloat16 inputs, else the input's.
inline at::ScalarType pooled_opmath_dtype(const at::Tensor& y) {
  const auto s = y.scalar_type();
  return (s == at::kHalf || s == at::kBFloat16) ? at::kFloat : s;
}

// pooled_linear_backward's arguments: those of the forward, grad_out and out M×F in y's dtype,
// the saved normalised values M×F and var (F, or empty without BN) in the opmath dtype.
inline void check_pooled_linear_backward(const at::Tensor& grad_out, const at::Tensor& y,
                                         const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& bn_weight,
                                         const std::optional<at::Tensor>& bn_bias,
                                         bool batch_norm, int64_t act, const at::Tensor& out,
                                         const at::Tensor& normalised, const at::Tensor& var,
                                         const char* op) {
  check_pooled_linear(y, weight, bias, bn_weight, bn_bias, batch_norm, act, op);
  const int64_t M = y.size(0), F = weight.size(0);
  check_like(grad_out, {M, F}, y, op, "grad_out");
  check_like(out, {M, F}, y, op, "out");
  const auto acc = pooled_opmath_dtype(y);
  auto check_saved = [&](const at::Tensor& t, at::IntArrayRef sizes, const char* name) {
    TORCH_CHECK_VALUE(t.sizes() == sizes, op, ": ", name, ": expected shape ", sizes, ", got ",
                      t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == acc, op, ": ", name, ": expected dtype ", acc,
                     ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == y.device(), op, ": ", name, ": expected device ",
                      y.device(), " (the device of y), got ", t.device());
  };
  check_saved(normalised, {M, F}, "normalised");
  check_saved(var, {batch_norm ? F : 0}, "var");
}

}  // namespace saffnet_fast

// pooled_linear CPU kernels (float32, float64). Schema, math and the CUDA path:
// pooled_linear.cpp.
//
// Minimum bytes moved: forward reads y and W once, writes out and the normalised values
// once: M×(K + 2F); backward reads grad_out, out / normalised, y and W once and writes
// grad_y and grad_W: M×(2K + 3F) + 2F×K. Passes: forward, the GEMM (MKL) then one epilogue
// loop (column statistics, normalise, affine, activation); backward, one loop (activation
// gradient, column sums, BN's input gradient) then two GEMMs.
//
// Single-threaded loops: M×F is at most a few ten thousand values on SAFFNet's shapes
// (CA at 8×64×64×48: 896 rows × 8), well under the cost of waking a thread pool. Column
// sums accumulate in double.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "../common/pooled_linear.h"

namespace saffnet_fast {
namespace {

// BN's γ or β as F values, `fill` (1 or 0) where the BN has no affine parameters
template <typename scalar_t>
std::vector<scalar_t> affine_values(const std::optional<at::Tensor>& t, int64_t F,
                                    scalar_t fill) {
  if (!t.has_value()) return std::vector<scalar_t>(F, fill);
  const at::Tensor c = t->contiguous();
  return std::vector<scalar_t>(c.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>() + F);
}

template <typename scalar_t>
scalar_t activate(scalar_t p, int64_t act) {
  switch (act) {
    case kRelu:
      return p > scalar_t(0) ? p : scalar_t(0);
    case kHardSwish:
      return hard_swish_value(p);
    case kSigmoid:
      return scalar_t(1) / (scalar_t(1) + std::exp(-p));
    default:
      return p;
  }
}

template <typename scalar_t>
scalar_t activation_grad(scalar_t g, scalar_t out, scalar_t pre, int64_t act) {
  switch (act) {
    case kRelu:
      return out > scalar_t(0) ? g : scalar_t(0);
    case kHardSwish:
      return g * hard_swish_grad(pre);
    case kSigmoid:  // ATen's sigmoid_backward: g·(1 − y)·y
      return g * (scalar_t(1) - out) * out;
    default:
      return g;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pooled_linear_cpu(
    const at::Tensor& y_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    bool batch_norm, double eps, int64_t act) {
  const char* op = "pooled_linear";
  check_pooled_linear(y_in, weight, bias, bn_weight, bn_bias, batch_norm, act, op);
  check_cpu_dtype(y_in, op, "y");
  const at::Tensor y = y_in.contiguous();
  // z = y·Wᵀ + b; without BN it is also the saved pre-activation
  at::Tensor z = bias.has_value() ? at::addmm(*bias, y, weight.t()) : at::mm(y, weight.t());
  const int64_t M = z.size(0), F = z.size(1);
  at::Tensor out = at::empty({M, F}, y.options());
  at::Tensor normalised = batch_norm ? at::empty({M, F}, y.options()) : z;
  at::Tensor mean = at::empty({batch_norm ? F : 0}, y.options());
  at::Tensor var = at::empty({batch_norm ? F : 0}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "pooled_linear_cpu", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    if (!batch_norm) {
      for (int64_t i = 0; i < M * F; ++i) op_[i] = activate(zp[i], act);
      return;
    }
    // two-pass column statistics (biased variance, as BN normalises with)
    std::vector<double> sum(F, 0.0), sq(F, 0.0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t f = 0; f < F; ++f) sum[f] += zp[m * F + f];
    std::vector<scalar_t> mu(F), invstd(F);
    const auto gamma = affine_values<scalar_t>(bn_weight, F, 1);
    const auto beta = affine_values<scalar_t>(bn_bias, F, 0);
    for (int64_t f = 0; f < F; ++f) mu[f] = static_cast<scalar_t>(sum[f] / M);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t f = 0; f < F; ++f) {
        const double d = static_cast<double>(zp[m * F + f]) - mu[f];
        sq[f] += d * d;
      }
    scalar_t* mp = mean.mutable_data_ptr<scalar_t>();
    scalar_t* vp = var.mutable_data_ptr<scalar_t>();
    for (int64_t f = 0; f < F; ++f) {
      mp[f] = mu[f];
      vp[f] = static_cast<scalar_t>(sq[f] / M);
      invstd[f] = static_cast<scalar_t>(1.0 / std::sqrt(sq[f] / M + eps));
    }
    scalar_t* np_ = normalised.mutable_data_ptr<scalar_t>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t f = 0; f < F; ++f) {
        const int64_t i = m * F + f;
        const scalar_t nz = (zp[i] - mu[f]) * invstd[f];
        np_[i] = nz;
        op_[i] = activate(nz * gamma[f] + beta[f], act);
      }
  });
  return {out, normalised, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pooled_linear_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& y_in, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, bool batch_norm, double eps, int64_t act,
    const at::Tensor& out_in, const at::Tensor& normalised_in, const at::Tensor& var_in) {
  const char* op = "pooled_linear_backward";
  check_pooled_linear_backward(grad_out_in, y_in, weight, bias, bn_weight, bn_bias, batch_norm,
                               act, out_in, normalised_in, var_in, op);
  check_cpu_dtype(y_in, op, "y");
  const int64_t M = y_in.size(0), F = weight.size(0);
  const at::Tensor y = y_in.contiguous(), g = grad_out_in.contiguous();
  const at::Tensor out = out_in.contiguous(), normalised = normalised_in.contiguous();
  at::Tensor g_z = at::empty({M, F}, y.options());
  at::Tensor grad_bias = at::empty({F}, y.options());
  at::Tensor grad_bn_weight = at::empty({batch_norm ? F : 0}, y.options());
  at::Tensor grad_bn_bias = at::empty({batch_norm ? F : 0}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "pooled_linear_backward_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* outp = out.const_data_ptr<scalar_t>();
    const scalar_t* np_ = normalised.const_data_ptr<scalar_t>();
    scalar_t* gz = g_z.mutable_data_ptr<scalar_t>();
    const auto gamma = affine_values<scalar_t>(bn_weight, F, 1);
    const auto beta = affine_values<scalar_t>(bn_bias, F, 0);
    // the activation's gradient (g_pre, kept in g_z), and for BN the column sums
    // Σ g_pre (grad_β) and Σ g_pre·x̂ (grad_γ)
    std::vector<double> sum_g(F, 0.0), sum_gx(F, 0.0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t f = 0; f < F; ++f) {
        const int64_t i = m * F + f;
        const scalar_t pre = batch_norm ? np_[i] * gamma[f] + beta[f] : np_[i];
        const scalar_t gpre = activation_grad(gp[i], outp[i], pre, act);
        gz[i] = gpre;
        sum_g[f] += gpre;
        sum_gx[f] += static_cast<double>(gpre) * np_[i];
      }
    scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
    if (!batch_norm) {
      for (int64_t f = 0; f < F; ++f) gb[f] = static_cast<scalar_t>(sum_g[f]);
      return;
    }
    // BN's input gradient with batch statistics: invstd·γ·(g − mean(g) − x̂·mean(g·x̂))
    const scalar_t* vp = var_in.const_data_ptr<scalar_t>();
    scalar_t* gw = grad_bn_weight.mutable_data_ptr<scalar_t>();
    scalar_t* gbb = grad_bn_bias.mutable_data_ptr<scalar_t>();
    std::vector<scalar_t> scale(F), mean_g(F), mean_gx(F);
    for (int64_t f = 0; f < F; ++f) {
      gw[f] = static_cast<scalar_t>(sum_gx[f]);
      gbb[f] = static_cast<scalar_t>(sum_g[f]);
      scale[f] = static_cast<scalar_t>(gamma[f] / std::sqrt(static_cast<double>(vp[f]) + eps));
      mean_g[f] = static_cast<scalar_t>(sum_g[f] / M);
      mean_gx[f] = static_cast<scalar_t>(sum_gx[f] / M);
    }
    std::vector<double> sum_z(F, 0.0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t f = 0; f < F; ++f) {
        const int64_t i = m * F + f;
        const scalar_t v = scale[f] * (gz[i] - mean_g[f] - np_[i] * mean_gx[f]);
        gz[i] = v;
        sum_z[f] += v;
      }
    for (int64_t f = 0; f < F; ++f) gb[f] = static_cast<scalar_t>(sum_z[f]);
  });
  return {at::mm(g_z, weight), at::mm(g_z.t(), y), grad_bias, grad_bn_weight, grad_bn_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CPU, m) {
  m.impl("pooled_linear", &pooled_linear_cpu);
  m.impl("pooled_linear_backward", &pooled_linear_backward_cpu);
}

}  // namespace saffnet_fast

// Device-independent driver of split_resplice_train (csrc/split_resplice_train.cpp): the
// step loop, the buffers and the convolutions (ATen), parameterised by a Kernels class that
// each dispatch key's kernel file provides with three fused passes:
//   Kernels::moments(v, mean, var)                      per-channel batch mean / biased var
//   Kernels::apply(v, mean, var, γ, β, StepArgs, keep_dst, carry_dst)
//                                                       BN + LeakyReLU + dropout, split write
//   Kernels::backward(grad_keep, grad_carry, v, mean, var, γ, β, StepArgs)
//                                                       -> (grad_v, grad_γ, grad_β)
// Every N×c×H×W tensor handed to the kernels has contiguous H×W planes (a channel slice of
// a contiguous NCHW tensor); they index n and c through strides.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "split_resplice.h"
#include "split_resplice_checks.h"

namespace saffnet_fast {

// The dropout seed reaches the kernels either as a value (a CPU seed tensor, read on the
// host) or as a pointer to a one-element int64 tensor on the kernels' device, read by the
// kernel itself: a seed drawn on the GPU (torch.randint(..., device="cuda")) then needs no
// host sync, and a CUDA graph replay reads the seed its captured randint wrote, a new one
// each replay, so successive graphed steps draw different masks.
struct StepArgs {
  double eps, slope, p;
  uint64_t seed;                  // used when seed_on_device is null
  const int64_t* seed_on_device;  // device pointer, or null
  int64_t step;
};

inline StepArgs step_args(double eps, double slope, double p, const at::Tensor& seed,
                          int64_t step) {
  if (seed.is_cpu())
    return {eps, slope, p, static_cast<uint64_t>(seed.item<int64_t>()), nullptr, step};
  return {eps, slope, p, 0, seed.data_ptr<int64_t>(), step};
}

inline void check_split_resplice_train_args(const at::Tensor& x, at::TensorList weights,
                                            at::TensorList gammas, at::TensorList betas,
                                            double eps, double slope, double p,
                                            const at::Tensor& seed, const char* op,
                                            std::vector<int64_t>& widths) {
  widths = check_split_resplice_args(x, weights, gammas, op, "gammas");
  check_split_resplice_args(x, weights, betas, op, "betas");
  TORCH_CHECK_VALUE(eps > 0, op, ": eps: expected > 0, got ", eps);
  TORCH_CHECK_VALUE(slope >= 0, op, ": negative_slope: expected ≥ 0, got ", slope);
  TORCH_CHECK_VALUE(p >= 0 && p < 1, op, ": dropout: expected a probability in [0, 1), got ", p);
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == at::kLong &&
                        (seed.is_cpu() || seed.device() == x.device()),
                    op, ": seed: expected a one-element int64 tensor on the CPU or on x's "
                    "device (", x.device(), "), got ", seed.scalar_type(), " of shape ",
                    seed.sizes(), " on ", seed.device());
  const int64_t M = x.size(0) * x.size(2) * x.size(3);
  TORCH_CHECK_VALUE(M > 1, op, ": x: BatchNorm in training needs more than one value per "
                    "channel (N·H·W > 1), got shape ", x.sizes());
}

inline at::Tensor conv3x3(const at::Tensor& input, const at::Tensor& weight) {
  return at::conv2d(input, weight, /*bias=*/{}, /*stride=*/1, /*padding=*/1);
}

template <class Kernels>
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>
split_resplice_train_forward(const at::Tensor& x_in, at::TensorList weights,
                             at::TensorList gammas, at::TensorList betas, double eps,
                             double slope, double p, const at::Tensor& seed) {
  const char* op = "split_resplice_train";
  std::vector<int64_t> widths;
  check_split_resplice_train_args(x_in, weights, gammas, betas, eps, slope, p, seed, op, widths);
  Kernels::check_dtype(x_in, op);
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto plan = split_resplice_plan(C, widths);
  const int64_t steps = static_cast<int64_t>(plan.size()), w0 = C / (steps + 1);
  int64_t total = 0;
  for (int64_t c : widths) total += c;

  at::Tensor out = at::empty_like(x);
  at::Tensor mean = at::empty({total}, x.options()), var = at::empty({total}, x.options());
  std::vector<at::Tensor> pre, inputs;
  out.narrow(1, 0, w0).copy_(x.narrow(1, 0, w0));
  at::Tensor input = x.narrow(1, plan[0].x_offset, w0);
  int64_t stat_offset = 0;
  for (int64_t j = 0; j < steps; ++j) {
    const SplitRespliceStep& s = plan[j];
    at::Tensor v = conv3x3(input, weights[j]).contiguous();
    at::Tensor mean_j = mean.narrow(0, stat_offset, s.width);
    at::Tensor var_j = var.narrow(0, stat_offset, s.width);
    Kernels::moments(v, mean_j, var_j);
    at::Tensor next_input, carry_dst;
    if (j + 1 < steps) {
      // The next step's input [slice j+2 | carry(j)], written in place: the slice copied,
      // the carry by the apply pass.
      next_input = at::empty({N, widths[j + 1], H, W}, x.options());
      next_input.narrow(1, 0, w0).copy_(x.narrow(1, plan[j + 1].x_offset, w0));
      carry_dst = next_input.narrow(1, w0, s.width - s.keep);
    }
    const StepArgs args = step_args(eps, slope, p, seed, j);
    Kernels::apply(v, mean_j, var_j, gammas[j], betas[j], args,
                   out.narrow(1, s.out_offset, s.keep), carry_dst);
    pre.push_back(v);
    if (next_input.defined()) inputs.push_back(next_input);
    input = next_input;
    stat_offset += s.width;
  }
  return {out, pre, inputs, mean, var};
}

template <class Kernels>
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
split_resplice_train_backward(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                              at::TensorList weights, at::TensorList gammas,
                              at::TensorList betas, at::TensorList pre, at::TensorList inputs,
                              const at::Tensor& mean, const at::Tensor& var, double eps,
                              double slope, double p, const at::Tensor& seed) {
  const char* op = "split_resplice_train_backward";
  std::vector<int64_t> widths;
  check_split_resplice_train_args(x_in, weights, gammas, betas, eps, slope, p, seed, op, widths);
  Kernels::check_dtype(x_in, op);
  check_like(grad_out_in, x_in.sizes(), x_in, op, "grad_out");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const int64_t C = x.size(1);
  const auto plan = split_resplice_plan(C, widths);
  const int64_t steps = static_cast<int64_t>(plan.size()), w0 = C / (steps + 1);
  int64_t total = 0;
  for (int64_t c : widths) total += c;
  TORCH_CHECK_VALUE(static_cast<int64_t>(pre.size()) == steps, op, ": pre: expected ", steps,
                    " tensors (split_resplice_train's second output), got ", pre.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(inputs.size()) == steps - 1, op, ": inputs: expected ",
                    steps - 1, " tensors (split_resplice_train's third output), got ",
                    inputs.size());
  check_like(mean, {total}, x, op, "mean");
  check_like(var, {total}, x, op, "var");
  for (int64_t j = 0; j < steps; ++j) {
    check_like(pre[j], {x.size(0), widths[j], x.size(2), x.size(3)}, x, op, "pre[j]");
    if (j > 0)
      check_like(inputs[j - 1], {x.size(0), widths[j], x.size(2), x.size(3)}, x, op,
                 "inputs[j]");
  }

  at::Tensor grad_x = at::empty_like(x);
  grad_x.narrow(1, 0, w0).copy_(grad_out.narrow(1, 0, w0));
  std::vector<at::Tensor> grad_w(steps), grad_gamma(steps), grad_beta(steps);
  at::Tensor grad_carry;  // gradient w.r.t. carry(j), from step j+1's input gradient
  int64_t stat_offset = total;
  for (int64_t j = steps - 1; j >= 0; --j) {
    const SplitRespliceStep& s = plan[j];
    stat_offset -= s.width;
    const StepArgs args = step_args(eps, slope, p, seed, j);
    at::Tensor grad_v;
    std::tie(grad_v, grad_gamma[j], grad_beta[j]) = Kernels::backward(
        grad_out.narrow(1, s.out_offset, s.keep), grad_carry, pre[j].contiguous(),
        mean.narrow(0, stat_offset, s.width), var.narrow(0, stat_offset, s.width), gammas[j],
        betas[j], args);
    const at::Tensor input = j == 0 ? x.narrow(1, s.x_offset, w0) : inputs[j - 1];
    auto grads = at::convolution_backward(grad_v, input, weights[j], /*bias_sizes=*/std::nullopt,
                                          /*stride=*/{1, 1}, /*padding=*/{1, 1},
                                          /*dilation=*/{1, 1}, /*transposed=*/false,
                                          /*output_padding=*/{0, 0}, /*groups=*/1,
                                          /*output_mask=*/{true, true, false});
    const at::Tensor grad_input = std::get<0>(grads).contiguous();
    grad_w[j] = std::get<1>(grads);
    grad_x.narrow(1, s.x_offset, w0).copy_(grad_input.narrow(1, 0, w0));
    grad_carry = j > 0 ? grad_input.narrow(1, w0, s.width - w0) : at::Tensor();
  }
  return {grad_x, grad_w, grad_gamma, grad_beta};
}

}  // namespace saffnet_fast

// pooled_linear: one layer of the small MLPs that run on pooled vectors, as rows
//   out = act(BN(y·Wᵀ + b)),   y: M×K rows, W: F×K, BN with the batch statistics of the M rows
// (optional), act ∈ {identity, ReLU, h_swish, sigmoid}. The layers it serves:
//   * CoordAttention: conv1 → bn1 → h_swish on the N·(H+W) pooled positions, and conv_h /
//     conv_w → sigmoid on the N·H and N·W positions;
//   * AFF's global branch: conv → BN → ReLU → conv → BN on the N pooled means.
//
// Why an op for a few kilobytes of arithmetic: in training, the reference's graph for these
// layers is ~15 ATen calls forward and ~30 autograd calls backward per block, each 10–30 µs
// of dispatch and engine overhead on a CPU, whatever the size. Measured, SCAFF(128) on
// 8×128×16×12, 2 threads, forward + backward: CA's pooled layers 0.60 ms and the global
// branch 0.28 ms of the native block's 3.45 ms (their arithmetic is ~0.5 MFLOP).
// One op forward and one backward op instead.
//
// CUDA: the composite body below, ATen calls (the GEMMs in cuBLAS, the statistics and the
// activation a few elementwise / reduction calls on M×F), device-generic. Half and bfloat16
// inputs keep the GEMM in their dtype (float32 accumulation in cuBLAS) and do the statistics
// and activation in float32. CPU: direct loops around MKL GEMMs, cpu/pooled_linear_kernel.cpp.
//
// Minimum bytes moved: y, W once; out (and the saved normalised values) once: M×(K + 2F).
// Passes (composite): GEMM, one statistics reduction, the elementwise epilogue as a few ATen
// calls on M×F.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/pooled_linear.h"

namespace saffnet_fast {
namespace {

at::Tensor apply_act(const at::Tensor& pre, int64_t act) {
  switch (act) {
    case kRelu:
      return at::relu(pre);
    case kHardSwish:  // the reference's HSwish, x·relu6(x + 3)/6, in the same order
      return pre * at::hardtanh(pre + 3.0, 0.0, 6.0) / 6.0;
    case kSigmoid:
      return at::sigmoid(pre);
    default:
      return pre;
  }
}

// -> (out M×F, normalised M×F (BN's x̂, or the pre-activation without BN), batch mean F,
//     biased batch variance F); mean and variance are empty without BN.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pooled_linear(
    const at::Tensor& y, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    bool batch_norm, double eps, int64_t act) {
  check_pooled_linear(y, weight, bias, bn_weight, bn_bias, batch_norm, act, "pooled_linear");
  const auto acc = pooled_opmath_dtype(y);
  at::Tensor z = bias.has_value() ? at::addmm(bias.value(), y, weight.t()) : at::mm(y, weight.t());
  z = z.to(acc);
  at::Tensor mean, var, normalised, pre;
  if (batch_norm) {
    std::tie(var, mean) = at::var_mean(z, {0}, /*correction=*/0, /*keepdim=*/false);
    normalised = (z - mean) * at::rsqrt(var + eps);
    pre = normalised;
    if (bn_weight.has_value()) pre = pre * bn_weight->to(acc);
    if (bn_bias.has_value()) pre = pre + bn_bias->to(acc);
  } else {
    normalised = pre = z;
    mean = var = z.new_empty({0});
  }
  return {apply_act(pre, act).to(y.scalar_type()), normalised, mean, var};
}

// -> (grad_y, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias); the last two are empty
// without BN, grad_bias is Σ_rows of the pre-BN gradient whether or not bias was given.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pooled_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, bool batch_norm, double eps, int64_t act,
    const at::Tensor& out, const at::Tensor& normalised, const at::Tensor& var) {
  check_pooled_linear_backward(grad_out, y, weight, bias, bn_weight, bn_bias, batch_norm, act,
                               out, normalised, var, "pooled_linear_backward");
  const auto acc = pooled_opmath_dtype(y);
  const at::Tensor g = grad_out.to(acc);
  const at::Tensor gamma = bn_weight.has_value() ? bn_weight->to(acc) : at::Tensor();
  // the pre-activation, from the saved normalised values (h_swish needs it; the others
  // differentiate from their output)
  auto pre_activation = [&]() {
    if (!batch_norm) return normalised;
    at::Tensor p = gamma.defined() ? normalised * gamma : normalised;
    return bn_bias.has_value() ? p + bn_bias->to(acc) : p;
  };
  at::Tensor g_pre;
  switch (act) {
    case kRelu:
      g_pre = at::threshold_backward(g, out.to(acc), 0);
      break;
    case kSigmoid:
      g_pre = at::sigmoid_backward(g, out.to(acc));
      break;
    case kHardSwish: {
      // d/dp [p·relu6(p + 3)/6] = (relu6(p + 3) + p·[−3 < p < 3]) / 6: autograd's value for
      // the reference's expression (hardtanh passes gradient strictly inside its range)
      const at::Tensor p = pre_activation();
      const at::Tensor inside = at::logical_and(p > -3.0, p < 3.0);
      g_pre = g * (at::hardtanh(p + 3.0, 0.0, 6.0) + p * inside) / 6.0;
      break;
    }
    default:
      g_pre = g;
  }
  at::Tensor g_z, grad_bn_weight, grad_bn_bias;
  if (batch_norm) {
    grad_bn_bias = g_pre.sum(0);
    grad_bn_weight = (g_pre * normalised).sum(0);
    const at::Tensor g_norm = gamma.defined() ? g_pre * gamma : g_pre;
    // BN's backward with batch statistics: invstd·(g − mean(g) − x̂·mean(g·x̂))
    g_z = at::rsqrt(var + eps) *
          (g_norm - g_norm.mean(0) - normalised * (g_norm * normalised).mean(0));
    grad_bn_bias = grad_bn_bias.to(y.scalar_type());
    grad_bn_weight = grad_bn_weight.to(y.scalar_type());
  } else {
    g_z = g_pre;
    grad_bn_weight = grad_bn_bias = y.new_empty({0});
  }
  g_z = g_z.to(y.scalar_type());
  return {at::mm(g_z, weight), at::mm(g_z.t(), y), g_z.sum(0), grad_bn_weight, grad_bn_bias};
}

// Autograd in C++, not torch.library.register_autograd: the Python wrapper costs ~60 µs
// per call forward + backward (pytree handling, default filling, redispatch, zero-filled
// gradients for the three non-differentiable outputs), three times the op's own time.
// Measured, 224×128 rows to 8 features with sigmoid, 2 threads: Python registration
// 103 µs forward + backward, torch.autograd.Function 71 µs, ATen addmm + sigmoid 46 µs.
class PooledLinearFunction : public torch::autograd::Function<PooledLinearFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& y, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bn_weight,
      const std::optional<at::Tensor>& bn_bias, bool batch_norm, double eps, int64_t act) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("saffnet_fast::pooled_linear", "")
                         .typed<decltype(pooled_linear)>();
    auto [out, normalised, mean, var] =
        op.call(y, weight, bias, bn_weight, bn_bias, batch_norm, eps, act);
    ctx->save_for_backward({y, weight, bias.value_or(at::Tensor()),
                            bn_weight.value_or(at::Tensor()), bn_bias.value_or(at::Tensor()),
                            out, normalised, var});
    ctx->saved_data["batch_norm"] = batch_norm;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    // only `out` is differentiable: the rest are saved values and the batch statistics
    // for the running-stat update
    ctx->mark_non_differentiable({normalised, mean, var});
    ctx->set_materialize_grads(false);  // no zero-filled gradients for those three
    return {out, normalised, mean, var};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return torch::autograd::variable_list(8);  // out unused
    auto optional_of = [](const at::Tensor& t) {
      return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("saffnet_fast::pooled_linear_backward", "")
                         .typed<decltype(pooled_linear_backward)>();
    auto [grad_y, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias] =
        op.call(grads[0], saved[0], saved[1], optional_of(saved[2]), optional_of(saved[3]),
                optional_of(saved[4]), ctx->saved_data["batch_norm"].toBool(),
                ctx->saved_data["eps"].toDouble(), ctx->saved_data["act"].toInt(), saved[5],
                saved[6], saved[7]);
    auto if_given = [](const at::Tensor& grad, const at::Tensor& input) {
      return input.defined() ? grad : at::Tensor();
    };
    return {grad_y,
            grad_weight,
            if_given(grad_bias, saved[2]),
            if_given(grad_bn_weight, saved[3]),
            if_given(grad_bn_bias, saved[4]),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pooled_linear_autograd(
    const at::Tensor& y, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    bool batch_norm, double eps, int64_t act) {
  auto outs = PooledLinearFunction::apply(y, weight, bias, bn_weight, bn_bias, batch_norm, eps,
                                          act);
  return {outs[0], outs[1], outs[2], outs[3]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(saffnet_fast, m) {
  m.def("pooled_linear(Tensor y, Tensor weight, Tensor? bias, Tensor? bn_weight, "
        "Tensor? bn_bias, bool batch_norm, float eps, int act) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("pooled_linear_backward(Tensor grad_out, Tensor y, Tensor weight, Tensor? bias, "
        "Tensor? bn_weight, Tensor? bn_bias, bool batch_norm, float eps, int act, "
        "Tensor out, Tensor normalised, Tensor var) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// The composite body serves CUDA (registered only in a CUDA build, as every other op's CUDA
// kernel is); the CPU has its own loops (cpu/pooled_linear_kernel.cpp): on the CPU, the
// composite's ~20 ATen calls cost 10× the arithmetic.
#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(saffnet_fast, CUDA, m) {
  m.impl("pooled_linear", &pooled_linear);
  m.impl("pooled_linear_backward", &pooled_linear_backward);
}
#endif
TORCH_LIBRARY_IMPL(saffnet_fast, Autograd, m) {
  m.impl("pooled_linear", &pooled_linear_autograd);
}

}  // namespace saffnet_fast

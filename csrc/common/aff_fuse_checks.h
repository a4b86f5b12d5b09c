// Argument checks of aff_fuse / coord_scale, shared by the CPU and CUDA registrations.
#pragma once

#include <optional>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "checks.h"

namespace saffnet_fast {

inline void check_coord_factors(const at::Tensor& x, const at::Tensor& a_h, const at::Tensor& a_w,
                                const char* op) {
  check_nchw(x, op, "x");
  check_like(a_h, {x.size(0), x.size(1), x.size(2)}, x, op, "a_h");
  check_like(a_w, {x.size(0), x.size(1), x.size(3)}, x, op, "a_w");
}

// local_att's conv1: w1 Ci×C with C the channels of x, b1 Ci; returns Ci.
inline int64_t check_local_att_conv1(const at::Tensor& x, const at::Tensor& w1,
                                     const at::Tensor& b1, const char* op) {
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(1) == C && w1.size(0) >= 1, op,
                    ": w1: expected a Ci×C weight with C = ", C,
                    " (the channels of x), got shape ", w1.sizes());
  const int64_t Ci = w1.size(0);
  check_like(w1, {Ci, C}, x, op, "w1");
  check_like(b1, {Ci}, x, op, "b1");
  return Ci;
}

// w1: Ci×C (local_att conv1 with BN folded), b1: Ci, w2: C×Ci, b2: C, global_logit: N×C.
inline void check_aff_args(const at::Tensor& x, const at::Tensor& a_h, const at::Tensor& a_w,
                           const at::Tensor& global_logit, const at::Tensor& w1,
                           const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                           const char* op) {
  check_coord_factors(x, a_h, a_w, op);
  const int64_t N = x.size(0), C = x.size(1);
  check_like(global_logit, {N, C}, x, op, "global_logit");
  const int64_t Ci = check_local_att_conv1(x, w1, b1, op);
  check_like(w2, {C, Ci}, x, op, "w2");
  check_like(b2, {C}, x, op, "b2");
}

// aff_combine: x N×C×H×W, a_h / a_w its factors, local_logit shaped like x, global_logit N×C.
inline void check_aff_combine_args(const at::Tensor& x, const at::Tensor& a_h,
                                   const at::Tensor& a_w, const at::Tensor& local_logit,
                                   const at::Tensor& global_logit, const char* op) {
  check_coord_factors(x, a_h, a_w, op);
  check_like(local_logit, x.sizes(), x, op, "local_logit");
  check_like(global_logit, {x.size(0), x.size(1)}, x, op, "global_logit");
}

// aff_pair_combine: x and residual N×C×H×W of one shape, local_logit shaped like x,
// global_logit N×C, all of x's dtype and device.
inline void check_aff_pair_combine_args(const at::Tensor& x, const at::Tensor& residual,
                                        const at::Tensor& local_logit,
                                        const at::Tensor& global_logit, const char* op) {
  check_nchw(x, op, "x");
  check_like(residual, x.sizes(), x, op, "residual");
  check_like(local_logit, x.sizes(), x, op, "local_logit");
  check_like(global_logit, {x.size(0), x.size(1)}, x, op, "global_logit");
}

// aff_pair: x and residual N×C×H×W of one shape, dtype and device; the rest as aff_fuse.
inline void check_aff_pair_args(const at::Tensor& x, const at::Tensor& residual,
                                const at::Tensor& global_logit, const at::Tensor& w1,
                                const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                                const char* op) {
  check_nchw(x, op, "x");
  check_like(residual, x.sizes(), x, op, "residual");
  const int64_t N = x.size(0), C = x.size(1);
  check_like(global_logit, {N, C}, x, op, "global_logit");
  const int64_t Ci = check_local_att_conv1(x, w1, b1, op);
  check_like(w2, {C, Ci}, x, op, "w2");
  check_like(b2, {C}, x, op, "b2");
}

// aff_moments: w1 Ci×C, b1 Ci; stage 2 also w2 C×Ci and b2 C (both or neither).
inline void check_aff_moments_args(const at::Tensor& x, const at::Tensor& a_h,
                                   const at::Tensor& a_w, const at::Tensor& w1,
                                   const at::Tensor& b1, const std::optional<at::Tensor>& w2,
                                   const std::optional<at::Tensor>& b2, const char* op) {
  check_coord_factors(x, a_h, a_w, op);
  const int64_t C = x.size(1);
  const int64_t Ci = check_local_att_conv1(x, w1, b1, op);
  TORCH_CHECK_VALUE(w2.has_value() == b2.has_value(), op,
                    ": w2, b2: expected both (stage 2) or neither (stage 1)");
  if (w2.has_value()) {
    check_like(*w2, {C, Ci}, x, op, "w2");
    check_like(*b2, {C}, x, op, "b2");
  }
}

// aff_moments_backward: aff_moments' arguments, and grad_mean, grad_var and mean, each a
// vector over the statistics' channels (C with stage 2, else Ci).
inline void check_aff_moments_backward_args(
    const at::Tensor& grad_mean, const at::Tensor& grad_var, const at::Tensor& x,
    const at::Tensor& a_h, const at::Tensor& a_w, const at::Tensor& w1, const at::Tensor& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
    const at::Tensor& mean, const char* op) {
  check_aff_moments_args(x, a_h, a_w, w1, b1, w2, b2, op);
  const int64_t Co = w2.has_value() ? x.size(1) : w1.size(0);
  check_like(grad_mean, {Co}, x, op, "grad_mean");
  check_like(grad_var, {Co}, x, op, "grad_var");
  check_like(mean, {Co}, x, op, "mean");
}

// x itself when it is densely NCHW- or NHWC-ordered (the kernels index it through its
// strides), else a contiguous copy.
inline at::Tensor dense_nchw_or_nhwc(const at::Tensor& x) {
  if (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  return x.contiguous();
}

// Memory format for an output shaped like (dense) x: channels_last when x is.
inline at::MemoryFormat output_format(const at::Tensor& x) {
  return (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// local_logit as it is when its planes or its channels are dense (NCHW, NHWC, or the
// channel-major C×N×H×W of the local branch's GEMM output), else a contiguous copy.
inline at::Tensor dense_local_logit(const at::Tensor& local) {
  if ((local.stride(3) == 1 && local.stride(2) == local.size(3)) ||
      local.is_contiguous(at::MemoryFormat::ChannelsLast))
    return local;
  return local.contiguous();
}

// The gradients of aff_combine_backward / aff_pair_combine_backward, allocated once for
// both registrations and laid out as the fake kernels in saffnet_fast/ops/native.py say:
// full-size gradients in x's (or residual's) format, grad_local_logit in local_logit's own
// (dense) layout, the per-plane ones contiguous. x and local are the dense_* forms.
struct AffCombineGrads {
  at::Tensor x, a_h, a_w, local, global;
};
inline AffCombineGrads empty_aff_combine_grads(const at::Tensor& x, const at::Tensor& local) {
  const int64_t N = x.size(0), C = x.size(1);
  return {at::empty(x.sizes(), x.options().memory_format(output_format(x))),
          at::empty({N, C, x.size(2)}, x.options()), at::empty({N, C, x.size(3)}, x.options()),
          at::empty_like(local), at::empty({N, C}, x.options())};
}
struct AffPairCombineGrads {
  at::Tensor x, residual, local, global;
};
inline AffPairCombineGrads empty_aff_pair_combine_grads(const at::Tensor& x,
                                                        const at::Tensor& residual,
                                                        const at::Tensor& local) {
  return {at::empty(x.sizes(), x.options().memory_format(output_format(x))),
          at::empty(x.sizes(), x.options().memory_format(output_format(residual))),
          at::empty_like(local), at::empty({x.size(0), x.size(1)}, x.options())};
}

// aff_input's output: N×C×H×W stored channel-major (memory order C, N, H, W), so the local
// branch's 1×1 convolutions are single GEMMs on its C×(N·H·W) matrix view.
inline at::Tensor aff_input_empty(const at::Tensor& x) {
  return at::empty({x.size(1), x.size(0), x.size(2), x.size(3)}, x.options())
      .permute({1, 0, 2, 3});
}

}  // namespace saffnet_fast

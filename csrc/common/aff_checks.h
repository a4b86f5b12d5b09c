// Argument checks of the ops on x and its coordinate factors a_h, a_w (coord_scale,
// aff_input, aff_combine, aff_fuse, aff_moments) and on an (x, residual) pair (aff_pair,
// aff_pair_combine), shared by the CPU and CUDA registrations so both reject bad input with
// the same message.
#pragma once

#include <optional>

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

}  // namespace saffnet_fast

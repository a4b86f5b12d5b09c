// Argument checks of split_resplice, shared by the CPU and CUDA registrations.
#pragma once

#include <vector>

#include "checks.h"

namespace saffnet_fast {

// Returns the step widths c_j (from the weights) after checking every argument.
// `biases` is any per-step list of c_j-vectors (the folded biases in inference, the BN γ or
// β in training), named `biases_name` in the messages.
inline std::vector<int64_t> check_split_resplice_args(const at::Tensor& x,
                                                      at::TensorList weights,
                                                      at::TensorList biases,
                                                      const char* op = "split_resplice",
                                                      const char* biases_name = "biases") {
  check_nchw(x, op, "x");
  const int64_t steps = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(steps >= 1, op, ": weights: expected one 3×3 weight per step, got none");
  TORCH_CHECK_VALUE(static_cast<int64_t>(biases.size()) == steps, op, ": ", biases_name, ": expected ",
                    steps, " tensors (one per weight), got ", biases.size());
  const int64_t C = x.size(1), splits = steps + 1;
  TORCH_CHECK_VALUE(C % splits == 0, op, ": x: expected channels divisible by splits = ", splits,
                    " (steps + 1), got C = ", C);
  const int64_t w = C / splits;
  std::vector<int64_t> widths;
  int64_t expected = w;
  for (int64_t j = 0; j < steps; ++j) {
    if (j > 0) expected = w + widths.back() / 2;
    const at::Tensor& wt = weights[j];
    TORCH_CHECK_VALUE(wt.dim() == 4 && wt.size(0) == expected && wt.size(1) == expected &&
                          wt.size(2) == 3 && wt.size(3) == 3,
                      op, ": weights[", j, "]: expected shape [", expected, ", ", expected,
                      ", 3, 3] for x with C = ", C, ", got ", wt.sizes());
    TORCH_CHECK_TYPE(wt.scalar_type() == x.scalar_type(), op, ": weights[", j,
                     "]: expected dtype ", x.scalar_type(), ", got ", wt.scalar_type());
    TORCH_CHECK_VALUE(wt.device() == x.device(), op, ": weights[", j, "]: expected device ",
                      x.device(), ", got ", wt.device());
    const at::Tensor& b = biases[j];
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == expected, op, ": ", biases_name, "[", j,
                      "]: expected shape [", expected, "], got ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == x.scalar_type(), op, ": ", biases_name, "[", j,
                     "]: expected dtype ", x.scalar_type(), ", got ", b.scalar_type());
    TORCH_CHECK_VALUE(b.device() == x.device(), op, ": ", biases_name, "[", j, "]: expected device ",
                      x.device(), ", got ", b.device());
    widths.push_back(expected);
  }
  return widths;
}

inline void check_split_resplice_outputs(const at::Tensor& x, int64_t carry_channels,
                                         const at::Tensor& out, const at::Tensor& carries) {
  const char* op = "split_resplice_out";
  check_like(out, x.sizes(), x, op, "out");
  check_like(carries, {x.size(0), carry_channels, x.size(2), x.size(3)}, x, op, "carries");
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out: expected a contiguous tensor");
  TORCH_CHECK_VALUE(carries.is_contiguous(), op, ": carries: expected a contiguous tensor");
}

}  // namespace saffnet_fast

// Channel bookkeeping and per-element math of split_resplice (SR(C, s), paper eqs. 1–6),
// shared by the CPU and CUDA kernels.
//
// x is split into s slices of w = C/s channels. Step 0 convolves slice 1; step j ≥ 1
// convolves cat(slice j+1, carry(j-1)), where carry(j) is the second floor(c_j/2) channels
// of step j's output y_j. y_j's first ceil(c_j/2) channels (all of them for the last step)
// are written straight into their slice of the output; slice 0 is copied through.
// Each step: y = LeakyReLU(conv3×3(in; W_j) + b_j) with BN folded into (W_j, b_j) and Dropout
// the identity (inference).
#pragma once

#include <cstdint>
#include <vector>

#include "macros.h"

namespace saffnet_fast {

template <typename acc_t>
SAFFNET_HOST_DEVICE_INLINE acc_t leaky_relu(acc_t v, acc_t slope) {
  return v > acc_t(0) ? v : v * slope;
}

// Where each step reads and writes, in channels.
struct SplitRespliceStep {
  int64_t width;          // c_j: input = output channels of step j
  int64_t x_offset;       // first channel of slice j+1 in x (the step's first w inputs)
  int64_t carry_in;       // first channel of carry(j-1) in the carry buffer (-1 for j = 0)
  int64_t keep;           // output channels that go to the output tensor
  int64_t out_offset;     // where they go
  int64_t carry_out;      // first channel of carry(j) in the carry buffer (-1 for the last)
};

inline std::vector<SplitRespliceStep> split_resplice_plan(int64_t channels,
                                                          const std::vector<int64_t>& widths) {
  const int64_t steps = static_cast<int64_t>(widths.size());
  const int64_t w = channels / (steps + 1);
  std::vector<SplitRespliceStep> plan(steps);
  int64_t out_offset = w, carry_offset = 0, prev_carry = -1;
  for (int64_t j = 0; j < steps; ++j) {
    SplitRespliceStep& s = plan[j];
    s.width = widths[j];
    s.x_offset = (j + 1) * w;
    s.carry_in = prev_carry;
    const bool last = j == steps - 1;
    s.keep = last ? s.width : (s.width + 1) / 2;
    s.out_offset = out_offset;
    out_offset += s.keep;
    if (last) {
      s.carry_out = -1;
    } else {
      s.carry_out = carry_offset;
      prev_carry = carry_offset;
      carry_offset += s.width - s.keep;
    }
  }
  return plan;
}

inline int64_t split_resplice_carry_channels(const std::vector<SplitRespliceStep>& plan) {
  int64_t total = 0;
  for (const auto& s : plan) total += s.width - s.keep;
  return total;
}

}  // namespace saffnet_fast

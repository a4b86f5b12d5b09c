// Elementwise passes over one plane shared by the CPU split_resplice kernels.
//
// One function for the LeakyReLU epilogues, which (with -fno-trapping-math, setup.py) the
// compiler if-converts and vectorises.
#pragma once

#include <cstdint>

#include "../common/split_resplice.h"

namespace saffnet_fast {

// dst[i] = LeakyReLU(src[i]·scale + shift) · (drop ? drop[i] : 1)
template <typename in_t, typename out_t, typename acc_t>
inline void bn_leaky_relu_plane(const in_t* __restrict__ src, out_t* __restrict__ dst,
                                int64_t len, acc_t scale, acc_t shift, acc_t slope,
                                const acc_t* __restrict__ drop) {
  if (drop != nullptr) {
    for (int64_t i = 0; i < len; ++i)
      dst[i] = static_cast<out_t>(
          leaky_relu(static_cast<acc_t>(src[i]) * scale + shift, slope) * drop[i]);
  } else {
    for (int64_t i = 0; i < len; ++i)
      dst[i] = static_cast<out_t>(leaky_relu(static_cast<acc_t>(src[i]) * scale + shift, slope));
  }
}

}  // namespace saffnet_fast

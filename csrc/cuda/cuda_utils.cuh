// Small CUDA helpers shared by the kernels in csrc/cuda/.
#pragma once

#include <cuda_runtime.h>

namespace saffnet_fast {

constexpr int kWarpSize = 32;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // the full sum is in lane 0
}

// Sum over the warp, then one atomicAdd from lane 0. Every lane of the warp must call it
// (inactive pixels pass 0).
template <typename acc_t>
__device__ __forceinline__ void warp_atomic_add(acc_t* target, acc_t v) {
  v = warp_sum(v);
  if ((threadIdx.x % kWarpSize) == 0) atomicAdd(target, v);
}

inline unsigned blocks_for(int64_t work, int threads) {
  return static_cast<unsigned>((work + threads - 1) / threads);
}

}  // namespace saffnet_fast

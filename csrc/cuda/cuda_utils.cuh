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

// Sum over the whole block, returned to every thread. blockDim.x must be a multiple of
// kWarpSize (warp_sum shuffles with the full mask); scratch holds one T per warp (shared
// memory, kWarpSize entries cover 1024 threads). Every thread must call it; consecutive
// calls may share one scratch (the leading barrier keeps the previous result alive until
// all threads have read it).
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? scratch[lane] : T(0);
    v = warp_sum(v);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

inline unsigned blocks_for(int64_t work, int threads) {
  return static_cast<unsigned>((work + threads - 1) / threads);
}

}  // namespace saffnet_fast

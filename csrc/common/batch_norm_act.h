// Per-element math of split_resplice's training steps, shared by the CPU and CUDA kernels:
// BatchNorm with batch statistics, LeakyReLU and Dropout, applied to a step's pre-BN
// convolution output v:
//   scale = γ / sqrt(var + eps),  shift = β − mean·scale           (per channel)
//   z = v·scale + shift,  a = LeakyReLU(z),  y = a · keep / (1 − p)
// keep is drawn from a counter-based RNG (Philox-4×32-10, ATen's host/device at::Philox4_32) keyed
// by (seed, element index, step), so backward regenerates the forward's mask instead of
// storing it, and the CPU and CUDA kernels draw the same mask for the same seed.
#pragma once

#include <ATen/core/PhiloxRNGEngine.h>

#include <cstdint>

#include "macros.h"

namespace saffnet_fast {

// Element `index` of a step draws output (index mod 4) of Philox block (index / 4): one
// block of 10 rounds serves four consecutive elements. The CUDA kernels call dropout_bits
// per element; the CPU kernels generate 64 blocks at once (cpu/philox_vec.h), bit for bit
// the same.
SAFFNET_HOST_DEVICE_INLINE uint32_t dropout_bits(uint64_t seed, uint64_t step, uint64_t index) {
  at::Philox4_32 engine(seed, /*subsequence=*/index >> 2, /*offset=*/step);
  uint32_t r = engine();
  for (uint64_t k = 0; k < (index & 3); ++k) r = engine();
  return r;
}

// keep ⇔ u ≥ p with u = 24 random bits / 2²⁴ ∈ [0, 1), exactly representable in float.
SAFFNET_HOST_DEVICE_INLINE bool dropout_keep_bits(uint32_t bits, float p) {
  return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f) >= p;
}

// BN backward for one channel with batch statistics, given dz (the gradient at z = BN(v))
// summed over the batch: Σdz = grad_β and Σdz·v̂ = grad_γ, v̂ = (v − mean)·invstd:
//   dv = γ·invstd · (dz − Σdz/M − v̂·Σdz·v̂/M)
template <typename acc_t>
SAFFNET_HOST_DEVICE_INLINE acc_t batch_norm_input_grad(acc_t dz, acc_t v_hat, acc_t gamma_invstd,
                                                       acc_t mean_dz, acc_t mean_dz_vhat) {
  return gamma_invstd * (dz - mean_dz - v_hat * mean_dz_vhat);
}

}  // namespace saffnet_fast

// AFF local_att per pixel, shared by the aff_fuse and aff_moments CUDA kernels: the hidden
// vector z = W1·x(1 + m) + b1 and the conv2 logit W2·relu(z) + b2 of one pixel, held in
// registers (Ci ≤ kMaxCi, a template bound of 16 or 64, loops unrolled up to it). The
// weights are read as acc_t from global memory: every lane of a warp reads the same address,
// a broadcast from L1.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <type_traits>

#include "../common/attention_math.h"
#include "cuda_utils.cuh"

namespace saffnet_fast {

template <typename acc_t>
struct AffWeights {
  const acc_t* w1;  // Ci×C
  const acc_t* b1;  // Ci
  const acc_t* w2;  // C×Ci (nullptr where only stage 1 is needed)
  const acc_t* b2;  // C    (nullptr where only stage 1 is needed)
};

// z[j] = b1[j] + Σ_c w1[j,c]·x·(1 + m), the pre-ReLU hidden vector of one pixel. Strides:
// any struct with the x strides (xn, xc, xh, xw) and the factor strides (hn, hc, hl,
// wn, wc, wl).
template <typename scalar_t, typename acc_t, int kMaxCi, typename Strides>
__device__ __forceinline__ void hidden_vector(const scalar_t* __restrict__ x,
                                              const scalar_t* __restrict__ a_h,
                                              const scalar_t* __restrict__ a_w,
                                              const AffWeights<acc_t>& wt, const Strides& s,
                                              int64_t n, int64_t h, int64_t w, int64_t C,
                                              int Ci, acc_t (&z)[kMaxCi]) {
#pragma unroll
  for (int j = 0; j < kMaxCi; ++j) z[j] = j < Ci ? wt.b1[j] : acc_t(0);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xv = static_cast<acc_t>(x[n * s.xn + c * s.xc + h * s.xh + w * s.xw]);
    const acc_t mv = static_cast<acc_t>(a_h[n * s.hn + c * s.hc + h * s.hl]) *
                     static_cast<acc_t>(a_w[n * s.wn + c * s.wc + w * s.wl]);
    const acc_t t = xv + xv * mv;
#pragma unroll
    for (int j = 0; j < kMaxCi; ++j)
      if (j < Ci) z[j] += wt.w1[j * C + c] * t;
  }
}

// aff_pair's hidden vector: z[j] = b1[j] + Σ_c w1[j,c]·(x + residual) at one pixel.
// Strides: any struct with the x strides (xn, xc, xh, xw) and the residual's (rn, rc, rh, rw).
template <typename scalar_t, typename acc_t, int kMaxCi, typename Strides>
__device__ __forceinline__ void hidden_vector_pair(const scalar_t* __restrict__ x,
                                                   const scalar_t* __restrict__ residual,
                                                   const AffWeights<acc_t>& wt,
                                                   const Strides& s, int64_t n, int64_t h,
                                                   int64_t w, int64_t C, int Ci,
                                                   acc_t (&z)[kMaxCi]) {
#pragma unroll
  for (int j = 0; j < kMaxCi; ++j) z[j] = j < Ci ? wt.b1[j] : acc_t(0);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t t = static_cast<acc_t>(x[n * s.xn + c * s.xc + h * s.xh + w * s.xw]) +
                    static_cast<acc_t>(residual[n * s.rn + c * s.rc + h * s.rh + w * s.rw]);
#pragma unroll
    for (int j = 0; j < kMaxCi; ++j)
      if (j < Ci) z[j] += wt.w1[j * C + c] * t;
  }
}

// l[c] = b2[c] + Σ_j w2[c,j]·relu(z[j]): local_att's conv2 output of channel c (pre-BN).
template <typename acc_t, int kMaxCi>
__device__ __forceinline__ acc_t local_logit(const AffWeights<acc_t>& wt, int64_t c, int Ci,
                                             const acc_t (&z)[kMaxCi]) {
  acc_t l = wt.b2[c];
#pragma unroll
  for (int j = 0; j < kMaxCi; ++j)
    if (j < Ci) l += wt.w2[c * Ci + j] * relu(z[j]);
  return l;
}

// Backward, one pixel. Every lane of the warp must call these (the weight gradients are
// warp-reduced; inactive pixels pass zero gradients).

// conv2 for channel c, from ds = dL/dl_c: grad_w2[c, j] += ds·relu(z[j]) and
// dz[j] += W2[c, j]·ds (dz is W2ᵀ·ds before the ReLU mask, which the caller applies).
template <typename acc_t, int kMaxCi>
__device__ __forceinline__ void conv2_backward_channel(const AffWeights<acc_t>& wt,
                                                       acc_t* grad_w2, int64_t c, int Ci,
                                                       const acc_t (&z)[kMaxCi], acc_t ds,
                                                       acc_t (&dz)[kMaxCi]) {
#pragma unroll
  for (int j = 0; j < kMaxCi; ++j) {
    if (j < Ci) {
      warp_atomic_add(grad_w2 + c * Ci + j, ds * relu(z[j]));
      dz[j] += wt.w2[c * Ci + j] * ds;
    }
  }
}

// conv1 for channel c, from dz = dL/dz and t = x·(1 + m) of this pixel:
// grad_w1[j, c] += dz[j]·t; returns dt = Σ_j W1[j, c]·dz[j].
template <typename acc_t, int kMaxCi>
__device__ __forceinline__ acc_t conv1_backward_channel(const AffWeights<acc_t>& wt,
                                                        acc_t* grad_w1, int64_t C, int64_t c,
                                                        int Ci, const acc_t (&dz)[kMaxCi],
                                                        acc_t t) {
  acc_t dt = 0;
#pragma unroll
  for (int j = 0; j < kMaxCi; ++j) {
    if (j < Ci) {
      dt += wt.w1[j * C + c] * dz[j];
      warp_atomic_add(grad_w1 + j * C + c, dz[j] * t);
    }
  }
  return dt;
}

// Calls fn(std::integral_constant<int, kMaxCi>) with the smallest supported bound ≥ Ci.
template <typename Fn>
void dispatch_max_ci(int64_t Ci, const char* op, Fn&& fn) {
  TORCH_CHECK_VALUE(Ci <= 64, op, ": w1: the CUDA kernel supports up to 64 hidden channels "
                    "(AFF's channels // r, e.g. 256 // 4), got ", Ci);
  if (Ci <= 16) fn(std::integral_constant<int, 16>{});
  else fn(std::integral_constant<int, 64>{});
}

}  // namespace saffnet_fast

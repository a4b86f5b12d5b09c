// Per-element math of the attention ops (coord_scale, aff_fuse), shared by the CPU and CUDA
// kernels. acc_t is the accumulation type (float for float/half/bfloat16, double for double).
//
// aff_fuse computes, per pixel and channel, AFF(x·m, x) of the official AFF with its BN
// folded (inference) and the global branch's logit given:
//   m   = a_h[n,c,h] · a_w[n,c,w]            (SCAFF: coordinate attention; SAWF: the SE+ gate)
//   t   = x·m + x = x·(1 + m)                (AFF's xa)
//   z   = W1·t + b1,  r = relu(z)            (local_att conv1+BN, ReLU)
//   l   = W2·r + b2                          (local_att conv2+BN)
//   wei = σ(l + g[n,c])                      (g: global_att logit)
//   out = 2·x·m·wei + 2·x·(1 − wei) = 2·x·(1 + (m − 1)·wei)
#pragma once

#include <cmath>

#include "macros.h"

namespace saffnet_fast {

template <typename acc_t>
SAFFNET_HOST_DEVICE_INLINE acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + ::exp(-v));
}

template <typename acc_t>
SAFFNET_HOST_DEVICE_INLINE acc_t relu(acc_t v) {
  return v > acc_t(0) ? v : acc_t(0);
}

// out = 2·x·(1 + (m − 1)·wei)
template <typename acc_t>
SAFFNET_HOST_DEVICE_INLINE acc_t aff_combine(acc_t x, acc_t m, acc_t wei) {
  return acc_t(2) * x * (acc_t(1) + (m - acc_t(1)) * wei);
}

// Gradients of aff_combine for the incoming gradient g at one element:
//   d_x (direct, not through wei) = 2·g·(1 + (m − 1)·wei)
//   d_m (direct)                  = 2·g·x·wei
//   d_s (through wei = σ(s))      = 2·g·x·(m − 1) · wei·(1 − wei)
template <typename acc_t>
struct AffCombineGrad {
  acc_t d_x, d_m, d_s;
};

template <typename acc_t>
SAFFNET_HOST_DEVICE_INLINE AffCombineGrad<acc_t> aff_combine_grad(acc_t g, acc_t x, acc_t m,
                                                                 acc_t wei) {
  AffCombineGrad<acc_t> r;
  r.d_x = acc_t(2) * g * (acc_t(1) + (m - acc_t(1)) * wei);
  r.d_m = acc_t(2) * g * x * wei;
  r.d_s = acc_t(2) * g * x * (m - acc_t(1)) * wei * (acc_t(1) - wei);
  return r;
}

// aff_pair: the official AFF(x, residual) on two tensors (the drop-in FastAFF):
//   t   = x + residual                       (AFF's xa)
//   z, r, l, wei as above
//   out = 2·x·wei + 2·residual·(1 − wei) = 2·residual + 2·(x − residual)·wei
template <typename acc_t>
SAFFNET_HOST_DEVICE_INLINE acc_t aff_pair_combine(acc_t x, acc_t residual, acc_t wei) {
  return acc_t(2) * residual + acc_t(2) * (x - residual) * wei;
}

// Gradients of aff_pair_combine for the incoming gradient g at one element:
//   d_x (direct) = 2·g·wei,  d_r (direct) = 2·g·(1 − wei),
//   d_s (through wei = σ(s)) = 2·g·(x − residual)·wei·(1 − wei)
template <typename acc_t>
struct AffPairGrad {
  acc_t d_x, d_r, d_s;
};

template <typename acc_t>
SAFFNET_HOST_DEVICE_INLINE AffPairGrad<acc_t> aff_pair_grad(acc_t g, acc_t x, acc_t residual,
                                                           acc_t wei) {
  AffPairGrad<acc_t> d;
  d.d_x = acc_t(2) * g * wei;
  d.d_r = acc_t(2) * g * (acc_t(1) - wei);
  d.d_s = acc_t(2) * g * (x - residual) * wei * (acc_t(1) - wei);
  return d;
}

}  // namespace saffnet_fast

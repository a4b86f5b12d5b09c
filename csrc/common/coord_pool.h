// Per-element math of coord_pool, shared by the CPU and CUDA kernels.
//   forward:  pool_h[n,c,h] = mean_w x[n,c,h,w]      pool_w[n,c,w] = mean_h x[n,c,h,w]
//   backward: grad_x[n,c,h,w] = grad_h[n,c,h] / W + grad_w[n,c,w] / H
#pragma once

#include "macros.h"

namespace saffnet_fast {

template <typename acc_t>
SAFFNET_HOST_DEVICE_INLINE acc_t coord_pool_grad(acc_t grad_h, acc_t grad_w, acc_t inv_w,
                                                 acc_t inv_h) {
  return grad_h * inv_w + grad_w * inv_h;
}

}  // namespace saffnet_fast

// Memory layouts shared by the CPU and CUDA registrations of the attention ops (coord_scale,
// aff_input, aff_combine, aff_fuse, aff_moments, aff_pair, aff_pair_combine): which input
// layouts the kernels read in place, and the layouts of the outputs they allocate (those
// the fake kernels in saffnet_fast/ops/native.py declare).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

namespace saffnet_fast {

// x itself when it is densely NCHW- or NHWC-ordered (the kernels index it through its
// strides), else a contiguous copy.
inline at::Tensor dense_nchw_or_nhwc(const at::Tensor& x) {
  if (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  return x.contiguous();
}

// Memory format for an output shaped like (dense) x: channels_last when x is.
inline at::MemoryFormat output_format(const at::Tensor& x) {
  return (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// local_logit as it is when its planes or its channels are dense (NCHW, NHWC, or the
// channel-major C×N×H×W of the local branch's GEMM output), else a contiguous copy.
inline at::Tensor dense_local_logit(const at::Tensor& local) {
  if ((local.stride(3) == 1 && local.stride(2) == local.size(3)) ||
      local.is_contiguous(at::MemoryFormat::ChannelsLast))
    return local;
  return local.contiguous();
}

// The gradients of aff_combine_backward / aff_pair_combine_backward, allocated once for
// both registrations and laid out as the fake kernels in saffnet_fast/ops/native.py say:
// full-size gradients in x's (or residual's) format, grad_local_logit in local_logit's own
// (dense) layout, the per-plane ones contiguous. x and local are the dense_* forms.
struct AffCombineGrads {
  at::Tensor x, a_h, a_w, local, global;
};
inline AffCombineGrads empty_aff_combine_grads(const at::Tensor& x, const at::Tensor& local) {
  const int64_t N = x.size(0), C = x.size(1);
  return {at::empty(x.sizes(), x.options().memory_format(output_format(x))),
          at::empty({N, C, x.size(2)}, x.options()), at::empty({N, C, x.size(3)}, x.options()),
          at::empty_like(local), at::empty({N, C}, x.options())};
}
struct AffPairCombineGrads {
  at::Tensor x, residual, local, global;
};
inline AffPairCombineGrads empty_aff_pair_combine_grads(const at::Tensor& x,
                                                        const at::Tensor& residual,
                                                        const at::Tensor& local) {
  return {at::empty(x.sizes(), x.options().memory_format(output_format(x))),
          at::empty(x.sizes(), x.options().memory_format(output_format(residual))),
          at::empty_like(local), at::empty({x.size(0), x.size(1)}, x.options())};
}

// aff_input's output: N×C×H×W stored channel-major (memory order C, N, H, W), so the local
// branch's 1×1 convolutions are single GEMMs on its C×(N·H·W) matrix view.
inline at::Tensor aff_input_empty(const at::Tensor& x) {
  return at::empty({x.size(1), x.size(0), x.size(2), x.size(3)}, x.options())
      .permute({1, 0, 2, 3});
}

}  // namespace saffnet_fast

// aff_pair CUDA kernels (float32, float64, float16, bfloat16; float32 accumulation for the
// 16-bit types): the official AFF(x, residual) on two tensors. Op: csrc/aff_pair.cpp;
// per-element math: csrc/common/attention_math.h; per-pixel local_att: aff_local.cuh.
//
// Minimum bytes moved: forward reads x and residual once and writes out once (+ N·C logits
// and the weights); one pass, one launch. Backward reads grad_out, x and residual once and
// writes grad_x and grad_residual once; one pass, one launch (the forward recomputed per
// pixel, nothing stored).
//
// One thread per pixel, grid (pixel tiles, N), as aff_fuse: the hidden vector in registers,
// parameter gradients warp-reduced and added with one atomicAdd per warp, grad_global_logit
// by per-lane atomics (float results order-dependent in the last bits).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/aff_checks.h"
#include "../common/attention_math.h"
#include "../common/layout.h"
#include "aff_local.cuh"
#include "cuda_utils.cuh"

namespace saffnet_fast {
namespace {

constexpr int kThreads = 128;

struct PairStrides {
  int64_t xn, xc, xh, xw;  // x
  int64_t rn, rc, rh, rw;  // residual
  int64_t on, oc, oh, ow;  // out / grad_x
  int64_t qn, qc, qh, qw;  // grad_residual (backward only)
  int64_t gn, gc, gh, gw;  // grad_out (backward only)
  int64_t ln, lc;          // global_logit
};

template <typename scalar_t, typename acc_t, int kMaxCi>
__global__ void __launch_bounds__(kThreads)
    aff_pair_forward_kernel(const scalar_t* __restrict__ x,
                            const scalar_t* __restrict__ residual,
                            const scalar_t* __restrict__ logit, AffWeights<acc_t> wt,
                            scalar_t* out, PairStrides s, int64_t C, int64_t H, int64_t W,
                            int Ci) {
  const int64_t n = blockIdx.y;
  const int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (p >= H * W) return;
  const int64_t h = p / W, w = p % W;
  acc_t z[kMaxCi];
  hidden_vector_pair<scalar_t, acc_t, kMaxCi>(x, residual, wt, s, n, h, w, C, Ci, z);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xv = static_cast<acc_t>(x[n * s.xn + c * s.xc + h * s.xh + w * s.xw]);
    const acc_t rv = static_cast<acc_t>(residual[n * s.rn + c * s.rc + h * s.rh + w * s.rw]);
    const acc_t wei = sigmoid(local_logit<acc_t, kMaxCi>(wt, c, Ci, z) +
                              static_cast<acc_t>(logit[n * s.ln + c * s.lc]));
    out[n * s.on + c * s.oc + h * s.oh + w * s.ow] =
        static_cast<scalar_t>(aff_pair_combine(xv, rv, wei));
  }
}

// Gradient buffers (acc_t, zero-initialised, contiguous).
template <typename acc_t>
struct PairGrads {
  acc_t* logit;  // N×C
  acc_t* w1;     // Ci×C
  acc_t* b1;     // Ci
  acc_t* w2;     // C×Ci
  acc_t* b2;     // C
};

template <typename scalar_t, typename acc_t, int kMaxCi>
__global__ void __launch_bounds__(kThreads)
    aff_pair_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                             const scalar_t* __restrict__ residual,
                             const scalar_t* __restrict__ logit, AffWeights<acc_t> wt,
                             scalar_t* gx, scalar_t* gres, PairGrads<acc_t> gr, PairStrides s,
                             int64_t C, int64_t H, int64_t W, int Ci) {
  // No early return: every lane takes part in the warp reductions (inactive ones add 0).
  const int64_t n = blockIdx.y;
  const int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const bool active = p < H * W;
  const int64_t h = active ? p / W : 0, w = active ? p % W : 0;
  acc_t z[kMaxCi], dz[kMaxCi];
  hidden_vector_pair<scalar_t, acc_t, kMaxCi>(x, residual, wt, s, n, h, w, C, Ci, z);
#pragma unroll
  for (int j = 0; j < kMaxCi; ++j) dz[j] = acc_t(0);

  // Pass over channels 1: d_s, grad of the second 1×1 conv, and W2ᵀ·d_s into dz.
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xv = static_cast<acc_t>(x[n * s.xn + c * s.xc + h * s.xh + w * s.xw]);
    const acc_t rv = static_cast<acc_t>(residual[n * s.rn + c * s.rc + h * s.rh + w * s.rw]);
    const acc_t wei = sigmoid(local_logit<acc_t, kMaxCi>(wt, c, Ci, z) +
                              static_cast<acc_t>(logit[n * s.ln + c * s.lc]));
    const acc_t go =
        active ? static_cast<acc_t>(grad[n * s.gn + c * s.gc + h * s.gh + w * s.gw]) : acc_t(0);
    const acc_t ds = aff_pair_grad(go, xv, rv, wei).d_s;
    if (active) atomicAdd(gr.logit + n * C + c, ds);
    warp_atomic_add(gr.b2 + c, ds);
    conv2_backward_channel<acc_t, kMaxCi>(wt, gr.w2, c, Ci, z, ds, dz);
  }
#pragma unroll
  for (int j = 0; j < kMaxCi; ++j) {
    if (j < Ci) {
      dz[j] = z[j] > acc_t(0) ? dz[j] : acc_t(0);
      warp_atomic_add(gr.b1 + j, dz[j]);
    }
  }
  // Pass over channels 2: grad of the first 1×1 conv, grad_x and grad_residual.
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xv = static_cast<acc_t>(x[n * s.xn + c * s.xc + h * s.xh + w * s.xw]);
    const acc_t rv = static_cast<acc_t>(residual[n * s.rn + c * s.rc + h * s.rh + w * s.rw]);
    const acc_t dt = conv1_backward_channel<acc_t, kMaxCi>(wt, gr.w1, C, c, Ci, dz, xv + rv);
    if (!active) continue;
    const acc_t wei = sigmoid(local_logit<acc_t, kMaxCi>(wt, c, Ci, z) +
                              static_cast<acc_t>(logit[n * s.ln + c * s.lc]));
    const acc_t go = static_cast<acc_t>(grad[n * s.gn + c * s.gc + h * s.gh + w * s.gw]);
    const AffPairGrad<acc_t> d = aff_pair_grad(go, xv, rv, wei);
    gx[n * s.on + c * s.oc + h * s.oh + w * s.ow] = static_cast<scalar_t>(d.d_x + dt);
    gres[n * s.qn + c * s.qc + h * s.qh + w * s.qw] = static_cast<scalar_t>(d.d_r + dt);
  }
}


PairStrides make_strides(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& out,
                         const at::Tensor* grad_residual, const at::Tensor* grad,
                         const at::Tensor& logit) {
  PairStrides s{};
  s.xn = x.stride(0), s.xc = x.stride(1), s.xh = x.stride(2), s.xw = x.stride(3);
  s.rn = residual.stride(0), s.rc = residual.stride(1), s.rh = residual.stride(2),
  s.rw = residual.stride(3);
  s.on = out.stride(0), s.oc = out.stride(1), s.oh = out.stride(2), s.ow = out.stride(3);
  if (grad_residual) {
    s.qn = grad_residual->stride(0), s.qc = grad_residual->stride(1),
    s.qh = grad_residual->stride(2), s.qw = grad_residual->stride(3);
  }
  if (grad) {
    s.gn = grad->stride(0), s.gc = grad->stride(1), s.gh = grad->stride(2),
    s.gw = grad->stride(3);
  }
  s.ln = logit.stride(0), s.lc = logit.stride(1);
  return s;
}

at::Tensor aff_pair_cuda(const at::Tensor& x_in, const at::Tensor& residual_in,
                         const at::Tensor& logit, const at::Tensor& w1, const at::Tensor& b1,
                         const at::Tensor& w2, const at::Tensor& b2) {
  check_aff_pair_args(x_in, residual_in, logit, w1, b1, w2, b2, "aff_pair");
  check_cuda_dtype(x_in, "aff_pair", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense_nchw_or_nhwc(x_in), residual = dense_nchw_or_nhwc(residual_in);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ci = w1.size(0);
  TORCH_CHECK_VALUE(N <= 65535, "aff_pair: x: the CUDA kernel supports batches up to 65535");
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aff_pair_cuda",
                                  [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor w1a = w1.to(acc_dtype).contiguous(), b1a = b1.to(acc_dtype).contiguous();
    const at::Tensor w2a = w2.to(acc_dtype).contiguous(), b2a = b2.to(acc_dtype).contiguous();
    const AffWeights<acc_t> wt{w1a.const_data_ptr<acc_t>(), b1a.const_data_ptr<acc_t>(),
                               w2a.const_data_ptr<acc_t>(), b2a.const_data_ptr<acc_t>()};
    const PairStrides s = make_strides(x, residual, out, nullptr, nullptr, logit);
    const dim3 grid(blocks_for(H * W, kThreads), static_cast<unsigned>(N));
    dispatch_max_ci(Ci, "aff_pair", [&](auto max_ci) {
      aff_pair_forward_kernel<scalar_t, acc_t, decltype(max_ci)::value>
          <<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              x.const_data_ptr<scalar_t>(), residual.const_data_ptr<scalar_t>(),
              logit.const_data_ptr<scalar_t>(), wt, out.mutable_data_ptr<scalar_t>(), s, C, H,
              W, static_cast<int>(Ci));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
aff_pair_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x_in,
                       const at::Tensor& residual_in, const at::Tensor& logit,
                       const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                       const at::Tensor& b2) {
  const char* op = "aff_pair_backward";
  check_aff_pair_args(x_in, residual_in, logit, w1, b1, w2, b2, op);
  check_cuda_dtype(x_in, op, "x");
  check_like(grad_out, x_in.sizes(), x_in, op, "grad_out");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense_nchw_or_nhwc(x_in), residual = dense_nchw_or_nhwc(residual_in);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ci = w1.size(0);
  TORCH_CHECK_VALUE(N <= 65535, op, ": x: the CUDA kernel supports batches up to 65535");
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  at::Tensor gres =
      at::empty(x.sizes(), x.options().memory_format(output_format(residual)));
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
      result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "aff_pair_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const auto acc_opts = x.options().dtype(acc_dtype);
    const at::Tensor w1a = w1.to(acc_dtype).contiguous(), b1a = b1.to(acc_dtype).contiguous();
    const at::Tensor w2a = w2.to(acc_dtype).contiguous(), b2a = b2.to(acc_dtype).contiguous();
    const AffWeights<acc_t> wt{w1a.const_data_ptr<acc_t>(), b1a.const_data_ptr<acc_t>(),
                               w2a.const_data_ptr<acc_t>(), b2a.const_data_ptr<acc_t>()};
    at::Tensor g_logit = at::zeros({N, C}, acc_opts);
    at::Tensor g_w1 = at::zeros({Ci, C}, acc_opts), g_b1 = at::zeros({Ci}, acc_opts);
    at::Tensor g_w2 = at::zeros({C, Ci}, acc_opts), g_b2 = at::zeros({C}, acc_opts);
    const PairGrads<acc_t> gr{g_logit.mutable_data_ptr<acc_t>(), g_w1.mutable_data_ptr<acc_t>(),
                              g_b1.mutable_data_ptr<acc_t>(), g_w2.mutable_data_ptr<acc_t>(),
                              g_b2.mutable_data_ptr<acc_t>()};
    const PairStrides s = make_strides(x, residual, gx, &gres, &grad_out, logit);
    const dim3 grid(blocks_for(H * W, kThreads), static_cast<unsigned>(N));
    dispatch_max_ci(Ci, op, [&](auto max_ci) {
      aff_pair_backward_kernel<scalar_t, acc_t, decltype(max_ci)::value>
          <<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
              residual.const_data_ptr<scalar_t>(), logit.const_data_ptr<scalar_t>(), wt,
              gx.mutable_data_ptr<scalar_t>(), gres.mutable_data_ptr<scalar_t>(), gr, s, C, H,
              W, static_cast<int>(Ci));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const auto dt = x.scalar_type();
    result = {gx, gres, g_logit.to(dt), g_w1.to(dt), g_b1.to(dt), g_w2.to(dt), g_b2.to(dt)};
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CUDA, m) {
  m.impl("aff_pair", &aff_pair_cuda);
  m.impl("aff_pair_backward", &aff_pair_backward_cuda);
}

}  // namespace saffnet_fast

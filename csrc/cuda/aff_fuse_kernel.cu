// aff_fuse CUDA kernels (float32, float64, float16, bfloat16; float32 accumulation for the
// 16-bit types). Op: csrc/aff_fuse.cpp; per-element math: csrc/common/attention_math.h.
//
// Minimum bytes moved: forward reads x once and writes out once (+ N·C·(H+W+1) factors and
// the weights); one pass, one launch. Backward reads grad_out and x once and writes grad_x
// once; one pass, one launch (the forward is recomputed per pixel, nothing stored).
//
// One thread per pixel; grid (pixel tiles, N) so that all lanes of a warp share n. The
// local_att hidden vector (Ci ≤ kMaxCi values, a template bound of 16 or 64) lives in
// registers; the per-pixel local_att math is aff_local.cuh, shared with aff_moments.
// Backward: parameter gradients are reduced across the warp with shuffles and added with one
// atomicAdd per warp; grad_a_h / grad_a_w / grad_global_logit by per-lane atomics. The
// atomics make float results order-dependent in the last bits (not bitwise deterministic).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../common/aff_checks.h"
#include "../common/attention_math.h"
#include "../common/layout.h"
#include "aff_local.cuh"
#include "cuda_utils.cuh"

namespace saffnet_fast {
namespace {

constexpr int kThreads = 128;

struct AffStrides {
  int64_t xn, xc, xh, xw;  // x
  int64_t on, oc, oh, ow;  // out / grad_x
  int64_t gn, gc, gh, gw;  // grad_out (backward only)
  int64_t hn, hc, hl;      // a_h
  int64_t wn, wc, wl;      // a_w
  int64_t ln, lc;          // global_logit
};

template <typename scalar_t, typename acc_t, int kMaxCi>
__global__ void __launch_bounds__(kThreads)
    aff_fuse_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ a_h,
                            const scalar_t* __restrict__ a_w,
                            const scalar_t* __restrict__ logit, AffWeights<acc_t> wt,
                            scalar_t* out, AffStrides s, int64_t C, int64_t H, int64_t W,
                            int Ci) {
  const int64_t n = blockIdx.y;
  const int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (p >= H * W) return;
  const int64_t h = p / W, w = p % W;
  acc_t z[kMaxCi];
  hidden_vector<scalar_t, acc_t, kMaxCi>(x, a_h, a_w, wt, s, n, h, w, C, Ci, z);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xv = static_cast<acc_t>(x[n * s.xn + c * s.xc + h * s.xh + w * s.xw]);
    const acc_t mv = static_cast<acc_t>(a_h[n * s.hn + c * s.hc + h * s.hl]) *
                     static_cast<acc_t>(a_w[n * s.wn + c * s.wc + w * s.wl]);
    const acc_t wei =
        sigmoid(local_logit<acc_t, kMaxCi>(wt, c, Ci, z) +
                static_cast<acc_t>(logit[n * s.ln + c * s.lc]));
    out[n * s.on + c * s.oc + h * s.oh + w * s.ow] =
        static_cast<scalar_t>(aff_combine(xv, mv, wei));
  }
}

// Gradient buffers (acc_t, zero-initialised, contiguous).
template <typename acc_t>
struct AffGrads {
  acc_t* a_h;    // N×C×H
  acc_t* a_w;    // N×C×W
  acc_t* logit;  // N×C
  acc_t* w1;     // Ci×C
  acc_t* b1;     // Ci
  acc_t* w2;     // C×Ci
  acc_t* b2;     // C
};

template <typename scalar_t, typename acc_t, int kMaxCi>
__global__ void __launch_bounds__(kThreads)
    aff_fuse_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                             const scalar_t* __restrict__ a_h,
                             const scalar_t* __restrict__ a_w,
                             const scalar_t* __restrict__ logit, AffWeights<acc_t> wt,
                             scalar_t* gx, AffGrads<acc_t> gr, AffStrides s, int64_t C,
                             int64_t H, int64_t W, int Ci) {
  // No early return: every lane takes part in the warp reductions (inactive ones add 0).
  const int64_t n = blockIdx.y;
  const int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const bool active = p < H * W;
  const int64_t h = active ? p / W : 0, w = active ? p % W : 0;
  acc_t z[kMaxCi], dz[kMaxCi];
  hidden_vector<scalar_t, acc_t, kMaxCi>(x, a_h, a_w, wt, s, n, h, w, C, Ci, z);
#pragma unroll
  for (int j = 0; j < kMaxCi; ++j) dz[j] = acc_t(0);

  // Pass over channels 1: d_s, grad of the second 1×1 conv, and W2ᵀ·d_s into dz.
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xv = static_cast<acc_t>(x[n * s.xn + c * s.xc + h * s.xh + w * s.xw]);
    const acc_t mv = static_cast<acc_t>(a_h[n * s.hn + c * s.hc + h * s.hl]) *
                     static_cast<acc_t>(a_w[n * s.wn + c * s.wc + w * s.wl]);
    const acc_t wei = sigmoid(local_logit<acc_t, kMaxCi>(wt, c, Ci, z) +
                              static_cast<acc_t>(logit[n * s.ln + c * s.lc]));
    const acc_t go =
        active ? static_cast<acc_t>(grad[n * s.gn + c * s.gc + h * s.gh + w * s.gw]) : acc_t(0);
    const acc_t ds = aff_combine_grad(go, xv, mv, wei).d_s;
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
  // Pass over channels 2: grad of the first 1×1 conv, grad_x, grad of the factors.
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xv = static_cast<acc_t>(x[n * s.xn + c * s.xc + h * s.xh + w * s.xw]);
    const acc_t ahv = static_cast<acc_t>(a_h[n * s.hn + c * s.hc + h * s.hl]);
    const acc_t awv = static_cast<acc_t>(a_w[n * s.wn + c * s.wc + w * s.wl]);
    const acc_t mv = ahv * awv;
    const acc_t t = xv + xv * mv;
    const acc_t dt = conv1_backward_channel<acc_t, kMaxCi>(wt, gr.w1, C, c, Ci, dz, t);
    if (!active) continue;
    const acc_t wei = sigmoid(local_logit<acc_t, kMaxCi>(wt, c, Ci, z) +
                              static_cast<acc_t>(logit[n * s.ln + c * s.lc]));
    const acc_t go = static_cast<acc_t>(grad[n * s.gn + c * s.gc + h * s.gh + w * s.gw]);
    const AffCombineGrad<acc_t> d = aff_combine_grad(go, xv, mv, wei);
    gx[n * s.on + c * s.oc + h * s.oh + w * s.ow] =
        static_cast<scalar_t>(d.d_x + dt * (acc_t(1) + mv));
    const acc_t dm = d.d_m + dt * xv;
    atomicAdd(gr.a_h + (n * C + c) * H + h, dm * awv);
    atomicAdd(gr.a_w + (n * C + c) * W + w, dm * ahv);
  }
}

AffStrides make_strides(const at::Tensor& x, const at::Tensor& out, const at::Tensor* grad,
                        const at::Tensor& a_h, const at::Tensor& a_w, const at::Tensor& logit) {
  AffStrides s{};
  s.xn = x.stride(0), s.xc = x.stride(1), s.xh = x.stride(2), s.xw = x.stride(3);
  s.on = out.stride(0), s.oc = out.stride(1), s.oh = out.stride(2), s.ow = out.stride(3);
  if (grad) s.gn = grad->stride(0), s.gc = grad->stride(1), s.gh = grad->stride(2), s.gw = grad->stride(3);
  s.hn = a_h.stride(0), s.hc = a_h.stride(1), s.hl = a_h.stride(2);
  s.wn = a_w.stride(0), s.wc = a_w.stride(1), s.wl = a_w.stride(2);
  s.ln = logit.stride(0), s.lc = logit.stride(1);
  return s;
}

void aff_fuse_out_cuda(const at::Tensor& x_in, const at::Tensor& a_h, const at::Tensor& a_w,
                       const at::Tensor& logit, const at::Tensor& w1, const at::Tensor& b1,
                       const at::Tensor& w2, const at::Tensor& b2, at::Tensor& out) {
  check_aff_args(x_in, a_h, a_w, logit, w1, b1, w2, b2, "aff_fuse");
  check_cuda_dtype(x_in, "aff_fuse", "x");
  check_like(out, x_in.sizes(), x_in, "aff_fuse", "out");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ci = w1.size(0);
  TORCH_CHECK_VALUE(N <= 65535, "aff_fuse: x: the CUDA kernel supports batches up to 65535");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aff_fuse_cuda",
                                  [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor w1a = w1.to(acc_dtype).contiguous(), b1a = b1.to(acc_dtype).contiguous();
    const at::Tensor w2a = w2.to(acc_dtype).contiguous(), b2a = b2.to(acc_dtype).contiguous();
    const AffWeights<acc_t> wt{w1a.const_data_ptr<acc_t>(), b1a.const_data_ptr<acc_t>(),
                               w2a.const_data_ptr<acc_t>(), b2a.const_data_ptr<acc_t>()};
    const AffStrides s = make_strides(x, out, nullptr, a_h, a_w, logit);
    const dim3 grid(blocks_for(H * W, kThreads), static_cast<unsigned>(N));
    dispatch_max_ci(Ci, "aff_fuse", [&](auto max_ci) {
      aff_fuse_forward_kernel<scalar_t, acc_t, decltype(max_ci)::value>
          <<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              x.const_data_ptr<scalar_t>(), a_h.const_data_ptr<scalar_t>(),
              a_w.const_data_ptr<scalar_t>(), logit.const_data_ptr<scalar_t>(), wt,
              out.mutable_data_ptr<scalar_t>(), s, C, H, W, static_cast<int>(Ci));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor aff_fuse_cuda(const at::Tensor& x_in, const at::Tensor& a_h, const at::Tensor& a_w,
                         const at::Tensor& logit, const at::Tensor& w1, const at::Tensor& b1,
                         const at::Tensor& w2, const at::Tensor& b2) {
  check_nchw(x_in, "aff_fuse", "x");
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  aff_fuse_out_cuda(x, a_h, a_w, logit, w1, b1, w2, b2, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
aff_fuse_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& a_h,
                       const at::Tensor& a_w, const at::Tensor& logit, const at::Tensor& w1,
                       const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  check_aff_args(x_in, a_h, a_w, logit, w1, b1, w2, b2, "aff_fuse_backward");
  check_cuda_dtype(x_in, "aff_fuse_backward", "x");
  check_like(grad_out, x_in.sizes(), x_in, "aff_fuse_backward", "grad_out");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ci = w1.size(0);
  TORCH_CHECK_VALUE(N <= 65535, "aff_fuse_backward: x: the CUDA kernel supports batches up to 65535");
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
             at::Tensor>
      result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "aff_fuse_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const auto acc_opts = x.options().dtype(acc_dtype);
    const at::Tensor w1a = w1.to(acc_dtype).contiguous(), b1a = b1.to(acc_dtype).contiguous();
    const at::Tensor w2a = w2.to(acc_dtype).contiguous(), b2a = b2.to(acc_dtype).contiguous();
    const AffWeights<acc_t> wt{w1a.const_data_ptr<acc_t>(), b1a.const_data_ptr<acc_t>(),
                               w2a.const_data_ptr<acc_t>(), b2a.const_data_ptr<acc_t>()};
    at::Tensor g_ah = at::zeros({N, C, H}, acc_opts), g_aw = at::zeros({N, C, W}, acc_opts);
    at::Tensor g_logit = at::zeros({N, C}, acc_opts);
    at::Tensor g_w1 = at::zeros({Ci, C}, acc_opts), g_b1 = at::zeros({Ci}, acc_opts);
    at::Tensor g_w2 = at::zeros({C, Ci}, acc_opts), g_b2 = at::zeros({C}, acc_opts);
    const AffGrads<acc_t> gr{g_ah.mutable_data_ptr<acc_t>(), g_aw.mutable_data_ptr<acc_t>(),
                             g_logit.mutable_data_ptr<acc_t>(), g_w1.mutable_data_ptr<acc_t>(),
                             g_b1.mutable_data_ptr<acc_t>(), g_w2.mutable_data_ptr<acc_t>(),
                             g_b2.mutable_data_ptr<acc_t>()};
    const AffStrides s = make_strides(x, gx, &grad_out, a_h, a_w, logit);
    const dim3 grid(blocks_for(H * W, kThreads), static_cast<unsigned>(N));
    dispatch_max_ci(Ci, "aff_fuse_backward", [&](auto max_ci) {
      aff_fuse_backward_kernel<scalar_t, acc_t, decltype(max_ci)::value>
          <<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
              a_h.const_data_ptr<scalar_t>(), a_w.const_data_ptr<scalar_t>(),
              logit.const_data_ptr<scalar_t>(), wt, gx.mutable_data_ptr<scalar_t>(), gr, s, C,
              H, W, static_cast<int>(Ci));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const auto dt = x.scalar_type();
    result = {gx, g_ah.to(dt), g_aw.to(dt), g_logit.to(dt), g_w1.to(dt), g_b1.to(dt),
              g_w2.to(dt), g_b2.to(dt)};
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CUDA, m) {
  m.impl("aff_fuse", &aff_fuse_cuda);
  m.impl("aff_fuse_out", &aff_fuse_out_cuda);
  m.impl("aff_fuse_backward", &aff_fuse_backward_cuda);
}

}  // namespace saffnet_fast

// aff_moments CUDA kernels (float32, float64, float16, bfloat16; float32 accumulation for the
// 16-bit types and float32, float64 for float64). Op: csrc/aff_moments.cpp; per-element math:
// csrc/common/attention_math.h; CPU kernels (the specification): cpu/aff_moments_kernel.cpp.
//
// Minimum bytes moved: forward reads x once (+ the N·C·(H+W) factors and the weights) and
// writes 2 vectors of y's channel count; one pass over x (one launch) plus a one-thread-per-
// channel finishing launch. The pre-BN activations y are recomputed per pixel, never stored.
// Backward reads x once and writes grad_x once (+ the factor and weight gradients); one pass,
// one launch (the forward is recomputed per pixel).
//
// One thread per pixel; grid (pixel tiles, N) so that all lanes of a warp share n. AFF's
// hidden vector z (Ci ≤ kMaxCi values, kMaxCi = 16 or 64) lives in registers: the per-pixel
// local_att math is aff_local.cuh, shared with aff_fuse_kernel.cu.
//
// Forward statistics: Σy and Σy² per channel, each warp-reduced in double and added with
// one atomicAdd(double) per warp and channel, then mean = Σy/M, var = max(Σy²/M − mean², 0).
// That single-pass form is safe here only because it is accumulated in double: its
// cancellation costs about log2(mean²/var) of double's 53 bits, so the float32 (or float64
// for float64 inputs) results keep full accuracy unless |mean|/std exceeds ~10⁴ (float32);
// in float32 the same formula lost ~4e-5 relative accuracy on nearly constant channels
// (issue #4), which is why the CPU kernel merges centred moments instead.
//
// Backward: parameter gradients are reduced across the warp with shuffles and added with one
// atomicAdd per warp; grad_a_h / grad_a_w by per-lane atomics. The atomics (forward and
// backward) make results order-dependent in the last bits (not bitwise deterministic,
// unlike the CPU kernels).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>

#include "../common/aff_checks.h"
#include "../common/attention_math.h"
#include "../common/layout.h"
#include "aff_local.cuh"
#include "cuda_utils.cuh"

namespace saffnet_fast {
namespace {

constexpr int kThreads = 128;

// Strides of x, of grad_x (backward only) and of the factors.
struct AffStrides {
  int64_t xn, xc, xh, xw;  // x
  int64_t on, oc, oh, ow;  // grad_x
  int64_t hn, hc, hl;      // a_h
  int64_t wn, wc, wl;      // a_w
};

// Adds y and y² of every lane into sums[c] and sums[Co + c] (one double atomic each per warp).
__device__ __forceinline__ void add_moments(double* sums, int64_t Co, int64_t c, double y) {
  warp_atomic_add(sums + c, y);
  warp_atomic_add(sums + Co + c, y * y);
}

// sums: 2×Co doubles (Σy, Σy²), zero-initialised.
template <typename scalar_t, typename acc_t, int kMaxCi>
__global__ void __launch_bounds__(kThreads)
    aff_moments_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ a_h,
                               const scalar_t* __restrict__ a_w, AffWeights<acc_t> wt,
                               double* sums, AffStrides s, int64_t C, int64_t H, int64_t W,
                               int Ci, bool stage2) {
  // No early return: every lane takes part in the warp reductions (inactive ones add 0).
  const int64_t n = blockIdx.y;
  const int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const bool active = p < H * W;
  const int64_t h = active ? p / W : 0, w = active ? p % W : 0;
  acc_t z[kMaxCi];
  hidden_vector<scalar_t, acc_t, kMaxCi>(x, a_h, a_w, wt, s, n, h, w, C, Ci, z);
  if (stage2) {
    for (int64_t c = 0; c < C; ++c) {
      const acc_t y = local_logit<acc_t, kMaxCi>(wt, c, Ci, z);
      add_moments(sums, C, c, active ? static_cast<double>(y) : 0.0);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kMaxCi; ++j)
      if (j < Ci) add_moments(sums, Ci, j, active ? static_cast<double>(z[j]) : 0.0);
  }
}

// mean = Σy/M, biased var = max(Σy²/M − mean², 0) (the clamp absorbs rounding when the
// variance is ~0), cast to x's dtype.
template <typename scalar_t>
__global__ void aff_moments_finish_kernel(const double* __restrict__ sums, int64_t Co,
                                          double inv_count, scalar_t* mean, scalar_t* var) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= Co) return;
  const double m = sums[c] * inv_count;
  const double q = sums[Co + c] * inv_count - m * m;
  mean[c] = static_cast<scalar_t>(m);
  var[c] = static_cast<scalar_t>(q > 0.0 ? q : 0.0);
}

// Gradient buffers (acc_t, zero-initialised, contiguous).
template <typename acc_t>
struct AffMomentGrads {
  acc_t* a_h;  // N×C×H
  acc_t* a_w;  // N×C×W
  acc_t* w1;   // Ci×C
  acc_t* b1;   // Ci
  acc_t* w2;   // C×Ci (stage 2 only)
  acc_t* b2;   // C    (stage 2 only)
};

// Incoming gradients as acc_t vectors of y's channel count, and 1/M.
template <typename acc_t>
struct MomentGrads {
  const acc_t* grad_mean;
  const acc_t* grad_var;
  const acc_t* mean;
  acc_t inv_count;
};

// dy = grad_mean/M + grad_var·2·(y − mean)/M for one y element (the var term through the
// mean cancels: Σ(y − mean) = 0), in the CPU kernel's operation order.
template <typename acc_t>
__device__ __forceinline__ acc_t moment_grad(const MomentGrads<acc_t>& g, int64_t c, acc_t y) {
  const acc_t a = g.grad_mean[c] * g.inv_count, b = g.grad_var[c] * 2 * g.inv_count;
  return a + b * (y - g.mean[c]);
}

template <typename scalar_t, typename acc_t, int kMaxCi>
__global__ void __launch_bounds__(kThreads)
    aff_moments_backward_kernel(const scalar_t* __restrict__ x,
                                const scalar_t* __restrict__ a_h,
                                const scalar_t* __restrict__ a_w, AffWeights<acc_t> wt,
                                MomentGrads<acc_t> mg, scalar_t* gx, AffMomentGrads<acc_t> gr,
                                AffStrides s, int64_t C, int64_t H, int64_t W, int Ci,
                                bool stage2) {
  // No early return: every lane takes part in the warp reductions (inactive ones add 0).
  const int64_t n = blockIdx.y;
  const int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const bool active = p < H * W;
  const int64_t h = active ? p / W : 0, w = active ? p % W : 0;
  acc_t z[kMaxCi], dz[kMaxCi];
  hidden_vector<scalar_t, acc_t, kMaxCi>(x, a_h, a_w, wt, s, n, h, w, C, Ci, z);
  if (stage2) {
    // conv2: grad_w2 += dy·relu(z), grad_b2 += dy, dz = (W2ᵀ·dy)·[z > 0].
#pragma unroll
    for (int j = 0; j < kMaxCi; ++j) dz[j] = acc_t(0);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t dy =
          active ? moment_grad(mg, c, local_logit<acc_t, kMaxCi>(wt, c, Ci, z)) : acc_t(0);
      warp_atomic_add(gr.b2 + c, dy);
      conv2_backward_channel<acc_t, kMaxCi>(wt, gr.w2, c, Ci, z, dy, dz);
    }
#pragma unroll
    for (int j = 0; j < kMaxCi; ++j) dz[j] = z[j] > acc_t(0) ? dz[j] : acc_t(0);
  } else {
    // Stage 1: y = z, so dz = dy.
#pragma unroll
    for (int j = 0; j < kMaxCi; ++j)
      dz[j] = (active && j < Ci) ? moment_grad(mg, j, z[j]) : acc_t(0);
  }
#pragma unroll
  for (int j = 0; j < kMaxCi; ++j)
    if (j < Ci) warp_atomic_add(gr.b1 + j, dz[j]);
  // conv1: grad_w1 += dz·tᵀ, dt = W1ᵀ·dz; then t = x·(1 + m) gives grad_x and grad_m.
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xv = static_cast<acc_t>(x[n * s.xn + c * s.xc + h * s.xh + w * s.xw]);
    const acc_t ahv = static_cast<acc_t>(a_h[n * s.hn + c * s.hc + h * s.hl]);
    const acc_t awv = static_cast<acc_t>(a_w[n * s.wn + c * s.wc + w * s.wl]);
    const acc_t mv = ahv * awv;
    const acc_t t = xv + xv * mv;
    const acc_t dt = conv1_backward_channel<acc_t, kMaxCi>(wt, gr.w1, C, c, Ci, dz, t);
    if (!active) continue;
    gx[n * s.on + c * s.oc + h * s.oh + w * s.ow] = static_cast<scalar_t>(dt * (acc_t(1) + mv));
    const acc_t dm = dt * xv;
    atomicAdd(gr.a_h + (n * C + c) * H + h, dm * awv);
    atomicAdd(gr.a_w + (n * C + c) * W + w, dm * ahv);
  }
}

AffStrides make_strides(const at::Tensor& x, const at::Tensor* gx, const at::Tensor& a_h,
                        const at::Tensor& a_w) {
  AffStrides s{};
  s.xn = x.stride(0), s.xc = x.stride(1), s.xh = x.stride(2), s.xw = x.stride(3);
  if (gx) s.on = gx->stride(0), s.oc = gx->stride(1), s.oh = gx->stride(2), s.ow = gx->stride(3);
  s.hn = a_h.stride(0), s.hc = a_h.stride(1), s.hl = a_h.stride(2);
  s.wn = a_w.stride(0), s.wc = a_w.stride(1), s.wl = a_w.stride(2);
  return s;
}

// The weights converted to contiguous acc_t tensors; they must outlive the launches that
// read them through AffWeights.
struct AccWeights {
  at::Tensor w1, b1, w2, b2;
  AccWeights(const at::Tensor& w1_, const at::Tensor& b1_, const std::optional<at::Tensor>& w2_,
             const std::optional<at::Tensor>& b2_, at::ScalarType acc_dtype)
      : w1(w1_.to(acc_dtype).contiguous()), b1(b1_.to(acc_dtype).contiguous()) {
    if (w2_.has_value()) {
      w2 = w2_->to(acc_dtype).contiguous();
      b2 = b2_->to(acc_dtype).contiguous();
    }
  }
  template <typename acc_t>
  AffWeights<acc_t> pointers() const {
    return {w1.const_data_ptr<acc_t>(), b1.const_data_ptr<acc_t>(),
            w2.defined() ? w2.const_data_ptr<acc_t>() : nullptr,
            b2.defined() ? b2.const_data_ptr<acc_t>() : nullptr};
  }
};

std::tuple<at::Tensor, at::Tensor> aff_moments_cuda(const at::Tensor& x_in, const at::Tensor& a_h,
                                                    const at::Tensor& a_w, const at::Tensor& w1,
                                                    const at::Tensor& b1,
                                                    const std::optional<at::Tensor>& w2,
                                                    const std::optional<at::Tensor>& b2) {
  const char* op = "aff_moments";
  check_aff_moments_args(x_in, a_h, a_w, w1, b1, w2, b2, op);
  check_cuda_dtype(x_in, op, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ci = w1.size(0);
  TORCH_CHECK_VALUE(N <= 65535, op, ": x: the CUDA kernel supports batches up to 65535, got ", N);
  const bool stage2 = w2.has_value();
  const int64_t Co = stage2 ? C : Ci;
  at::Tensor mean = at::empty({Co}, x.options()), var = at::empty({Co}, x.options());
  at::Tensor sums = at::zeros({2, Co}, x.options().dtype(at::kDouble));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aff_moments_cuda",
                                  [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const AccWeights weights(w1, b1, w2, b2, c10::CppTypeToScalarType<acc_t>::value);
    const AffWeights<acc_t> wt = weights.pointers<acc_t>();
    const AffStrides s = make_strides(x, nullptr, a_h, a_w);
    const dim3 grid(blocks_for(H * W, kThreads), static_cast<unsigned>(N));
    dispatch_max_ci(Ci, op, [&](auto max_ci) {
      aff_moments_forward_kernel<scalar_t, acc_t, decltype(max_ci)::value>
          <<<grid, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(),
                                          a_h.const_data_ptr<scalar_t>(),
                                          a_w.const_data_ptr<scalar_t>(), wt,
                                          sums.mutable_data_ptr<double>(), s, C, H, W,
                                          static_cast<int>(Ci), stage2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    aff_moments_finish_kernel<scalar_t><<<blocks_for(Co, kThreads), kThreads, 0, stream>>>(
        sums.const_data_ptr<double>(), Co, 1.0 / static_cast<double>(N * H * W),
        mean.mutable_data_ptr<scalar_t>(), var.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
aff_moments_backward_cuda(const at::Tensor& grad_mean, const at::Tensor& grad_var,
                          const at::Tensor& x_in, const at::Tensor& a_h, const at::Tensor& a_w,
                          const at::Tensor& w1, const at::Tensor& b1,
                          const std::optional<at::Tensor>& w2,
                          const std::optional<at::Tensor>& b2, const at::Tensor& mean) {
  const char* op = "aff_moments_backward";
  check_aff_moments_backward_args(grad_mean, grad_var, x_in, a_h, a_w, w1, b1, w2, b2, mean, op);
  check_cuda_dtype(x_in, op, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ci = w1.size(0);
  TORCH_CHECK_VALUE(N <= 65535, op, ": x: the CUDA kernel supports batches up to 65535, got ", N);
  const bool stage2 = w2.has_value();
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
      result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "aff_moments_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const auto acc_opts = x.options().dtype(acc_dtype);
    const AccWeights weights(w1, b1, w2, b2, acc_dtype);
    const AffWeights<acc_t> wt = weights.pointers<acc_t>();
    const at::Tensor gmean_a = grad_mean.to(acc_dtype).contiguous();
    const at::Tensor gvar_a = grad_var.to(acc_dtype).contiguous();
    const at::Tensor mean_a = mean.to(acc_dtype).contiguous();
    const MomentGrads<acc_t> mg{gmean_a.const_data_ptr<acc_t>(), gvar_a.const_data_ptr<acc_t>(),
                                mean_a.const_data_ptr<acc_t>(),
                                acc_t(1) / static_cast<acc_t>(N * H * W)};
    at::Tensor g_ah = at::zeros({N, C, H}, acc_opts), g_aw = at::zeros({N, C, W}, acc_opts);
    at::Tensor g_w1 = at::zeros({Ci, C}, acc_opts), g_b1 = at::zeros({Ci}, acc_opts);
    // grad_w2 / grad_b2 are empty (0 elements) in stage 1, as the schema says.
    at::Tensor g_w2 = stage2 ? at::zeros({C, Ci}, acc_opts) : at::empty({0}, acc_opts);
    at::Tensor g_b2 = stage2 ? at::zeros({C}, acc_opts) : at::empty({0}, acc_opts);
    const AffMomentGrads<acc_t> gr{g_ah.mutable_data_ptr<acc_t>(), g_aw.mutable_data_ptr<acc_t>(),
                                   g_w1.mutable_data_ptr<acc_t>(), g_b1.mutable_data_ptr<acc_t>(),
                                   stage2 ? g_w2.mutable_data_ptr<acc_t>() : nullptr,
                                   stage2 ? g_b2.mutable_data_ptr<acc_t>() : nullptr};
    const AffStrides s = make_strides(x, &gx, a_h, a_w);
    const dim3 grid(blocks_for(H * W, kThreads), static_cast<unsigned>(N));
    dispatch_max_ci(Ci, op, [&](auto max_ci) {
      aff_moments_backward_kernel<scalar_t, acc_t, decltype(max_ci)::value>
          <<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              x.const_data_ptr<scalar_t>(), a_h.const_data_ptr<scalar_t>(),
              a_w.const_data_ptr<scalar_t>(), wt, mg, gx.mutable_data_ptr<scalar_t>(), gr, s, C,
              H, W, static_cast<int>(Ci), stage2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const auto dt = x.scalar_type();
    result = {gx, g_ah.to(dt), g_aw.to(dt), g_w1.to(dt), g_b1.to(dt), g_w2.to(dt), g_b2.to(dt)};
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CUDA, m) {
  m.impl("aff_moments", &aff_moments_cuda);
  m.impl("aff_moments_backward", &aff_moments_backward_cuda);
}

}  // namespace saffnet_fast

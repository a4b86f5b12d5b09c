// split_resplice_train CUDA kernels (float32, float64, float16, bfloat16; float32 accumulation
// for the 16-bit types and float32, float64 for float64): the fused per-step passes of
// csrc/common/split_resplice_train.h. Op: csrc/split_resplice_train.cpp; math:
// csrc/common/batch_norm_act.h; CPU kernels (the specification):
// cpu/split_resplice_train_kernel.cpp.
//
// Minimum bytes moved per step (v = the step's pre-BN conv output, c_j channels): forward
// reads v twice for the two-pass statistics (the second read mostly from L2) and once more
// to apply, writing y once, split between the output slice and the next step's input;
// backward reads v and grad_y twice and writes grad_v once (dz is recomputed in the second
// loop instead of being stored and read back as the CPU kernel does: fewer bytes, and no
// rounding of dz to 16 bits). Launches per step: 1 statistics + 1 apply forward, 1 backward,
// plus ATen's (cuDNN's) convolution and its backward.
//
// Layout: statistics and backward run one block per channel, the block looping over the
// channel's N·H·W values (per-thread partial sums in acc_t, block reduction in double, then
// a second, centred pass: no cancellation; deterministic, no atomics). Apply runs one thread
// per element. The dropout mask is regenerated per element with dropout_bits(seed, step,
// index), index = (n·c_j + c)·H·W + i as on the CPU, so CPU and CUDA draw the same mask.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/batch_norm_act.h"
#include "../common/checks.h"
#include "../common/split_resplice.h"
#include "../common/split_resplice_train.h"
#include "cuda_utils.cuh"

namespace saffnet_fast {
namespace {

constexpr int kChannelThreads = 512;  // statistics / backward: one block per channel
constexpr int kApplyThreads = 256;

// Dropout multiplier of element `index`: 1/(1 − p) (kept) or 0; 1 without dropout.
template <typename acc_t>
__device__ __forceinline__ acc_t dropout_scale(uint64_t seed, uint64_t step, uint64_t index,
                                               float p, acc_t kept) {
  if (p <= 0.0f) return acc_t(1);
  return dropout_keep_bits(dropout_bits(seed, step, index), p) ? kept : acc_t(0);
}

// mean[c] and biased var[c] of channel c = blockIdx.x over its N·HW values.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kChannelThreads)
    channel_moments_kernel(const scalar_t* __restrict__ v, int64_t sn, int64_t sc, int64_t N,
                           int64_t HW, scalar_t* mean, scalar_t* var) {
  __shared__ double scratch[kWarpSize];
  const int64_t c = blockIdx.x, M = N * HW;
  const scalar_t* base = v + c * sc;
  acc_t s = 0;
  for (int64_t e = threadIdx.x; e < M; e += blockDim.x)
    s += static_cast<acc_t>(base[(e / HW) * sn + e % HW]);
  const double mu = block_sum(static_cast<double>(s), scratch) / static_cast<double>(M);
  const acc_t mu_a = static_cast<acc_t>(mu);
  acc_t q = 0;
  for (int64_t e = threadIdx.x; e < M; e += blockDim.x) {
    const acc_t d = static_cast<acc_t>(base[(e / HW) * sn + e % HW]) - mu_a;
    q += d * d;
  }
  const double m2 = block_sum(static_cast<double>(q), scratch);
  if (threadIdx.x == 0) {
    mean[c] = static_cast<scalar_t>(mu);
    var[c] = static_cast<scalar_t>(m2 / static_cast<double>(M));  // biased, as BN normalises
  }
}

// Per-channel parameters and the step's dropout, as acc_t.
template <typename acc_t>
struct StepParams {
  acc_t eps, slope, kept;  // kept = 1/(1 − p)
  float p;
  uint64_t seed, step;
  const int64_t* seed_on_device;  // when set, the seed is read here (see StepArgs)

  __device__ __forceinline__ uint64_t dropout_seed() const {
    return seed_on_device ? static_cast<uint64_t>(__ldg(seed_on_device)) : seed;
  }
};

template <typename acc_t>
StepParams<acc_t> step_params(const StepArgs& a) {
  return {static_cast<acc_t>(a.eps), static_cast<acc_t>(a.slope),
          acc_t(1) / (acc_t(1) - static_cast<acc_t>(a.p)), static_cast<float>(a.p), a.seed,
          static_cast<uint64_t>(a.step), a.seed_on_device};
}

// y = Dropout(LeakyReLU(BN(v))) for every element of v (N×Cj×HW); channels c < keep go to
// keep_dst, the others to carry_dst.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kApplyThreads)
    bn_act_dropout_apply_kernel(const scalar_t* __restrict__ v, int64_t vn, int64_t vc,
                                const scalar_t* __restrict__ mean,
                                const scalar_t* __restrict__ var,
                                const scalar_t* __restrict__ gamma,
                                const scalar_t* __restrict__ beta, StepParams<acc_t> prm,
                                scalar_t* keep_dst, int64_t kn, int64_t kc, scalar_t* carry_dst,
                                int64_t cn, int64_t cc, int64_t N, int64_t Cj, int64_t HW,
                                int64_t keep) {
  const int64_t total = N * Cj * HW;
  const uint64_t seed = prm.dropout_seed();
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
       e += (int64_t)blockDim.x * gridDim.x) {
    const int64_t i = e % HW, nc = e / HW, c = nc % Cj, n = nc / Cj;
    const acc_t scale = static_cast<acc_t>(gamma[c]) /
                        ::sqrt(static_cast<acc_t>(var[c]) + prm.eps);
    const acc_t shift = static_cast<acc_t>(beta[c]) - static_cast<acc_t>(mean[c]) * scale;
    const acc_t y = leaky_relu(static_cast<acc_t>(v[n * vn + c * vc + i]) * scale + shift,
                               prm.slope);
    // e is the element index (n·Cj + c)·HW + i of the CPU kernel's mask.
    const acc_t drop = dropout_scale(seed, prm.step, static_cast<uint64_t>(e), prm.p, prm.kept);
    scalar_t* dst = c < keep ? keep_dst + n * kn + c * kc : carry_dst + n * cn + (c - keep) * cc;
    dst[i] = static_cast<scalar_t>(y * drop);
  }
}

// One block per channel c: loop 1 computes dz = dy·dropout·LeakyReLU'(z) and reduces Σdz
// (grad_β) and Σdz·v̂ (grad_γ); loop 2 recomputes dz and writes
// grad_v = γ·invstd·(dz − Σdz/M − v̂·Σdz·v̂/M). grad_v is contiguous N×Cj×HW.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kChannelThreads)
    bn_act_dropout_backward_kernel(const scalar_t* __restrict__ grad_keep, int64_t kn,
                                   int64_t kc, const scalar_t* __restrict__ grad_carry,
                                   int64_t cn, int64_t cc, const scalar_t* __restrict__ v,
                                   int64_t vn, int64_t vc, const scalar_t* __restrict__ mean,
                                   const scalar_t* __restrict__ var,
                                   const scalar_t* __restrict__ gamma,
                                   const scalar_t* __restrict__ beta, StepParams<acc_t> prm,
                                   scalar_t* grad_v, scalar_t* grad_gamma, scalar_t* grad_beta,
                                   int64_t N, int64_t Cj, int64_t HW, int64_t keep) {
  __shared__ double scratch[kWarpSize];
  const int64_t c = blockIdx.x, M = N * HW;
  const acc_t mu = static_cast<acc_t>(mean[c]);
  const acc_t invstd = acc_t(1) / ::sqrt(static_cast<acc_t>(var[c]) + prm.eps);
  const acc_t scale = static_cast<acc_t>(gamma[c]) * invstd;
  const acc_t shift = static_cast<acc_t>(beta[c]) - mu * scale;
  // dy of channel c (nullptr: no gradient reaches it, dy = 0; only when grad_carry is
  // undefined, and then keep == Cj).
  const scalar_t* dy = c < keep ? grad_keep + c * kc
                                : (grad_carry ? grad_carry + (c - keep) * cc : nullptr);
  const int64_t dyn = c < keep ? kn : cn;
  const uint64_t seed = prm.dropout_seed();
  // dz and v̂ of element e = n·HW + i of the channel.
  auto dz_vhat = [&](int64_t e, acc_t& vhat) {
    const int64_t n = e / HW, i = e % HW;
    const acc_t vv = static_cast<acc_t>(v[n * vn + c * vc + i]);
    const acc_t z = vv * scale + shift;
    vhat = (vv - mu) * invstd;
    const acc_t g = dy ? static_cast<acc_t>(dy[n * dyn + i]) : acc_t(0);
    const uint64_t index = static_cast<uint64_t>((n * Cj + c) * HW + i);
    return g * dropout_scale(seed, prm.step, index, prm.p, prm.kept) *
           (z > acc_t(0) ? acc_t(1) : prm.slope);
  };
  acc_t s_dz = 0, s_dz_vhat = 0;
  for (int64_t e = threadIdx.x; e < M; e += blockDim.x) {
    acc_t vhat;
    const acc_t d = dz_vhat(e, vhat);
    s_dz += d;
    s_dz_vhat += d * vhat;
  }
  const double sum_dz = block_sum(static_cast<double>(s_dz), scratch);
  const double sum_dz_vhat = block_sum(static_cast<double>(s_dz_vhat), scratch);
  if (threadIdx.x == 0) {
    grad_gamma[c] = static_cast<scalar_t>(sum_dz_vhat);
    grad_beta[c] = static_cast<scalar_t>(sum_dz);
  }
  const acc_t mean_dz = static_cast<acc_t>(sum_dz / static_cast<double>(M));
  const acc_t mean_dz_vhat = static_cast<acc_t>(sum_dz_vhat / static_cast<double>(M));
  for (int64_t e = threadIdx.x; e < M; e += blockDim.x) {
    acc_t vhat;
    const acc_t d = dz_vhat(e, vhat);
    const int64_t n = e / HW, i = e % HW;
    grad_v[(n * Cj + c) * HW + i] =
        static_cast<scalar_t>(batch_norm_input_grad(d, vhat, scale, mean_dz, mean_dz_vhat));
  }
}

struct CudaKernels {
  static void check_dtype(const at::Tensor& x, const char* op) { check_cuda_dtype(x, op, "x"); }

  static void moments(const at::Tensor& v, at::Tensor& mean, at::Tensor& var) {
    const c10::cuda::CUDAGuard guard(v.device());
    const int64_t N = v.size(0), Cj = v.size(1), HW = v.size(2) * v.size(3);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(),
                                    "split_resplice_train_moments_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
      channel_moments_kernel<scalar_t, acc_t>
          <<<static_cast<unsigned>(Cj), kChannelThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              v.const_data_ptr<scalar_t>(), v.stride(0), v.stride(1), N, HW,
              mean.mutable_data_ptr<scalar_t>(), var.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void apply(const at::Tensor& v, const at::Tensor& mean, const at::Tensor& var,
                    const at::Tensor& gamma, const at::Tensor& beta, const StepArgs& a,
                    at::Tensor keep_dst, at::Tensor carry_dst) {
    const c10::cuda::CUDAGuard guard(v.device());
    const int64_t N = v.size(0), Cj = v.size(1), HW = v.size(2) * v.size(3);
    const int64_t keep = keep_dst.size(1);
    const at::Tensor g = gamma.contiguous(), b = beta.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(),
                                    "split_resplice_train_apply_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
      scalar_t* cp = carry_dst.defined() ? carry_dst.mutable_data_ptr<scalar_t>() : nullptr;
      const int64_t cn = cp ? carry_dst.stride(0) : 0, cc = cp ? carry_dst.stride(1) : 0;
      const int64_t total = N * Cj * HW;
      const unsigned blocks = std::min<unsigned>(blocks_for(total, kApplyThreads), 65535u * 8u);
      bn_act_dropout_apply_kernel<scalar_t, acc_t>
          <<<blocks, kApplyThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              v.const_data_ptr<scalar_t>(), v.stride(0), v.stride(1),
              mean.const_data_ptr<scalar_t>(), var.const_data_ptr<scalar_t>(),
              g.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), step_params<acc_t>(a),
              keep_dst.mutable_data_ptr<scalar_t>(), keep_dst.stride(0), keep_dst.stride(1), cp,
              cn, cc, N, Cj, HW, keep);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_keep, const at::Tensor& grad_carry, const at::Tensor& v,
      const at::Tensor& mean, const at::Tensor& var, const at::Tensor& gamma,
      const at::Tensor& beta, const StepArgs& a) {
    const c10::cuda::CUDAGuard guard(v.device());
    const int64_t N = v.size(0), Cj = v.size(1), HW = v.size(2) * v.size(3);
    const int64_t keep = grad_keep.size(1);
    at::Tensor grad_v = at::empty_like(v, at::MemoryFormat::Contiguous);
    at::Tensor grad_gamma = at::empty({Cj}, v.options()), grad_beta = at::empty({Cj}, v.options());
    const at::Tensor g = gamma.contiguous(), b = beta.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(),
                                    "split_resplice_train_backward_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
      const scalar_t* gcp = grad_carry.defined() ? grad_carry.const_data_ptr<scalar_t>() : nullptr;
      const int64_t cn = gcp ? grad_carry.stride(0) : 0, cc = gcp ? grad_carry.stride(1) : 0;
      bn_act_dropout_backward_kernel<scalar_t, acc_t>
          <<<static_cast<unsigned>(Cj), kChannelThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              grad_keep.const_data_ptr<scalar_t>(), grad_keep.stride(0), grad_keep.stride(1),
              gcp, cn, cc, v.const_data_ptr<scalar_t>(), v.stride(0), v.stride(1),
              mean.const_data_ptr<scalar_t>(), var.const_data_ptr<scalar_t>(),
              g.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), step_params<acc_t>(a),
              grad_v.mutable_data_ptr<scalar_t>(), grad_gamma.mutable_data_ptr<scalar_t>(),
              grad_beta.mutable_data_ptr<scalar_t>(), N, Cj, HW, keep);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {grad_v, grad_gamma, grad_beta};
  }
};

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>
split_resplice_train_cuda(const at::Tensor& x, at::TensorList weights, at::TensorList gammas,
                          at::TensorList betas, double eps, double negative_slope,
                          double dropout, const at::Tensor& seed) {
  return split_resplice_train_forward<CudaKernels>(x, weights, gammas, betas, eps,
                                                   negative_slope, dropout, seed);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
split_resplice_train_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                   at::TensorList weights, at::TensorList gammas,
                                   at::TensorList betas, at::TensorList pre,
                                   at::TensorList inputs, const at::Tensor& mean,
                                   const at::Tensor& var, double eps, double negative_slope,
                                   double dropout, const at::Tensor& seed) {
  return split_resplice_train_backward<CudaKernels>(grad_out, x, weights, gammas, betas, pre,
                                                    inputs, mean, var, eps, negative_slope,
                                                    dropout, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CUDA, m) {
  m.impl("split_resplice_train", &split_resplice_train_cuda);
  m.impl("split_resplice_train_backward", &split_resplice_train_backward_cuda);
}

}  // namespace saffnet_fast

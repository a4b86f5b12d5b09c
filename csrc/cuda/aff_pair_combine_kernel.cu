// aff_pair_combine CUDA kernels (float32, float64, float16, bfloat16; float32 accumulation
// for the 16-bit types).
//
// Minimum bytes moved: forward reads x, residual and local_logit once and writes out once
// (+ N·C global logits), one pass. Backward reads grad_out, x, residual and local_logit once
// and writes grad_x, grad_residual and grad_local_logit once (+ N·C), one pass.
//
// Forward: grid-stride elementwise over the logical N×C×H×W index, every tensor through its
// strides. Backward: one block per (n, c) plane striding over its H·W values, a block sum
// for grad_global_logit.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/aff_checks.h"
#include "../common/attention_math.h"
#include "../common/layout.h"
#include "cuda_utils.cuh"
#include "tensor_strides.cuh"

namespace saffnet_fast {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void aff_pair_combine_forward_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
    const scalar_t* __restrict__ local, const scalar_t* __restrict__ global, scalar_t* out,
    int64_t total, int64_t C, int64_t H, int64_t W, Idx4 xs, Idx4 rs, Idx4 ls, Idx4 os,
    int64_t gn, int64_t gc) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t w = i % W, h = (i / W) % H, c = (i / (W * H)) % C, n = i / (W * H * C);
    const acc_t wei = sigmoid(static_cast<acc_t>(local[ls.at(n, c, h, w)]) +
                              static_cast<acc_t>(global[n * gn + c * gc]));
    out[os.at(n, c, h, w)] = static_cast<scalar_t>(
        aff_pair_combine(static_cast<acc_t>(x[xs.at(n, c, h, w)]),
                         static_cast<acc_t>(residual[rs.at(n, c, h, w)]), wei));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void aff_pair_combine_backward_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ residual, const scalar_t* __restrict__ local,
    const scalar_t* __restrict__ global, scalar_t* gx, scalar_t* gr, scalar_t* g_local,
    scalar_t* g_global, int64_t C, int64_t H, int64_t W, Idx4 gs, Idx4 xs, Idx4 rs, Idx4 ls,
    Idx4 dxs, Idx4 drs, Idx4 dls, int64_t gn, int64_t gc) {
  __shared__ acc_t scratch[kWarpSize];
  const int64_t plane = blockIdx.x;
  const int64_t n = plane / C, c = plane % C;
  const acc_t glob = static_cast<acc_t>(global[n * gn + c * gc]);
  acc_t local_sum = 0;
  for (int64_t i = threadIdx.x; i < H * W; i += blockDim.x) {
    const int64_t h = i / W, w = i % W;
    const acc_t wei = sigmoid(static_cast<acc_t>(local[ls.at(n, c, h, w)]) + glob);
    const AffPairGrad<acc_t> d = aff_pair_grad(static_cast<acc_t>(grad[gs.at(n, c, h, w)]),
                                               static_cast<acc_t>(x[xs.at(n, c, h, w)]),
                                               static_cast<acc_t>(residual[rs.at(n, c, h, w)]),
                                               wei);
    gx[dxs.at(n, c, h, w)] = static_cast<scalar_t>(d.d_x);
    gr[drs.at(n, c, h, w)] = static_cast<scalar_t>(d.d_r);
    g_local[dls.at(n, c, h, w)] = static_cast<scalar_t>(d.d_s);
    local_sum += d.d_s;
  }
  local_sum = block_sum(local_sum, scratch);
  if (threadIdx.x == 0) g_global[plane] = static_cast<scalar_t>(local_sum);
}

at::Tensor aff_pair_combine_cuda(const at::Tensor& x_in, const at::Tensor& residual_in,
                                 const at::Tensor& local_in, const at::Tensor& global_logit) {
  check_aff_pair_combine_args(x_in, residual_in, local_in, global_logit, "aff_pair_combine");
  check_cuda_dtype(x_in, "aff_pair_combine", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense_nchw_or_nhwc(x_in), residual = dense_nchw_or_nhwc(residual_in);
  const at::Tensor local = dense_local_logit(local_in);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  const int64_t total = x.numel();
  const int threads = 256;
  const unsigned blocks = std::min<unsigned>(blocks_for(total, threads), 65535u * 8u);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "aff_pair_combine_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    aff_pair_combine_forward_kernel<scalar_t, acc_t>
        <<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), residual.const_data_ptr<scalar_t>(),
            local.const_data_ptr<scalar_t>(), global_logit.const_data_ptr<scalar_t>(),
            out.mutable_data_ptr<scalar_t>(), total, x.size(1), x.size(2), x.size(3),
            strides4(x), strides4(residual), strides4(local), strides4(out),
            global_logit.stride(0), global_logit.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aff_pair_combine_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& residual_in,
    const at::Tensor& local_in, const at::Tensor& global_logit) {
  check_aff_pair_combine_args(x_in, residual_in, local_in, global_logit,
                              "aff_pair_combine_backward");
  check_cuda_dtype(x_in, "aff_pair_combine_backward", "x");
  check_like(grad_out, x_in.sizes(), x_in, "aff_pair_combine_backward", "grad_out");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense_nchw_or_nhwc(x_in), residual = dense_nchw_or_nhwc(residual_in);
  const at::Tensor local = dense_local_logit(local_in);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  AffPairCombineGrads g = empty_aff_pair_combine_grads(x, residual, local);
  const int threads = static_cast<int>(
      std::min<int64_t>(256, std::max<int64_t>(kWarpSize, (H * W + kWarpSize - 1) /
                                                              kWarpSize * kWarpSize)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "aff_pair_combine_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    aff_pair_combine_backward_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(N * C), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
            grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            residual.const_data_ptr<scalar_t>(), local.const_data_ptr<scalar_t>(),
            global_logit.const_data_ptr<scalar_t>(), g.x.mutable_data_ptr<scalar_t>(),
            g.residual.mutable_data_ptr<scalar_t>(), g.local.mutable_data_ptr<scalar_t>(),
            g.global.mutable_data_ptr<scalar_t>(), C, H, W, strides4(grad_out), strides4(x),
            strides4(residual), strides4(local), strides4(g.x), strides4(g.residual),
            strides4(g.local), global_logit.stride(0), global_logit.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g.x, g.residual, g.local, g.global};
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CUDA, m) {
  m.impl("aff_pair_combine", &aff_pair_combine_cuda);
  m.impl("aff_pair_combine_backward", &aff_pair_combine_backward_cuda);
}

}  // namespace saffnet_fast

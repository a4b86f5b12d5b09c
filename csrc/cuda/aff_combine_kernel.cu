// aff_combine CUDA kernels (float32, float64, float16, bfloat16; float32 accumulation for the
// 16-bit types).
//
// Minimum bytes moved: forward reads x and local_logit once and writes out once
// (+ N·C·(H+W+1) factors and logits), one pass. Backward reads grad_out, x and local_logit
// once and writes grad_x and grad_local_logit once (+ N·C·(H+W+1)), one pass.
//
// Forward: grid-stride elementwise over the logical N×C×H×W index, every tensor through its
// strides. Backward: one block per (n, c) plane, warps over rows (row sums by shuffles ->
// grad_a_h), per-warp column partials in shared memory (-> grad_a_w), a block sum for
// grad_global_logit; grad_x and grad_local_logit written in the same sweep (the layout of
// coord_scale_backward_kernel).
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

constexpr int kMaxWarps = 8;
constexpr size_t kMaxSharedBytes = 48 * 1024;

template <typename scalar_t, typename acc_t>
__global__ void aff_combine_forward_kernel(const scalar_t* __restrict__ x,
                                           const scalar_t* __restrict__ a_h,
                                           const scalar_t* __restrict__ a_w,
                                           const scalar_t* __restrict__ local,
                                           const scalar_t* __restrict__ global, scalar_t* out,
                                           int64_t total, int64_t C, int64_t H, int64_t W,
                                           Idx4 xs, Idx4 ls, Idx4 os, Idx3 hs, Idx3 ws,
                                           int64_t gn, int64_t gc) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t w = i % W, h = (i / W) % H, c = (i / (W * H)) % C, n = i / (W * H * C);
    const acc_t m = static_cast<acc_t>(a_h[n * hs.n + c * hs.c + h * hs.l]) *
                    static_cast<acc_t>(a_w[n * ws.n + c * ws.c + w * ws.l]);
    const acc_t wei = sigmoid(static_cast<acc_t>(local[ls.at(n, c, h, w)]) +
                              static_cast<acc_t>(global[n * gn + c * gc]));
    out[os.at(n, c, h, w)] =
        static_cast<scalar_t>(aff_combine(static_cast<acc_t>(x[xs.at(n, c, h, w)]), m, wei));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void aff_combine_backward_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ a_h, const scalar_t* __restrict__ a_w,
    const scalar_t* __restrict__ local, const scalar_t* __restrict__ global, scalar_t* gx,
    scalar_t* g_local, scalar_t* ga_h, scalar_t* ga_w, scalar_t* g_global, int64_t C, int64_t H,
    int64_t W, Idx4 gs, Idx4 xs, Idx4 ls, Idx4 dxs, Idx4 dls, Idx3 hs, Idx3 ws, int64_t gn,
    int64_t gc) {
  extern __shared__ unsigned char shared_raw[];
  acc_t* col = reinterpret_cast<acc_t*>(shared_raw);  // [warps][W]
  __shared__ acc_t scratch[kWarpSize];
  const int64_t plane = blockIdx.x;
  const int64_t n = plane / C, c = plane % C;
  const int warps = blockDim.x / kWarpSize;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const acc_t glob = static_cast<acc_t>(global[n * gn + c * gc]);
  acc_t* my_col = col + warp * W;
  for (int64_t w = lane; w < W; w += kWarpSize) my_col[w] = acc_t(0);
  acc_t local_sum = 0;
  for (int64_t h = warp; h < H; h += warps) {
    const acc_t ah = static_cast<acc_t>(a_h[n * hs.n + c * hs.c + h * hs.l]);
    acc_t row = 0;
    for (int64_t w = lane; w < W; w += kWarpSize) {
      const acc_t aw = static_cast<acc_t>(a_w[n * ws.n + c * ws.c + w * ws.l]);
      const acc_t wei = sigmoid(static_cast<acc_t>(local[ls.at(n, c, h, w)]) + glob);
      const auto d = aff_combine_grad(static_cast<acc_t>(grad[gs.at(n, c, h, w)]),
                                      static_cast<acc_t>(x[xs.at(n, c, h, w)]), ah * aw, wei);
      gx[dxs.at(n, c, h, w)] = static_cast<scalar_t>(d.d_x);
      g_local[dls.at(n, c, h, w)] = static_cast<scalar_t>(d.d_s);
      local_sum += d.d_s;
      row += d.d_m * aw;
      my_col[w] += d.d_m * ah;
    }
    row = warp_sum(row);
    if (lane == 0) ga_h[plane * H + h] = static_cast<scalar_t>(row);
  }
  local_sum = block_sum(local_sum, scratch);  // ends with a barrier: the columns are written
  if (threadIdx.x == 0) g_global[plane] = static_cast<scalar_t>(local_sum);
  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) {
    acc_t s = 0;
    for (int k = 0; k < warps; ++k) s += col[k * W + w];
    ga_w[plane * W + w] = static_cast<scalar_t>(s);
  }
}

at::Tensor aff_combine_cuda(const at::Tensor& x_in, const at::Tensor& a_h, const at::Tensor& a_w,
                            const at::Tensor& local_in, const at::Tensor& global_logit) {
  check_aff_combine_args(x_in, a_h, a_w, local_in, global_logit, "aff_combine");
  check_cuda_dtype(x_in, "aff_combine", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  const at::Tensor local = dense_local_logit(local_in);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  const int64_t total = x.numel();
  const int threads = 256;
  const unsigned blocks = std::min<unsigned>(blocks_for(total, threads), 65535u * 8u);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aff_combine_cuda",
                                  [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    aff_combine_forward_kernel<scalar_t, acc_t>
        <<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), a_h.const_data_ptr<scalar_t>(),
            a_w.const_data_ptr<scalar_t>(), local.const_data_ptr<scalar_t>(),
            global_logit.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total,
            x.size(1), x.size(2), x.size(3), strides4(x), strides4(local), strides4(out),
            strides3(a_h), strides3(a_w), global_logit.stride(0), global_logit.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> aff_combine_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& a_h,
    const at::Tensor& a_w, const at::Tensor& local_in, const at::Tensor& global_logit) {
  check_aff_combine_args(x_in, a_h, a_w, local_in, global_logit, "aff_combine_backward");
  check_cuda_dtype(x_in, "aff_combine_backward", "x");
  check_like(grad_out, x_in.sizes(), x_in, "aff_combine_backward", "grad_out");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  const at::Tensor local = dense_local_logit(local_in);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  AffCombineGrads g = empty_aff_combine_grads(x, local);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "aff_combine_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const size_t row_bytes = static_cast<size_t>(W) * sizeof(acc_t);
    TORCH_CHECK_VALUE(row_bytes <= kMaxSharedBytes, "aff_combine_backward: x: W = ", W,
                      " exceeds the CUDA kernel's limit of ", kMaxSharedBytes / sizeof(acc_t),
                      " columns");
    int warps = static_cast<int>(std::min<int64_t>(kMaxWarps, std::max<int64_t>(1, H)));
    while (warps > 1 && warps * row_bytes > kMaxSharedBytes) --warps;
    aff_combine_backward_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(N * C), warps * kWarpSize, warps * row_bytes,
           at::cuda::getCurrentCUDAStream()>>>(
            grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            a_h.const_data_ptr<scalar_t>(), a_w.const_data_ptr<scalar_t>(),
            local.const_data_ptr<scalar_t>(), global_logit.const_data_ptr<scalar_t>(),
            g.x.mutable_data_ptr<scalar_t>(), g.local.mutable_data_ptr<scalar_t>(),
            g.a_h.mutable_data_ptr<scalar_t>(), g.a_w.mutable_data_ptr<scalar_t>(),
            g.global.mutable_data_ptr<scalar_t>(), C, H, W, strides4(grad_out), strides4(x),
            strides4(local), strides4(g.x), strides4(g.local), strides3(a_h), strides3(a_w),
            global_logit.stride(0), global_logit.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g.x, g.a_h, g.a_w, g.local, g.global};
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CUDA, m) {
  m.impl("aff_combine", &aff_combine_cuda);
  m.impl("aff_combine_backward", &aff_combine_backward_cuda);
}

}  // namespace saffnet_fast

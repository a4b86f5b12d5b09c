// coord_pool CUDA kernels (float32, float64, float16, bfloat16; float32 accumulation for the
// 16-bit types, float64 for float64).
//
// Minimum bytes moved: forward reads x once and writes N·C·(H+W) means; backward reads
// N·C·(H+W) gradients and writes N·C·H·W. One pass (one launch) each.
//
// Forward: one block per (n, c) plane. Each warp takes rows h = warp, warp + warps, ...;
// its lanes walk the row (coalesced when W is the innermost stride), reduce the row sum
// with shuffles (-> pool_h) and add each element to a per-warp column accumulator in shared
// memory owned by one lane (no atomics). The warps' column partials are summed at the end
// (-> pool_w). x is read through its strides, so channels_last and sliced inputs need no
// copy (channels_last reads are strided, hence uncoalesced: correct, not fast).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/coord_pool.h"

namespace saffnet_fast {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxWarps = 8;
constexpr size_t kMaxSharedBytes = 48 * 1024;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void coord_pool_forward_kernel(const scalar_t* __restrict__ x, scalar_t* pool_h,
                                          scalar_t* pool_w, int64_t C, int64_t H, int64_t W,
                                          int64_t sn, int64_t sc, int64_t sh, int64_t sw,
                                          int64_t hn, int64_t hc, int64_t hh, int64_t wn,
                                          int64_t wc, int64_t ww) {
  extern __shared__ unsigned char shared_raw[];
  acc_t* col = reinterpret_cast<acc_t*>(shared_raw);  // [warps][W]
  const int64_t plane = blockIdx.x;
  const int64_t n = plane / C, c = plane % C;
  const int warps = blockDim.x / kWarp;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  acc_t* my_col = col + warp * W;
  for (int64_t w = lane; w < W; w += kWarp) my_col[w] = acc_t(0);
  const scalar_t* base = x + n * sn + c * sc;
  const acc_t inv_w = acc_t(1) / acc_t(W), inv_h = acc_t(1) / acc_t(H);
  for (int64_t h = warp; h < H; h += warps) {
    acc_t row = 0;
    for (int64_t w = lane; w < W; w += kWarp) {
      const acc_t v = static_cast<acc_t>(base[h * sh + w * sw]);
      row += v;
      my_col[w] += v;
    }
    row = warp_sum(row);
    if (lane == 0) pool_h[n * hn + c * hc + h * hh] = static_cast<scalar_t>(row * inv_w);
  }
  __syncthreads();
  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) {
    acc_t s = 0;
    for (int k = 0; k < warps; ++k) s += col[k * W + w];
    pool_w[n * wn + c * wc + w * ww] = static_cast<scalar_t>(s * inv_h);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void coord_pool_backward_kernel(const scalar_t* __restrict__ gh,
                                           const scalar_t* __restrict__ gw, scalar_t* gx,
                                           int64_t total, int64_t C, int64_t H, int64_t W,
                                           int64_t hn, int64_t hc, int64_t hh, int64_t wn,
                                           int64_t wc, int64_t ww) {
  const acc_t inv_w = acc_t(1) / acc_t(W), inv_h = acc_t(1) / acc_t(H);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t w = i % W, h = (i / W) % H, c = (i / (W * H)) % C, n = i / (W * H * C);
    const acc_t g_h = static_cast<acc_t>(gh[n * hn + c * hc + h * hh]);
    const acc_t g_w = static_cast<acc_t>(gw[n * wn + c * wc + w * ww]);
    gx[i] = static_cast<scalar_t>(coord_pool_grad(g_h, g_w, inv_w, inv_h));
  }
}

void coord_pool_out_cuda(const at::Tensor& x, at::Tensor& pool_h, at::Tensor& pool_w) {
  check_nchw(x, "coord_pool", "x");
  check_cuda_dtype(x, "coord_pool", "x");
  check_like(pool_h, {x.size(0), x.size(1), x.size(2)}, x, "coord_pool", "pool_h");
  check_like(pool_w, {x.size(0), x.size(1), x.size(3)}, x, "coord_pool", "pool_w");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coord_pool_cuda",
                                  [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const size_t row_bytes = static_cast<size_t>(W) * sizeof(acc_t);
    TORCH_CHECK_VALUE(row_bytes <= kMaxSharedBytes, "coord_pool: x: W = ", W,
                      " exceeds the CUDA kernel's limit of ", kMaxSharedBytes / sizeof(acc_t),
                      " columns for ", x.scalar_type());
    int warps = static_cast<int>(std::min<int64_t>(kMaxWarps, std::max<int64_t>(1, H)));
    while (warps > 1 && warps * row_bytes > kMaxSharedBytes) --warps;
    coord_pool_forward_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(N * C), warps * kWarp, warps * row_bytes,
           at::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), pool_h.mutable_data_ptr<scalar_t>(),
            pool_w.mutable_data_ptr<scalar_t>(), C, H, W, x.stride(0), x.stride(1), x.stride(2),
            x.stride(3), pool_h.stride(0), pool_h.stride(1), pool_h.stride(2), pool_w.stride(0),
            pool_w.stride(1), pool_w.stride(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> coord_pool_cuda(const at::Tensor& x) {
  check_nchw(x, "coord_pool", "x");
  at::Tensor pool_h = at::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  at::Tensor pool_w = at::empty({x.size(0), x.size(1), x.size(3)}, x.options());
  coord_pool_out_cuda(x, pool_h, pool_w);
  return {pool_h, pool_w};
}

at::Tensor coord_pool_backward_cuda(const at::Tensor& grad_h, const at::Tensor& grad_w) {
  TORCH_CHECK_VALUE(grad_h.dim() == 3, "coord_pool_backward: grad_h: expected N×C×H, got shape ",
                    grad_h.sizes());
  TORCH_CHECK_VALUE(grad_w.dim() == 3 && grad_w.size(0) == grad_h.size(0) &&
                        grad_w.size(1) == grad_h.size(1),
                    "coord_pool_backward: grad_w: expected N×C×W with N, C of grad_h ",
                    grad_h.sizes(), ", got shape ", grad_w.sizes());
  check_cuda_dtype(grad_h, "coord_pool_backward", "grad_h");
  TORCH_CHECK_TYPE(grad_w.scalar_type() == grad_h.scalar_type(),
                   "coord_pool_backward: grad_w: expected dtype ", grad_h.scalar_type(), ", got ",
                   grad_w.scalar_type());
  const c10::cuda::CUDAGuard guard(grad_h.device());
  const int64_t N = grad_h.size(0), C = grad_h.size(1), H = grad_h.size(2), W = grad_w.size(2);
  at::Tensor gx = at::empty({N, C, H, W}, grad_h.options());
  const int64_t total = gx.numel();
  if (total == 0) return gx;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535 * 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_h.scalar_type(),
                                  "coord_pool_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    coord_pool_backward_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(blocks), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
            grad_h.const_data_ptr<scalar_t>(), grad_w.const_data_ptr<scalar_t>(),
            gx.mutable_data_ptr<scalar_t>(), total, C, H, W, grad_h.stride(0), grad_h.stride(1),
            grad_h.stride(2), grad_w.stride(0), grad_w.stride(1), grad_w.stride(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CUDA, m) {
  m.impl("coord_pool", &coord_pool_cuda);
  m.impl("coord_pool_out", &coord_pool_out_cuda);
  m.impl("coord_pool_backward", &coord_pool_backward_cuda);
}

}  // namespace saffnet_fast

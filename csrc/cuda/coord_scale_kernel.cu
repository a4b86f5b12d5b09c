// coord_scale CUDA kernels (float32, float64, float16, bfloat16; float32 accumulation for
// the 16-bit types); with offset 1 they also serve aff_input (coord_scale_kernel.cuh,
// aff_input_kernel.cu).
//
// Minimum bytes moved: forward reads x once and writes out once (+ N·C·(H+W) factors), one
// pass. Backward reads grad_out and x once and writes grad_x once (+ N·C·(H+W)), one pass.
//
// Forward: grid-stride elementwise over the logical N×C×H×W index, reading and writing
// through strides. Backward: one block per (n, c) plane, warps over rows (row sums by
// shuffles -> grad_a_h), per-warp column partials in shared memory (-> grad_a_w), grad_x
// written in the same sweep.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "../common/aff_checks.h"
#include "../common/layout.h"
#include "coord_scale_kernel.cuh"
#include "cuda_utils.cuh"
#include "tensor_strides.cuh"

namespace saffnet_fast {
namespace {

constexpr int kMaxWarps = 8;
constexpr size_t kMaxSharedBytes = 48 * 1024;

template <typename scalar_t, typename acc_t>
__global__ void coord_scale_forward_kernel(const scalar_t* __restrict__ x,
                                           const scalar_t* __restrict__ a_h,
                                           const scalar_t* __restrict__ a_w, scalar_t* out,
                                           int64_t total, int64_t C, int64_t H, int64_t W,
                                           Idx4 xs, Idx4 os, Idx3 hs, Idx3 ws, acc_t offset) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t w = i % W, h = (i / W) % H, c = (i / (W * H)) % C, n = i / (W * H * C);
    const acc_t v = static_cast<acc_t>(x[n * xs.n + c * xs.c + h * xs.h + w * xs.w]) *
                    (offset + static_cast<acc_t>(a_h[n * hs.n + c * hs.c + h * hs.l]) *
                                  static_cast<acc_t>(a_w[n * ws.n + c * ws.c + w * ws.l]));
    out[n * os.n + c * os.c + h * os.h + w * os.w] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void coord_scale_backward_kernel(const scalar_t* __restrict__ grad,
                                            const scalar_t* __restrict__ x,
                                            const scalar_t* __restrict__ a_h,
                                            const scalar_t* __restrict__ a_w, scalar_t* gx,
                                            scalar_t* ga_h, scalar_t* ga_w, int64_t C, int64_t H,
                                            int64_t W, Idx4 gs, Idx4 xs, Idx4 dxs, Idx3 hs,
                                            Idx3 ws, acc_t offset,
                                            const scalar_t* __restrict__ grad_sum) {
  extern __shared__ unsigned char shared_raw[];
  acc_t* col = reinterpret_cast<acc_t*>(shared_raw);  // [warps][W]
  const int64_t plane = blockIdx.x;
  const int64_t n = plane / C, c = plane % C;
  // aff_input's plane-sum gradient, the same for every element of the plane
  const acc_t plane_grad = grad_sum != nullptr ? static_cast<acc_t>(grad_sum[plane]) : acc_t(0);
  const int warps = blockDim.x / kWarpSize;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  acc_t* my_col = col + warp * W;
  for (int64_t w = lane; w < W; w += kWarpSize) my_col[w] = acc_t(0);
  for (int64_t h = warp; h < H; h += warps) {
    const acc_t ah = static_cast<acc_t>(a_h[n * hs.n + c * hs.c + h * hs.l]);
    acc_t row = 0;
    for (int64_t w = lane; w < W; w += kWarpSize) {
      const acc_t aw = static_cast<acc_t>(a_w[n * ws.n + c * ws.c + w * ws.l]);
      const acc_t g =
          static_cast<acc_t>(grad[n * gs.n + c * gs.c + h * gs.h + w * gs.w]) + plane_grad;
      const acc_t gxv = g * static_cast<acc_t>(x[n * xs.n + c * xs.c + h * xs.h + w * xs.w]);
      gx[n * dxs.n + c * dxs.c + h * dxs.h + w * dxs.w] =
          static_cast<scalar_t>(g * (offset + ah * aw));
      row += gxv * aw;
      my_col[w] += gxv * ah;
    }
    row = warp_sum(row);
    if (lane == 0) ga_h[plane * H + h] = static_cast<scalar_t>(row);
  }
  __syncthreads();
  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) {
    acc_t s = 0;
    for (int k = 0; k < warps; ++k) s += col[k * W + w];
    ga_w[plane * W + w] = static_cast<scalar_t>(s);
  }
}

}  // namespace

void coord_scale_offset_cuda(const at::Tensor& x, const at::Tensor& a_h, const at::Tensor& a_w,
                             double offset, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t total = x.numel();
  const int threads = 256;
  const unsigned blocks = std::min<unsigned>(blocks_for(total, threads), 65535u * 8u);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coord_scale_cuda",
                                  [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    coord_scale_forward_kernel<scalar_t, acc_t>
        <<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), a_h.const_data_ptr<scalar_t>(),
            a_w.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, x.size(1),
            x.size(2), x.size(3), strides4(x), strides4(out), strides3(a_h), strides3(a_w),
            static_cast<acc_t>(offset));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> coord_scale_offset_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& a_h,
    const at::Tensor& a_w, double offset, const char* op, const char* grad_name,
    const std::optional<at::Tensor>& grad_sum_in) {
  check_coord_factors(x_in, a_h, a_w, op);
  check_cuda_dtype(x_in, op, "x");
  check_like(grad_out, x_in.sizes(), x_in, op, grad_name);
  at::Tensor grad_sum;  // contiguous N×C, read by plane index
  if (grad_sum_in.has_value()) {
    check_like(*grad_sum_in, {x_in.size(0), x_in.size(1)}, x_in, op, "grad_sum");
    grad_sum = grad_sum_in->contiguous();
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  at::Tensor ga_h = at::empty({N, C, H}, x.options());
  at::Tensor ga_w = at::empty({N, C, W}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "coord_scale_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const size_t row_bytes = static_cast<size_t>(W) * sizeof(acc_t);
    TORCH_CHECK_VALUE(row_bytes <= kMaxSharedBytes, op, ": x: W = ", W,
                      " exceeds the CUDA kernel's limit of ", kMaxSharedBytes / sizeof(acc_t),
                      " columns");
    int warps = static_cast<int>(std::min<int64_t>(kMaxWarps, std::max<int64_t>(1, H)));
    while (warps > 1 && warps * row_bytes > kMaxSharedBytes) --warps;
    coord_scale_backward_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(N * C), warps * kWarpSize, warps * row_bytes,
           at::cuda::getCurrentCUDAStream()>>>(
            grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            a_h.const_data_ptr<scalar_t>(), a_w.const_data_ptr<scalar_t>(),
            gx.mutable_data_ptr<scalar_t>(), ga_h.mutable_data_ptr<scalar_t>(),
            ga_w.mutable_data_ptr<scalar_t>(), C, H, W, strides4(grad_out), strides4(x),
            strides4(gx), strides3(a_h), strides3(a_w), static_cast<acc_t>(offset),
            grad_sum.defined() ? grad_sum.const_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, ga_h, ga_w};
}

namespace {

void coord_scale_out_cuda(const at::Tensor& x, const at::Tensor& a_h, const at::Tensor& a_w,
                          at::Tensor& out) {
  check_coord_factors(x, a_h, a_w, "coord_scale");
  check_cuda_dtype(x, "coord_scale", "x");
  check_like(out, x.sizes(), x, "coord_scale", "out");
  coord_scale_offset_cuda(x, a_h, a_w, 0.0, out);
}

at::Tensor coord_scale_cuda(const at::Tensor& x_in, const at::Tensor& a_h,
                            const at::Tensor& a_w) {
  check_nchw(x_in, "coord_scale", "x");
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  coord_scale_out_cuda(x, a_h, a_w, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> coord_scale_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& a_h,
    const at::Tensor& a_w) {
  return coord_scale_offset_backward_cuda(grad_out, x_in, a_h, a_w, 0.0,
                                          "coord_scale_backward", "grad_out");
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CUDA, m) {
  m.impl("coord_scale", &coord_scale_cuda);
  m.impl("coord_scale_out", &coord_scale_out_cuda);
  m.impl("coord_scale_backward", &coord_scale_backward_cuda);
}

}  // namespace saffnet_fast

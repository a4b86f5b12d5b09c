// split_resplice CUDA forward (float32, float64, float16, bfloat16; float32 accumulation for
// the 16-bit types), inference form. Op: csrc/split_resplice.cpp; channel plan and math:
// csrc/common/split_resplice.h.
//
// Minimum bytes moved: read x once, write the output once, plus the carried channels
// (≤ C/2 per step) written and read back once. Launches: slice-0 copy + one per step
// (7 for s = 8), each a direct 3×3 convolution, one thread per output element, with the
// folded BN bias and LeakyReLU in its epilogue and the result stored straight into its
// slice of the output (or the carry buffer). Not yet the single-launch halo-tiled version
// kernels.md describes.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/split_resplice.h"
#include "../common/split_resplice_checks.h"
#include "cuda_utils.cuh"

namespace saffnet_fast {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void split_resplice_step_kernel(const scalar_t* __restrict__ x,
                                           scalar_t* carries, scalar_t* out,
                                           const acc_t* __restrict__ weight,
                                           const acc_t* __restrict__ bias, acc_t slope,
                                           SplitRespliceStep s, int64_t N, int64_t C,
                                           int64_t CC, int64_t H, int64_t W, int64_t w0) {
  const int64_t HW = H * W, cj = s.width, total = N * cj * HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t p = i % HW, o = (i / HW) % cj, n = i / (HW * cj);
    const int64_t h = p / W, w = p % W;
    acc_t acc = bias[o];
    for (int64_t ci = 0; ci < cj; ++ci) {
      const scalar_t* src = ci < w0 ? x + (n * C + s.x_offset + ci) * HW
                                    : carries + (n * CC + s.carry_in + (ci - w0)) * HW;
      const acc_t* k = weight + (o * cj + ci) * 9;
#pragma unroll
      for (int ky = 0; ky < 3; ++ky) {
        const int64_t hh = h + ky - 1;
        if (hh < 0 || hh >= H) continue;
#pragma unroll
        for (int kx = 0; kx < 3; ++kx) {
          const int64_t ww = w + kx - 1;
          if (ww < 0 || ww >= W) continue;
          acc += k[ky * 3 + kx] * static_cast<acc_t>(src[hh * W + ww]);
        }
      }
    }
    scalar_t* dst = o < s.keep ? out + (n * C + s.out_offset + o) * HW
                               : carries + (n * CC + s.carry_out + (o - s.keep)) * HW;
    dst[p] = static_cast<scalar_t>(leaky_relu(acc, slope));
  }
}

void split_resplice_out_cuda(const at::Tensor& x_in, at::TensorList weights,
                             at::TensorList biases, double negative_slope, at::Tensor& out,
                             at::Tensor& carries) {
  const std::vector<int64_t> widths = check_split_resplice_args(x_in, weights, biases);
  check_cuda_dtype(x_in, "split_resplice", "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const auto plan = split_resplice_plan(C, widths);
  const int64_t CC = split_resplice_carry_channels(plan);
  check_split_resplice_outputs(x_in, CC, out, carries);
  const at::Tensor x = x_in.contiguous();
  const int64_t w0 = C / (static_cast<int64_t>(plan.size()) + 1);
  out.narrow(1, 0, w0).copy_(x.narrow(1, 0, w0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "split_resplice_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const int threads = 256;
    for (size_t j = 0; j < plan.size(); ++j) {
      const at::Tensor wt = weights[j].to(acc_dtype).contiguous();
      const at::Tensor bt = biases[j].to(acc_dtype).contiguous();
      const int64_t total = N * plan[j].width * H * W;
      const unsigned blocks = std::min<unsigned>(blocks_for(total, threads), 65535u * 8u);
      split_resplice_step_kernel<scalar_t, acc_t>
          <<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
              x.const_data_ptr<scalar_t>(), carries.mutable_data_ptr<scalar_t>(),
              out.mutable_data_ptr<scalar_t>(), wt.const_data_ptr<acc_t>(),
              bt.const_data_ptr<acc_t>(), static_cast<acc_t>(negative_slope), plan[j], N, C,
              CC, H, W, w0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

std::tuple<at::Tensor, at::Tensor> split_resplice_cuda(const at::Tensor& x,
                                                       at::TensorList weights,
                                                       at::TensorList biases,
                                                       double negative_slope) {
  const std::vector<int64_t> widths = check_split_resplice_args(x, weights, biases);
  const auto plan = split_resplice_plan(x.size(1), widths);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor carries = at::empty(
      {x.size(0), split_resplice_carry_channels(plan), x.size(2), x.size(3)}, x.options());
  split_resplice_out_cuda(x, weights, biases, negative_slope, out, carries);
  return {out, carries};
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CUDA, m) {
  m.impl("split_resplice", &split_resplice_cuda);
  m.impl("split_resplice_out", &split_resplice_out_cuda);
}

}  // namespace saffnet_fast

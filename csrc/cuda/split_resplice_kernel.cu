// split_resplice CUDA forward (float32, float64, float16, bfloat16; float32 accumulation for
// the 16-bit types), inference form. Op: csrc/split_resplice.cpp; channel plan and math:
// csrc/common/split_resplice.h; the tiled program: csrc/common/split_resplice_tile.h.
//
// Two kernels:
// - split_resplice_tiled_kernel, one launch for the whole chain: a block per tile_h × tile_w
//   tile of one image runs every step, the carried channels kept in shared memory on the
//   tile plus a halo that shrinks by one pixel per step. Minimum bytes moved: x read once,
//   the output written once (plus the carries, N × Σ floor(c_j/2) × H × W, when autograd
//   needs them). One pass. split_resplice and split_resplice_tiled use it whenever the
//   automatic tile fits its shared-memory budget (SR of the model's C = 64: 16×16, 32 KB).
//   ptxas -v (sm_90, CUDA 13): 40–48 registers per thread, no stack frame, no spills.
// - split_resplice_step_kernel, the fallback for wider SRs: slice-0 copy + one launch per
//   step (7 for s = 8), a direct 3×3 convolution with one thread per output element, the
//   carries written to and read back from global memory.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/split_resplice.h"
#include "../common/split_resplice_checks.h"
#include "../common/split_resplice_tile.h"
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

// Threads per tile: 256 covers a 16×16 tile's kept channels one pixel per thread.
constexpr int kSrTileThreads = 256;

// One block = one tile of image blockIdx.z + n_offset; the phases of split_resplice_tile.h,
// a barrier after each step (step j+1 reads the carry step j wrote, then overwrites the
// buffer step j read).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSrTileThreads)
    split_resplice_tiled_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                scalar_t* __restrict__ carries, const acc_t* __restrict__ params,
                                acc_t slope, const SrTilePlan plan, int64_t n_offset, int64_t C,
                                int64_t H, int64_t W) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  // Two carry buffers, step j writing buffer j mod 2 (addressed arithmetically: an array of
  // the two pointers indexed by j was a 16-byte stack frame in ptxas -v).
  acc_t* const shared = reinterpret_cast<acc_t*>(shared_bytes);
  const int64_t n = blockIdx.z + n_offset;
  const int64_t y0 = static_cast<int64_t>(blockIdx.y) * plan.tile_h;
  const int64_t x0 = static_cast<int64_t>(blockIdx.x) * plan.tile_w;
  split_resplice_tile_copy(x, out, plan, n, C, H, W, y0, x0, threadIdx.x, blockDim.x);
  for (int j = 0; j < plan.steps; ++j) {
    acc_t* const next = shared + (j & 1) * plan.buffer_elems;
    const acc_t* const prev = shared + ((j + 1) & 1) * plan.buffer_elems;
    split_resplice_tile_step(x, out, carries, params, slope, plan, j, prev, next, n, C, H, W,
                             y0, x0, threadIdx.x, blockDim.x);
    __syncthreads();
  }
}

int64_t shared_limit_bytes() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}

// Runs the tiled kernel of `setup` (plan and packed parameters) into out (and carries, when
// not null), both contiguous.
void launch_split_resplice_tiled(const at::Tensor& x, const SplitRespliceTiledSetup& setup,
                                 double negative_slope, at::Tensor& out, at::Tensor* carries) {
  const SrTilePlan& plan = setup.plan;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t tiles_y = (H + plan.tile_h - 1) / plan.tile_h;
  const int64_t tiles_x = (W + plan.tile_w - 1) / plan.tile_w;
  TORCH_CHECK_VALUE(tiles_y <= 65535, "split_resplice_tiled: x: H = ", H, " needs ", tiles_y,
                    " tile rows of ", plan.tile_h, ", over the grid limit of 65535");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "split_resplice_tiled_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const int64_t bytes = 2 * plan.buffer_elems * static_cast<int64_t>(sizeof(acc_t));
    auto kernel = split_resplice_tiled_kernel<scalar_t, acc_t>;
    if (bytes > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(bytes)));
    scalar_t* carries_ptr = carries != nullptr ? carries->mutable_data_ptr<scalar_t>() : nullptr;
    for (int64_t n0 = 0; n0 < N; n0 += 65535) {
      const dim3 grid(static_cast<unsigned>(tiles_x), static_cast<unsigned>(tiles_y),
                      static_cast<unsigned>(std::min<int64_t>(N - n0, 65535)));
      kernel<<<grid, kSrTileThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), carries_ptr,
          setup.params.const_data_ptr<acc_t>(), static_cast<acc_t>(negative_slope), plan, n0,
          C, H, W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

std::tuple<at::Tensor, at::Tensor> split_resplice_tiled_cuda(
    const at::Tensor& x_in, at::TensorList weights, at::TensorList biases,
    double negative_slope, int64_t tile_h, int64_t tile_w, bool write_carries) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  SplitRespliceTiledSetup setup =
      setup_split_resplice_tiled("split_resplice_tiled", x_in, weights, biases, tile_h, tile_w,
                                 write_carries, shared_limit_bytes());
  if (setup.plan.tile_h == 0)
    return split_resplice_untiled(x_in, weights, biases, negative_slope, write_carries);
  const at::Tensor x = x_in.contiguous();
  launch_split_resplice_tiled(x, setup, negative_slope, setup.out,
                              write_carries ? &setup.carries : nullptr);
  return {setup.out, setup.carries};
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
  if (static_cast<int64_t>(plan.size()) <= kSrTileMaxSteps) {
    const SplitRespliceTiledSetup setup =
        setup_split_resplice_tiled("split_resplice", x, weights, biases, 0, 0, true,
                                   shared_limit_bytes(), /*allocate_outputs=*/false);
    if (setup.plan.tile_h > 0) {
      launch_split_resplice_tiled(x, setup, negative_slope, out, &carries);
      return;
    }
  }
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
  m.impl("split_resplice_tiled", &split_resplice_tiled_cuda);
}

}  // namespace saffnet_fast

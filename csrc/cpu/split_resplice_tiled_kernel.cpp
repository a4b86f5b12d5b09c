// split_resplice_tiled on the CPU: a serial emulation of the CUDA halo-tiled program
// (csrc/common/split_resplice_tile.h), for testing it without a GPU. Every tile runs the
// GPU block's phases one after another with one "thread", on a NaN-filled stand-in for its
// shared memory, so a read of a carry element no phase wrote shows up as NaN in the output.
// Takes the CUDA kernel's dtypes (float16 / bfloat16 stored, float32 accumulated; float32;
// float64). Not a fast path: the CPU split_resplice is.
//
// Minimum bytes moved and passes are those of the CUDA kernel: x read once (plus halo
// re-reads from cache), the output written once, one pass; the carries only when asked.
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../common/split_resplice_checks.h"
#include "../common/split_resplice_tile.h"

namespace saffnet_fast {
namespace {

// The emulation accepts the tiles an H100 block can hold (227 KB of opt-in shared memory).
constexpr int64_t kEmulatedSharedBytes = 227 * 1024;

std::tuple<at::Tensor, at::Tensor> split_resplice_tiled_cpu(
    const at::Tensor& x_in, at::TensorList weights, at::TensorList biases,
    double negative_slope, int64_t tile_h, int64_t tile_w, bool write_carries) {
  SplitRespliceTiledSetup setup =
      setup_split_resplice_tiled("split_resplice_tiled", x_in, weights, biases, tile_h, tile_w,
                                 write_carries, kEmulatedSharedBytes);
  if (setup.plan.tile_h == 0)
    return split_resplice_untiled(x_in, weights, biases, negative_slope, write_carries);
  const at::Tensor x = x_in.contiguous();
  const SrTilePlan& p = setup.plan;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t tiles_y = (H + p.tile_h - 1) / p.tile_h, tiles_x = (W + p.tile_w - 1) / p.tile_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "split_resplice_tiled_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* outp = setup.out.mutable_data_ptr<scalar_t>();
    scalar_t* carriesp = write_carries ? setup.carries.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t* params = setup.params.const_data_ptr<acc_t>();
    const acc_t slope = static_cast<acc_t>(negative_slope);
    at::parallel_for(0, N * tiles_y * tiles_x, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> shared(2 * p.buffer_elems);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / (tiles_y * tiles_x);
        const int64_t y0 = (t / tiles_x) % tiles_y * p.tile_h, x0 = t % tiles_x * p.tile_w;
        std::fill(shared.begin(), shared.end(), std::numeric_limits<acc_t>::quiet_NaN());
        acc_t* buffers[2] = {shared.data(), shared.data() + p.buffer_elems};
        split_resplice_tile_copy(xp, outp, p, n, C, H, W, y0, x0, 0, 1);
        for (int j = 0; j < p.steps; ++j)
          split_resplice_tile_step(xp, outp, carriesp, params, slope, p, j, buffers[(j + 1) & 1],
                                   buffers[j & 1], n, C, H, W, y0, x0, 0, 1);
      }
    });
  });
  return {setup.out, setup.carries};
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CPU, m) {
  m.impl("split_resplice_tiled", &split_resplice_tiled_cpu);
}

}  // namespace saffnet_fast

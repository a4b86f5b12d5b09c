// Argument checks of split_resplice, shared by the CPU and CUDA registrations.
#pragma once

#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>

#include "checks.h"
#include "split_resplice_tile.h"

namespace saffnet_fast {

// Returns the step widths c_j (from the weights) after checking every argument.
// `biases` is any per-step list of c_j-vectors (the folded biases in inference, the BN γ or
// β in training), named `biases_name` in the messages.
inline std::vector<int64_t> check_split_resplice_args(const at::Tensor& x,
                                                      at::TensorList weights,
                                                      at::TensorList biases,
                                                      const char* op = "split_resplice",
                                                      const char* biases_name = "biases") {
  check_nchw(x, op, "x");
  const int64_t steps = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(steps >= 1, op, ": weights: expected one 3×3 weight per step, got none");
  TORCH_CHECK_VALUE(static_cast<int64_t>(biases.size()) == steps, op, ": ", biases_name, ": expected ",
                    steps, " tensors (one per weight), got ", biases.size());
  const int64_t C = x.size(1), splits = steps + 1;
  TORCH_CHECK_VALUE(C % splits == 0, op, ": x: expected channels divisible by splits = ", splits,
                    " (steps + 1), got C = ", C);
  const int64_t w = C / splits;
  std::vector<int64_t> widths;
  int64_t expected = w;
  for (int64_t j = 0; j < steps; ++j) {
    if (j > 0) expected = w + widths.back() / 2;
    const at::Tensor& wt = weights[j];
    TORCH_CHECK_VALUE(wt.dim() == 4 && wt.size(0) == expected && wt.size(1) == expected &&
                          wt.size(2) == 3 && wt.size(3) == 3,
                      op, ": weights[", j, "]: expected shape [", expected, ", ", expected,
                      ", 3, 3] for x with C = ", C, ", got ", wt.sizes());
    TORCH_CHECK_TYPE(wt.scalar_type() == x.scalar_type(), op, ": weights[", j,
                     "]: expected dtype ", x.scalar_type(), ", got ", wt.scalar_type());
    TORCH_CHECK_VALUE(wt.device() == x.device(), op, ": weights[", j, "]: expected device ",
                      x.device(), ", got ", wt.device());
    const at::Tensor& b = biases[j];
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == expected, op, ": ", biases_name, "[", j,
                      "]: expected shape [", expected, "], got ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == x.scalar_type(), op, ": ", biases_name, "[", j,
                     "]: expected dtype ", x.scalar_type(), ", got ", b.scalar_type());
    TORCH_CHECK_VALUE(b.device() == x.device(), op, ": ", biases_name, "[", j, "]: expected device ",
                      x.device(), ", got ", b.device());
    widths.push_back(expected);
  }
  return widths;
}

inline void check_split_resplice_outputs(const at::Tensor& x, int64_t carry_channels,
                                         const at::Tensor& out, const at::Tensor& carries) {
  const char* op = "split_resplice_out";
  check_like(out, x.sizes(), x, op, "out");
  check_like(carries, {x.size(0), carry_channels, x.size(2), x.size(3)}, x, op, "carries");
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out: expected a contiguous tensor");
  TORCH_CHECK_VALUE(carries.is_contiguous(), op, ": carries: expected a contiguous tensor");
}

// Everything split_resplice_tiled needs before its tiles run, shared by the CUDA kernel and
// the CPU emulation: checked arguments (the CUDA kernels' dtypes), the tile (tile_h = tile_w
// = 0: automatic), the plan, the weights and biases packed into one array of x's
// accumulation type (float for the 16-bit types, as at::acc_type on CUDA), and the outputs
// (carries N×0×H×W unless write_carries). `shared_limit_bytes` is what one block may use; an explicit tile
// over it is an error; with tile 0×0 and no tile fitting (or more than kSrTileMaxSteps
// steps), plan.tile_h is 0 and nothing is allocated: the caller runs the per-step kernels.
struct SplitRespliceTiledSetup {
  SrTilePlan plan{};
  at::Tensor params;  // acc_t, plan.param_elems
  at::Tensor out, carries;
};

inline SplitRespliceTiledSetup setup_split_resplice_tiled(
    const char* op, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    int64_t tile_h, int64_t tile_w, bool write_carries, int64_t shared_limit_bytes,
    bool allocate_outputs = true) {
  const std::vector<int64_t> widths = check_split_resplice_args(x, weights, biases, op);
  check_cuda_dtype(x, op, "x");
  const at::ScalarType acc_dtype = at::toOpMathType(x.scalar_type());
  const bool automatic = tile_h == 0 && tile_w == 0;
  TORCH_CHECK_VALUE(automatic || (tile_h >= 1 && tile_h <= 64 && tile_w >= 1 && tile_w <= 64),
                    op, ": tile_h, tile_w: expected both 0 (automatic) or both in [1, 64], got ",
                    tile_h, ", ", tile_w);
  const bool too_many_steps = static_cast<int64_t>(widths.size()) > kSrTileMaxSteps;
  TORCH_CHECK_VALUE(automatic || !too_many_steps, op, ": weights: the tiled kernel takes at most ",
                    kSrTileMaxSteps, " steps (splits ≤ ", kSrTileMaxSteps + 1, "), got ",
                    widths.size());
  SplitRespliceTiledSetup setup;
  if (too_many_steps) return setup;  // automatic: the per-step kernels
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  const auto steps = split_resplice_plan(C, widths);
  const int64_t acc_size = at::elementSize(acc_dtype);
  auto bytes_of = [&](const SrTilePlan& p) { return 2 * p.buffer_elems * acc_size; };
  if (automatic) {
    const int64_t budget = std::min(shared_limit_bytes, kSrAutoTileBudgetBytes);
    for (const auto& c : kSrAutoTiles) {
      if (bytes_of(split_resplice_tile_plan(C, steps, c[0], c[1])) <= budget) {
        tile_h = c[0];
        tile_w = c[1];
        break;
      }
    }
  }
  setup.plan = split_resplice_tile_plan(C, steps, tile_h, tile_w);
  if (tile_h == 0) return setup;  // automatic, nothing fits
  TORCH_CHECK_VALUE(bytes_of(setup.plan) <= shared_limit_bytes, op, ": tile_h × tile_w = ",
                    tile_h, "×", tile_w, " needs ", bytes_of(setup.plan),
                    " bytes of shared memory for C = ", C, ", over the limit of ",
                    shared_limit_bytes, "; choose a smaller tile");
  std::vector<at::Tensor> flat;
  for (size_t j = 0; j < widths.size(); ++j) {
    flat.push_back(weights[j].to(acc_dtype).reshape(-1));
    flat.push_back(biases[j].to(acc_dtype).reshape(-1));
  }
  setup.params = at::cat(flat).contiguous();
  if (allocate_outputs) {
    setup.out = at::empty(x.sizes(), x.options());
    setup.carries =
        at::empty({x.size(0), write_carries ? setup.plan.carry_channels : 0, H, W}, x.options());
  }
  return setup;
}

// split_resplice_tiled's answer when no tile fits: the registered split_resplice op (the
// per-step kernels of x's device), the carries dropped unless asked for.
inline std::tuple<at::Tensor, at::Tensor> split_resplice_untiled(const at::Tensor& x,
                                                                 at::TensorList weights,
                                                                 at::TensorList biases,
                                                                 double negative_slope,
                                                                 bool write_carries) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("saffnet_fast::split_resplice", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::TensorList,
                                                    at::TensorList, double)>();
  auto [out, carries] = op.call(x, weights, biases, negative_slope);
  if (!write_carries) carries = carries.narrow(1, 0, 0);
  return {out, carries};
}

}  // namespace saffnet_fast

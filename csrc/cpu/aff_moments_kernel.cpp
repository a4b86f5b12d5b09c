// aff_moments CPU kernels (float32, float64), see csrc/aff_moments.cpp for the op.
//
// Minimum bytes moved: forward reads x once (+ the N·C·(H+W) factors and the weights) and
// writes 2 vectors; one pass; the pre-BN activations y are recomputed per tile, never
// stored. Backward reads x once and writes grad_x once (+ small reductions); one pass.
//
// Statistics: per tile, each channel's mean and centred sum of squares (two passes over the
// tile's values, which sit in a [channel][pixel] buffer); tiles are merged with Chan et al.'s
// pairwise formula in double, per parallel chunk, and the chunks in chunk order, so results
// are deterministic for a given thread count. Single-pass Σy² − (Σy)²/n in float32 lost
// ~4e-5 relative accuracy on the variance of nearly constant channels (the Triton SAWF
// training case in issue #4); this form has no such cancellation.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../common/aff_checks.h"
#include "../common/attention_math.h"
#include "../common/layout.h"
#include "aff_tile.h"

namespace saffnet_fast {
namespace {

// Running (count, mean, M2) per channel, merged pairwise (Chan, Golub, LeVeque 1979).
struct ChannelMoments {
  std::vector<double> count, mean, m2;
  explicit ChannelMoments(int64_t channels) : count(channels, 0), mean(channels, 0), m2(channels, 0) {}
  void merge(int64_t c, double n_b, double mean_b, double m2_b) {
    const double n_a = count[c];
    const double n = n_a + n_b;
    const double delta = mean_b - mean[c];
    mean[c] += delta * n_b / n;
    m2[c] += m2_b + delta * delta * n_a * n_b / n;
    count[c] = n;
  }
};

template <typename scalar_t>
void aff_moments_forward_kernel(const at::Tensor& x, const at::Tensor& a_h, const at::Tensor& a_w,
                                const at::Tensor& w1t, const at::Tensor& b1t,
                                const std::optional<at::Tensor>& w2t,
                                const std::optional<at::Tensor>& b2t, at::Tensor& mean_out,
                                at::Tensor& var_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const LocalAttSetup<scalar_t, acc_t> la(x, w1t, b1t, w2t, b2t);
  const int64_t N = la.N, C = la.C, W = la.W, Ci = la.Ci, HW = la.HW;
  const int64_t tiles = la.tiles, Co = la.Co;
  const bool stage2 = la.stage2;
  const std::vector<acc_t>&w1 = la.w1, &b1 = la.b1, &w2 = la.w2, &b2 = la.b2;
  const Strides4 xs(x);
  const Strides3 hs3(a_h), ws3(a_w);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* ahp = a_h.const_data_ptr<scalar_t>();
  const scalar_t* awp = a_w.const_data_ptr<scalar_t>();

  ChunkResults<ChannelMoments> chunks;
  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    TileForward<scalar_t, acc_t> tile(C, Ci, W);
    ChannelMoments moments(Co);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles, p0 = (task % tiles) * kTile;
      const int64_t np = std::min(kTile, HW - p0);
      tile.load(xp, xs, ahp, hs3, awp, ws3, w1, b1, n, p0, np);
      if (stage2) tile.local_logits(w2, b2);
      const acc_t* Y = stage2 ? tile.Lmat.data() : tile.Z.data();
      for (int64_t c = 0; c < Co; ++c) {
        double s, q;
        tile_moments(Y + c * kTile, np, &s, &q);
        moments.merge(c, static_cast<double>(np), s / static_cast<double>(np), q);
      }
    }
    chunks.add(begin, std::move(moments));
  });
  ChannelMoments total(Co);
  for (const ChannelMoments& part : chunks.in_order())
    for (int64_t c = 0; c < Co; ++c)
      if (part.count[c] > 0) total.merge(c, part.count[c], part.mean[c], part.m2[c]);
  scalar_t* mp = mean_out.mutable_data_ptr<scalar_t>();
  scalar_t* vp = var_out.mutable_data_ptr<scalar_t>();
  for (int64_t c = 0; c < Co; ++c) {
    mp[c] = static_cast<scalar_t>(total.mean[c]);
    vp[c] = static_cast<scalar_t>(total.m2[c] / total.count[c]);  // biased, as BN normalises
  }
}

std::tuple<at::Tensor, at::Tensor> aff_moments_cpu(const at::Tensor& x_in, const at::Tensor& a_h,
                                                   const at::Tensor& a_w, const at::Tensor& w1,
                                                   const at::Tensor& b1,
                                                   const std::optional<at::Tensor>& w2,
                                                   const std::optional<at::Tensor>& b2) {
  check_aff_moments_args(x_in, a_h, a_w, w1, b1, w2, b2, "aff_moments");
  check_cpu_dtype(x_in, "aff_moments", "x");
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  const int64_t Co = w2.has_value() ? x.size(1) : w1.size(0);
  at::Tensor mean = at::empty({Co}, x.options()), var = at::empty({Co}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aff_moments_cpu", [&] {
    aff_moments_forward_kernel<scalar_t>(x, a_h, a_w, w1, b1, w2, b2, mean, var);
  });
  return {mean, var};
}

// Backward: with M = N·H·W, each y element's gradient is
//   dy = grad_mean/M + grad_var · 2·(y − mean)/M
// (the var term through the mean cancels: Σ(y − mean) = 0). Stage 2 back-propagates dy
// through conv2 and the ReLU to dz; stage 1 has dz = dy. Then through conv1 to dt, and
// t = x·(1 + m) gives grad_x = dt·(1 + m) and grad_m = dt·x.
// DY[p] = a + b·(Y[p] − mean) for the tile's np pixels, zero beyond (TileBackward's
// contract).
template <typename T>
SAFFNET_ALWAYS_INLINE void moments_grad_body(T* __restrict__ DY, const T* __restrict__ Y, T a,
                                             T b, T mean, int64_t np) {
#pragma omp simd
  for (int64_t p = 0; p < kTile; ++p) DY[p] = p < np ? a + b * (Y[p] - mean) : T(0);
}
SAFFNET_CPU_CLONES void moments_grad_tile(float* DY, const float* Y, float a, float b,
                                          float mean, int64_t np) {
  moments_grad_body(DY, Y, a, b, mean, np);
}
SAFFNET_CPU_CLONES void moments_grad_tile(double* DY, const double* Y, double a, double b,
                                          double mean, int64_t np) {
  moments_grad_body(DY, Y, a, b, mean, np);
}

template <typename scalar_t>
void aff_moments_backward_kernel(const at::Tensor& gmean_t, const at::Tensor& gvar_t,
                                 const at::Tensor& x, const at::Tensor& a_h,
                                 const at::Tensor& a_w, const at::Tensor& w1t,
                                 const at::Tensor& b1t, const std::optional<at::Tensor>& w2t,
                                 const std::optional<at::Tensor>& b2t,
                                 const at::Tensor& mean_t, at::Tensor& gx, at::Tensor& ga_h,
                                 at::Tensor& ga_w, at::Tensor& gw1, at::Tensor& gb1,
                                 at::Tensor& gw2, at::Tensor& gb2) {
  using acc_t = at::opmath_type<scalar_t>;
  const LocalAttSetup<scalar_t, acc_t> la(x, w1t, b1t, w2t, b2t);
  const int64_t N = la.N, C = la.C, H = la.H, W = la.W, Ci = la.Ci, HW = la.HW;
  const int64_t tiles = la.tiles, Co = la.Co;
  const bool stage2 = la.stage2;
  const std::vector<acc_t>&w1 = la.w1, &b1 = la.b1, &w2 = la.w2, &b2 = la.b2;
  const auto w1_tr = transposed(w1, Ci, C);
  const auto w2_tr = stage2 ? transposed(w2, C, Ci) : std::vector<acc_t>();
  const auto gmean = to_acc<acc_t, scalar_t>(gmean_t), gvar = to_acc<acc_t, scalar_t>(gvar_t);
  const auto mean = to_acc<acc_t, scalar_t>(mean_t);
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(N * HW);
  const Strides4 xs(x), dxs(gx);
  const Strides3 hs3(a_h), ws3(a_w);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* ahp = a_h.const_data_ptr<scalar_t>();
  const scalar_t* awp = a_w.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();

  const int64_t off_ah = 0, off_aw = off_ah + N * C * H, off_w1 = off_aw + N * C * W,
                off_b1 = off_w1 + Ci * C, off_w2 = off_b1 + Ci,
                off_b2 = off_w2 + (stage2 ? C * Ci : 0), red_size = off_b2 + (stage2 ? C : 0);
  ChunkResults<std::vector<acc_t>> chunks;

  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    TileForward<scalar_t, acc_t> tile(C, Ci, W);
    TileBackward<scalar_t, acc_t> backward(C, Ci, stage2);
    std::vector<acc_t> red(red_size, acc_t(0));
    std::vector<acc_t> DY(Co * kTile);
    const InputGradTargets<scalar_t, acc_t> targets{gxp, dxs, ahp, hs3, awp, ws3,
                                                    red.data() + off_ah, red.data() + off_aw,
                                                    C, H, W};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles, p0 = (task % tiles) * kTile;
      const int64_t np = std::min(kTile, HW - p0);
      tile.load(xp, xs, ahp, hs3, awp, ws3, w1, b1, n, p0, np);
      if (stage2) tile.local_logits(w2, b2);
      const acc_t* Y = stage2 ? tile.Lmat.data() : tile.Z.data();
      for (int64_t c = 0; c < Co; ++c)
        moments_grad_tile(DY.data() + c * kTile, Y + c * kTile, gmean[c] * inv_count,
                          gvar[c] * 2 * inv_count, mean[c], np);
      // conv2 (stage 2) or DZ = DY (stage 1), then conv1 and t = x·(1 + m): aff_tile.h,
      // shared with aff_fuse.
      if (stage2) {
        row_sums(red.data() + off_b2, DY.data(), C);
        backward.conv2(tile, DY.data(), w2_tr.data());
      } else {
        std::copy(DY.begin(), DY.end(), backward.DZ.begin());
      }
      backward.conv1_and_input(tile, w1_tr.data(), red.data() + off_b1,
                               nullptr, nullptr, targets, n);
    }
    backward.flush_weight_grads(red.data() + off_w1, stage2 ? red.data() + off_w2 : nullptr);
    chunks.add(begin, std::move(red));
  });

  const std::vector<acc_t> total = summed_in_order(chunks, red_size);
  store_from<scalar_t>(ga_h, total, off_ah);
  store_from<scalar_t>(ga_w, total, off_aw);
  store_from<scalar_t>(gw1, total, off_w1);
  store_from<scalar_t>(gb1, total, off_b1);
  if (stage2) {
    store_from<scalar_t>(gw2, total, off_w2);
    store_from<scalar_t>(gb2, total, off_b2);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
aff_moments_backward_cpu(const at::Tensor& grad_mean, const at::Tensor& grad_var,
                         const at::Tensor& x_in, const at::Tensor& a_h, const at::Tensor& a_w,
                         const at::Tensor& w1, const at::Tensor& b1,
                         const std::optional<at::Tensor>& w2,
                         const std::optional<at::Tensor>& b2, const at::Tensor& mean) {
  const char* op = "aff_moments_backward";
  check_aff_moments_backward_args(grad_mean, grad_var, x_in, a_h, a_w, w1, b1, w2, b2, mean, op);
  check_cpu_dtype(x_in, op, "x");
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  at::Tensor ga_h = at::empty({N, C, H}, x.options());
  at::Tensor ga_w = at::empty({N, C, W}, x.options());
  at::Tensor gw1 = at::empty(w1.sizes(), x.options());
  at::Tensor gb1 = at::empty(b1.sizes(), x.options());
  at::Tensor gw2 = at::empty(w2.has_value() ? w2->sizes() : at::IntArrayRef{0}, x.options());
  at::Tensor gb2 = at::empty(b2.has_value() ? b2->sizes() : at::IntArrayRef{0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aff_moments_backward_cpu", [&] {
    aff_moments_backward_kernel<scalar_t>(grad_mean, grad_var, x, a_h, a_w, w1, b1, w2, b2,
                                          mean, gx, ga_h, ga_w, gw1, gb1, gw2, gb2);
  });
  return {gx, ga_h, ga_w, gw1, gb1, gw2, gb2};
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CPU, m) {
  m.impl("aff_moments", &aff_moments_cpu);
  m.impl("aff_moments_backward", &aff_moments_backward_cpu);
}

}  // namespace saffnet_fast

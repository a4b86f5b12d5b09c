// aff_pair CPU kernels (float32, float64): the official AFF(x, residual) on two tensors, see
// csrc/aff_pair.cpp for the op and csrc/common/attention_math.h for the math.
//
// Minimum bytes moved: forward reads x and residual once and writes out once (+ the N·C
// global logits and the weights); one pass. Backward reads grad_out, x and residual once and
// writes grad_x and grad_residual once (+ small reductions); one pass, the forward recomputed
// per tile instead of stored.
//
// The same pixel tiles as aff_fuse (aff_tile.h): X = residual, M = x and T = x + residual
// as [channel][pixel] buffers, the two 1×1 convolutions of local_att as tile GEMMs. Parameter
// gradients are accumulated per parallel chunk and summed in chunk order (deterministic for a
// given thread count).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/aff_checks.h"
#include "../common/attention_math.h"
#include "../common/layout.h"
#include "aff_tile.h"
#include "tile_gemm.h"

namespace saffnet_fast {
namespace {

// res = aff_pair_combine(x = M, residual = X, σ(L + glob)) for one channel's kTile pixels.
template <typename T>
SAFFNET_ALWAYS_INLINE void pair_output_body(T* __restrict__ res, const T* __restrict__ wei,
                                            const T* __restrict__ X, const T* __restrict__ M) {
#pragma omp simd
  for (int64_t p = 0; p < kTile; ++p) res[p] = aff_pair_combine(M[p], X[p], wei[p]);
}
SAFFNET_CPU_CLONES void pair_output_tile(float* res, const float* L, float glob, const float* X,
                                         const float* M) {
  alignas(64) float wei[kTile];
  logit_weight_tile(wei, L, glob);
  pair_output_body(res, wei, X, M);
}
SAFFNET_CPU_CLONES void pair_output_tile(double* res, const double* L, double glob,
                                         const double* X, const double* M) {
  alignas(64) double wei[kTile];
  logit_weight_tile(wei, L, glob);
  pair_output_body(res, wei, X, M);
}

// The direct gradients of one channel's kTile pixels (GO zero beyond the tile, so all three
// are zero there, as TileBackward needs): DX = ∂/∂x, DR = ∂/∂residual, DS = ∂/∂logit;
// returns ΣDS.
template <typename T>
SAFFNET_ALWAYS_INLINE T pair_grad_body(T* __restrict__ DX, T* __restrict__ DR,
                                       T* __restrict__ DS, const T* __restrict__ wei,
                                       const T* __restrict__ GO, const T* __restrict__ X,
                                       const T* __restrict__ M) {
  T ds_sum = 0;
#pragma omp simd reduction(+ : ds_sum)
  for (int64_t p = 0; p < kTile; ++p) {
    const AffPairGrad<T> d = aff_pair_grad(GO[p], M[p], X[p], wei[p]);
    DX[p] = d.d_x;
    DR[p] = d.d_r;
    DS[p] = d.d_s;
    ds_sum += d.d_s;
  }
  return ds_sum;
}
SAFFNET_CPU_CLONES float pair_grad_tile(float* DX, float* DR, float* DS, const float* L,
                                        float glob, const float* GO, const float* X,
                                        const float* M) {
  alignas(64) float wei[kTile];
  logit_weight_tile(wei, L, glob);
  return pair_grad_body(DX, DR, DS, wei, GO, X, M);
}
SAFFNET_CPU_CLONES double pair_grad_tile(double* DX, double* DR, double* DS, const double* L,
                                         double glob, const double* GO, const double* X,
                                         const double* M) {
  alignas(64) double wei[kTile];
  logit_weight_tile(wei, L, glob);
  return pair_grad_body(DX, DR, DS, wei, GO, X, M);
}

template <typename scalar_t>
void aff_pair_forward_kernel(const at::Tensor& x, const at::Tensor& residual,
                             const at::Tensor& g, const at::Tensor& w1t, const at::Tensor& b1t,
                             const at::Tensor& w2t, const at::Tensor& b2t, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const LocalAttSetup<scalar_t, acc_t> la(x, w1t, b1t, w2t, b2t);
  const Strides4 xs(x), rs(residual);
  const int64_t gn = g.stride(0), gc = g.stride(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* rp = residual.const_data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  aff_forward_tiles(
      la, out,
      [&](TileForward<scalar_t, acc_t>& tile, int64_t n, int64_t p0, int64_t np) {
        tile.load_pair(xp, xs, rp, rs, la.w1, la.b1, n, p0, np);
      },
      [&](acc_t* res, const TileForward<scalar_t, acc_t>& tile, int64_t n, int64_t c) {
        const int64_t k = c * kTile;
        pair_output_tile(res, tile.Lmat.data() + k, static_cast<acc_t>(gp[n * gn + c * gc]),
                         tile.X.data() + k, tile.M.data() + k);
      });
}

// x and residual as the kernels read them: both dense NCHW or both dense NHWC (a mixed pair
// is made contiguous), so the output layout follows x.
std::pair<at::Tensor, at::Tensor> pair_layout(const at::Tensor& x_in, const at::Tensor& r_in) {
  at::Tensor x = dense_nchw_or_nhwc(x_in), r = dense_nchw_or_nhwc(r_in);
  if (output_format(x) != output_format(r)) {
    x = x.contiguous();
    r = r.contiguous();
  }
  return {x, r};
}

at::Tensor aff_pair_cpu(const at::Tensor& x_in, const at::Tensor& residual_in,
                        const at::Tensor& global_logit, const at::Tensor& w1,
                        const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  check_aff_pair_args(x_in, residual_in, global_logit, w1, b1, w2, b2, "aff_pair");
  check_cpu_dtype(x_in, "aff_pair", "x");
  const auto [x, residual] = pair_layout(x_in, residual_in);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aff_pair_cpu", [&] {
    aff_pair_forward_kernel<scalar_t>(x, residual, global_logit, w1, b1, w2, b2, out);
  });
  return out;
}

template <typename scalar_t>
void aff_pair_backward_kernel(const at::Tensor& grad, const at::Tensor& x,
                              const at::Tensor& residual, const at::Tensor& g,
                              const at::Tensor& w1t, const at::Tensor& b1t,
                              const at::Tensor& w2t, const at::Tensor& b2t, at::Tensor& gx,
                              at::Tensor& gr, at::Tensor& gg, at::Tensor& gw1, at::Tensor& gb1,
                              at::Tensor& gw2, at::Tensor& gb2) {
  using acc_t = at::opmath_type<scalar_t>;
  const LocalAttSetup<scalar_t, acc_t> la(x, w1t, b1t, w2t, b2t);
  const int64_t N = la.N, C = la.C, W = la.W, Ci = la.Ci, HW = la.HW, tiles = la.tiles;
  const std::vector<acc_t>&w1 = la.w1, &b1 = la.b1, &w2 = la.w2, &b2 = la.b2;
  const auto w1_tr = transposed(w1, Ci, C), w2_tr = transposed(w2, C, Ci);
  const Strides4 xs(x), rs(residual), gs(grad), dxs(gx), drs(gr);
  const int64_t gn = g.stride(0), gc = g.stride(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* rp = residual.const_data_ptr<scalar_t>();
  const scalar_t* gradp = grad.const_data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  scalar_t* grp = gr.mutable_data_ptr<scalar_t>();

  // Layout of one chunk's reduction buffer.
  const int64_t off_g = 0, off_w1 = off_g + N * C, off_b1 = off_w1 + Ci * C,
                off_w2 = off_b1 + Ci, off_b2 = off_w2 + C * Ci, red_size = off_b2 + C;
  ChunkResults<std::vector<acc_t>> chunks;

  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    TileForward<scalar_t, acc_t> tile(C, Ci, W);
    TileBackward<scalar_t, acc_t> backward(C, Ci, true);
    std::vector<acc_t> red(red_size, acc_t(0));
    std::vector<acc_t> DX(C * kTile), DR(C * kTile), DS(C * kTile);
    alignas(64) acc_t GO[kTile];
    const bool grad_plane_contiguous = gs.w == 1 && gs.h == W;
    const bool grads_plane_contiguous = dxs.w == 1 && dxs.h == W && drs.w == 1 && drs.h == W;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles, p0 = (task % tiles) * kTile;
      const int64_t np = std::min(kTile, HW - p0);
      tile.load_pair(xp, xs, rp, rs, w1, b1, n, p0, np);
      tile.local_logits(w2, b2);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t k = c * kTile;
        const scalar_t* grad_plane = gradp + n * gs.n + c * gs.c;
        if (grad_plane_contiguous) prefetch_tile_ahead(grad_plane + p0);
        gather_tile(GO, PlaneRef<const scalar_t>{grad_plane, gs.h, gs.w}, tile.seg, tile.nseg,
                    np);
        const acc_t ds_sum =
            pair_grad_tile(DX.data() + k, DR.data() + k, DS.data() + k, tile.Lmat.data() + k,
                           static_cast<acc_t>(gp[n * gn + c * gc]), GO, tile.X.data() + k,
                           tile.M.data() + k);
        red[off_g + n * C + c] += ds_sum;
        red[off_b2 + c] += ds_sum;
      }
      backward.conv2(tile, DS.data(), w2_tr.data());
      backward.conv1(tile, w1_tr.data(), red.data() + off_b1);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t k = c * kTile;
        scalar_t* gx_plane = gxp + n * dxs.n + c * dxs.c;
        scalar_t* gr_plane = grp + n * drs.n + c * drs.c;
        if (grads_plane_contiguous) {
          // both gradients' lines fetched for writing ahead: the stores otherwise stalled on
          // their misses (2 × C new streams): aff_pair_backward 6.8 → 4.0 ms for AFF(64),
          // 64×48, batch 8, 2 threads
          prefetch_tile_ahead<1>(gx_plane + p0);
          prefetch_tile_ahead<1>(gr_plane + p0);
        }
        pair_input_grads(PlaneRef<scalar_t>{gx_plane, dxs.h, dxs.w},
                         PlaneRef<scalar_t>{gr_plane, drs.h, drs.w},
                         backward.DT.data() + k, DX.data() + k, DR.data() + k, tile.seg,
                         tile.nseg);
      }
    }
    backward.flush_weight_grads(red.data() + off_w1, red.data() + off_w2);
    chunks.add(begin, std::move(red));
  });

  const std::vector<acc_t> total = summed_in_order(chunks, red_size);
  store_from<scalar_t>(gg, total, off_g);
  store_from<scalar_t>(gw1, total, off_w1);
  store_from<scalar_t>(gb1, total, off_b1);
  store_from<scalar_t>(gw2, total, off_w2);
  store_from<scalar_t>(gb2, total, off_b2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
aff_pair_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x_in,
                      const at::Tensor& residual_in, const at::Tensor& global_logit,
                      const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                      const at::Tensor& b2) {
  const char* op = "aff_pair_backward";
  check_aff_pair_args(x_in, residual_in, global_logit, w1, b1, w2, b2, op);
  check_cpu_dtype(x_in, op, "x");
  check_like(grad_out, x_in.sizes(), x_in, op, "grad_out");
  const auto [x, residual] = pair_layout(x_in, residual_in);
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  at::Tensor gr = at::empty(x.sizes(), x.options().memory_format(output_format(residual)));
  at::Tensor gg = at::empty(global_logit.sizes(), x.options());
  at::Tensor gw1 = at::empty(w1.sizes(), x.options());
  at::Tensor gb1 = at::empty(b1.sizes(), x.options());
  at::Tensor gw2 = at::empty(w2.sizes(), x.options());
  at::Tensor gb2 = at::empty(b2.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aff_pair_backward_cpu", [&] {
    aff_pair_backward_kernel<scalar_t>(grad_out, x, residual, global_logit, w1, b1, w2, b2, gx,
                                       gr, gg, gw1, gb1, gw2, gb2);
  });
  return {gx, gr, gg, gw1, gb1, gw2, gb2};
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CPU, m) {
  m.impl("aff_pair", &aff_pair_cpu);
  m.impl("aff_pair_backward", &aff_pair_backward_cpu);
}

}  // namespace saffnet_fast

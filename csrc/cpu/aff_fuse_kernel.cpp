// aff_fuse CPU kernels (float32, float64), see csrc/aff_fuse.cpp for the op and
// csrc/common/attention_math.h for the math.
//
// Minimum bytes moved: forward reads x once and writes out once (+ the N·C·(H+W+1) factors
// and the weights); one pass. Backward reads grad_out and x once and writes grad_x once
// (+ small reductions); one pass, the forward recomputed per tile instead of stored.
//
// Work unit: a tile of kTile pixels of one sample, with all C channels of each pixel held in
// [channel][pixel] buffers, so the two 1×1 convolutions of local_att are small GEMMs whose
// inner loop runs over pixels (vectorisable, no reduction across lanes). x is read through
// its strides: NCHW and NHWC (channels_last) need no copy; other layouts are made contiguous.
// The backward's parameter-gradient reductions are accumulated per parallel chunk and summed
// in chunk order, so results are deterministic for a given thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/aff_checks.h"
#include "../common/attention_math.h"
#include "../common/layout.h"
#include "aff_tile.h"
#include "tile_gemm.h"
#include "vec_math.h"

namespace saffnet_fast {
namespace {

// res[p] = aff_combine(X[p], M[p], σ(L[p] + glob)) for the kTile pixels of one channel.
// float: vectorised sigmoid (vec_math.h), compiled as AVX-512 / AVX2 / baseline clones;
// double: scalar libm.
SAFFNET_CPU_CLONES void aff_output_tile(float* __restrict__ res, const float* __restrict__ L,
                                        float glob, const float* __restrict__ X,
                                        const float* __restrict__ M) {
  static_assert(kTile % 16 == 0, "kTile must be a whole number of 16-float vectors");
  for (int64_t v = 0; v < kTile; v += 16) {
    vfloat16 l, x, m;
    std::memcpy(&l, L + v, sizeof(l));
    std::memcpy(&x, X + v, sizeof(x));
    std::memcpy(&m, M + v, sizeof(m));
    const vfloat16 wei = vec_sigmoid(l + glob);
    const vfloat16 o = 2.0f * x * (1.0f + (m - 1.0f) * wei);
    std::memcpy(res + v, &o, sizeof(o));
  }
}
inline void aff_output_tile(double* res, const double* L, double glob, const double* X,
                            const double* M) {
  for (int64_t p = 0; p < kTile; ++p) res[p] = aff_combine(X[p], M[p], sigmoid(L[p] + glob));
}

// The gradients of aff_combine for the kTile pixels of one channel, from the incoming
// gradient GO (zero beyond the tile's pixels, so all three are zero there, as TileBackward
// needs): DX = ∂/∂x, DM = ∂/∂m, DS = ∂/∂(logit); returns ΣDS. wei = σ(L + glob) as
// aff_output_tile computes it (logit_weight_tile, aff_tile.h).
template <typename T>
SAFFNET_ALWAYS_INLINE T aff_combine_grad_body(T* __restrict__ DX, T* __restrict__ DM,
                                              T* __restrict__ DS, const T* __restrict__ wei,
                                              const T* __restrict__ GO, const T* __restrict__ X,
                                              const T* __restrict__ M) {
  T ds_sum = 0;
#pragma omp simd reduction(+ : ds_sum)
  for (int64_t p = 0; p < kTile; ++p) {
    const AffCombineGrad<T> d = aff_combine_grad(GO[p], X[p], M[p], wei[p]);
    DX[p] = d.d_x;
    DM[p] = d.d_m;
    DS[p] = d.d_s;
    ds_sum += d.d_s;
  }
  return ds_sum;
}
SAFFNET_CPU_CLONES float aff_combine_grad_tile(float* DX, float* DM, float* DS, const float* L,
                                               float glob, const float* GO, const float* X,
                                               const float* M) {
  alignas(64) float wei[kTile];
  logit_weight_tile(wei, L, glob);
  return aff_combine_grad_body(DX, DM, DS, wei, GO, X, M);
}
double aff_combine_grad_tile(double* DX, double* DM, double* DS, const double* L, double glob,
                             const double* GO, const double* X, const double* M) {
  alignas(64) double wei[kTile];
  logit_weight_tile(wei, L, glob);
  return aff_combine_grad_body(DX, DM, DS, wei, GO, X, M);
}

template <typename scalar_t>
void aff_fuse_forward_kernel(const at::Tensor& x, const at::Tensor& a_h, const at::Tensor& a_w,
                             const at::Tensor& g, const at::Tensor& w1t, const at::Tensor& b1t,
                             const at::Tensor& w2t, const at::Tensor& b2t, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const LocalAttSetup<scalar_t, acc_t> la(x, w1t, b1t, w2t, b2t);
  const Strides4 xs(x);
  const Strides3 hs3(a_h), ws3(a_w);
  const int64_t gn = g.stride(0), gc = g.stride(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* ahp = a_h.const_data_ptr<scalar_t>();
  const scalar_t* awp = a_w.const_data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  aff_forward_tiles(
      la, out,
      [&](TileForward<scalar_t, acc_t>& tile, int64_t n, int64_t p0, int64_t np) {
        tile.load(xp, xs, ahp, hs3, awp, ws3, la.w1, la.b1, n, p0, np);
      },
      [&](acc_t* res, const TileForward<scalar_t, acc_t>& tile, int64_t n, int64_t c) {
        const int64_t k = c * kTile;
        aff_output_tile(res, tile.Lmat.data() + k, static_cast<acc_t>(gp[n * gn + c * gc]),
                        tile.X.data() + k, tile.M.data() + k);
      });
}

void aff_fuse_out_cpu(const at::Tensor& x_in, const at::Tensor& a_h, const at::Tensor& a_w,
                      const at::Tensor& global_logit, const at::Tensor& w1, const at::Tensor& b1,
                      const at::Tensor& w2, const at::Tensor& b2, at::Tensor& out) {
  check_aff_args(x_in, a_h, a_w, global_logit, w1, b1, w2, b2, "aff_fuse");
  check_cpu_dtype(x_in, "aff_fuse", "x");
  check_like(out, x_in.sizes(), x_in, "aff_fuse", "out");
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aff_fuse_cpu", [&] {
    aff_fuse_forward_kernel<scalar_t>(x, a_h, a_w, global_logit, w1, b1, w2, b2, out);
  });
}

at::Tensor aff_fuse_cpu(const at::Tensor& x_in, const at::Tensor& a_h, const at::Tensor& a_w,
                        const at::Tensor& global_logit, const at::Tensor& w1,
                        const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  check_nchw(x_in, "aff_fuse", "x");
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  aff_fuse_out_cpu(x, a_h, a_w, global_logit, w1, b1, w2, b2, out);
  return out;
}

template <typename scalar_t>
void aff_fuse_backward_kernel(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& a_h,
                              const at::Tensor& a_w, const at::Tensor& g,
                              const at::Tensor& w1t, const at::Tensor& b1t,
                              const at::Tensor& w2t, const at::Tensor& b2t, at::Tensor& gx,
                              at::Tensor& ga_h, at::Tensor& ga_w, at::Tensor& gg,
                              at::Tensor& gw1, at::Tensor& gb1, at::Tensor& gw2,
                              at::Tensor& gb2) {
  using acc_t = at::opmath_type<scalar_t>;
  const LocalAttSetup<scalar_t, acc_t> la(x, w1t, b1t, w2t, b2t);
  const int64_t N = la.N, C = la.C, H = la.H, W = la.W, Ci = la.Ci, HW = la.HW;
  const int64_t tiles = la.tiles;
  const std::vector<acc_t>&w1 = la.w1, &b1 = la.b1, &w2 = la.w2, &b2 = la.b2;
  const auto w1_tr = transposed(w1, Ci, C), w2_tr = transposed(w2, C, Ci);
  const Strides4 xs(x), gs(grad), dxs(gx);
  const Strides3 hs3(a_h), ws3(a_w);
  const int64_t gn = g.stride(0), gc = g.stride(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gradp = grad.const_data_ptr<scalar_t>();
  const scalar_t* ahp = a_h.const_data_ptr<scalar_t>();
  const scalar_t* awp = a_w.const_data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();

  // Layout of one chunk's reduction buffer.
  const int64_t off_ah = 0, off_aw = off_ah + N * C * H, off_g = off_aw + N * C * W,
                off_w1 = off_g + N * C, off_b1 = off_w1 + Ci * C, off_w2 = off_b1 + Ci,
                off_b2 = off_w2 + C * Ci, red_size = off_b2 + C;
  ChunkResults<std::vector<acc_t>> chunks;

  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    TileForward<scalar_t, acc_t> tile(C, Ci, W);
    TileBackward<scalar_t, acc_t> backward(C, Ci, true);
    std::vector<acc_t> red(red_size, acc_t(0));
    std::vector<acc_t> DX(C * kTile), DM(C * kTile), DS(C * kTile);
    alignas(64) acc_t GO[kTile];
    const bool grad_plane_contiguous = gs.w == 1 && gs.h == W;
    const InputGradTargets<scalar_t, acc_t> targets{gxp, dxs, ahp, hs3, awp, ws3,
                                                    red.data() + off_ah, red.data() + off_aw,
                                                    C, H, W};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles, p0 = (task % tiles) * kTile;
      const int64_t np = std::min(kTile, HW - p0);
      tile.load(xp, xs, ahp, hs3, awp, ws3, w1, b1, n, p0, np);
      tile.local_logits(w2, b2);
      // Output stage: d_x, d_m direct and d_s through the sigmoid.
      for (int64_t c = 0; c < C; ++c) {
        const int64_t k = c * kTile;
        if (grad_plane_contiguous) prefetch_tile_ahead(gradp + n * gs.n + c * gs.c + p0);
        gather_tile(GO, PlaneRef<const scalar_t>{gradp + n * gs.n + c * gs.c, gs.h, gs.w},
                    tile.seg, tile.nseg, np);
        const acc_t ds_sum = aff_combine_grad_tile(
            DX.data() + k, DM.data() + k, DS.data() + k, tile.Lmat.data() + k,
            static_cast<acc_t>(gp[n * gn + c * gc]), GO, tile.X.data() + k, tile.M.data() + k);
        red[off_g + n * C + c] += ds_sum;
        red[off_b2 + c] += ds_sum;
      }
      // The two 1×1 convs and t = x·(1 + m): aff_tile.h, shared with aff_moments.
      backward.conv2(tile, DS.data(), w2_tr.data());
      backward.conv1_and_input(tile, w1_tr.data(), red.data() + off_b1,
                               DX.data(), DM.data(), targets, n);
    }
    backward.flush_weight_grads(red.data() + off_w1, red.data() + off_w2);
    chunks.add(begin, std::move(red));
  });

  const std::vector<acc_t> total = summed_in_order(chunks, red_size);
  store_from<scalar_t>(ga_h, total, off_ah);
  store_from<scalar_t>(ga_w, total, off_aw);
  store_from<scalar_t>(gg, total, off_g);
  store_from<scalar_t>(gw1, total, off_w1);
  store_from<scalar_t>(gb1, total, off_b1);
  store_from<scalar_t>(gw2, total, off_w2);
  store_from<scalar_t>(gb2, total, off_b2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
aff_fuse_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& a_h,
                      const at::Tensor& a_w, const at::Tensor& global_logit,
                      const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                      const at::Tensor& b2) {
  check_aff_args(x_in, a_h, a_w, global_logit, w1, b1, w2, b2, "aff_fuse_backward");
  check_cpu_dtype(x_in, "aff_fuse_backward", "x");
  check_like(grad_out, x_in.sizes(), x_in, "aff_fuse_backward", "grad_out");
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  at::Tensor ga_h = at::empty({N, C, H}, x.options());
  at::Tensor ga_w = at::empty({N, C, W}, x.options());
  at::Tensor gg = at::empty({N, C}, x.options());
  at::Tensor gw1 = at::empty(w1.sizes(), x.options());
  at::Tensor gb1 = at::empty(b1.sizes(), x.options());
  at::Tensor gw2 = at::empty(w2.sizes(), x.options());
  at::Tensor gb2 = at::empty(b2.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aff_fuse_backward_cpu", [&] {
    aff_fuse_backward_kernel<scalar_t>(grad_out, x, a_h, a_w, global_logit, w1, b1, w2, b2, gx,
                                       ga_h, ga_w, gg, gw1, gb1, gw2, gb2);
  });
  return {gx, ga_h, ga_w, gg, gw1, gb1, gw2, gb2};
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CPU, m) {
  m.impl("aff_fuse", &aff_fuse_cpu);
  m.impl("aff_fuse_out", &aff_fuse_out_cpu);
  m.impl("aff_fuse_backward", &aff_fuse_backward_cpu);
}

}  // namespace saffnet_fast

// aff_pair_combine CPU kernels (float32, float64).
//
// Minimum bytes moved: forward reads x, residual and local_logit once and writes out once
// (+ N·C global logits), one pass. Backward reads grad_out, x, residual and local_logit once
// and writes grad_x, grad_residual and grad_local_logit once (+ N·C), one pass.
//
// Tasks over (n, c) planes. Each plane's wei = σ(local + global) is computed into a buffer
// with the vectorised sigmoid (vec_math.h), then one flat loop over the plane's H·W values
// (rows of W = 12 or 24 are too short for a per-row vector loop). Planes that are not dense
// (channels_last, sliced) are gathered into buffers and, for outputs, scattered back.
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
#include "vec_math.h"

namespace saffnet_fast {
namespace {

template <typename T>
SAFFNET_ALWAYS_INLINE void pair_combine_plane_body(const T* __restrict__ X,
                                                   const T* __restrict__ R,
                                                   const T* __restrict__ WEI, int64_t count,
                                                   T* __restrict__ OUT) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) OUT[i] = aff_pair_combine(X[i], R[i], WEI[i]);
}
SAFFNET_CPU_CLONES inline void pair_combine_plane(const float* X, const float* R,
                                                  const float* WEI, int64_t count, float* OUT) {
  pair_combine_plane_body(X, R, WEI, count, OUT);
}
SAFFNET_CPU_CLONES inline void pair_combine_plane(const double* X, const double* R,
                                                  const double* WEI, int64_t count,
                                                  double* OUT) {
  pair_combine_plane_body(X, R, WEI, count, OUT);
}

// One plane's backward; returns Σ DS (the plane's grad_global_logit).
template <typename T>
SAFFNET_ALWAYS_INLINE double pair_combine_grad_plane_body(
    const T* __restrict__ G, const T* __restrict__ X, const T* __restrict__ R,
    const T* __restrict__ WEI, int64_t count, T* __restrict__ DX, T* __restrict__ DR,
    T* __restrict__ DS) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) {
    const AffPairGrad<T> d = aff_pair_grad(G[i], X[i], R[i], WEI[i]);
    DX[i] = d.d_x;
    DR[i] = d.d_r;
    DS[i] = d.d_s;
    sum += static_cast<double>(d.d_s);
  }
  return sum;
}
SAFFNET_CPU_CLONES inline double pair_combine_grad_plane(const float* G, const float* X,
                                                         const float* R, const float* WEI,
                                                         int64_t count, float* DX, float* DR,
                                                         float* DS) {
  return pair_combine_grad_plane_body(G, X, R, WEI, count, DX, DR, DS);
}
SAFFNET_CPU_CLONES inline double pair_combine_grad_plane(const double* G, const double* X,
                                                         const double* R, const double* WEI,
                                                         int64_t count, double* DX, double* DR,
                                                         double* DS) {
  return pair_combine_grad_plane_body(G, X, R, WEI, count, DX, DR, DS);
}

// Forward (grad == nullptr): out = aff_pair_combine(x, residual, σ(local + global)).
// Backward: out is grad_x; grad_residual, grad_local and grad_global are written too.
template <typename scalar_t>
void aff_pair_combine_kernel(const at::Tensor& x, const at::Tensor& residual,
                             const at::Tensor& local, const at::Tensor& global,
                             const at::Tensor* grad, at::Tensor& out, at::Tensor* g_residual,
                             at::Tensor* g_local, at::Tensor* g_global) {
  static_assert(std::is_same_v<at::opmath_type<scalar_t>, scalar_t>, "float32 / float64 only");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const PlaneAccess<scalar_t> xp(x), rp(residual), lp(local), op(out);
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* rd = residual.const_data_ptr<scalar_t>();
  const scalar_t* ld = local.const_data_ptr<scalar_t>();
  const scalar_t* gl = global.const_data_ptr<scalar_t>();
  const int64_t gln = global.stride(0), glc = global.stride(1);
  scalar_t* od = out.mutable_data_ptr<scalar_t>();
  const scalar_t* gd = grad != nullptr ? grad->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* drd = g_residual ? g_residual->mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* dld = g_local ? g_local->mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* dgd = g_global ? g_global->mutable_data_ptr<scalar_t>() : nullptr;
  const PlaneAccess<scalar_t> gp(grad != nullptr ? *grad : x);
  const PlaneAccess<scalar_t> drp(g_residual != nullptr ? *g_residual : x);
  const PlaneAccess<scalar_t> dlp(g_local != nullptr ? *g_local : x);

  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, HW));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> wei(HW), xb(HW), rb(HW), ob(HW), gb, drb, dlb;
    if (gd != nullptr) {
      for (auto* v : {&gb, &drb, &dlb}) v->resize(HW);
    }
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C, c = plane % C;
      const scalar_t glob = gl[n * gln + c * glc];
      const scalar_t* L = ld + n * lp.s.n + c * lp.s.c;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) wei[h * W + w] = L[h * lp.s.h + w * lp.s.w] + glob;
      sigmoid_values(wei.data(), HW);
      const scalar_t* X = xp.read(xd, n, c, xb);
      const scalar_t* R = rp.read(rd, n, c, rb);
      scalar_t* O = op.target(od, n, c, ob);
      if (gd == nullptr) {
        pair_combine_plane(X, R, wei.data(), HW, O);
      } else {
        const scalar_t* G = gp.read(gd, n, c, gb);
        scalar_t* DR = drp.target(drd, n, c, drb);
        scalar_t* DS = dlp.target(dld, n, c, dlb);
        dgd[plane] = static_cast<scalar_t>(
            pair_combine_grad_plane(G, X, R, wei.data(), HW, O, DR, DS));
        drp.commit(drd, n, c, drb);
        dlp.commit(dld, n, c, dlb);
      }
      op.commit(od, n, c, ob);
    }
  });
}

at::Tensor aff_pair_combine_cpu(const at::Tensor& x_in, const at::Tensor& residual_in,
                                const at::Tensor& local_in, const at::Tensor& global_logit) {
  check_aff_pair_combine_args(x_in, residual_in, local_in, global_logit, "aff_pair_combine");
  check_cpu_dtype(x_in, "aff_pair_combine", "x");
  const at::Tensor x = dense_nchw_or_nhwc(x_in), residual = dense_nchw_or_nhwc(residual_in);
  const at::Tensor local = dense_local_logit(local_in);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aff_pair_combine_cpu", [&] {
    aff_pair_combine_kernel<scalar_t>(x, residual, local, global_logit, nullptr, out, nullptr,
                                      nullptr, nullptr);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aff_pair_combine_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& residual_in,
    const at::Tensor& local_in, const at::Tensor& global_logit) {
  check_aff_pair_combine_args(x_in, residual_in, local_in, global_logit,
                              "aff_pair_combine_backward");
  check_cpu_dtype(x_in, "aff_pair_combine_backward", "x");
  check_like(grad_out, x_in.sizes(), x_in, "aff_pair_combine_backward", "grad_out");
  const at::Tensor x = dense_nchw_or_nhwc(x_in), residual = dense_nchw_or_nhwc(residual_in);
  const at::Tensor local = dense_local_logit(local_in);
  AffPairCombineGrads g = empty_aff_pair_combine_grads(x, residual, local);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aff_pair_combine_backward_cpu", [&] {
    aff_pair_combine_kernel<scalar_t>(x, residual, local, global_logit, &grad_out, g.x,
                                      &g.residual, &g.local, &g.global);
  });
  return {g.x, g.residual, g.local, g.global};
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CPU, m) {
  m.impl("aff_pair_combine", &aff_pair_combine_cpu);
  m.impl("aff_pair_combine_backward", &aff_pair_combine_backward_cpu);
}

}  // namespace saffnet_fast

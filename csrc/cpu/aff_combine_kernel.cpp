// aff_combine CPU kernels (float32, float64).
//
// Minimum bytes moved: forward reads x and local_logit once and writes out once
// (+ N·C·(H+W+1) factors and logits), one pass. Backward reads grad_out, x and local_logit
// once and writes grad_x and grad_local_logit once (+ N·C·(H+W+1)), one pass.
//
// Two loop orders, chosen by x's layout (every full-size tensor is read and written through
// its strides), as in coord_scale_kernel.cpp:
//   * NCHW: tasks over (n, c) planes; per row, wei = σ(local + global) is computed for the
//     whole row into a buffer (the vectorised sigmoid of vec_math.h), then the row's
//     elementwise math; the backward's row / column / plane sums stay inside a task;
//   * channels_last: tasks over (n, block of channels), channels innermost.
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
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

constexpr int64_t kChannelBlock = 64;

// The backward of one dense H·W plane, flattened so every loop vectorises (rows of W = 12
// or 24 are too short for a per-row vector loop): AH / AW hold a_h and a_w expanded to the
// plane. Writes DX (grad_x), DS (grad_local) and DMW = d_m·a_w, DMH = d_m·a_h, whose row and
// column sums are grad_a_h and grad_a_w; returns Σ DS (grad_global).
template <typename T>
SAFFNET_ALWAYS_INLINE double combine_grad_plane_body(
    const T* __restrict__ G, const T* __restrict__ X, const T* __restrict__ WEI,
    const T* __restrict__ AH, const T* __restrict__ AW, int64_t count, T* __restrict__ DX,
    T* __restrict__ DS, T* __restrict__ DMW, T* __restrict__ DMH) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) {
    const auto d = aff_combine_grad(G[i], X[i], AH[i] * AW[i], WEI[i]);
    DX[i] = d.d_x;
    DS[i] = d.d_s;
    DMW[i] = d.d_m * AW[i];
    DMH[i] = d.d_m * AH[i];
    sum += static_cast<double>(d.d_s);
  }
  return sum;
}
SAFFNET_CPU_CLONES inline double combine_grad_plane(const float* G, const float* X,
                                                    const float* WEI, const float* AH,
                                                    const float* AW, int64_t count, float* DX,
                                                    float* DS, float* DMW, float* DMH) {
  return combine_grad_plane_body(G, X, WEI, AH, AW, count, DX, DS, DMW, DMH);
}
SAFFNET_CPU_CLONES inline double combine_grad_plane(const double* G, const double* X,
                                                    const double* WEI, const double* AH,
                                                    const double* AW, int64_t count, double* DX,
                                                    double* DS, double* DMW, double* DMH) {
  return combine_grad_plane_body(G, X, WEI, AH, AW, count, DX, DS, DMW, DMH);
}

// Forward (grad == nullptr): out = aff_combine(x, a_h·a_w, σ(local + global)). Backward: out
// is grad_x, and grad_local / the row, column and plane sums (grad_a_h, grad_a_w,
// grad_global) are written too.
template <typename scalar_t>
void aff_combine_kernel(const at::Tensor& x, const at::Tensor& a_h, const at::Tensor& a_w,
                        const at::Tensor& local, const at::Tensor& global, const at::Tensor* grad,
                        at::Tensor& out, at::Tensor* g_local, at::Tensor* g_a_h,
                        at::Tensor* g_a_w, at::Tensor* g_global) {
  // float math for float (the vectorised sigmoid; at::acc_type would be double on the CPU)
  // and double for double; the row, column and plane sums (grad_a_h, grad_a_w,
  // grad_global) are accumulated in double: they cancel, and in float32 their rounding
  // depended on the vector width of the clone that ran (AVX2 vs AVX-512).
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const Strides4 xs(x), ls(local), os(out);
  const Strides4 gs = grad != nullptr ? Strides4(*grad) : xs;
  const Strides4 dls = g_local != nullptr ? Strides4(*g_local) : xs;
  const int64_t hn = a_h.stride(0), hc = a_h.stride(1), hh = a_h.stride(2);
  const int64_t wn = a_w.stride(0), wc = a_w.stride(1), ww = a_w.stride(2);
  const int64_t gln = global.stride(0), glc = global.stride(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* lp = local.const_data_ptr<scalar_t>();
  const scalar_t* glp = global.const_data_ptr<scalar_t>();
  const scalar_t* ahp = a_h.const_data_ptr<scalar_t>();
  const scalar_t* awp = a_w.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad != nullptr ? grad->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  // grad_a_h N×C×H, grad_a_w N×C×W and grad_global N×C are created contiguous
  scalar_t* dlp = g_local ? g_local->mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* dahp = g_a_h ? g_a_h->mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* dawp = g_a_w ? g_a_w->mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* dgp = g_global ? g_global->mutable_data_ptr<scalar_t>() : nullptr;

  const bool channel_innermost = C > 1 && xs.c == 1;
  if (!channel_innermost) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * W));
    const PlaneAccess<scalar_t> grad_plane(grad != nullptr ? *grad : x);
    const PlaneAccess<scalar_t> grad_local_plane(g_local != nullptr ? *g_local : x);
    at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> aw(W), wei(H * W);
      std::vector<double> col(W);
      std::vector<acc_t> AH, AW, DMW, DMH, Gbuf, DSbuf;
      if (gp != nullptr) {
        for (auto* v : {&AH, &AW, &DMW, &DMH, &Gbuf, &DSbuf}) v->resize(H * W);
      }
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C;
        const acc_t glob = static_cast<acc_t>(glp[n * gln + c * glc]);
        for (int64_t w = 0; w < W; ++w) aw[w] = static_cast<acc_t>(awp[n * wn + c * wc + w * ww]);
        // wei for the whole plane at once: one sigmoid call (and one partial vector) per
        // plane, not per row (rows of 12 are all remainder: 2.5× slower at 8×128×16×12)
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* lr = lp + n * ls.n + c * ls.c + h * ls.h;
          for (int64_t w = 0; w < W; ++w) wei[h * W + w] = static_cast<acc_t>(lr[w * ls.w]) + glob;
        }
        sigmoid_values(wei.data(), H * W);
        if (gp == nullptr) {
          for (int64_t h = 0; h < H; ++h) {
            const acc_t ah = static_cast<acc_t>(ahp[n * hn + c * hc + h * hh]);
            const acc_t* wr = wei.data() + h * W;
            const scalar_t* xr = xp + n * xs.n + c * xs.c + h * xs.h;
            scalar_t* orow = op + n * os.n + c * os.c + h * os.h;
            for (int64_t w = 0; w < W; ++w)
              orow[w * os.w] = static_cast<scalar_t>(
                  aff_combine(static_cast<acc_t>(xr[w * xs.w]), ah * aw[w], wr[w]));
          }
          continue;
        }
        // Backward. x and grad_x are dense NCHW here (x decides the layout, grad_x follows
        // it); grad_out is gathered and grad_local scattered when their planes are not.
        for (int64_t h = 0; h < H; ++h) {
          const acc_t ah = static_cast<acc_t>(ahp[n * hn + c * hc + h * hh]);
          for (int64_t w = 0; w < W; ++w) {
            AH[h * W + w] = ah;
            AW[h * W + w] = aw[w];
          }
        }
        const scalar_t* G = grad_plane.read(gp, n, c, Gbuf);
        scalar_t* DS = grad_local_plane.target(dlp, n, c, DSbuf);
        const double plane_sum = combine_grad_plane(G, xp + n * xs.n + c * xs.c, wei.data(),
                                                    AH.data(), AW.data(), H * W,
                                                    op + n * os.n + c * os.c, DS, DMW.data(),
                                                    DMH.data());
        grad_local_plane.commit(dlp, n, c, DSbuf);
        plane_factor_sums(DMW.data(), DMH.data(), H, W, col, dahp + plane * H, dawp + plane * W);
        dgp[plane] = static_cast<scalar_t>(plane_sum);
      }
    });
    return;
  }

  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ah(kChannelBlock * H), aw(kChannelBlock * W), glob(kChannelBlock),
        wei(kChannelBlock);
    std::vector<double> rows(kChannelBlock * H), cols(kChannelBlock * W);
    std::vector<double> sums(kChannelBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * kChannelBlock;
      const int64_t cb = std::min(kChannelBlock, C - c0);
      // factors as [h][c] / [w][c] so the innermost loop runs over contiguous channels
      for (int64_t c = 0; c < cb; ++c) {
        glob[c] = static_cast<acc_t>(glp[n * gln + (c0 + c) * glc]);
        for (int64_t h = 0; h < H; ++h)
          ah[h * kChannelBlock + c] = static_cast<acc_t>(ahp[n * hn + (c0 + c) * hc + h * hh]);
        for (int64_t w = 0; w < W; ++w)
          aw[w * kChannelBlock + c] = static_cast<acc_t>(awp[n * wn + (c0 + c) * wc + w * ww]);
      }
      std::fill(rows.begin(), rows.end(), 0.0);
      std::fill(cols.begin(), cols.end(), 0.0);
      std::fill(sums.begin(), sums.end(), 0.0);
      for (int64_t h = 0; h < H; ++h) {
        const acc_t* ahr = ah.data() + h * kChannelBlock;
        for (int64_t w = 0; w < W; ++w) {
          const scalar_t* px = xp + xs.at(n, c0, h, w);
          const scalar_t* pl = lp + ls.at(n, c0, h, w);
          scalar_t* po = op + os.at(n, c0, h, w);
          const acc_t* awr = aw.data() + w * kChannelBlock;
          for (int64_t c = 0; c < cb; ++c) wei[c] = static_cast<acc_t>(pl[c * ls.c]) + glob[c];
          sigmoid_values(wei.data(), cb);
          if (gp == nullptr) {
            for (int64_t c = 0; c < cb; ++c)
              po[c * os.c] = static_cast<scalar_t>(
                  aff_combine(static_cast<acc_t>(px[c * xs.c]), ahr[c] * awr[c], wei[c]));
            continue;
          }
          const scalar_t* pg = gp + gs.at(n, c0, h, w);
          scalar_t* pdl = dlp + dls.at(n, c0, h, w);
          double* rowr = rows.data() + h * kChannelBlock;
          double* colr = cols.data() + w * kChannelBlock;
          for (int64_t c = 0; c < cb; ++c) {
            const auto d = aff_combine_grad(static_cast<acc_t>(pg[c * gs.c]),
                                            static_cast<acc_t>(px[c * xs.c]), ahr[c] * awr[c],
                                            wei[c]);
            po[c * os.c] = static_cast<scalar_t>(d.d_x);
            pdl[c * dls.c] = static_cast<scalar_t>(d.d_s);
            sums[c] += d.d_s;
            rowr[c] += d.d_m * awr[c];
            colr[c] += d.d_m * ahr[c];
          }
        }
      }
      if (gp != nullptr) {
        for (int64_t c = 0; c < cb; ++c) {
          const int64_t plane = n * C + c0 + c;
          dgp[plane] = static_cast<scalar_t>(sums[c]);
          for (int64_t h = 0; h < H; ++h)
            dahp[plane * H + h] = static_cast<scalar_t>(rows[h * kChannelBlock + c]);
          for (int64_t w = 0; w < W; ++w)
            dawp[plane * W + w] = static_cast<scalar_t>(cols[w * kChannelBlock + c]);
        }
      }
    }
  });
}

at::Tensor aff_combine_cpu(const at::Tensor& x_in, const at::Tensor& a_h, const at::Tensor& a_w,
                           const at::Tensor& local_in, const at::Tensor& global_logit) {
  check_aff_combine_args(x_in, a_h, a_w, local_in, global_logit, "aff_combine");
  check_cpu_dtype(x_in, "aff_combine", "x");
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  const at::Tensor local = dense_local_logit(local_in);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aff_combine_cpu", [&] {
    aff_combine_kernel<scalar_t>(x, a_h, a_w, local, global_logit, nullptr, out, nullptr,
                                 nullptr, nullptr, nullptr);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> aff_combine_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& a_h,
    const at::Tensor& a_w, const at::Tensor& local_in, const at::Tensor& global_logit) {
  check_aff_combine_args(x_in, a_h, a_w, local_in, global_logit, "aff_combine_backward");
  check_cpu_dtype(x_in, "aff_combine_backward", "x");
  check_like(grad_out, x_in.sizes(), x_in, "aff_combine_backward", "grad_out");
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  const at::Tensor local = dense_local_logit(local_in);
  AffCombineGrads g = empty_aff_combine_grads(x, local);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aff_combine_backward_cpu", [&] {
    aff_combine_kernel<scalar_t>(x, a_h, a_w, local, global_logit, &grad_out, g.x, &g.local,
                                 &g.a_h, &g.a_w, &g.global);
  });
  return {g.x, g.a_h, g.a_w, g.local, g.global};
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CPU, m) {
  m.impl("aff_combine", &aff_combine_cpu);
  m.impl("aff_combine_backward", &aff_combine_backward_cpu);
}

}  // namespace saffnet_fast

// coord_scale CPU kernels (float32, float64); with offset 1 they also serve aff_input
// (coord_scale_kernel.h, aff_input_kernel.cpp).
//
// Minimum bytes moved: forward reads x once and writes out once (+ N·C·(H+W) factors), one
// pass. Backward reads grad_out and x once, writes grad_x once (+ N·C·(H+W)), one pass.
//
// Two loop orders, chosen by x's layout (x is read through its strides, grad_out too):
//   * NCHW: tasks over (n, c) planes; the backward's row/column sums stay inside a task;
//   * channels_last: tasks over (n, block of channels), channels innermost.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../common/aff_checks.h"
#include "../common/layout.h"
#include "../common/macros.h"
#include "coord_scale_kernel.h"
#include "plane_access.h"

namespace saffnet_fast {
namespace {

constexpr int64_t kChannelBlock = 64;

// Dense-plane bodies (x, out and grad each with contiguous H·W planes): loops over the whole
// flattened plane, with a_h and a_w expanded to it in AH / AW, so they vectorise (rows of
// W = 12 or 24 are too short for a per-row vector loop). float math for float32 (the
// strided path below computes in double: at::acc_type is double on the CPU), sums in double.
// Measured, aff_input forward / backward at 8×128×16×12, 2 threads: 57 / 136 µs strided,
// see the commit introducing these for the dense figures.
template <typename T>
SAFFNET_ALWAYS_INLINE double scale_plane_body(const T* __restrict__ X, const T* __restrict__ AH,
                                              const T* __restrict__ AW, T offset, int64_t count,
                                              T* __restrict__ OUT) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) {
    const T v = X[i] * (offset + AH[i] * AW[i]);
    OUT[i] = v;
    sum += static_cast<double>(v);
  }
  return sum;
}
template <typename T>
SAFFNET_ALWAYS_INLINE void scale_grad_plane_body(const T* __restrict__ G, T plane_grad,
                                                 const T* __restrict__ X,
                                                 const T* __restrict__ AH,
                                                 const T* __restrict__ AW, T offset,
                                                 int64_t count, T* __restrict__ DX,
                                                 T* __restrict__ DMW, T* __restrict__ DMH) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const T g = G[i] + plane_grad;
    DX[i] = g * (offset + AH[i] * AW[i]);
    const T gx = g * X[i];
    DMW[i] = gx * AW[i];
    DMH[i] = gx * AH[i];
  }
}
#define SAFFNET_SCALE_PLANE_CLONES(T)                                                       \
  SAFFNET_CPU_CLONES inline double scale_plane(const T* X, const T* AH, const T* AW,        \
                                               T offset, int64_t count, T* OUT) {           \
    return scale_plane_body(X, AH, AW, offset, count, OUT);                                 \
  }                                                                                         \
  SAFFNET_CPU_CLONES inline void scale_grad_plane(const T* G, T plane_grad, const T* X,     \
                                                  const T* AH, const T* AW, T offset,       \
                                                  int64_t count, T* DX, T* DMW, T* DMH) {   \
    scale_grad_plane_body(G, plane_grad, X, AH, AW, offset, count, DX, DMW, DMH);           \
  }
SAFFNET_SCALE_PLANE_CLONES(float)
SAFFNET_SCALE_PLANE_CLONES(double)
#undef SAFFNET_SCALE_PLANE_CLONES

// One kernel for forward (grad == nullptr: out = x·(offset + a_h·a_w), and the plane sums
// Σ_hw out into `sums` when given) and backward (out = grad_x = g·(offset + a_h·a_w) with
// g = grad + grad_sum[n, c] (grad_sum optional: the gradient of the plane sums), and the
// row/column sums into ga_h / ga_w, which the offset does not change). coord_scale:
// offset 0; aff_input: offset 1.
template <typename scalar_t>
void coord_scale_kernel(const at::Tensor& x, const at::Tensor& a_h, const at::Tensor& a_w,
                        const at::Tensor* grad, at::Tensor& out, at::Tensor* ga_h,
                        at::Tensor* ga_w, double offset_value = 0.0, at::Tensor* sums = nullptr,
                        const at::Tensor* grad_sum = nullptr) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const acc_t offset = static_cast<acc_t>(offset_value);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t xn = x.stride(0), xc = x.stride(1), xh = x.stride(2), xw = x.stride(3);
  const int64_t on = out.stride(0), oc = out.stride(1), oh = out.stride(2), ow = out.stride(3);
  const int64_t hn = a_h.stride(0), hc = a_h.stride(1), hh = a_h.stride(2);
  const int64_t wn = a_w.stride(0), wc = a_w.stride(1), ww = a_w.stride(2);
  int64_t gn = 0, gc = 0, gh = 0, gw = 0;
  const scalar_t* gp = nullptr;
  if (grad != nullptr) {
    gn = grad->stride(0), gc = grad->stride(1), gh = grad->stride(2), gw = grad->stride(3);
    gp = grad->const_data_ptr<scalar_t>();
  }
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* ahp = a_h.const_data_ptr<scalar_t>();
  const scalar_t* awp = a_w.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  scalar_t* gahp = ga_h ? ga_h->mutable_data_ptr<scalar_t>() : nullptr;  // contiguous N×C×H
  scalar_t* gawp = ga_w ? ga_w->mutable_data_ptr<scalar_t>() : nullptr;  // contiguous N×C×W
  scalar_t* sump = sums ? sums->mutable_data_ptr<scalar_t>() : nullptr;  // contiguous N×C
  const scalar_t* gsp = grad_sum ? grad_sum->const_data_ptr<scalar_t>() : nullptr;  // N×C
  auto plane_grad = [&](int64_t plane) { return gsp ? static_cast<acc_t>(gsp[plane]) : acc_t(0); };

  const bool channel_innermost = C > 1 && xc == 1;
  const bool dense = PlaneAccess<scalar_t>(x).dense() && PlaneAccess<scalar_t>(out).dense() &&
                     (grad == nullptr || PlaneAccess<scalar_t>(*grad).dense());
  if (!channel_innermost && dense) {
    using math_t = scalar_t;  // float math for float32 (see scale_plane_body)
    const int64_t count = H * W;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, count));
    at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<math_t> AH(count), AW(count), DMW, DMH;
      std::vector<double> col(W);
      if (gp != nullptr) {
        DMW.resize(count);
        DMH.resize(count);
      }
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C;
        for (int64_t h = 0; h < H; ++h) {
          const math_t ah = ahp[n * hn + c * hc + h * hh];
          for (int64_t w = 0; w < W; ++w) {
            AH[h * W + w] = ah;
            AW[h * W + w] = awp[n * wn + c * wc + w * ww];
          }
        }
        const scalar_t* X = xp + n * xn + c * xc;
        scalar_t* O = op + n * on + c * oc;
        if (gp == nullptr) {
          const double sum = scale_plane(X, AH.data(), AW.data(), static_cast<math_t>(offset),
                                         count, O);
          if (sump) sump[plane] = static_cast<scalar_t>(sum);
          continue;
        }
        scale_grad_plane(gp + n * gn + c * gc, static_cast<math_t>(plane_grad(plane)), X,
                         AH.data(), AW.data(), static_cast<math_t>(offset), count, O,
                         DMW.data(), DMH.data());
        plane_factor_sums(DMW.data(), DMH.data(), H, W, col, gahp + plane * H, gawp + plane * W);
      }
    });
    return;
  }
  if (!channel_innermost) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * W));
    at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> aw(W), col(W);
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C;
        const acc_t gs = plane_grad(plane);
        acc_t plane_sum = 0;
        for (int64_t w = 0; w < W; ++w) aw[w] = static_cast<acc_t>(awp[n * wn + c * wc + w * ww]);
        std::fill(col.begin(), col.end(), acc_t(0));
        for (int64_t h = 0; h < H; ++h) {
          const acc_t ah = static_cast<acc_t>(ahp[n * hn + c * hc + h * hh]);
          const scalar_t* xr = xp + n * xn + c * xc + h * xh;
          scalar_t* orow = op + n * on + c * oc + h * oh;
          if (gp == nullptr) {
            for (int64_t w = 0; w < W; ++w) {
              const scalar_t v =
                  static_cast<scalar_t>(static_cast<acc_t>(xr[w * xw]) * (offset + ah * aw[w]));
              orow[w * ow] = v;
              plane_sum += v;
            }
          } else {
            const scalar_t* gr = gp + n * gn + c * gc + h * gh;
            acc_t row = 0;
            for (int64_t w = 0; w < W; ++w) {
              const acc_t g = static_cast<acc_t>(gr[w * gw]) + gs;
              const acc_t gx = g * static_cast<acc_t>(xr[w * xw]);
              orow[w * ow] = static_cast<scalar_t>(g * (offset + ah * aw[w]));
              row += gx * aw[w];
              col[w] += gx * ah;
            }
            gahp[plane * H + h] = static_cast<scalar_t>(row);
          }
        }
        if (gp != nullptr)
          for (int64_t w = 0; w < W; ++w) gawp[plane * W + w] = static_cast<scalar_t>(col[w]);
        else if (sump)
          sump[plane] = static_cast<scalar_t>(plane_sum);
      }
    });
    return;
  }

  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ah(kChannelBlock * H), aw(kChannelBlock * W), rows(kChannelBlock * H),
        cols(kChannelBlock * W), gs(kChannelBlock), plane_sums(kChannelBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * kChannelBlock;
      const int64_t cb = std::min(kChannelBlock, C - c0);
      // factors as [h][c] / [w][c] so the innermost loop runs over contiguous channels
      for (int64_t c = 0; c < cb; ++c) {
        gs[c] = plane_grad(n * C + c0 + c);
        for (int64_t h = 0; h < H; ++h)
          ah[h * kChannelBlock + c] = static_cast<acc_t>(ahp[n * hn + (c0 + c) * hc + h * hh]);
        for (int64_t w = 0; w < W; ++w)
          aw[w * kChannelBlock + c] = static_cast<acc_t>(awp[n * wn + (c0 + c) * wc + w * ww]);
      }
      std::fill(rows.begin(), rows.end(), acc_t(0));
      std::fill(cols.begin(), cols.end(), acc_t(0));
      std::fill(plane_sums.begin(), plane_sums.end(), acc_t(0));
      for (int64_t h = 0; h < H; ++h) {
        const acc_t* ahr = ah.data() + h * kChannelBlock;
        for (int64_t w = 0; w < W; ++w) {
          const scalar_t* px = xp + n * xn + h * xh + w * xw + c0 * xc;
          scalar_t* po = op + n * on + h * oh + w * ow + c0 * oc;
          const acc_t* awr = aw.data() + w * kChannelBlock;
          if (gp == nullptr) {
            for (int64_t c = 0; c < cb; ++c) {
              const scalar_t v =
                  static_cast<scalar_t>(static_cast<acc_t>(px[c]) * (offset + ahr[c] * awr[c]));
              po[c * oc] = v;
              plane_sums[c] += v;
            }
          } else {
            const scalar_t* pg = gp + n * gn + h * gh + w * gw + c0 * gc;
            acc_t* rowr = rows.data() + h * kChannelBlock;
            acc_t* colr = cols.data() + w * kChannelBlock;
            for (int64_t c = 0; c < cb; ++c) {
              const acc_t g = static_cast<acc_t>(pg[c * gc]) + gs[c];
              const acc_t gx = g * static_cast<acc_t>(px[c]);
              po[c * oc] = static_cast<scalar_t>(g * (offset + ahr[c] * awr[c]));
              rowr[c] += gx * awr[c];
              colr[c] += gx * ahr[c];
            }
          }
        }
      }
      if (gp == nullptr && sump) {
        for (int64_t c = 0; c < cb; ++c) sump[n * C + c0 + c] = static_cast<scalar_t>(plane_sums[c]);
      }
      if (gp != nullptr) {
        for (int64_t c = 0; c < cb; ++c) {
          const int64_t plane = n * C + c0 + c;
          for (int64_t h = 0; h < H; ++h)
            gahp[plane * H + h] = static_cast<scalar_t>(rows[h * kChannelBlock + c]);
          for (int64_t w = 0; w < W; ++w)
            gawp[plane * W + w] = static_cast<scalar_t>(cols[w * kChannelBlock + c]);
        }
      }
    }
  });
}

}  // namespace

void coord_scale_offset_cpu(const at::Tensor& x, const at::Tensor& a_h, const at::Tensor& a_w,
                            double offset, at::Tensor& out, at::Tensor* sums) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "coord_scale_cpu", [&] {
    coord_scale_kernel<scalar_t>(x, a_h, a_w, nullptr, out, nullptr, nullptr, offset, sums);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> coord_scale_offset_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& a_h,
    const at::Tensor& a_w, double offset, const char* op, const char* grad_name,
    const std::optional<at::Tensor>& grad_sum_in) {
  check_coord_factors(x_in, a_h, a_w, op);
  check_cpu_dtype(x_in, op, "x");
  check_like(grad, x_in.sizes(), x_in, op, grad_name);
  at::Tensor grad_sum;
  if (grad_sum_in.has_value()) {
    check_like(*grad_sum_in, {x_in.size(0), x_in.size(1)}, x_in, op, "grad_sum");
    grad_sum = grad_sum_in->contiguous();
  }
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  at::Tensor ga_h = at::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  at::Tensor ga_w = at::empty({x.size(0), x.size(1), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "coord_scale_backward_cpu", [&] {
    coord_scale_kernel<scalar_t>(x, a_h, a_w, &grad, gx, &ga_h, &ga_w, offset, nullptr,
                                 grad_sum.defined() ? &grad_sum : nullptr);
  });
  return {gx, ga_h, ga_w};
}

namespace {

void coord_scale_out_cpu(const at::Tensor& x_in, const at::Tensor& a_h, const at::Tensor& a_w,
                         at::Tensor& out) {
  check_coord_factors(x_in, a_h, a_w, "coord_scale");
  check_cpu_dtype(x_in, "coord_scale", "x");
  check_like(out, x_in.sizes(), x_in, "coord_scale", "out");
  coord_scale_offset_cpu(dense_nchw_or_nhwc(x_in), a_h, a_w, 0.0, out, nullptr);
}

at::Tensor coord_scale_cpu(const at::Tensor& x_in, const at::Tensor& a_h, const at::Tensor& a_w) {
  check_nchw(x_in, "coord_scale", "x");
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  coord_scale_out_cpu(x, a_h, a_w, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> coord_scale_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& a_h,
    const at::Tensor& a_w) {
  return coord_scale_offset_backward_cpu(grad_out, x, a_h, a_w, 0.0, "coord_scale_backward",
                                         "grad_out");
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CPU, m) {
  m.impl("coord_scale", &coord_scale_cpu);
  m.impl("coord_scale_out", &coord_scale_out_cpu);
  m.impl("coord_scale_backward", &coord_scale_backward_cpu);
}

}  // namespace saffnet_fast

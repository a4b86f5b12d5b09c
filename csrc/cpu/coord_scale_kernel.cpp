// coord_scale CPU kernels (float32, float64).
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
#include <vector>

#include "../common/aff_fuse_checks.h"

namespace saffnet_fast {
namespace {

constexpr int64_t kChannelBlock = 64;

// One kernel for forward (grad == nullptr: out = x·(offset + a_h·a_w)) and backward (out =
// grad_x = grad·(offset + a_h·a_w), and the row/column sums into ga_h / ga_w, which the
// offset does not change). coord_scale: offset 0; aff_input: offset 1.
template <typename scalar_t>
void coord_scale_kernel(const at::Tensor& x, const at::Tensor& a_h, const at::Tensor& a_w,
                        const at::Tensor* grad, at::Tensor& out, at::Tensor* ga_h,
                        at::Tensor* ga_w, double offset_value = 0.0) {
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

  const bool channel_innermost = C > 1 && xc == 1;
  if (!channel_innermost) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * W));
    at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> aw(W), col(W);
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C;
        for (int64_t w = 0; w < W; ++w) aw[w] = static_cast<acc_t>(awp[n * wn + c * wc + w * ww]);
        std::fill(col.begin(), col.end(), acc_t(0));
        for (int64_t h = 0; h < H; ++h) {
          const acc_t ah = static_cast<acc_t>(ahp[n * hn + c * hc + h * hh]);
          const scalar_t* xr = xp + n * xn + c * xc + h * xh;
          scalar_t* orow = op + n * on + c * oc + h * oh;
          if (gp == nullptr) {
            for (int64_t w = 0; w < W; ++w)
              orow[w * ow] =
                  static_cast<scalar_t>(static_cast<acc_t>(xr[w * xw]) * (offset + ah * aw[w]));
          } else {
            const scalar_t* gr = gp + n * gn + c * gc + h * gh;
            acc_t row = 0;
            for (int64_t w = 0; w < W; ++w) {
              const acc_t g = static_cast<acc_t>(gr[w * gw]);
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
      }
    });
    return;
  }

  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ah(kChannelBlock * H), aw(kChannelBlock * W), rows(kChannelBlock * H),
        cols(kChannelBlock * W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * kChannelBlock;
      const int64_t cb = std::min(kChannelBlock, C - c0);
      // factors as [h][c] / [w][c] so the innermost loop runs over contiguous channels
      for (int64_t c = 0; c < cb; ++c) {
        for (int64_t h = 0; h < H; ++h)
          ah[h * kChannelBlock + c] = static_cast<acc_t>(ahp[n * hn + (c0 + c) * hc + h * hh]);
        for (int64_t w = 0; w < W; ++w)
          aw[w * kChannelBlock + c] = static_cast<acc_t>(awp[n * wn + (c0 + c) * wc + w * ww]);
      }
      std::fill(rows.begin(), rows.end(), acc_t(0));
      std::fill(cols.begin(), cols.end(), acc_t(0));
      for (int64_t h = 0; h < H; ++h) {
        const acc_t* ahr = ah.data() + h * kChannelBlock;
        for (int64_t w = 0; w < W; ++w) {
          const scalar_t* px = xp + n * xn + h * xh + w * xw + c0 * xc;
          scalar_t* po = op + n * on + h * oh + w * ow + c0 * oc;
          const acc_t* awr = aw.data() + w * kChannelBlock;
          if (gp == nullptr) {
            for (int64_t c = 0; c < cb; ++c)
              po[c * oc] =
                  static_cast<scalar_t>(static_cast<acc_t>(px[c]) * (offset + ahr[c] * awr[c]));
          } else {
            const scalar_t* pg = gp + n * gn + h * gh + w * gw + c0 * gc;
            acc_t* rowr = rows.data() + h * kChannelBlock;
            acc_t* colr = cols.data() + w * kChannelBlock;
            for (int64_t c = 0; c < cb; ++c) {
              const acc_t g = static_cast<acc_t>(pg[c * gc]);
              const acc_t gx = g * static_cast<acc_t>(px[c]);
              po[c * oc] = static_cast<scalar_t>(g * (offset + ahr[c] * awr[c]));
              rowr[c] += gx * awr[c];
              colr[c] += gx * ahr[c];
            }
          }
        }
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

void coord_scale_out_cpu(const at::Tensor& x_in, const at::Tensor& a_h, const at::Tensor& a_w,
                         at::Tensor& out) {
  check_coord_factors(x_in, a_h, a_w, "coord_scale");
  check_cpu_dtype(x_in, "coord_scale", "x");
  check_like(out, x_in.sizes(), x_in, "coord_scale", "out");
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "coord_scale_cpu", [&] {
    coord_scale_kernel<scalar_t>(x, a_h, a_w, nullptr, out, nullptr, nullptr);
  });
}

at::Tensor coord_scale_cpu(const at::Tensor& x_in, const at::Tensor& a_h, const at::Tensor& a_w) {
  check_nchw(x_in, "coord_scale", "x");
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  coord_scale_out_cpu(x, a_h, a_w, out);
  return out;
}

// (grad_x = grad·(offset + a_h·a_w), grad_a_h, grad_a_w) for coord_scale_backward (offset
// 0) and aff_input_backward (offset 1); `op` and `grad_name` name them in errors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> coord_scale_backward_with_offset(
    const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& a_h,
    const at::Tensor& a_w, double offset, const char* op, const char* grad_name) {
  check_coord_factors(x_in, a_h, a_w, op);
  check_cpu_dtype(x_in, op, "x");
  check_like(grad, x_in.sizes(), x_in, op, grad_name);
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(output_format(x)));
  at::Tensor ga_h = at::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  at::Tensor ga_w = at::empty({x.size(0), x.size(1), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "coord_scale_backward_cpu", [&] {
    coord_scale_kernel<scalar_t>(x, a_h, a_w, &grad, gx, &ga_h, &ga_w, offset);
  });
  return {gx, ga_h, ga_w};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> coord_scale_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& a_h,
    const at::Tensor& a_w) {
  return coord_scale_backward_with_offset(grad_out, x, a_h, a_w, 0.0, "coord_scale_backward",
                                          "grad_out");
}

// aff_input (schema: aff_combine.cpp): t = x·(1 + a_h ⊗ a_w), the coord_scale kernel with
// offset 1, written channel-major (aff_input_empty).
at::Tensor aff_input_cpu(const at::Tensor& x_in, const at::Tensor& a_h, const at::Tensor& a_w) {
  check_coord_factors(x_in, a_h, a_w, "aff_input");
  check_cpu_dtype(x_in, "aff_input", "x");
  const at::Tensor x = dense_nchw_or_nhwc(x_in);
  at::Tensor t = aff_input_empty(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aff_input_cpu", [&] {
    coord_scale_kernel<scalar_t>(x, a_h, a_w, nullptr, t, nullptr, nullptr, 1.0);
  });
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aff_input_backward_cpu(
    const at::Tensor& grad_t, const at::Tensor& x, const at::Tensor& a_h,
    const at::Tensor& a_w) {
  return coord_scale_backward_with_offset(grad_t, x, a_h, a_w, 1.0, "aff_input_backward",
                                          "grad_t");
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CPU, m) {
  m.impl("coord_scale", &coord_scale_cpu);
  m.impl("coord_scale_out", &coord_scale_out_cpu);
  m.impl("coord_scale_backward", &coord_scale_backward_cpu);
  m.impl("aff_input", &aff_input_cpu);
  m.impl("aff_input_backward", &aff_input_backward_cpu);
}

}  // namespace saffnet_fast

// coord_pool CPU kernels (float32, float64). Accumulation: in the input type on the
// contiguous-row path (8-way split row sums), in double on the strided paths.
//
// Minimum bytes moved: forward reads x once and writes N·C·(H+W) means; backward reads
// N·C·(H+W) gradients and writes N·C·H·W. One pass each.
//
// Strides: the forward reads x through its strides (no copy). Two loop orders:
//   * channel-innermost (channels_last) x: tasks over (n, block of channels), reading rows
//     of contiguous channels;
//   * anything else: tasks over (n, c) planes, reading each plane row by row.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/checks.h"
#include "../common/coord_pool.h"

namespace saffnet_fast {
namespace {

constexpr int64_t kChannelBlock = 64;

// Sums of one contiguous-row plane (sw == 1): row_sum[h] = Σ_w x[h, w], col[w] += x[h, w].
// Eight independent partial sums make the row reduction vectorisable without reassociation
// flags; compiled as AVX-512 / AVX2 / baseline clones.
template <typename scalar_t>
SAFFNET_ALWAYS_INLINE void plane_sums_body(const scalar_t* __restrict__ base, int64_t sh,
                                           int64_t H, int64_t W, scalar_t* __restrict__ row_sum,
                                           scalar_t* __restrict__ col) {
  constexpr int64_t kParts = 8;
  for (int64_t w = 0; w < W; ++w) col[w] = scalar_t(0);
  for (int64_t h = 0; h < H; ++h) {
    const scalar_t* __restrict__ r = base + h * sh;
    scalar_t part[kParts] = {};
    int64_t w = 0;
    for (; w + kParts <= W; w += kParts)
      for (int64_t k = 0; k < kParts; ++k) {
        part[k] += r[w + k];
        col[w + k] += r[w + k];
      }
    scalar_t total = 0;
    for (; w < W; ++w) {
      total += r[w];
      col[w] += r[w];
    }
    for (int64_t k = 0; k < kParts; ++k) total += part[k];
    row_sum[h] = total;
  }
}

SAFFNET_CPU_CLONES void plane_sums(const float* base, int64_t sh, int64_t H, int64_t W,
                                   float* row_sum, float* col) {
  plane_sums_body<float>(base, sh, H, W, row_sum, col);
}
SAFFNET_CPU_CLONES void plane_sums(const double* base, int64_t sh, int64_t H, int64_t W,
                                   double* row_sum, double* col) {
  plane_sums_body<double>(base, sh, H, W, row_sum, col);
}

template <typename scalar_t>
void coord_pool_forward_cpu(const at::Tensor& x, at::Tensor& pool_h, at::Tensor& pool_w) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const int64_t hn = pool_h.stride(0), hc = pool_h.stride(1), hh = pool_h.stride(2);
  const int64_t wn = pool_w.stride(0), wc = pool_w.stride(1), ww = pool_w.stride(2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* php = pool_h.mutable_data_ptr<scalar_t>();
  scalar_t* pwp = pool_w.mutable_data_ptr<scalar_t>();
  const acc_t inv_w = acc_t(1) / acc_t(W), inv_h = acc_t(1) / acc_t(H);

  const bool channel_innermost = C > 1 && sc == 1;
  if (channel_innermost) {
    const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
    at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(kChannelBlock), col(W * kChannelBlock);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, c0 = (task % blocks) * kChannelBlock;
        const int64_t cb = std::min(kChannelBlock, C - c0);
        std::fill(col.begin(), col.end(), acc_t(0));
        for (int64_t h = 0; h < H; ++h) {
          std::fill(row.begin(), row.end(), acc_t(0));
          for (int64_t w = 0; w < W; ++w) {
            const scalar_t* px = xp + n * sn + h * sh + w * sw + c0;
            acc_t* colw = col.data() + w * kChannelBlock;
            for (int64_t c = 0; c < cb; ++c) {
              const acc_t v = static_cast<acc_t>(px[c]);
              row[c] += v;
              colw[c] += v;
            }
          }
          for (int64_t c = 0; c < cb; ++c)
            php[n * hn + (c0 + c) * hc + h * hh] = static_cast<scalar_t>(row[c] * inv_w);
        }
        for (int64_t c = 0; c < cb; ++c)
          for (int64_t w = 0; w < W; ++w)
            pwp[n * wn + (c0 + c) * wc + w * ww] =
                static_cast<scalar_t>(col[w * kChannelBlock + c] * inv_h);
      }
    });
    return;
  }

  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * W));
  if (sw == 1) {
    // Rows contiguous (NCHW and most slices): float sums in float (the rows and columns of
    // SAFFNet's maps are ≤ a few hundred long), double in double.
    at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> row_sum(H), col(W);
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C;
        plane_sums(xp + n * sn + c * sc, sh, H, W, row_sum.data(), col.data());
        for (int64_t h = 0; h < H; ++h)
          php[n * hn + c * hc + h * hh] = static_cast<scalar_t>(row_sum[h] * inv_w);
        for (int64_t w = 0; w < W; ++w)
          pwp[n * wn + c * wc + w * ww] = static_cast<scalar_t>(col[w] * inv_h);
      }
    });
    return;
  }
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> col(W);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C, c = plane % C;
      const scalar_t* base = xp + n * sn + c * sc;
      std::fill(col.begin(), col.end(), acc_t(0));
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* r = base + h * sh;
        acc_t row = 0;
        for (int64_t w = 0; w < W; ++w) {
          const acc_t v = static_cast<acc_t>(r[w * sw]);
          row += v;
          col[w] += v;
        }
        php[n * hn + c * hc + h * hh] = static_cast<scalar_t>(row * inv_w);
      }
      for (int64_t w = 0; w < W; ++w)
        pwp[n * wn + c * wc + w * ww] = static_cast<scalar_t>(col[w] * inv_h);
    }
  });
}

void coord_pool_out_cpu(const at::Tensor& x, at::Tensor& pool_h, at::Tensor& pool_w) {
  check_nchw(x, "coord_pool", "x");
  check_cpu_dtype(x, "coord_pool", "x");
  check_like(pool_h, {x.size(0), x.size(1), x.size(2)}, x, "coord_pool", "pool_h");
  check_like(pool_w, {x.size(0), x.size(1), x.size(3)}, x, "coord_pool", "pool_w");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "coord_pool_cpu", [&] {
    coord_pool_forward_cpu<scalar_t>(x, pool_h, pool_w);
  });
}

std::tuple<at::Tensor, at::Tensor> coord_pool_cpu(const at::Tensor& x) {
  check_nchw(x, "coord_pool", "x");
  check_cpu_dtype(x, "coord_pool", "x");
  at::Tensor pool_h = at::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  at::Tensor pool_w = at::empty({x.size(0), x.size(1), x.size(3)}, x.options());
  coord_pool_out_cpu(x, pool_h, pool_w);
  return {pool_h, pool_w};
}

template <typename scalar_t>
void coord_pool_backward_kernel(const at::Tensor& gh, const at::Tensor& gw, at::Tensor& gx) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const int64_t N = gh.size(0), C = gh.size(1), H = gh.size(2), W = gw.size(2);
  const int64_t hn = gh.stride(0), hc = gh.stride(1), hh = gh.stride(2);
  const int64_t wn = gw.stride(0), wc = gw.stride(1), ww = gw.stride(2);
  const scalar_t* ghp = gh.const_data_ptr<scalar_t>();
  const scalar_t* gwp = gw.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  const acc_t inv_w = acc_t(1) / acc_t(W), inv_h = acc_t(1) / acc_t(H);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * W));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> col(W);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C, c = plane % C;
      for (int64_t w = 0; w < W; ++w) col[w] = static_cast<acc_t>(gwp[n * wn + c * wc + w * ww]);
      scalar_t* out = gxp + plane * H * W;
      for (int64_t h = 0; h < H; ++h) {
        const acc_t g = static_cast<acc_t>(ghp[n * hn + c * hc + h * hh]);
        for (int64_t w = 0; w < W; ++w)
          out[h * W + w] = static_cast<scalar_t>(coord_pool_grad(g, col[w], inv_w, inv_h));
      }
    }
  });
}

at::Tensor coord_pool_backward_cpu(const at::Tensor& grad_h, const at::Tensor& grad_w) {
  TORCH_CHECK_VALUE(grad_h.dim() == 3, "coord_pool_backward: grad_h: expected N×C×H, got shape ",
                    grad_h.sizes());
  TORCH_CHECK_VALUE(grad_w.dim() == 3 && grad_w.size(0) == grad_h.size(0) &&
                        grad_w.size(1) == grad_h.size(1),
                    "coord_pool_backward: grad_w: expected N×C×W with N, C of grad_h ",
                    grad_h.sizes(), ", got shape ", grad_w.sizes());
  check_cpu_dtype(grad_h, "coord_pool_backward", "grad_h");
  TORCH_CHECK_TYPE(grad_w.scalar_type() == grad_h.scalar_type(),
                   "coord_pool_backward: grad_w: expected dtype ", grad_h.scalar_type(), ", got ",
                   grad_w.scalar_type());
  at::Tensor gx = at::empty({grad_h.size(0), grad_h.size(1), grad_h.size(2), grad_w.size(2)},
                            grad_h.options());
  if (gx.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES(grad_h.scalar_type(), "coord_pool_backward_cpu", [&] {
    coord_pool_backward_kernel<scalar_t>(grad_h, grad_w, gx);
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CPU, m) {
  m.impl("coord_pool", &coord_pool_cpu);
  m.impl("coord_pool_out", &coord_pool_out_cpu);
  m.impl("coord_pool_backward", &coord_pool_backward_cpu);
}

}  // namespace saffnet_fast

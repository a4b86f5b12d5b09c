// split_resplice CPU forward (float32, float64), inference form. Op: csrc/split_resplice.cpp.
//
// Minimum bytes moved: read x once (slice 0 copied, slices 1..s-1 read by their step), write
// the output once, plus the carried channels (≤ C/2 per step) written and read back once.
// Passes: one per step (7 for s = 8), each over that step's c_j ≤ ~C/4 channels, so the
// whole op moves about as much as two full passes over x; no cat copies, no BN/activation
// passes (folded / applied in the conv's epilogue).
//
// Each step is a direct 3×3 convolution: tasks over (n, output row); for every input channel,
// tap and output channel, the inner loop runs over the row's pixels (vectorisable), zero
// padding by clipping the row range. Steps run in order (step j reads step j-1's carry).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/split_resplice.h"
#include "../common/split_resplice_checks.h"
#include "plane_ops.h"

namespace saffnet_fast {
namespace {

// Lanes of one 64-byte vector (AVX-512 register; two AVX2 or four SSE registers in the
// other clones): 16 floats or 8 doubles.
template <typename acc_t>
constexpr int64_t lanes() { return 64 / static_cast<int64_t>(sizeof(acc_t)); }

// One output row of one step, all output channels, from zero-padded input rows:
// padded[(i * 3 + ky) * Wp + 1 + w] = in_i[h+ky-1][w] (0 outside the image), Wp ≥ W + 2
// rounded so every vector chunk can be read whole. acc[o][w] = bias[o] + Σ_i Σ_taps
// k[o,i,ky,kx] · padded[i,ky][w + kx]; each chunk of acc stays in a vector register for the
// whole Σ (one store per output element). GCC vector extensions make the vectorisation
// explicit (auto-vectorisation of the scalar form was measured slower).
template <typename acc_t, int kOut>
SAFFNET_ALWAYS_INLINE void conv3x3_row_block(acc_t* __restrict__ acc,
                                             const acc_t* __restrict__ padded,
                                             const acc_t* __restrict__ wv,
                                             const acc_t* __restrict__ bv, int64_t o0,
                                             int64_t cj, int64_t Wp, int64_t W) {
  typedef acc_t vec_t __attribute__((vector_size(64)));
  constexpr int64_t L = lanes<acc_t>();
  for (int64_t w0 = 0; w0 < W; w0 += L) {
    vec_t a[kOut];
    for (int q = 0; q < kOut; ++q) a[q] = vec_t{} + bv[o0 + q];
    for (int64_t i = 0; i < cj; ++i) {
      for (int64_t ky = 0; ky < 3; ++ky) {
        const acc_t* r = padded + (i * 3 + ky) * Wp + w0;
        vec_t r0, r1, r2;
        std::memcpy(&r0, r, sizeof(vec_t));
        std::memcpy(&r1, r + 1, sizeof(vec_t));
        std::memcpy(&r2, r + 2, sizeof(vec_t));
        for (int q = 0; q < kOut; ++q) {
          const acc_t* k = wv + ((o0 + q) * cj + i) * 9 + ky * 3;
          a[q] += k[0] * r0 + k[1] * r1 + k[2] * r2;
        }
      }
    }
    const int64_t valid = std::min<int64_t>(L, W - w0);
    for (int q = 0; q < kOut; ++q) {
      acc_t out[L];
      std::memcpy(out, &a[q], sizeof(vec_t));
      for (int64_t t = 0; t < valid; ++t) acc[(o0 + q) * W + w0 + t] = out[t];
    }
  }
}

// Output channels in blocks of 8 (the three input vectors loaded per tap row serve 8
// outputs: 24 FMAs per 3 loads; 8 accumulators + 3 inputs fit AVX-512's 32 registers), the
// remainder (SAFFNet's widths are 7, 15, 31, …) as one block of its own size rather than
// single channels, which would be load-bound.
template <typename acc_t>
SAFFNET_ALWAYS_INLINE void conv3x3_row(acc_t* __restrict__ acc, const acc_t* __restrict__ padded,
                                       const acc_t* __restrict__ wv,
                                       const acc_t* __restrict__ bv, int64_t cj, int64_t Wp,
                                       int64_t W) {
  int64_t o = 0;
  for (; o + 8 <= cj; o += 8) conv3x3_row_block<acc_t, 8>(acc, padded, wv, bv, o, cj, Wp, W);
  switch (cj - o) {
    case 7: conv3x3_row_block<acc_t, 7>(acc, padded, wv, bv, o, cj, Wp, W); break;
    case 6: conv3x3_row_block<acc_t, 6>(acc, padded, wv, bv, o, cj, Wp, W); break;
    case 5: conv3x3_row_block<acc_t, 5>(acc, padded, wv, bv, o, cj, Wp, W); break;
    case 4: conv3x3_row_block<acc_t, 4>(acc, padded, wv, bv, o, cj, Wp, W); break;
    case 3: conv3x3_row_block<acc_t, 3>(acc, padded, wv, bv, o, cj, Wp, W); break;
    case 2: conv3x3_row_block<acc_t, 2>(acc, padded, wv, bv, o, cj, Wp, W); break;
    case 1: conv3x3_row_block<acc_t, 1>(acc, padded, wv, bv, o, cj, Wp, W); break;
    default: break;
  }
}

SAFFNET_CPU_CLONES void conv3x3_row_clones(float* acc, const float* padded, const float* wv,
                                           const float* bv, int64_t cj, int64_t Wp, int64_t W) {
  conv3x3_row<float>(acc, padded, wv, bv, cj, Wp, W);
}
SAFFNET_CPU_CLONES void conv3x3_row_clones(double* acc, const double* padded, const double* wv,
                                           const double* bv, int64_t cj, int64_t Wp, int64_t W) {
  conv3x3_row<double>(acc, padded, wv, bv, cj, Wp, W);
}

template <typename scalar_t>
void split_resplice_forward_kernel(const at::Tensor& x, at::TensorList weights,
                                   at::TensorList biases, double negative_slope,
                                   const std::vector<SplitRespliceStep>& plan, at::Tensor& out,
                                   at::Tensor& carries) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t CC = carries.size(1);
  const int64_t w0 = C / (static_cast<int64_t>(plan.size()) + 1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();  // contiguous NCHW
  scalar_t* op = out.mutable_data_ptr<scalar_t>();     // contiguous NCHW
  scalar_t* cp = carries.mutable_data_ptr<scalar_t>(); // contiguous NCHW
  const acc_t slope = static_cast<acc_t>(negative_slope);

  // Slice 0 goes straight to the output.
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      std::copy(xp + n * C * HW, xp + (n * C + w0) * HW, op + n * C * HW);
  });

  for (size_t j = 0; j < plan.size(); ++j) {
    const SplitRespliceStep& s = plan[j];
    const int64_t cj = s.width;
    const at::Tensor wt = weights[j].contiguous(), bt = biases[j].contiguous();
    std::vector<acc_t> wv(wt.const_data_ptr<scalar_t>(), wt.const_data_ptr<scalar_t>() + wt.numel());
    std::vector<acc_t> bv(bt.const_data_ptr<scalar_t>(), bt.const_data_ptr<scalar_t>() + cj);
    // Tasks: (n, output row). A task computes every output channel of its row, so each
    // input row is read once per tap for all outputs while it sits in L1, and a batch of
    // one still has H tasks to share between threads.
    at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
      constexpr int64_t L = lanes<acc_t>();
      const int64_t Wp = ((W + L - 1) / L) * L + 2;
      std::vector<acc_t> acc(cj * W), padded(cj * 3 * Wp, acc_t(0));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / H, h = task % H;
        for (int64_t i = 0; i < cj; ++i) {
          // input i: slice j+1 of x for i < w0, else carry(j-1)
          const scalar_t* src = i < w0 ? xp + (n * C + s.x_offset + i) * HW
                                       : cp + (n * CC + s.carry_in + (i - w0)) * HW;
          for (int64_t ky = 0; ky < 3; ++ky) {
            acc_t* dst = padded.data() + (i * 3 + ky) * Wp + 1;
            const int64_t hh = h + ky - 1;
            if (hh < 0 || hh >= H) {
              std::fill(dst, dst + W, acc_t(0));
            } else {
              for (int64_t w = 0; w < W; ++w) dst[w] = static_cast<acc_t>(src[hh * W + w]);
            }
          }
        }
        conv3x3_row_clones(acc.data(), padded.data(), wv.data(), bv.data(), cj, Wp, W);
        for (int64_t o = 0; o < cj; ++o) {
          scalar_t* dst = (o < s.keep ? op + (n * C + s.out_offset + o) * HW
                                      : cp + (n * CC + s.carry_out + (o - s.keep)) * HW) + h * W;
          bn_leaky_relu_plane<acc_t, scalar_t, acc_t>(acc.data() + o * W, dst, W, acc_t(1),
                                                      acc_t(0), slope, nullptr);
        }
      }
    });
  }
}

void split_resplice_out_cpu(const at::Tensor& x_in, at::TensorList weights,
                            at::TensorList biases, double negative_slope, at::Tensor& out,
                            at::Tensor& carries) {
  const std::vector<int64_t> widths = check_split_resplice_args(x_in, weights, biases);
  check_cpu_dtype(x_in, "split_resplice", "x");
  const auto plan = split_resplice_plan(x_in.size(1), widths);
  check_split_resplice_outputs(x_in, split_resplice_carry_channels(plan), out, carries);
  const at::Tensor x = x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "split_resplice_cpu", [&] {
    split_resplice_forward_kernel<scalar_t>(x, weights, biases, negative_slope, plan, out,
                                            carries);
  });
}

std::tuple<at::Tensor, at::Tensor> split_resplice_cpu(const at::Tensor& x,
                                                      at::TensorList weights,
                                                      at::TensorList biases,
                                                      double negative_slope) {
  const std::vector<int64_t> widths = check_split_resplice_args(x, weights, biases);
  const auto plan = split_resplice_plan(x.size(1), widths);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor carries = at::empty(
      {x.size(0), split_resplice_carry_channels(plan), x.size(2), x.size(3)}, x.options());
  split_resplice_out_cpu(x, weights, biases, negative_slope, out, carries);
  return {out, carries};
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CPU, m) {
  m.impl("split_resplice", &split_resplice_cpu);
  m.impl("split_resplice_out", &split_resplice_out_cpu);
}

}  // namespace saffnet_fast

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
#include <type_traits>
#include <vector>

#include "../common/split_resplice.h"
#include "../common/split_resplice_checks.h"
#include "plane_ops.h"
#include "tile_gemm.h"  // UnalignedVec

namespace saffnet_fast {
namespace {

// Lanes of one 64-byte vector (AVX-512 register; two AVX2 or four SSE registers in the
// other clones): 16 floats or 8 doubles.
template <typename acc_t>
constexpr int64_t lanes() { return 64 / static_cast<int64_t>(sizeof(acc_t)); }

// One output row of one step, all output channels, from zero-padded input rows:
// padded[(i * 3 + ky) * Wp + 1 + w] = in_i[h+ky-1][w] (0 outside the image), Wp ≥ W + 2
// rounded so every vector chunk can be read whole. acc[o][w] = bias[o] + Σ_i Σ_taps
// k[o,i,ky,kx] · padded[i,ky][w + kx]. A block computes kOut output channels over kChunks
// vector chunks of the row (pixels w0 .. w0 + kChunks·L), every accumulator in a register for
// the whole Σ (one store per output element). GCC vector extensions make the vectorisation
// explicit (auto-vectorisation of the scalar form was measured slower).
//
// Why several chunks per block: each weight is one broadcast load, used by one FMA per chunk.
// With one chunk and 8 outputs a tap row took 3 row loads + 24 broadcast loads for 24 FMAs,
// load-port-bound; 3 chunks × 6 outputs take 9 + 18 loads for 54 FMAs. Registers:
// kOut·kChunks accumulators + 3·kChunks row vectors + 1 ≤ 32 (AVX-512).
template <typename acc_t, int kOut, int kChunks>
SAFFNET_ALWAYS_INLINE void conv3x3_row_block(acc_t* __restrict__ acc,
                                             const acc_t* __restrict__ padded,
                                             const acc_t* __restrict__ wv,
                                             const acc_t* __restrict__ bv, int64_t o0,
                                             int64_t cj, int64_t Wp, int64_t W, int64_t w0) {
  typedef acc_t vec_t __attribute__((vector_size(64)));
  using uvec_t = typename UnalignedVec<acc_t>::type;
  constexpr int64_t L = lanes<acc_t>();
  vec_t a[kOut][kChunks];
#pragma GCC unroll 8
  for (int q = 0; q < kOut; ++q)
#pragma GCC unroll 3
    for (int u = 0; u < kChunks; ++u) a[q][u] = vec_t{} + bv[o0 + q];
  for (int64_t i = 0; i < cj; ++i) {
    for (int64_t ky = 0; ky < 3; ++ky) {
      const acc_t* r = padded + (i * 3 + ky) * Wp + w0;
      vec_t r0[kChunks], r1[kChunks], r2[kChunks];
#pragma GCC unroll 3
      for (int u = 0; u < kChunks; ++u) {
        r0[u] = *reinterpret_cast<const uvec_t*>(r + u * L);
        r1[u] = *reinterpret_cast<const uvec_t*>(r + u * L + 1);
        r2[u] = *reinterpret_cast<const uvec_t*>(r + u * L + 2);
      }
      // Three dependent FMAs per accumulator: written as a += k0·r0 + k1·r1 + k2·r2, GCC
      // (no reassociation) emitted mul, fma, fma, add: 4 vector ops per 3 MACs.
#pragma GCC unroll 8
      for (int q = 0; q < kOut; ++q) {
        const acc_t* k = wv + ((o0 + q) * cj + i) * 9 + ky * 3;
        // scalar · vector: one broadcast per weight, shared by the chunks (vec_t{} + k
        // instead cost a scalar add of 0, which IEEE signed zeros keep, before each).
        const acc_t k0 = k[0], k1 = k[1], k2 = k[2];
#pragma GCC unroll 3
        for (int u = 0; u < kChunks; ++u) {
          a[q][u] += k0 * r0[u];
          a[q][u] += k1 * r1[u];
          a[q][u] += k2 * r2[u];
        }
      }
    }
  }
#pragma GCC unroll 3
  for (int u = 0; u < kChunks; ++u) {
    const int64_t ws = w0 + u * L;
    const int64_t valid = std::min<int64_t>(L, W - ws);
#pragma GCC unroll 8
    for (int q = 0; q < kOut; ++q) {
      acc_t* dst = acc + (o0 + q) * W + ws;
      if (valid == L) {
        *reinterpret_cast<uvec_t*>(dst) = a[q][u];
      } else {
        for (int64_t t = 0; t < valid; ++t) dst[t] = a[q][u][t];
      }
    }
  }
}

// All output channels over kChunks chunks from w0: blocks of kMaxOut outputs (kMaxOut from
// the register budget above), the remainder (SAFFNet's widths are 7, 15, 31, …) as one block
// of its own size rather than single channels, which would be load-bound.
template <typename acc_t, int kChunks>
SAFFNET_ALWAYS_INLINE void conv3x3_row_chunks(acc_t* __restrict__ acc,
                                              const acc_t* __restrict__ padded,
                                              const acc_t* __restrict__ wv,
                                              const acc_t* __restrict__ bv, int64_t cj,
                                              int64_t Wp, int64_t W, int64_t w0) {
  constexpr int kMaxOut = kChunks == 3 ? 6 : 8;
  int64_t o = 0;
  for (; o + kMaxOut <= cj; o += kMaxOut)
    conv3x3_row_block<acc_t, kMaxOut, kChunks>(acc, padded, wv, bv, o, cj, Wp, W, w0);
  switch (cj - o) {
#define SAFFNET_CONV_REMAINDER(K)                                                        \
  case K:                                                                                \
    if constexpr (K < kMaxOut)                                                           \
      conv3x3_row_block<acc_t, K, kChunks>(acc, padded, wv, bv, o, cj, Wp, W, w0);       \
    break;
    SAFFNET_CONV_REMAINDER(7)
    SAFFNET_CONV_REMAINDER(6)
    SAFFNET_CONV_REMAINDER(5)
    SAFFNET_CONV_REMAINDER(4)
    SAFFNET_CONV_REMAINDER(3)
    SAFFNET_CONV_REMAINDER(2)
    SAFFNET_CONV_REMAINDER(1)
#undef SAFFNET_CONV_REMAINDER
    default: break;
  }
}

// The row in groups of up to three chunks (four remaining chunks as 2 + 2, not 3 + 1).
template <typename acc_t>
SAFFNET_ALWAYS_INLINE void conv3x3_row(acc_t* __restrict__ acc, const acc_t* __restrict__ padded,
                                       const acc_t* __restrict__ wv,
                                       const acc_t* __restrict__ bv, int64_t cj, int64_t Wp,
                                       int64_t W) {
  constexpr int64_t L = lanes<acc_t>();
  for (int64_t w0 = 0; w0 < W;) {
    const int64_t chunks = (W - w0 + L - 1) / L;
    if (chunks >= 3 && chunks != 4) {
      conv3x3_row_chunks<acc_t, 3>(acc, padded, wv, bv, cj, Wp, W, w0);
      w0 += 3 * L;
    } else if (chunks >= 2) {
      conv3x3_row_chunks<acc_t, 2>(acc, padded, wv, bv, cj, Wp, W, w0);
      w0 += 2 * L;
    } else {
      conv3x3_row_chunks<acc_t, 1>(acc, padded, wv, bv, cj, Wp, W, w0);
      w0 += L;
    }
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
  static_assert(std::is_same<acc_t, scalar_t>::value, "CPU kernels: float or double");
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
        // The row's output lines, one per output plane, are fetched for writing while the
        // convolution runs: the epilogue's stores otherwise stalled on their misses (~30% of
        // the step's time at batch 8).
        for (int64_t o = 0; o < cj; ++o) {
          const char* dst = reinterpret_cast<const char*>(
              (o < s.keep ? op + (n * C + s.out_offset + o) * HW
                          : cp + (n * CC + s.carry_out + (o - s.keep)) * HW) + h * W);
          for (int64_t b = 0; b < W * static_cast<int64_t>(sizeof(scalar_t)); b += 64)
            __builtin_prefetch(dst + b, 1, 3);
        }
        for (int64_t i = 0; i < cj; ++i) {
          // input i: slice j+1 of x for i < w0, else carry(j-1)
          const scalar_t* src = i < w0 ? xp + (n * C + s.x_offset + i) * HW
                                       : cp + (n * CC + s.carry_in + (i - w0)) * HW;
          // The next task's new input row (h + 2), fetched ahead: these copies otherwise
          // stalled on every input plane's miss (~half the step's non-convolution time).
          if (h + 2 < H) {
            const char* next = reinterpret_cast<const char*>(src + (h + 2) * W);
            for (int64_t b = 0; b < W * static_cast<int64_t>(sizeof(scalar_t)); b += 64)
              __builtin_prefetch(next + b, 0, 3);
          }
          for (int64_t ky = 0; ky < 3; ++ky) {
            acc_t* dst = padded.data() + (i * 3 + ky) * Wp + 1;
            const int64_t hh = h + ky - 1;
            if (hh < 0 || hh >= H) {
              std::fill(dst, dst + W, acc_t(0));
            } else {
              std::memcpy(dst, src + hh * W, sizeof(acc_t) * W);  // scalar_t == acc_t on CPU
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

// Small GEMM on pixel tiles used by the CPU attention kernels:
//   out[j][p] = bias[j] + Σ_c a[j][c] · b[c][p]      (j < rows, c < inner, p < kTile)
// with b and out in [row][kTile] layout. The pixel dimension is held in 64-byte vectors
// (GCC vector extensions) and eight (then four) output rows share every loaded b vector.
// Compiled as function clones for AVX-512 / AVX2 / baseline (SAFFNET_CPU_CLONES).
#pragma once

#include <cstdint>
#include <cstring>

#include "../common/macros.h"

namespace saffnet_fast {

constexpr int64_t kTile = 32;  // pixels per tile: 2 AVX-512 float vectors, 4 double vectors

// A 64-byte vector of acc_t that may sit at any acc_t-aligned address and alias acc_t data:
// loads and stores through it are plain vector moves. (memcpy into local vector arrays made
// GCC 12 keep tile_gemm's sixteen accumulators in memory, storing all of them to the stack on
// every step of the inner loop: 74 GFLOP/s on one Sapphire Rapids core; see tile_gemm.)
typedef float unaligned_vfloat __attribute__((vector_size(64), aligned(4), may_alias));
typedef double unaligned_vdouble __attribute__((vector_size(64), aligned(8), may_alias));
template <typename acc_t>
struct UnalignedVec;
template <>
struct UnalignedVec<float> {
  using type = unaligned_vfloat;
};
template <>
struct UnalignedVec<double> {
  using type = unaligned_vdouble;
};

template <typename acc_t, int kRows>
SAFFNET_ALWAYS_INLINE void tile_gemm_block(acc_t* __restrict__ out, const acc_t* __restrict__ a,
                                           const acc_t* __restrict__ bias,
                                           const acc_t* __restrict__ b, int64_t j0,
                                           int64_t inner) {
  typedef acc_t vec_t __attribute__((vector_size(64)));
  using uvec_t = typename UnalignedVec<acc_t>::type;
  constexpr int64_t L = 64 / static_cast<int64_t>(sizeof(acc_t));
  constexpr int64_t V = kTile / L;
  vec_t acc[kRows][V];
  for (int r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < V; ++v) acc[r][v] = vec_t{} + (bias ? bias[j0 + r] : acc_t(0));
  for (int64_t c = 0; c < inner; ++c) {
    vec_t bv[V];
    for (int64_t v = 0; v < V; ++v)
      bv[v] = *reinterpret_cast<const uvec_t*>(b + c * kTile + v * L);
    for (int r = 0; r < kRows; ++r) {
      const acc_t s = a[(j0 + r) * inner + c];
      for (int64_t v = 0; v < V; ++v) acc[r][v] += s * bv[v];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < V; ++v)
      *reinterpret_cast<uvec_t*>(out + (j0 + r) * kTile + v * L) = acc[r][v];
}

template <typename acc_t>
SAFFNET_ALWAYS_INLINE void tile_gemm_body(acc_t* out, const acc_t* a, const acc_t* bias,
                                          const acc_t* b, int64_t rows, int64_t inner) {
  // 8 output rows per block: 16 accumulator vectors (float) share each loaded b vector.
  int64_t j = 0;
  for (; j + 8 <= rows; j += 8) tile_gemm_block<acc_t, 8>(out, a, bias, b, j, inner);
  for (; j + 4 <= rows; j += 4) tile_gemm_block<acc_t, 4>(out, a, bias, b, j, inner);
  for (; j < rows; ++j) tile_gemm_block<acc_t, 1>(out, a, bias, b, j, inner);
}

SAFFNET_CPU_CLONES inline void tile_gemm(float* out, const float* a, const float* bias,
                                         const float* b, int64_t rows, int64_t inner) {
  tile_gemm_body<float>(out, a, bias, b, rows, inner);
}
SAFFNET_CPU_CLONES inline void tile_gemm(double* out, const double* a, const double* bias,
                                         const double* b, int64_t rows, int64_t inner) {
  tile_gemm_body<double>(out, a, bias, b, rows, inner);
}

// Weight gradients of a 1×1 conv over one tile, kept per SIMD lane:
//   lanes[r][k][l] += Σ_v a[r][v·L + l] · b[k][v·L + l]      (r < rows, k < cols, l < L)
// with a, b in [row][kTile] layout and L = 64 bytes of acc_t, the lanes summed once per
// parallel chunk (lane_sums) instead of one horizontal reduction per (r, k) and tile.
// SCAFF(64), batch 8, 64×48, 2 threads: aff_moments_backward 9.6 → 6.6 ms and
// aff_fuse_backward 16.7 → 12.1 ms, of which leaving the weight gradients out entirely had
// saved 4.5 and 6.2 ms.
template <typename acc_t>
SAFFNET_ALWAYS_INLINE void tile_outer_accumulate_body(acc_t* __restrict__ lanes,
                                                      const acc_t* __restrict__ a,
                                                      const acc_t* __restrict__ b,
                                                      int64_t rows, int64_t cols) {
  typedef acc_t vec_t __attribute__((vector_size(64)));
  constexpr int64_t L = 64 / static_cast<int64_t>(sizeof(acc_t));
  constexpr int64_t V = kTile / L;
  using uvec_t = typename UnalignedVec<acc_t>::type;
  for (int64_t r = 0; r < rows; ++r) {
    vec_t av[V];
    for (int64_t v = 0; v < V; ++v) av[v] = *reinterpret_cast<const uvec_t*>(a + r * kTile + v * L);
    acc_t* lane_row = lanes + r * cols * L;
    for (int64_t k = 0; k < cols; ++k) {
      vec_t acc = *reinterpret_cast<const uvec_t*>(lane_row + k * L);
      for (int64_t v = 0; v < V; ++v)
        acc += av[v] * *reinterpret_cast<const uvec_t*>(b + k * kTile + v * L);
      *reinterpret_cast<uvec_t*>(lane_row + k * L) = acc;
    }
  }
}

SAFFNET_CPU_CLONES inline void tile_outer_accumulate(float* lanes, const float* a,
                                                     const float* b, int64_t rows,
                                                     int64_t cols) {
  tile_outer_accumulate_body<float>(lanes, a, b, rows, cols);
}
SAFFNET_CPU_CLONES inline void tile_outer_accumulate(double* lanes, const double* a,
                                                     const double* b, int64_t rows,
                                                     int64_t cols) {
  tile_outer_accumulate_body<double>(lanes, a, b, rows, cols);
}

// out[i] += Σ_l lanes[i][l] for i < count: the per-lane sums of tile_outer_accumulate.
template <typename acc_t>
void lane_sums(const acc_t* lanes, int64_t count, acc_t* out) {
  constexpr int64_t L = 64 / static_cast<int64_t>(sizeof(acc_t));
  for (int64_t i = 0; i < count; ++i) {
    acc_t s = 0;
    for (int64_t l = 0; l < L; ++l) s += lanes[i * L + l];
    out[i] += s;
  }
}

}  // namespace saffnet_fast

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

// Weight gradients of a 1×1 conv over one tile:
//   out[r][k] += Σ_p a[r][p] · b[k][p]      (r < rows, k < cols, p < kTile)
// with a, b in [row][kTile] layout and out a rows × cols_pad accumulator (cols_pad: cols
// rounded up to whole 64-byte vectors; the padding columns stay zero). b is first transposed
// into bt[p][k] (scratch, kTile × cols_pad), so this is a small GEMM whose output block (up to
// 8 rows × 2 vectors of columns) stays in registers for the whole Σ over the tile's pixels
// and is read and written once per tile.
// Why not per-lane partial sums (lanes[r][k][l] += a·b over each vector lane, summed once per
// chunk, the earlier form): the lane buffer is 16× the weight (Ci·C·16 floats: 256 KiB per
// weight at C = 128, Ci = 32) and every tile read and wrote all of it, so the weight
// gradients ran at L2 speed. Measured, 2 threads, batch 8: aff_fuse_backward 1.11 → 0.81 ms
// for SCAFF(128) at 16×12 and 4.3 → 3.9 ms for SCAFF(64) at 64×48.
inline int64_t padded_cols(int64_t cols, int64_t lanes) {
  return (cols + lanes - 1) / lanes * lanes;
}

template <typename acc_t, int kRows, int kVecs>
SAFFNET_ALWAYS_INLINE void outer_block(acc_t* __restrict__ out, const acc_t* __restrict__ a,
                                       const acc_t* __restrict__ bt, int64_t r0, int64_t k0,
                                       int64_t cols_pad) {
  typedef acc_t vec_t __attribute__((vector_size(64)));
  using uvec_t = typename UnalignedVec<acc_t>::type;
  constexpr int64_t L = 64 / static_cast<int64_t>(sizeof(acc_t));
  vec_t acc[kRows][kVecs];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v)
      acc[r][v] = *reinterpret_cast<const uvec_t*>(out + (r0 + r) * cols_pad + k0 + v * L);
  for (int64_t p = 0; p < kTile; ++p) {
    vec_t bv[kVecs];
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v)
      bv[v] = *reinterpret_cast<const uvec_t*>(bt + p * cols_pad + k0 + v * L);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const acc_t s = a[(r0 + r) * kTile + p];
#pragma GCC unroll 2
      for (int v = 0; v < kVecs; ++v) acc[r][v] += s * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v)
      *reinterpret_cast<uvec_t*>(out + (r0 + r) * cols_pad + k0 + v * L) = acc[r][v];
}

template <typename acc_t, int kRows>
SAFFNET_ALWAYS_INLINE void outer_rows(acc_t* __restrict__ out, const acc_t* __restrict__ a,
                                      const acc_t* __restrict__ bt, int64_t r0,
                                      int64_t cols_pad) {
  constexpr int64_t L = 64 / static_cast<int64_t>(sizeof(acc_t));
  int64_t k0 = 0;
  for (; k0 + 2 * L <= cols_pad; k0 += 2 * L)
    outer_block<acc_t, kRows, 2>(out, a, bt, r0, k0, cols_pad);
  if (k0 < cols_pad) outer_block<acc_t, kRows, 1>(out, a, bt, r0, k0, cols_pad);
}

template <typename acc_t>
SAFFNET_ALWAYS_INLINE void tile_outer_accumulate_body(acc_t* __restrict__ out,
                                                      const acc_t* __restrict__ a,
                                                      const acc_t* __restrict__ b,
                                                      acc_t* __restrict__ bt, int64_t rows,
                                                      int64_t cols) {
  constexpr int64_t L = 64 / static_cast<int64_t>(sizeof(acc_t));
  const int64_t cols_pad = padded_cols(cols, L);
  for (int64_t p = 0; p < kTile; ++p) {
    acc_t* btp = bt + p * cols_pad;
    for (int64_t k = 0; k < cols; ++k) btp[k] = b[k * kTile + p];
    for (int64_t k = cols; k < cols_pad; ++k) btp[k] = acc_t(0);
  }
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) outer_rows<acc_t, 8>(out, a, bt, r, cols_pad);
  for (; r + 4 <= rows; r += 4) outer_rows<acc_t, 4>(out, a, bt, r, cols_pad);
  for (; r < rows; ++r) outer_rows<acc_t, 1>(out, a, bt, r, cols_pad);
}

SAFFNET_CPU_CLONES inline void tile_outer_accumulate(float* out, const float* a, const float* b,
                                                     float* bt, int64_t rows, int64_t cols) {
  tile_outer_accumulate_body<float>(out, a, b, bt, rows, cols);
}
SAFFNET_CPU_CLONES inline void tile_outer_accumulate(double* out, const double* a,
                                                     const double* b, double* bt, int64_t rows,
                                                     int64_t cols) {
  tile_outer_accumulate_body<double>(out, a, b, bt, rows, cols);
}

// grad[r·cols + k] += acc[r·cols_pad + k]: a padded accumulator of tile_outer_accumulate
// added to a rows × cols gradient.
template <typename acc_t>
void add_unpadded(const acc_t* acc, int64_t rows, int64_t cols, acc_t* grad) {
  constexpr int64_t L = 64 / static_cast<int64_t>(sizeof(acc_t));
  const int64_t cols_pad = padded_cols(cols, L);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k) grad[r * cols + k] += acc[r * cols_pad + k];
}

}  // namespace saffnet_fast

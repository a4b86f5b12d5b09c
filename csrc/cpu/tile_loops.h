// The per-element loops of the CPU attention kernels' pixel tiles (aff_tile.h): loading x and
// m = a_h·a_w into [channel][pixel] buffers, ReLU and its mask, the input gradients and their
// reductions onto a_h and a_w, and per-channel sums.
//
// Why a file of its own: these loops were written inline in the kernels' at::parallel_for
// bodies, which GCC compiles for the baseline x86-64 (SSE2) only, and they indexed every pixel
// through per-pixel (h, w) tables and scattered into grad_a_h / grad_a_w one element at a time,
// so they stayed scalar. Here each is a function compiled as AVX-512 / AVX2 / baseline clones
// (SAFFNET_CPU_CLONES), walks the tile by row segments (a run of pixels in one image row, where
// a_h is one scalar and x, a_w are unit-stride in NCHW), and uses `omp simd` reductions, which
// vectorise a sum without -ffast-math's licence to reassociate anything else.
// Measured on SCAFF(64), batch 8, 64×48, 2 threads, aff_fuse_backward: 10.3 ms before; the
// loops alone left it at 10.3 (the time moved to the stalls on x: a tile reads 64 channel
// planes at once, more streams than the hardware prefetcher follows); + prefetch_tile_ahead
// 5.5 ms; + tile_gemm's accumulators in registers (tile_gemm.h) 4.3 ms. Simply compiling the
// old loops with -march=native made the backward 2× slower (GCC turned the per-pixel scatters
// into AVX-512 gathers/scatters).
//
// CPU kernels compute in their scalar type (float or double), so every function here has a
// float and a double overload, both instantiating one always-inline template body.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../common/macros.h"
#include "tile_gemm.h"  // kTile

namespace saffnet_fast {

// Pixels p .. p+len−1 of a tile are the image pixels (h, w0 .. w0+len−1).
struct RowSegment {
  int64_t h, w0, p, len;
};

// Splits the tile of np pixels starting at flat pixel p0 (row length W) into row segments;
// returns their count (at most np).
inline int64_t row_segments(RowSegment* seg, int64_t p0, int64_t np, int64_t W) {
  int64_t count = 0;
  for (int64_t p = 0; p < np;) {
    const int64_t pix = p0 + p, w0 = pix % W;
    const int64_t len = std::min(W - w0, np - p);
    seg[count++] = RowSegment{pix / W, w0, p, len};
    p += len;
  }
  return count;
}

// Prefetches, in one channel plane, the tile two tiles ahead of `tile_start` (x86 prefetches
// never fault, so running past the plane's end is harmless).
template <int kWrite = 0, typename T>
SAFFNET_ALWAYS_INLINE void prefetch_tile_ahead(const T* tile_start) {
  const char* ahead = reinterpret_cast<const char*>(tile_start + 2 * kTile);
  for (int64_t b = 0; b < kTile * static_cast<int64_t>(sizeof(T)); b += 64)
    __builtin_prefetch(ahead + b, kWrite, 3);
}

// A plane of one (n, c) of an N×C×H×W tensor (element (h, w) at base[h·sh + w·sw]), and of a
// factor tensor (element l at base[l·sl]).
template <typename T>
struct PlaneRef {
  T* base;
  int64_t sh, sw;
};
template <typename T>
struct LineRef {
  T* base;
  int64_t sl;
};

// The tile's pixels as one run of memory when the plane's rows are dense (NCHW: tiles are
// flat pixel ranges, so consecutive row segments continue each other), else null. Copies
// through it are one vector loop over the tile instead of a memcpy call per row segment:
// at W = 12 a 32-pixel tile is 3–4 segments, and those calls were 7% of
// aff_fuse_backward (SCAFF(128), 8×16×12, 1 thread).
template <typename T>
SAFFNET_ALWAYS_INLINE T* tile_run(PlaneRef<T> plane, const RowSegment* seg, int64_t nseg) {
  if (plane.sw != 1 || (nseg > 1 && plane.sh != seg[0].w0 + seg[0].len)) return nullptr;
  return plane.base + seg[0].h * plane.sh + seg[0].w0;
}

// ----------------------------------------------------------------------------------------
// Forward: X = x, M = a_h·a_w, T = x·(1 + m) for the tile's pixels of channel c (kTile row).
// ----------------------------------------------------------------------------------------
template <typename T>
SAFFNET_ALWAYS_INLINE void load_channel_body(T* __restrict__ X, T* __restrict__ M,
                                             T* __restrict__ Tt, PlaneRef<const T> x,
                                             LineRef<const T> a_h, LineRef<const T> a_w,
                                             const RowSegment* seg, int64_t nseg) {
  for (int64_t s = 0; s < nseg; ++s) {
    const RowSegment g = seg[s];
    const T ah = a_h.base[g.h * a_h.sl];
    const T* __restrict__ xr = x.base + g.h * x.sh + g.w0 * x.sw;
    const T* __restrict__ awr = a_w.base + g.w0 * a_w.sl;
    T* __restrict__ Xs = X + g.p;
    T* __restrict__ Ms = M + g.p;
    T* __restrict__ Ts = Tt + g.p;
    if (x.sw == 1 && a_w.sl == 1) {  // NCHW x, contiguous a_w (SCAFF)
#pragma omp simd
      for (int64_t q = 0; q < g.len; ++q) {
        const T xv = xr[q], mv = ah * awr[q];
        Xs[q] = xv;
        Ms[q] = mv;
        Ts[q] = xv + xv * mv;
      }
    } else if (x.sw == 1 && a_w.sl == 0) {  // NCHW x, a_w broadcast (SAWF: m = gate)
      const T mv = ah * awr[0];
#pragma omp simd
      for (int64_t q = 0; q < g.len; ++q) {
        const T xv = xr[q];
        Xs[q] = xv;
        Ms[q] = mv;
        Ts[q] = xv + xv * mv;
      }
    } else {  // channels_last or other strides
      for (int64_t q = 0; q < g.len; ++q) {
        const T xv = xr[q * x.sw], mv = ah * awr[q * a_w.sl];
        Xs[q] = xv;
        Ms[q] = mv;
        Ts[q] = xv + xv * mv;
      }
    }
  }
}
SAFFNET_CPU_CLONES inline void load_channel(float* X, float* M, float* Tt,
                                            PlaneRef<const float> x, LineRef<const float> a_h,
                                            LineRef<const float> a_w, const RowSegment* seg,
                                            int64_t nseg) {
  load_channel_body(X, M, Tt, x, a_h, a_w, seg, nseg);
}
SAFFNET_CPU_CLONES inline void load_channel(double* X, double* M, double* Tt,
                                            PlaneRef<const double> x, LineRef<const double> a_h,
                                            LineRef<const double> a_w, const RowSegment* seg,
                                            int64_t nseg) {
  load_channel_body(X, M, Tt, x, a_h, a_w, seg, nseg);
}

// aff_pair's load: X = residual, M = x, T = residual + x (AFF's xa) for one channel.
template <typename T>
SAFFNET_ALWAYS_INLINE void load_pair_channel_body(T* __restrict__ X, T* __restrict__ M,
                                                  T* __restrict__ Tt, PlaneRef<const T> residual,
                                                  PlaneRef<const T> x, const RowSegment* seg,
                                                  int64_t nseg) {
  for (int64_t s = 0; s < nseg; ++s) {
    const RowSegment g = seg[s];
    const T* __restrict__ rr = residual.base + g.h * residual.sh + g.w0 * residual.sw;
    const T* __restrict__ xr = x.base + g.h * x.sh + g.w0 * x.sw;
    T* __restrict__ Xs = X + g.p;
    T* __restrict__ Ms = M + g.p;
    T* __restrict__ Ts = Tt + g.p;
    if (residual.sw == 1 && x.sw == 1) {
#pragma omp simd
      for (int64_t q = 0; q < g.len; ++q) {
        Xs[q] = rr[q];
        Ms[q] = xr[q];
        Ts[q] = rr[q] + xr[q];
      }
    } else {
      for (int64_t q = 0; q < g.len; ++q) {
        const T rv = rr[q * residual.sw], xv = xr[q * x.sw];
        Xs[q] = rv;
        Ms[q] = xv;
        Ts[q] = rv + xv;
      }
    }
  }
}
SAFFNET_CPU_CLONES inline void load_pair_channel(float* X, float* M, float* Tt,
                                                 PlaneRef<const float> residual,
                                                 PlaneRef<const float> x, const RowSegment* seg,
                                                 int64_t nseg) {
  load_pair_channel_body(X, M, Tt, residual, x, seg, nseg);
}
SAFFNET_CPU_CLONES inline void load_pair_channel(double* X, double* M, double* Tt,
                                                 PlaneRef<const double> residual,
                                                 PlaneRef<const double> x, const RowSegment* seg,
                                                 int64_t nseg) {
  load_pair_channel_body(X, M, Tt, residual, x, seg, nseg);
}

// ----------------------------------------------------------------------------------------
// R = relu(Z), and DZ ← DZ·[Z > 0], over count values.
// ----------------------------------------------------------------------------------------
template <typename T>
SAFFNET_ALWAYS_INLINE void relu_body(T* __restrict__ R, const T* __restrict__ Z, int64_t count) {
#pragma omp simd
  for (int64_t k = 0; k < count; ++k) R[k] = Z[k] > T(0) ? Z[k] : T(0);
}
SAFFNET_CPU_CLONES inline void relu_values(float* R, const float* Z, int64_t count) {
  relu_body(R, Z, count);
}
SAFFNET_CPU_CLONES inline void relu_values(double* R, const double* Z, int64_t count) {
  relu_body(R, Z, count);
}
template <typename T>
SAFFNET_ALWAYS_INLINE void relu_mask_body(T* __restrict__ DZ, const T* __restrict__ Z,
                                          int64_t count) {
#pragma omp simd
  for (int64_t k = 0; k < count; ++k) DZ[k] = Z[k] > T(0) ? DZ[k] : T(0);
}
SAFFNET_CPU_CLONES inline void relu_mask(float* DZ, const float* Z, int64_t count) {
  relu_mask_body(DZ, Z, count);
}
SAFFNET_CPU_CLONES inline void relu_mask(double* DZ, const double* Z, int64_t count) {
  relu_mask_body(DZ, Z, count);
}

// out[r] += Σ_p v[r·kTile + p] over p < kTile, for r < rows (the buffers are zero beyond a
// tile's pixels where this is used: bias gradients).
template <typename T>
SAFFNET_ALWAYS_INLINE void row_sums_body(T* __restrict__ out, const T* __restrict__ v,
                                         int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ vr = v + r * kTile;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t p = 0; p < kTile; ++p) s += vr[p];
    out[r] += s;
  }
}
SAFFNET_CPU_CLONES inline void row_sums(float* out, const float* v, int64_t rows) {
  row_sums_body(out, v, rows);
}
SAFFNET_CPU_CLONES inline void row_sums(double* out, const double* v, int64_t rows) {
  row_sums_body(out, v, rows);
}

// ----------------------------------------------------------------------------------------
// Input gradients of one channel of a tile, from DT = dL/dt (t = x·(1 + m)) and the direct
// terms DX, DM (may be null):
//   grad_x = DX + DT·(1 + M)          stored for the tile's pixels;
//   dm     = DM + DT·X                grad_a_h[h] += Σ_w dm·a_w[w], grad_a_w[w] += dm·a_h[h].
// ----------------------------------------------------------------------------------------
// Segments shorter than this (two 64-byte vectors) take the scalar-chain dot product.
template <typename T>
constexpr int64_t kShortSegment = 128 / static_cast<int64_t>(sizeof(T));

template <typename T>
SAFFNET_ALWAYS_INLINE void input_grads_body(PlaneRef<T> grad_x, T* __restrict__ red_a_h,
                                            T* __restrict__ red_a_w, const T* __restrict__ DT,
                                            const T* __restrict__ X, const T* __restrict__ M,
                                            const T* __restrict__ DX, const T* __restrict__ DM,
                                            LineRef<const T> a_h, LineRef<const T> a_w,
                                            const RowSegment* seg, int64_t nseg) {
  alignas(64) T dx[kTile];
  alignas(64) T dm[kTile];
  if (DX != nullptr) {
#pragma omp simd
    for (int64_t p = 0; p < kTile; ++p) {
      dx[p] = DX[p] + DT[p] * (T(1) + M[p]);
      dm[p] = DM[p] + DT[p] * X[p];
    }
  } else {
#pragma omp simd
    for (int64_t p = 0; p < kTile; ++p) {
      dx[p] = DT[p] * (T(1) + M[p]);
      dm[p] = DT[p] * X[p];
    }
  }
  T* __restrict__ run = tile_run(grad_x, seg, nseg);
  if (run != nullptr) {
    const int64_t np = seg[nseg - 1].p + seg[nseg - 1].len;
#pragma omp simd
    for (int64_t p = 0; p < np; ++p) run[p] = dx[p];
  }
  for (int64_t s = 0; s < nseg; ++s) {
    const RowSegment g = seg[s];
    const T ah = a_h.base[g.h * a_h.sl];
    const T* __restrict__ awr = a_w.base + g.w0 * a_w.sl;
    const T* __restrict__ dxs = dx + g.p;
    const T* __restrict__ dms = dm + g.p;
    T* __restrict__ raw = red_a_w + g.w0;
    if (run == nullptr) {
      T* __restrict__ gx = grad_x.base + g.h * grad_x.sh + g.w0 * grad_x.sw;
      for (int64_t q = 0; q < g.len; ++q) gx[q * grad_x.sw] = dxs[q];
    }
    T dot = 0;
    if (a_w.sl == 1 && g.len >= kShortSegment<T>) {
#pragma omp simd reduction(+ : dot)
      for (int64_t q = 0; q < g.len; ++q) dot += dms[q] * awr[q];
    } else {
      // Short rows (W = 12, 24 in SAFFNet's low-resolution branches) and a broadcast or
      // strided a_w (SAWF: a_w = 1 expanded, stride 0): four independent scalar chains. An
      // omp simd reduction runs short rows in its scalar epilogue and then sums 16 stored
      // lanes one by one, and the plain strided loop is one dependent chain. Measured on
      // aff_fuse_backward, 1 thread: SCAFF(128) at 8×16×12, with the vector tile copies
      // (tile_run), 1498 → 1205 µs; with a broadcast a_w (SAWF), 8×128×16×12: 1378 → 1320 µs.
      const int64_t sl = a_w.sl;
      T d0 = 0, d1 = 0, d2 = 0, d3 = 0;
      int64_t q = 0;
      for (; q + 4 <= g.len; q += 4) {
        d0 += dms[q] * awr[q * sl];
        d1 += dms[q + 1] * awr[(q + 1) * sl];
        d2 += dms[q + 2] * awr[(q + 2) * sl];
        d3 += dms[q + 3] * awr[(q + 3) * sl];
      }
      for (; q < g.len; ++q) d0 += dms[q] * awr[q * sl];
      dot = (d0 + d1) + (d2 + d3);
    }
    red_a_h[g.h] += dot;
#pragma omp simd
    for (int64_t q = 0; q < g.len; ++q) raw[q] += dms[q] * ah;
  }
}
SAFFNET_CPU_CLONES inline void input_grads(PlaneRef<float> grad_x, float* red_a_h,
                                           float* red_a_w, const float* DT, const float* X,
                                           const float* M, const float* DX, const float* DM,
                                           LineRef<const float> a_h, LineRef<const float> a_w,
                                           const RowSegment* seg, int64_t nseg) {
  input_grads_body(grad_x, red_a_h, red_a_w, DT, X, M, DX, DM, a_h, a_w, seg, nseg);
}
SAFFNET_CPU_CLONES inline void input_grads(PlaneRef<double> grad_x, double* red_a_h,
                                           double* red_a_w, const double* DT, const double* X,
                                           const double* M, const double* DX, const double* DM,
                                           LineRef<const double> a_h, LineRef<const double> a_w,
                                           const RowSegment* seg, int64_t nseg) {
  input_grads_body(grad_x, red_a_h, red_a_w, DT, X, M, DX, DM, a_h, a_w, seg, nseg);
}

// ----------------------------------------------------------------------------------------
// Tile moments: s = Σ y and q = Σ (y − s/np)² over the np pixels, accumulated in double.
// ----------------------------------------------------------------------------------------
template <typename T>
SAFFNET_ALWAYS_INLINE void tile_moments_body(const T* __restrict__ y, int64_t np, double* sum,
                                             double* centred_sq) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t p = 0; p < np; ++p) s += static_cast<double>(y[p]);
  const double m = s / static_cast<double>(np);
  double q = 0;
#pragma omp simd reduction(+ : q)
  for (int64_t p = 0; p < np; ++p) {
    const double d = static_cast<double>(y[p]) - m;
    q += d * d;
  }
  *sum = s;
  *centred_sq = q;
}
SAFFNET_CPU_CLONES inline void tile_moments(const float* y, int64_t np, double* sum,
                                            double* centred_sq) {
  tile_moments_body(y, np, sum, centred_sq);
}
SAFFNET_CPU_CLONES inline void tile_moments(const double* y, int64_t np, double* sum,
                                            double* centred_sq) {
  tile_moments_body(y, np, sum, centred_sq);
}

// ----------------------------------------------------------------------------------------
// Gathers / stores of one channel's tile values through the row segments (values beyond np
// are zero after a gather).
// ----------------------------------------------------------------------------------------
template <typename T>
SAFFNET_ALWAYS_INLINE void gather_tile_body(T* __restrict__ out, PlaneRef<const T> plane,
                                            const RowSegment* seg, int64_t nseg, int64_t np) {
  if (const T* run = tile_run(plane, seg, nseg)) {
#pragma omp simd
    for (int64_t p = 0; p < np; ++p) out[p] = run[p];
    for (int64_t p = np; p < kTile; ++p) out[p] = T(0);
    return;
  }
  for (int64_t s = 0; s < nseg; ++s) {
    const RowSegment g = seg[s];
    const T* __restrict__ src = plane.base + g.h * plane.sh + g.w0 * plane.sw;
    T* __restrict__ dst = out + g.p;
    if (plane.sw == 1) {
#pragma omp simd
      for (int64_t q = 0; q < g.len; ++q) dst[q] = src[q];
    } else {
      for (int64_t q = 0; q < g.len; ++q) dst[q] = src[q * plane.sw];
    }
  }
  for (int64_t p = np; p < kTile; ++p) out[p] = T(0);
}
SAFFNET_CPU_CLONES inline void gather_tile(float* out, PlaneRef<const float> plane,
                                           const RowSegment* seg, int64_t nseg, int64_t np) {
  gather_tile_body(out, plane, seg, nseg, np);
}
SAFFNET_CPU_CLONES inline void gather_tile(double* out, PlaneRef<const double> plane,
                                           const RowSegment* seg, int64_t nseg, int64_t np) {
  gather_tile_body(out, plane, seg, nseg, np);
}
template <typename T>
inline void store_tile(PlaneRef<T> plane, const T* __restrict__ values, const RowSegment* seg,
                       int64_t nseg) {
  if (T* run = tile_run(plane, seg, nseg)) {
    const int64_t np = seg[nseg - 1].p + seg[nseg - 1].len;
#pragma omp simd
    for (int64_t p = 0; p < np; ++p) run[p] = values[p];
    return;
  }
  for (int64_t s = 0; s < nseg; ++s) {
    const RowSegment g = seg[s];
    T* __restrict__ dst = plane.base + g.h * plane.sh + g.w0 * plane.sw;
    const T* __restrict__ src = values + g.p;
    if (plane.sw == 1) {
      std::memcpy(dst, src, sizeof(T) * g.len);
    } else {
      for (int64_t q = 0; q < g.len; ++q) dst[q * plane.sw] = src[q];
    }
  }
}

// aff_pair's input gradients of one channel of a tile: grad_x = DX + DT and
// grad_residual = DR + DT (t = x + residual), stored for the tile's pixels.
template <typename T>
SAFFNET_ALWAYS_INLINE void pair_input_grads_body(PlaneRef<T> grad_x, PlaneRef<T> grad_residual,
                                                 const T* __restrict__ DT,
                                                 const T* __restrict__ DX,
                                                 const T* __restrict__ DR, const RowSegment* seg,
                                                 int64_t nseg) {
  alignas(64) T gx[kTile];
  alignas(64) T gr[kTile];
#pragma omp simd
  for (int64_t p = 0; p < kTile; ++p) {
    gx[p] = DX[p] + DT[p];
    gr[p] = DR[p] + DT[p];
  }
  store_tile(grad_x, gx, seg, nseg);
  store_tile(grad_residual, gr, seg, nseg);
}

SAFFNET_CPU_CLONES inline void pair_input_grads(PlaneRef<float> grad_x,
                                                PlaneRef<float> grad_residual, const float* DT,
                                                const float* DX, const float* DR,
                                                const RowSegment* seg, int64_t nseg) {
  pair_input_grads_body(grad_x, grad_residual, DT, DX, DR, seg, nseg);
}
SAFFNET_CPU_CLONES inline void pair_input_grads(PlaneRef<double> grad_x,
                                                PlaneRef<double> grad_residual, const double* DT,
                                                const double* DX, const double* DR,
                                                const RowSegment* seg, int64_t nseg) {
  pair_input_grads_body(grad_x, grad_residual, DT, DX, DR, seg, nseg);
}

}  // namespace saffnet_fast

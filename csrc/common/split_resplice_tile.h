// The halo-tiled split_resplice program (SR(C, s), inference form) in one launch: written
// once as host-device phases, run by the CUDA kernel (csrc/cuda/split_resplice_kernel.cu, a
// thread block per tile, __syncthreads between phases) and, serially, by the CPU emulation
// (csrc/cpu/split_resplice_tiled_kernel.cpp), so the CPU tests check the very indexing the
// GPU runs.
//
// A tile is tile_h × tile_w output pixels of one image, all C channels. Step j's carried
// channels are needed by step j+1 one pixel beyond wherever step j+1 computes, so the
// region step j computes shrinks by one pixel per step: carry(j) covers the tile plus a
// halo of (s - 2 - j) pixels, read from x with a halo of (s - 1 - j); the kept channels, which
// nothing downstream reads, are computed on the tile alone. Carries live in two ping-pong
// shared-memory buffers in acc_t (float for the 16-bit types), zero outside the image, which
// is the next convolution's zero padding. The x slices are read from global memory (each
// x element is read by at most the 9 taps of neighbouring pixels, all in the same tile, so
// they stay in L1/L2).
//
// Recompute: for s = 8 and a 16×16 tile, carry(0) covers 28×28 = 3.1× the tile, carry(5)
// 18×18 = 1.3×; with about half of each step's channels carried, SR(64) does 1.37× the
// convolution arithmetic of the per-step kernels, in exchange for reading x and writing
// the output once and no carry round trips through global memory.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "macros.h"
#include "split_resplice.h"

namespace saffnet_fast {

constexpr int kSrTileMaxSteps = 15;  // splits ≤ 16

struct SrTileStep {
  int32_t width;       // c_j
  int32_t x_offset;    // first x channel of slice j+1
  int32_t keep;        // channels written to the output (on the tile only)
  int32_t out_offset;  // their first output channel
  int32_t carried;     // channels carried to step j+1 (0 for the last step)
  int32_t carry_out;   // their first channel in the global carries tensor (-1: last step)
  int32_t halo;        // pixels beyond the tile on which the carried channels are computed
  int64_t weight_offset, bias_offset;  // into the packed acc_t parameter array
};

struct SrTilePlan {
  int32_t steps, w0, carry_channels;  // carry_channels: C of the global carries tensor
  int32_t tile_h, tile_w;
  int64_t buffer_elems;  // acc_t elements of one ping-pong carry buffer
  int64_t param_elems;   // acc_t elements of the packed weights and biases
  SrTileStep step[kSrTileMaxSteps];
};

// Plan for SR over `channels` with the steps of split_resplice_plan, tiles of tile_h × tile_w.
inline SrTilePlan split_resplice_tile_plan(int64_t channels,
                                           const std::vector<SplitRespliceStep>& steps,
                                           int64_t tile_h, int64_t tile_w) {
  SrTilePlan p{};
  const int64_t S = static_cast<int64_t>(steps.size());
  p.steps = static_cast<int32_t>(S);
  p.w0 = static_cast<int32_t>(channels / (S + 1));
  p.tile_h = static_cast<int32_t>(tile_h);
  p.tile_w = static_cast<int32_t>(tile_w);
  int64_t offset = 0, carry_channels = 0, buffer = 0;
  for (int64_t j = 0; j < S; ++j) {
    const SplitRespliceStep& s = steps[j];
    SrTileStep& t = p.step[j];
    t.width = static_cast<int32_t>(s.width);
    t.x_offset = static_cast<int32_t>(s.x_offset);
    t.keep = static_cast<int32_t>(s.keep);
    t.out_offset = static_cast<int32_t>(s.out_offset);
    t.carried = static_cast<int32_t>(s.width - s.keep);
    t.carry_out = static_cast<int32_t>(s.carry_out);
    t.halo = static_cast<int32_t>(S - 1 - j);  // 0 for the last step
    t.weight_offset = offset;
    offset += s.width * s.width * 9;
    t.bias_offset = offset;
    offset += s.width;
    if (t.carried > 0) {
      carry_channels += t.carried;
      buffer = std::max<int64_t>(
          buffer, t.carried * (tile_h + 2 * t.halo) * (tile_w + 2 * t.halo));
    }
  }
  p.carry_channels = static_cast<int32_t>(carry_channels);
  p.buffer_elems = buffer;
  p.param_elems = offset;
  return p;
}

// Tiles tried, in order, when the caller asks for none: the largest whose two carry buffers
// fit kSrAutoTileBudgetBytes; when none does, the CUDA split_resplice falls back to one
// launch per step. Not tuned on a GPU yet: 16×16 keeps SR(64)'s buffers at 32 KB with
// 1.37× the arithmetic; the smaller tiles serve C ≥ 128.
constexpr int64_t kSrAutoTiles[3][2] = {{16, 16}, {8, 16}, {8, 8}};
// 64 KB of shared memory per block leaves room for three blocks per H100 SM.
constexpr int64_t kSrAutoTileBudgetBytes = 64 * 1024;

// ---------------------------------------------------------------------------------------
// Phases. Each takes (thread, threads): work item i goes to thread i mod threads. Within a
// phase, items write disjoint locations and read only what earlier phases wrote, so running
// the threads one after another (the CPU emulation) computes what the block computes.
// Images are contiguous N×C×H×W; (y0, x0) is the tile's top-left output pixel.
// ---------------------------------------------------------------------------------------

// Slice 0 is copied through to the output, on the tile.
template <typename scalar_t>
SAFFNET_HOST_DEVICE_INLINE void split_resplice_tile_copy(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ out, const SrTilePlan& p,
    int64_t n, int64_t C, int64_t H, int64_t W, int64_t y0, int64_t x0, int thread,
    int threads) {
  const int pixels = p.tile_h * p.tile_w, count = p.w0 * pixels;
  for (int i = thread; i < count; i += threads) {
    const int c = i / pixels, r = (i % pixels) / p.tile_w, q = i % p.tile_w;
    const int64_t gy = y0 + r, gx = x0 + q;
    if (gy >= H || gx >= W) continue;
    const int64_t at = ((n * C + c) * H + gy) * W + gx;
    out[at] = x[at];
  }
}

// Step j: LeakyReLU(conv3×3(cat(x slice j+1, carry(j-1))) + b_j). Kept channels go to `out`
// on the tile; carried channels go to carry_next on the tile + halo (0 outside the image),
// and, when `carries` is not null, to the global carries tensor on the tile.
// carry_prev holds carry(j-1) on the tile + (halo + 1), laid out [channel][row][col].
template <typename scalar_t, typename acc_t>
SAFFNET_HOST_DEVICE_INLINE void split_resplice_tile_step(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ out, scalar_t* __restrict__ carries,
    const acc_t* __restrict__ params, acc_t slope, const SrTilePlan& p, int j,
    const acc_t* __restrict__ carry_prev, acc_t* __restrict__ carry_next, int64_t n,
    int64_t C, int64_t H, int64_t W, int64_t y0, int64_t x0, int thread, int threads) {
  const SrTileStep& s = p.step[j];
  const int th = p.tile_h, tw = p.tile_w, pixels = th * tw;
  // Region of carry_next (this step's carried outputs) and of carry_prev (its input).
  const int halo = s.halo;
  const int rh = th + 2 * halo, rw = tw + 2 * halo, region = rh * rw;
  const int prw = rw + 2, prev_region = (rh + 2) * prw;
  const int keep_items = s.keep * pixels, items = keep_items + s.carried * region;
  const int64_t HW = H * W;
  const acc_t* __restrict__ weight = params + s.weight_offset;
  const acc_t* __restrict__ bias = params + s.bias_offset;
  for (int i = thread; i < items; i += threads) {
    // (o, r, q): output channel of the step and pixel in this step's region coordinates,
    // whose origin is (y0 - halo, x0 - halo).
    const bool kept = i < keep_items;
    int o, r, q;
    if (kept) {
      o = i / pixels;
      r = (i % pixels) / tw + halo;
      q = i % tw + halo;
    } else {
      const int k = i - keep_items;
      o = s.keep + k / region;
      r = (k % region) / rw;
      q = k % rw;
    }
    const int64_t gy = y0 - halo + r, gx = x0 - halo + q;
    const bool inside = gy >= 0 && gy < H && gx >= 0 && gx < W;
    if (!inside) {
      if (!kept) carry_next[(o - s.keep) * region + r * rw + q] = acc_t(0);
      continue;
    }
    acc_t acc = bias[o];
    const acc_t* __restrict__ k = weight + static_cast<int64_t>(o) * s.width * 9;
    for (int ci = 0; ci < p.w0; ++ci, k += 9) {
      const scalar_t* __restrict__ src = x + (n * C + s.x_offset + ci) * HW;
      for (int ky = 0; ky < 3; ++ky) {
        const int64_t yy = gy + ky - 1;
        if (yy < 0 || yy >= H) continue;
        for (int kx = 0; kx < 3; ++kx) {
          const int64_t xx = gx + kx - 1;
          if (xx < 0 || xx >= W) continue;
          acc += k[ky * 3 + kx] * static_cast<acc_t>(src[yy * W + xx]);
        }
      }
    }
    // carry(j-1) around (r, q): its region starts one pixel further out, so the 3×3
    // neighbourhood of (r, q) is rows r .. r+2, cols q .. q+2 there; zero padding is stored.
    for (int ci = p.w0; ci < s.width; ++ci, k += 9) {
      const acc_t* __restrict__ src = carry_prev + (ci - p.w0) * prev_region + r * prw + q;
      for (int ky = 0; ky < 3; ++ky)
        for (int kx = 0; kx < 3; ++kx) acc += k[ky * 3 + kx] * src[ky * prw + kx];
    }
    const acc_t y = leaky_relu(acc, slope);
    if (kept) {
      out[(n * C + s.out_offset + o) * HW + gy * W + gx] = static_cast<scalar_t>(y);
    } else {
      carry_next[(o - s.keep) * region + r * rw + q] = y;
      const bool on_tile = r >= halo && r < halo + th && q >= halo && q < halo + tw;
      if (carries != nullptr && on_tile)
        carries[(n * p.carry_channels + s.carry_out + o - s.keep) * HW + gy * W + gx] =
            static_cast<scalar_t>(y);
    }
  }
}

}  // namespace saffnet_fast

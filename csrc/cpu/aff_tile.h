// Pixel-tile machinery shared by the CPU kernels of aff_fuse and aff_moments: both
// recompute AFF's local branch on tiles of kTile pixels of one sample, with every channel of
// each pixel held in [channel][pixel] buffers so the two 1×1 convolutions are small GEMMs
// (tile_gemm.h) whose inner loop runs over pixels.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/attention_math.h"
#include "plane_access.h"
#include "tile_gemm.h"
#include "tile_loops.h"
#include "vec_math.h"

namespace saffnet_fast {

template <typename acc_t, typename scalar_t>
std::vector<acc_t> to_acc(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const scalar_t* p = c.const_data_ptr<scalar_t>();
  return std::vector<acc_t>(p, p + c.numel());
}

// Shape and acc_t weights of AFF's local_att as the CPU kernels read them: conv1 (w1 Ci×C,
// b1 Ci) and, for the second stage, conv2 (w2 C×Ci, b2 C; empty without). Co is the channel
// count of the map whose statistics aff_moments takes (C with stage 2, else Ci).
template <typename scalar_t, typename acc_t>
struct LocalAttSetup {
  int64_t N, C, H, W, Ci, HW, tiles, Co;
  bool stage2;
  std::vector<acc_t> w1, b1, w2, b2;
  LocalAttSetup(const at::Tensor& x, const at::Tensor& w1t, const at::Tensor& b1t,
                const std::optional<at::Tensor>& w2t, const std::optional<at::Tensor>& b2t)
      : N(x.size(0)), C(x.size(1)), H(x.size(2)), W(x.size(3)), Ci(w1t.size(0)),
        HW(H * W), tiles((HW + kTile - 1) / kTile), Co(w2t.has_value() ? C : Ci),
        stage2(w2t.has_value()), w1(to_acc<acc_t, scalar_t>(w1t)),
        b1(to_acc<acc_t, scalar_t>(b1t)),
        w2(stage2 ? to_acc<acc_t, scalar_t>(*w2t) : std::vector<acc_t>()),
        b2(stage2 ? to_acc<acc_t, scalar_t>(*b2t) : std::vector<acc_t>()) {}
};

// The results of the chunks of one at::parallel_for, each kept with its chunk's first index
// so that the caller combines them in chunk order: deterministic for a given thread count.
template <typename T>
class ChunkResults {
 public:
  void add(int64_t chunk_begin, T&& result) {
    std::lock_guard<std::mutex> lock(mutex_);
    results_.emplace_back(chunk_begin, std::move(result));
  }
  // The results in chunk order.
  std::vector<T> in_order() {
    std::sort(results_.begin(), results_.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    std::vector<T> ordered;
    ordered.reserve(results_.size());
    for (auto& r : results_) ordered.push_back(std::move(r.second));
    return ordered;
  }

 private:
  std::mutex mutex_;
  std::vector<std::pair<int64_t, T>> results_;
};

// The element-wise sum, in chunk order, of the chunks' reduction buffers (size values each).
template <typename acc_t>
std::vector<acc_t> summed_in_order(ChunkResults<std::vector<acc_t>>& chunks, int64_t size) {
  std::vector<acc_t> total(size, acc_t(0));
  for (const auto& part : chunks.in_order())
    for (int64_t i = 0; i < size; ++i) total[i] += part[i];
  return total;
}

// t ← total[offset, offset + t.numel()), cast to t's dtype.
template <typename scalar_t, typename acc_t>
void store_from(at::Tensor& t, const std::vector<acc_t>& total, int64_t offset) {
  scalar_t* p = t.mutable_data_ptr<scalar_t>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<scalar_t>(total[offset + i]);
}

// Everything one tile needs, recomputed identically by forward and backward:
// X = x, M = a_h·a_w, T = x·(1 + m) as [C][kTile]; Z = W1·T + b1 as [Ci][kTile] (pre-ReLU),
// R = relu(Z); seg: the tile's row segments (tile_loops.h).
template <typename scalar_t, typename acc_t>
struct TileForward {
  static_assert(std::is_same<scalar_t, acc_t>::value,
                "CPU kernels compute in their scalar type (float or double)");
  int64_t C, Ci, W;
  std::vector<acc_t> X, M, T, Z, R, Lmat;
  RowSegment seg[kTile];
  int64_t nseg = 0;
  TileForward(int64_t C_, int64_t Ci_, int64_t W_)
      : C(C_), Ci(Ci_), W(W_), X(C_ * kTile), M(C_ * kTile), T(C_ * kTile), Z(Ci_ * kTile),
        R(Ci_ * kTile), Lmat(C_ * kTile) {}

  void load(const scalar_t* x, const Strides4& xs, const scalar_t* a_h, const Strides3& hs3,
            const scalar_t* a_w, const Strides3& ws3, const std::vector<acc_t>& w1,
            const std::vector<acc_t>& b1, int64_t n, int64_t p0, int64_t np) {
    nseg = row_segments(seg, p0, np, W);
    const bool plane_contiguous = xs.w == 1 && xs.h == W;
    for (int64_t c = 0; c < C; ++c) {
      if (plane_contiguous) prefetch_tile_ahead(x + n * xs.n + c * xs.c + p0);
      load_channel(X.data() + c * kTile, M.data() + c * kTile, T.data() + c * kTile,
                   PlaneRef<const scalar_t>{x + n * xs.n + c * xs.c, xs.h, xs.w},
                   LineRef<const scalar_t>{a_h + n * hs3.n + c * hs3.c, hs3.l},
                   LineRef<const scalar_t>{a_w + n * ws3.n + c * ws3.c, ws3.l}, seg, nseg);
    }
    conv1(w1, b1);
  }

  // aff_pair's tile: X = residual, M = x, T = residual + x (so that Lmat, Z, R mean the same).
  void load_pair(const scalar_t* x, const Strides4& xs, const scalar_t* residual,
                 const Strides4& rs, const std::vector<acc_t>& w1, const std::vector<acc_t>& b1,
                 int64_t n, int64_t p0, int64_t np) {
    nseg = row_segments(seg, p0, np, W);
    const bool planes_contiguous = xs.w == 1 && xs.h == W && rs.w == 1 && rs.h == W;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* x_plane = x + n * xs.n + c * xs.c;
      const scalar_t* r_plane = residual + n * rs.n + c * rs.c;
      if (planes_contiguous) {
        prefetch_tile_ahead(x_plane + p0);
        prefetch_tile_ahead(r_plane + p0);
      }
      load_pair_channel(X.data() + c * kTile, M.data() + c * kTile, T.data() + c * kTile,
                        PlaneRef<const scalar_t>{r_plane, rs.h, rs.w},
                        PlaneRef<const scalar_t>{x_plane, xs.h, xs.w}, seg, nseg);
    }
    conv1(w1, b1);
  }

  // Z = W1·T + b1, R = relu(Z). Pixels np..kTile-1 of the buffers hold stale (finite) values
  // from earlier tiles, or the zeros they were created with; the GEMMs run on whole tiles and
  // those lanes are never stored.
  void conv1(const std::vector<acc_t>& w1, const std::vector<acc_t>& b1) {
    tile_gemm(Z.data(), w1.data(), b1.data(), T.data(), Ci, C);
    relu_values(R.data(), Z.data(), Ci * kTile);
  }

  // Lmat[c][p] = b2[c] + W2[c]·relu(Z[:, p]): the local_att output of every channel.
  void local_logits(const std::vector<acc_t>& w2, const std::vector<acc_t>& b2) {
    tile_gemm(Lmat.data(), w2.data(), b2.data(), R.data(), C, Ci);
  }
};

// wei[p] = σ(L[p] + glob) for the kTile pixels of one channel: AFF's weighting from the
// local logits and the channel's global logit. float: the vectorised sigmoid (vec_math.h; the
// scalar libm one per element was ~30% of aff_fuse_backward's time); double: libm.
SAFFNET_CPU_CLONES inline void logit_weight_tile(float* __restrict__ wei,
                                                 const float* __restrict__ L, float glob) {
  static_assert(kTile % 16 == 0, "kTile must be a whole number of 16-float vectors");
  for (int64_t v = 0; v < kTile; v += 16) {
    vfloat16 l;
    std::memcpy(&l, L + v, sizeof(l));
    const vfloat16 w = vec_sigmoid(l + glob);
    std::memcpy(wei + v, &w, sizeof(w));
  }
}
inline void logit_weight_tile(double* wei, const double* L, double glob) {
  for (int64_t p = 0; p < kTile; ++p) wei[p] = sigmoid(L[p] + glob);
}

// The inference pass shared by aff_fuse and aff_pair: for every tile of kTile pixels of
// every sample, load(tile, n, p0, np) fills the tile's buffers and its conv1
// (TileForward::load or load_pair), then the local logits, then per channel
// combine(res, tile, n, c) writes the tile's kTile output values into res, stored into
// out[n, c] (NCHW with a write prefetch, or through the row segments).
template <typename scalar_t, typename acc_t, typename Load, typename Combine>
void aff_forward_tiles(const LocalAttSetup<scalar_t, acc_t>& la, at::Tensor& out, Load&& load,
                       Combine&& combine) {
  const Strides4 os(out);
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const bool out_plane_contiguous = os.w == 1 && os.h == la.W;
  at::parallel_for(0, la.N * la.tiles, 1, [&](int64_t begin, int64_t end) {
    TileForward<scalar_t, acc_t> tile(la.C, la.Ci, la.W);
    alignas(64) acc_t res[kTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / la.tiles, p0 = (task % la.tiles) * kTile;
      const int64_t np = std::min(kTile, la.HW - p0);
      load(tile, n, p0, np);
      tile.local_logits(la.w2, la.b2);
      for (int64_t c = 0; c < la.C; ++c) {
        combine(res, tile, n, c);
        scalar_t* oc = op + n * os.n + c * os.c;
        if (out_plane_contiguous) {
          prefetch_tile_ahead<1>(oc + p0);
          std::copy(res, res + np, oc + p0);
        } else {
          store_tile(PlaneRef<scalar_t>{oc, os.h, os.w}, res, tile.seg, tile.nseg);
        }
      }
    }
  });
}

// The cols×rows transpose of a row-major rows×cols matrix: the backward GEMMs run on W2ᵀ
// and W1ᵀ, so their inner loop, too, is over pixels.
template <typename acc_t>
std::vector<acc_t> transposed(const std::vector<acc_t>& a, int64_t rows, int64_t cols) {
  std::vector<acc_t> t(a.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = a[r * cols + c];
  return t;
}

// Where the input gradients of one tile go: grad_x (stored), and grad_a_h / grad_a_w
// (accumulated into a chunk's reduction buffer, N×C×H and N×C×W).
template <typename scalar_t, typename acc_t>
struct InputGradTargets {
  scalar_t* grad_x;
  Strides4 gxs;
  const scalar_t* a_h;
  Strides3 hs3;
  const scalar_t* a_w;
  Strides3 ws3;
  acc_t* red_a_h;
  acc_t* red_a_w;
  int64_t C, H, W;
};

// Backward of one tile through local_att's two 1×1 convolutions and t = x·(1 + m), shared
// by the aff_fuse and aff_moments backward kernels; one object per parallel chunk. The
// gradient that enters (D for conv2's output, or DZ for conv1's) must be zero on the pixels
// beyond the tile's np: everything downstream is then zero there too, so the GEMMs
// (tile_gemm on W2ᵀ and W1ᵀ) and the weight gradients (per-lane sums, tile_gemm.h) run on
// whole kTile-pixel rows and stay exact. The weight gradients are added to the chunk's
// reduction buffer by flush_weight_grads once the chunk's tiles are done.
template <typename scalar_t, typename acc_t>
struct TileBackward {
  static constexpr int64_t kLanes = 64 / static_cast<int64_t>(sizeof(acc_t));
  int64_t C, Ci;
  std::vector<acc_t> DZ, DT;          // [Ci][kTile], [C][kTile]
  std::vector<acc_t> w1_acc, w2_acc;  // [Ci][C padded], [C][Ci padded] (tile_gemm.h)
  std::vector<acc_t> scratch;         // tile_outer_accumulate's transposed operand
  TileBackward(int64_t C_, int64_t Ci_, bool stage2)
      : C(C_), Ci(Ci_), DZ(Ci_ * kTile), DT(C_ * kTile),
        w1_acc(Ci_ * padded_cols(C_, kLanes), acc_t(0)),
        w2_acc(stage2 ? C_ * padded_cols(Ci_, kLanes) : 0, acc_t(0)),
        scratch(kTile * padded_cols(std::max(C_, Ci_), kLanes)) {}

  // conv2 (l = W2·relu(z) + b2), from D = dL/dl as [C][kTile]: grad_w2 += D·relu(Z)ᵀ and
  // DZ = (W2ᵀ·D)·[Z > 0]. grad_b2 (ΣD) is the caller's.
  void conv2(const TileForward<scalar_t, acc_t>& tile, const acc_t* D, const acc_t* w2t) {
    tile_outer_accumulate(w2_acc.data(), D, tile.R.data(), scratch.data(), C, Ci);
    tile_gemm(DZ.data(), w2t, nullptr, D, Ci, C);
    relu_mask(DZ.data(), tile.Z.data(), Ci * kTile);
  }

  // Adds the chunk's weight gradients: grad_w1 (Ci×C) and, after conv2 calls, grad_w2 (C×Ci).
  void flush_weight_grads(acc_t* grad_w1, acc_t* grad_w2) const {
    add_unpadded(w1_acc.data(), Ci, C, grad_w1);
    if (grad_w2 != nullptr) add_unpadded(w2_acc.data(), C, Ci, grad_w2);
  }

  // conv1 (z = W1·t + b1) from DZ: grad_b1 += ΣDZ, grad_w1 += DZ·Tᵀ, DT = W1ᵀ·DZ.
  void conv1(const TileForward<scalar_t, acc_t>& tile, const acc_t* w1t, acc_t* grad_b1) {
    row_sums(grad_b1, DZ.data(), Ci);
    tile_outer_accumulate(w1_acc.data(), DZ.data(), tile.T.data(), scratch.data(), Ci, C);
    tile_gemm(DT.data(), w1t, nullptr, DZ.data(), C, Ci);
  }

  // conv1 (z = W1·t + b1) from DZ, then t = x·(1 + m): grad_b1 += ΣDZ, grad_w1 += DZ·Tᵀ,
  // DT = W1ᵀ·DZ; grad_x = DX + DT·(1 + M) is stored for the tile's pixels and
  // DM + DT·X goes to grad_a_h (·a_w) and grad_a_w (·a_h) (tile_loops.h). DX and DM
  // (aff_fuse's direct terms) may be null.
  void conv1_and_input(const TileForward<scalar_t, acc_t>& tile, const acc_t* w1t,
                       acc_t* grad_b1, const acc_t* DX, const acc_t* DM,
                       const InputGradTargets<scalar_t, acc_t>& out, int64_t n) {
    conv1(tile, w1t, grad_b1);
    const bool grad_x_plane_contiguous = out.gxs.w == 1 && out.gxs.h == out.W;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t k = c * kTile;
      scalar_t* grad_x_plane = out.grad_x + n * out.gxs.n + c * out.gxs.c;
      if (grad_x_plane_contiguous) prefetch_tile_ahead<1>(grad_x_plane + tile.seg[0].h * out.W + tile.seg[0].w0);
      input_grads(PlaneRef<scalar_t>{grad_x_plane, out.gxs.h, out.gxs.w},
                  out.red_a_h + (n * C + c) * out.H, out.red_a_w + (n * C + c) * out.W,
                  DT.data() + k, tile.X.data() + k, tile.M.data() + k,
                  DX ? DX + k : nullptr, DM ? DM + k : nullptr,
                  LineRef<const scalar_t>{out.a_h + n * out.hs3.n + c * out.hs3.c, out.hs3.l},
                  LineRef<const scalar_t>{out.a_w + n * out.ws3.n + c * out.ws3.c, out.ws3.l},
                  tile.seg, tile.nseg);
    }
  }
};

}  // namespace saffnet_fast

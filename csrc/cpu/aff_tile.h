// Pixel-tile machinery shared by the CPU kernels of aff_fuse and aff_moments: both
// recompute AFF's local branch on tiles of kTile pixels of one sample, with every channel of
// each pixel held in [channel][pixel] buffers so the two 1×1 convolutions are small GEMMs
// (tile_gemm.h) whose inner loop runs over pixels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "../common/attention_math.h"
#include "tile_gemm.h"

namespace saffnet_fast {

// Strides of an N×C×H×W tensor and of the factor tensors, read once.
struct Strides4 {
  int64_t n, c, h, w;
  explicit Strides4(const at::Tensor& t)
      : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
};
struct Strides3 {
  int64_t n, c, l;
  explicit Strides3(const at::Tensor& t) : n(t.stride(0)), c(t.stride(1)), l(t.stride(2)) {}
};

template <typename acc_t, typename scalar_t>
std::vector<acc_t> to_acc(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const scalar_t* p = c.const_data_ptr<scalar_t>();
  return std::vector<acc_t>(p, p + c.numel());
}

// Everything one tile needs, recomputed identically by forward and backward:
// X = x, M = a_h·a_w, T = x·(1 + M) as [C][kTile]; Z = W1·T + b1 as [Ci][kTile] (pre-ReLU).
template <typename scalar_t, typename acc_t>
struct TileForward {
  int64_t C, Ci, W;
  std::vector<acc_t> X, M, T, Z, R, Lmat;
  int64_t hs[kTile], ws[kTile];
  TileForward(int64_t C_, int64_t Ci_, int64_t W_)
      : C(C_), Ci(Ci_), W(W_), X(C_ * kTile), M(C_ * kTile), T(C_ * kTile), Z(Ci_ * kTile),
        R(Ci_ * kTile), Lmat(C_ * kTile) {}

  void load(const scalar_t* x, const Strides4& xs, const scalar_t* a_h, const Strides3& hs3,
            const scalar_t* a_w, const Strides3& ws3, const std::vector<acc_t>& w1,
            const std::vector<acc_t>& b1, int64_t n, int64_t p0, int64_t np) {
    for (int64_t p = 0; p < np; ++p) {
      hs[p] = (p0 + p) / W;
      ws[p] = (p0 + p) % W;
    }
    const bool plane_contiguous = xs.w == 1 && xs.h == W;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* xc = x + n * xs.n + c * xs.c;
      const scalar_t* ahc = a_h + n * hs3.n + c * hs3.c;
      const scalar_t* awc = a_w + n * ws3.n + c * ws3.c;
      acc_t* Xc = X.data() + c * kTile;
      acc_t* Mc = M.data() + c * kTile;
      acc_t* Tc = T.data() + c * kTile;
      if (plane_contiguous) {
        // NCHW: the tile's pixels are consecutive in the plane.
        const scalar_t* xt = xc + p0;
        for (int64_t p = 0; p < np; ++p) {
          const acc_t xv = static_cast<acc_t>(xt[p]);
          const acc_t mv = static_cast<acc_t>(ahc[hs[p] * hs3.l]) * static_cast<acc_t>(awc[ws[p] * ws3.l]);
          Xc[p] = xv;
          Mc[p] = mv;
          Tc[p] = xv + xv * mv;
        }
        continue;
      }
      for (int64_t p = 0; p < np; ++p) {
        const acc_t xv = static_cast<acc_t>(xc[hs[p] * xs.h + ws[p] * xs.w]);
        const acc_t mv = static_cast<acc_t>(ahc[hs[p] * hs3.l]) * static_cast<acc_t>(awc[ws[p] * ws3.l]);
        Xc[p] = xv;
        Mc[p] = mv;
        Tc[p] = xv + xv * mv;
      }
    }
    // Pixels np..kTile-1 of the buffers hold stale (finite) values from earlier tiles, or the
    // zeros they were created with; the GEMMs run on whole tiles and those lanes are never
    // stored.
    tile_gemm(Z.data(), w1.data(), b1.data(), T.data(), Ci, C);
    for (int64_t k = 0; k < Ci * kTile; ++k) R[k] = relu(Z[k]);
  }

  // Lmat[c][p] = b2[c] + W2[c]·relu(Z[:, p]): the local_att output of every channel.
  void local_logits(const std::vector<acc_t>& w2, const std::vector<acc_t>& b2) {
    tile_gemm(Lmat.data(), w2.data(), b2.data(), R.data(), C, Ci);
  }

};

}  // namespace saffnet_fast

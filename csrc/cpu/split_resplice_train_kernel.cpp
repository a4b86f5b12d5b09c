// split_resplice_train CPU kernels (float32, float64): the fused per-step passes of
// csrc/common/split_resplice_train.h. Op: csrc/split_resplice_train.cpp; math:
// csrc/common/batch_norm_act.h.
//
// Minimum bytes moved per step (v = the step's pre-BN conv output, c_j channels): forward
// reads v twice (statistics, apply) and writes y once, split between the output slice and
// the next step's input; backward reads v and grad_y once and writes grad_v twice (the
// statistics pass stores dz in grad_v, the second pass finishes it in place), so the
// dropout mask is drawn once per pass that needs it. Passes: 2 forward, 2 backward, plus
// ATen's convolution and its backward.
//
// Work split: statistics and backward over channels (each channel's N planes in one task,
// reduced in double in a fixed order: deterministic for any thread count); apply over the
// N·c_j planes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../common/batch_norm_act.h"
#include "../common/checks.h"
#include "../common/split_resplice.h"
#include "../common/split_resplice_train.h"
#include "philox_vec.h"
#include "plane_ops.h"

namespace saffnet_fast {
namespace {

// Dropout multipliers for elements [index0, index0 + len): 1/(1 − p) or 0. Element i
// draws output (i mod 4) of Philox block i / 4 (batch_norm_act.h); the blocks are generated
// kPhiloxGroups at a time (philox_vec.h).
template <typename acc_t>
void dropout_scales(const StepArgs& a, uint64_t index0, int64_t len, acc_t* out) {
  const acc_t kept = acc_t(1) / (acc_t(1) - static_cast<acc_t>(a.p));
  const float p = static_cast<float>(a.p);
  const uint64_t end = index0 + static_cast<uint64_t>(len);
  // keep ⇔ (bits >> 8) ≥ p·2²⁴ (dropout_keep_bits, in integers: p·2²⁴ rounded up is exact
  // for the float comparison since bits >> 8 < 2²⁴ is an integer)
  const uint32_t threshold = static_cast<uint32_t>(std::ceil(static_cast<double>(p) * 16777216.0));
  uint32_t r[4][kPhiloxGroups];
  for (uint64_t group0 = index0 >> 2; 4 * group0 < end; group0 += kPhiloxGroups) {
    philox_groups(a.seed, static_cast<uint64_t>(a.step), group0, r);
    const uint64_t first = 4 * group0;
    if (first >= index0 && first + 4 * kPhiloxGroups <= end) {  // a whole batch in range
      acc_t* o = out + (first - index0);
      for (int l = 0; l < kPhiloxGroups; ++l)
        for (int k = 0; k < 4; ++k) o[4 * l + k] = (r[k][l] >> 8) >= threshold ? kept : acc_t(0);
      continue;
    }
    for (int l = 0; l < kPhiloxGroups; ++l) {
      for (int k = 0; k < 4; ++k) {
        const uint64_t index = first + 4 * l + k;
        if (index < index0 || index >= end) continue;
        out[index - index0] = dropout_keep_bits(r[k][l], p) ? kept : acc_t(0);
      }
    }
  }
}

// Reductions over a plane in kLanes independent double partial sums, folded every kFold
// elements: a plain `double += element` loop is one latency-bound scalar add per element,
// while independent lanes vectorise. double, not float lanes: float lost enough precision to
// fail the whole-SAFFNet float32 gradient check.
constexpr int64_t kLanes = 16, kFold = 1024;

// Σ term(i) for i < len.
template <typename Term>
double lane_sum(int64_t len, Term term) {
  double total = 0;
  for (int64_t b0 = 0; b0 < len; b0 += kFold) {
    const int64_t b1 = std::min(len, b0 + kFold);
    double lane[kLanes] = {};
    int64_t i = b0;
    for (; i + kLanes <= b1; i += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) lane[l] += term(i + l);
    for (; i < b1; ++i) lane[0] += term(i);
    for (int64_t l = 0; l < kLanes; ++l) total += lane[l];
  }
  return total;
}

// Backward pass 1 over one plane: dz = dy · drop · LeakyReLU'(z), stored; returns
// (Σdz, Σdz·(v − mean)) through the two doubles.
template <typename scalar_t, typename acc_t>
void plane_dz(const scalar_t* v, const scalar_t* dy, const acc_t* drop, scalar_t* dz,
              int64_t len, acc_t scale, acc_t shift, acc_t mean, acc_t slope, double& sum_dz,
              double& sum_dz_centred) {
  for (int64_t b0 = 0; b0 < len; b0 += kFold) {
    const int64_t b1 = std::min(len, b0 + kFold);
    double s1[kLanes] = {}, s2[kLanes] = {};
    auto one = [&](int64_t i, int64_t l) {
      const acc_t vv = static_cast<acc_t>(v[i]);
      const acc_t z = vv * scale + shift;
      const acc_t d = static_cast<acc_t>(dy[i]) * drop[i] * (z > acc_t(0) ? acc_t(1) : slope);
      dz[i] = static_cast<scalar_t>(d);
      s1[l] += static_cast<double>(d);
      s2[l] += static_cast<double>(d) * static_cast<double>(vv - mean);
    };
    int64_t i = b0;
    for (; i + kLanes <= b1; i += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) one(i + l, l);
    for (; i < b1; ++i) one(i, 0);
    for (int64_t l = 0; l < kLanes; ++l) {
      sum_dz += s1[l];
      sum_dz_centred += s2[l];
    }
  }
}

struct CpuKernels {
  static void check_dtype(const at::Tensor& x, const char* op) { check_cpu_dtype(x, op, "x"); }

  static void moments(const at::Tensor& v, at::Tensor& mean, at::Tensor& var) {
    const int64_t N = v.size(0), Cj = v.size(1), HW = v.size(2) * v.size(3);
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "split_resplice_train_moments_cpu", [&] {
      const scalar_t* vp = v.const_data_ptr<scalar_t>();
      scalar_t* mp = mean.mutable_data_ptr<scalar_t>();
      scalar_t* qp = var.mutable_data_ptr<scalar_t>();
      const int64_t sn = v.stride(0), sc = v.stride(1);
      at::parallel_for(0, Cj, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          // Per plane: mean and centred sum of squares; planes merged pairwise (Chan et al.).
          double count = 0, mu = 0, m2 = 0;
          for (int64_t n = 0; n < N; ++n) {
            const scalar_t* plane = vp + n * sn + c * sc;
            const double pm =
                lane_sum(HW, [plane](int64_t i) { return static_cast<double>(plane[i]); }) / HW;
            const double q = lane_sum(HW, [plane, pm](int64_t i) {
              const double d = static_cast<double>(plane[i]) - pm;
              return d * d;
            });
            const double total = count + HW, delta = pm - mu;
            mu += delta * HW / total;
            m2 += q + delta * delta * count * HW / total;
            count = total;
          }
          mp[c] = static_cast<scalar_t>(mu);
          qp[c] = static_cast<scalar_t>(m2 / count);
        }
      });
    });
  }

  static void apply(const at::Tensor& v, const at::Tensor& mean, const at::Tensor& var,
                    const at::Tensor& gamma, const at::Tensor& beta, const StepArgs& a,
                    at::Tensor keep_dst, at::Tensor carry_dst) {
    const int64_t N = v.size(0), Cj = v.size(1), HW = v.size(2) * v.size(3);
    const int64_t keep = keep_dst.size(1);
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "split_resplice_train_apply_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* vp = v.const_data_ptr<scalar_t>();
      const at::Tensor g = gamma.contiguous(), b = beta.contiguous();
      const scalar_t *mp = mean.const_data_ptr<scalar_t>(), *qp = var.const_data_ptr<scalar_t>();
      const scalar_t *gp = g.const_data_ptr<scalar_t>(), *bp = b.const_data_ptr<scalar_t>();
      scalar_t* kp = keep_dst.mutable_data_ptr<scalar_t>();
      scalar_t* cp = carry_dst.defined() ? carry_dst.mutable_data_ptr<scalar_t>() : nullptr;
      const int64_t vn = v.stride(0), vc = v.stride(1);
      const int64_t kn = keep_dst.stride(0), kc = keep_dst.stride(1);
      const int64_t cn = cp ? carry_dst.stride(0) : 0, cc = cp ? carry_dst.stride(1) : 0;
      const acc_t slope = static_cast<acc_t>(a.slope);
      at::parallel_for(0, N * Cj, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> drop(a.p > 0 ? HW : 0);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / Cj, c = task % Cj;
          const acc_t scale = static_cast<acc_t>(gp[c]) /
                              std::sqrt(static_cast<acc_t>(qp[c]) + static_cast<acc_t>(a.eps));
          const acc_t shift = static_cast<acc_t>(bp[c]) - static_cast<acc_t>(mp[c]) * scale;
          const scalar_t* src = vp + n * vn + c * vc;
          scalar_t* dst = c < keep ? kp + n * kn + c * kc : cp + n * cn + (c - keep) * cc;
          if (a.p > 0)
            dropout_scales<acc_t>(a, static_cast<uint64_t>((n * Cj + c) * HW), HW, drop.data());
          bn_leaky_relu_plane<scalar_t, scalar_t, acc_t>(src, dst, HW, scale, shift, slope,
                                                         a.p > 0 ? drop.data() : nullptr);
        }
      });
    });
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_keep, const at::Tensor& grad_carry, const at::Tensor& v,
      const at::Tensor& mean, const at::Tensor& var, const at::Tensor& gamma,
      const at::Tensor& beta, const StepArgs& a) {
    const int64_t N = v.size(0), Cj = v.size(1), HW = v.size(2) * v.size(3);
    const int64_t keep = grad_keep.size(1);
    at::Tensor grad_v = at::empty_like(v, at::MemoryFormat::Contiguous);
    at::Tensor grad_gamma = at::empty({Cj}, v.options()), grad_beta = at::empty({Cj}, v.options());
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "split_resplice_train_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* vp = v.const_data_ptr<scalar_t>();
      const at::Tensor g = gamma.contiguous(), b = beta.contiguous();
      const scalar_t *mp = mean.const_data_ptr<scalar_t>(), *qp = var.const_data_ptr<scalar_t>();
      const scalar_t *gp = g.const_data_ptr<scalar_t>(), *bp = b.const_data_ptr<scalar_t>();
      const scalar_t* gkp = grad_keep.const_data_ptr<scalar_t>();
      const scalar_t* gcp = grad_carry.defined() ? grad_carry.const_data_ptr<scalar_t>() : nullptr;
      const int64_t vn = v.stride(0), vc = v.stride(1);
      const int64_t kn = grad_keep.stride(0), kc = grad_keep.stride(1);
      const int64_t cn = gcp ? grad_carry.stride(0) : 0, cc = gcp ? grad_carry.stride(1) : 0;
      scalar_t* gvp = grad_v.mutable_data_ptr<scalar_t>();
      scalar_t* ggp = grad_gamma.mutable_data_ptr<scalar_t>();
      scalar_t* gbp = grad_beta.mutable_data_ptr<scalar_t>();
      const acc_t slope = static_cast<acc_t>(a.slope);
      const double count = static_cast<double>(N * HW);
      at::parallel_for(0, Cj, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> drop(HW, acc_t(1));
        for (int64_t c = begin; c < end; ++c) {
          const acc_t mu = static_cast<acc_t>(mp[c]);
          const acc_t invstd = acc_t(1) / std::sqrt(static_cast<acc_t>(qp[c]) + static_cast<acc_t>(a.eps));
          const acc_t gamma_c = static_cast<acc_t>(gp[c]);
          const acc_t scale = gamma_c * invstd;
          const acc_t shift = static_cast<acc_t>(bp[c]) - mu * scale;
          // Pass 1: dz = dy · dropout · LeakyReLU'(z), stored in grad_v; Σdz and Σdz·v̂.
          double sum_dz = 0, sum_dz_centred = 0;
          for (int64_t n = 0; n < N; ++n) {
            const scalar_t* src = vp + n * vn + c * vc;
            const scalar_t* dy = c < keep ? gkp + n * kn + c * kc
                                          : (gcp ? gcp + n * cn + (c - keep) * cc : nullptr);
            scalar_t* dz = gvp + (n * Cj + c) * HW;
            if (dy == nullptr) {  // the last step's carried channels: no gradient reaches them
              std::fill(dz, dz + HW, scalar_t(0));
              continue;
            }
            if (a.p > 0)
              dropout_scales<acc_t>(a, static_cast<uint64_t>((n * Cj + c) * HW), HW, drop.data());
            plane_dz<scalar_t, acc_t>(src, dy, drop.data(), dz, HW, scale, shift, mu, slope,
                                      sum_dz, sum_dz_centred);
          }
          const double sum_dz_vhat = sum_dz_centred * static_cast<double>(invstd);
          ggp[c] = static_cast<scalar_t>(sum_dz_vhat);
          gbp[c] = static_cast<scalar_t>(sum_dz);
          // Pass 2: grad_v = γ·invstd·(dz − mean(dz) − v̂·mean(dz·v̂)), in place.
          const acc_t mean_dz = static_cast<acc_t>(sum_dz / count);
          const acc_t mean_dz_vhat = static_cast<acc_t>(sum_dz_vhat / count);
          for (int64_t n = 0; n < N; ++n) {
            const scalar_t* src = vp + n * vn + c * vc;
            scalar_t* dz = gvp + (n * Cj + c) * HW;
            for (int64_t i = 0; i < HW; ++i) {
              const acc_t vhat = (static_cast<acc_t>(src[i]) - mu) * invstd;
              dz[i] = static_cast<scalar_t>(batch_norm_input_grad(
                  static_cast<acc_t>(dz[i]), vhat, scale, mean_dz, mean_dz_vhat));
            }
          }
        }
      });
    });
    return {grad_v, grad_gamma, grad_beta};
  }
};

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>
split_resplice_train_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList gammas,
                         at::TensorList betas, double eps, double negative_slope, double dropout,
                         const at::Tensor& seed) {
  return split_resplice_train_forward<CpuKernels>(x, weights, gammas, betas, eps,
                                                  negative_slope, dropout, seed);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
split_resplice_train_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                  at::TensorList weights, at::TensorList gammas,
                                  at::TensorList betas, at::TensorList pre,
                                  at::TensorList inputs, const at::Tensor& mean,
                                  const at::Tensor& var, double eps, double negative_slope,
                                  double dropout, const at::Tensor& seed) {
  return split_resplice_train_backward<CpuKernels>(grad_out, x, weights, gammas, betas, pre,
                                                   inputs, mean, var, eps, negative_slope,
                                                   dropout, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(saffnet_fast, CPU, m) {
  m.impl("split_resplice_train", &split_resplice_train_cpu);
  m.impl("split_resplice_train_backward", &split_resplice_train_backward_cpu);
}

}  // namespace saffnet_fast

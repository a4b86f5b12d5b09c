// Vectorised float32 sigmoid for the CPU attention kernels, on GCC vector extensions
// (64-byte vectors: one AVX-512 register, two AVX2 registers in the other clones).
//
// Why not std::exp: a scalar libm call per element cost more than the two 1×1 convolutions
// of aff_fuse together (measured: ~70% of the forward at C=64, 64×48). This is the Cephes
// expf (range reduction by ln 2 in two parts, degree-5 polynomial, exponent built from the
// integer bits), max relative error ~2 ulp on the clamped range, far below the 1e-5 float32
// parity budget. double keeps the scalar libm path (1e-10 budget).
#pragma once

#include <cstdint>
#include <cstring>

#include "../common/attention_math.h"
#include "../common/macros.h"

namespace saffnet_fast {

typedef float vfloat16 __attribute__((vector_size(64)));
typedef int32_t vint16 __attribute__((vector_size(64)));

SAFFNET_ALWAYS_INLINE vfloat16 vec_exp(vfloat16 x) {
  // exp(88.37) is near FLT_MAX; below -87.3, 2^n would need a denormal exponent.
  x = x > 88.3762626647949f ? vfloat16{} + 88.3762626647949f : x;
  x = x < -87.3f ? vfloat16{} - 87.3f : x;
  // n = round(x / ln 2) by the 1.5·2^23 trick (|x / ln 2| < 2^22).
  const vfloat16 shifted = x * 1.44269504088896341f + 12582912.0f;
  const vfloat16 n = shifted - 12582912.0f;
  vfloat16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vfloat16 y = vfloat16{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const vint16 bits = (__builtin_convertvector(n, vint16) + 127) << 23;
  vfloat16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

SAFFNET_ALWAYS_INLINE vfloat16 vec_sigmoid(vfloat16 v) {
  return 1.0f / (1.0f + vec_exp(-v));
}

// v[i] = σ(v[i]) for a run of `count` values: whole 16-float vectors, then the remainder
// through one zero-padded vector. double: libm.
SAFFNET_CPU_CLONES inline void sigmoid_values(float* v, int64_t count) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    vfloat16 a;
    std::memcpy(&a, v + i, sizeof(a));
    a = vec_sigmoid(a);
    std::memcpy(v + i, &a, sizeof(a));
  }
  if (i < count) {
    vfloat16 a{};
    std::memcpy(&a, v + i, (count - i) * sizeof(float));
    a = vec_sigmoid(a);
    std::memcpy(v + i, &a, (count - i) * sizeof(float));
  }
}
inline void sigmoid_values(double* v, int64_t count) {
  for (int64_t i = 0; i < count; ++i) v[i] = sigmoid(v[i]);
}

}  // namespace saffnet_fast

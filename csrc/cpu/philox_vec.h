// Philox-4×32-10 for 32 counters at once (GCC vector extensions: 8 × uint64 lanes holding
// 32-bit values, so the 32×32→64 products are plain vector multiplies), computing exactly
// what at::Philox4_32(seed, subsequence = group, offset = step) yields for each group: the
// CPU dropout of split_resplice_train draws the same bits as the CUDA kernels, which call
// at::Philox4_32 per element (batch_norm_act.h). tests/test_native_training.py checks the
// bits against a NumPy port of ATen's engine.
//
// Why: one scalar engine per 4 elements cost 6.5 ms of SR(64)'s 13 ms forward and again of
// its backward (training, dropout 0.1, batch 8, 64×48, 2 threads; profiled with dropout 0
// and 0.1).
#pragma once

#include <cstdint>

#include "../common/macros.h"

namespace saffnet_fast {

typedef uint64_t philox_u64x8 __attribute__((vector_size(64)));

// Groups per call: kPhiloxVectors independent 8-lane chains, interleaved. One chain is
// latency-bound (each round's 64-bit multiply waits for the last). 2M elements on one core
// of the development Xeon (AVX-512 clone): 1 chain 5.5 ms, 4 chains 1.77 ms, 8 chains
// 1.38 ms.
constexpr int kPhiloxVectors = 8;
constexpr int kPhiloxGroups = 8 * kPhiloxVectors;

// r[k][g]: output k of the block with counter (step, group0 + g), key = seed.
SAFFNET_ALWAYS_INLINE void philox_groups_body(uint64_t seed, uint64_t step, uint64_t group0,
                                              uint32_t (&r)[4][kPhiloxGroups]) {
  constexpr uint64_t kMask = 0xffffffffull;
  constexpr uint64_t kSA = 0xD2511F53ull, kSB = 0xCD9E8D57ull;
  constexpr uint32_t k10A = 0x9E3779B9u, k10B = 0xBB67AE85u;
  philox_u64x8 c0[kPhiloxVectors], c1[kPhiloxVectors], c2[kPhiloxVectors], c3[kPhiloxVectors];
  for (int v = 0; v < kPhiloxVectors; ++v) {
    for (int l = 0; l < 8; ++l) {
      const uint64_t g = group0 + static_cast<uint64_t>(8 * v + l);
      c0[v][l] = step & kMask;
      c1[v][l] = step >> 32;
      c2[v][l] = g & kMask;
      c3[v][l] = g >> 32;
    }
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int v = 0; v < kPhiloxVectors; ++v) {
      const philox_u64x8 p0 = c0[v] * kSA, p1 = c2[v] * kSB;
      const philox_u64x8 n0 = (p1 >> 32) ^ c1[v] ^ static_cast<uint64_t>(k0);
      const philox_u64x8 n2 = (p0 >> 32) ^ c3[v] ^ static_cast<uint64_t>(k1);
      c1[v] = p1 & kMask;
      c3[v] = p0 & kMask;
      c0[v] = n0;
      c2[v] = n2;
    }
    k0 += k10A;
    k1 += k10B;
  }
  for (int v = 0; v < kPhiloxVectors; ++v) {
    for (int l = 0; l < 8; ++l) {
      r[0][8 * v + l] = static_cast<uint32_t>(c0[v][l]);
      r[1][8 * v + l] = static_cast<uint32_t>(c1[v][l]);
      r[2][8 * v + l] = static_cast<uint32_t>(c2[v][l]);
      r[3][8 * v + l] = static_cast<uint32_t>(c3[v][l]);
    }
  }
}

SAFFNET_CPU_CLONES inline void philox_groups(uint64_t seed, uint64_t step, uint64_t group0,
                                             uint32_t (&r)[4][kPhiloxGroups]) {
  philox_groups_body(seed, step, group0, r);
}

}  // namespace saffnet_fast

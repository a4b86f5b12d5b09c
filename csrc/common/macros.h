// Host/device qualifiers shared by the CPU (.cpp) and CUDA (.cu) translation units, mmcv
// style: the per-element math in csrc/common/*.h is written once and compiled by both g++
// and nvcc.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SAFFNET_HOST_DEVICE __host__ __device__
#define SAFFNET_HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define SAFFNET_HOST_DEVICE
#define SAFFNET_HOST_DEVICE_INLINE inline
#endif

// CPU kernels' hot loops are compiled several times, for x86-64-v4 (AVX-512), x86-64-v3
// (AVX2 + FMA) and the baseline, and the loader picks the best clone for the running CPU
// (GCC function multiversioning), so a portable build still uses the wide vector units.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define SAFFNET_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SAFFNET_CPU_CLONES
#endif
#define SAFFNET_ALWAYS_INLINE inline __attribute__((always_inline))

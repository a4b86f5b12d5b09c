// Host-side argument checks shared by every op and every dispatch key, so the CPU and CUDA
// kernels reject bad input with the same message (naming the op and the argument).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace saffnet_fast {

// x must be a floating-point N×C×H×W tensor with a non-empty batch and non-empty planes.
inline void check_nchw(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": ", name,
                    ": expected a 4-D N×C×H×W tensor, got ", x.dim(), "-D shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": ", name,
                   ": expected a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.size(0) > 0, op, ": ", name, ": empty batch (shape ", x.sizes(), ")");
  TORCH_CHECK_VALUE(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, op, ": ", name,
                    ": expected C, H and W ≥ 1, got shape ", x.sizes());
}

// t must have exactly `sizes`, the dtype and device of `like`.
inline void check_like(const at::Tensor& t, at::IntArrayRef sizes, const at::Tensor& like,
                       const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == sizes, op, ": ", name, ": expected shape ", sizes, ", got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": ", name, ": expected dtype ",
                   like.scalar_type(), " (the dtype of x), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, ": expected device ",
                    like.device(), " (the device of x), got ", t.device());
}

inline void check_cpu_dtype(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": ",
                   name, ": the CPU kernels take float32 or float64, got ", x.scalar_type());
}

inline void check_cuda_dtype(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                       x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   op, ": ", name,
                   ": the CUDA kernels take float32, float64, float16 or bfloat16, got ",
                   x.scalar_type());
}

}  // namespace saffnet_fast

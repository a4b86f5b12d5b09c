// Schemas of coord_scale: coordinate attention's output x·a_h·a_w (a_h N×C×H over rows,
// a_w N×C×W over columns) in one pass, without the N×C×H×W broadcast product the eager
// reference materialises. Kernels: cpu/coord_scale_kernel.cpp, cuda/coord_scale_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(saffnet_fast, m) {
  m.def("coord_scale(Tensor x, Tensor a_h, Tensor a_w) -> Tensor");
  m.def("coord_scale_out(Tensor x, Tensor a_h, Tensor a_w, Tensor(a!) out) -> ()");
  // -> (grad_x = g·a_h·a_w, grad_a_h = Σ_w g·x·a_w, grad_a_w = Σ_h g·x·a_h)
  m.def("coord_scale_backward(Tensor grad_out, Tensor x, Tensor a_h, Tensor a_w) -> "
        "(Tensor, Tensor, Tensor)");
}

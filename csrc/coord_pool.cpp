// Schemas of coord_pool: the two directional means of coordinate attention, from one read
// of x. Kernels: cpu/coord_pool_kernel.cpp, cuda/coord_pool_kernel.cu. Fake kernels and
// autograd: saffnet_fast/ops/native.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(saffnet_fast, m) {
  // (pool_h N×C×H = x.mean(3), pool_w N×C×W = x.mean(2))
  m.def("coord_pool(Tensor x) -> (Tensor, Tensor)");
  // The same into caller-provided outputs (any strides); every element is written.
  m.def("coord_pool_out(Tensor x, Tensor(a!) pool_h, Tensor(b!) pool_w) -> ()");
  // grad_x = grad_h[..., None] / W + grad_w[..., None, :] / H, N×C×H×W contiguous.
  m.def("coord_pool_backward(Tensor grad_h, Tensor grad_w) -> Tensor");
}

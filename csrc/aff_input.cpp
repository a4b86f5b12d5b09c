// Schemas of aff_input: AFF's input xa = x·(1 + a_h ⊗ a_w) for the training path that keeps
// local_att's activations (saffnet_fast/ops/native.py, "stored" local branch; aff_combine
// forms its output). Kernels: cpu/aff_input_kernel.cpp, cuda/aff_input_kernel.cu, which run
// the coord_scale kernels with offset 1 (coord_scale computes x·(0 + a_h ⊗ a_w)).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(saffnet_fast, m) {
  // -> (t, t_sum): t = x·(1 + a_h ⊗ a_w), N×C×H×W stored channel-major (memory order
  // C, N, H, W): the local branch's 1×1 convolutions then run as single GEMMs on t's
  // C×(N·H·W) view; t_sum = Σ_hw t, N×C, the global branch's input (times 1/(H·W)), from
  // the same pass.
  m.def("aff_input(Tensor x, Tensor a_h, Tensor a_w) -> (Tensor, Tensor)");
  // with g = grad_t + grad_sum[n, c] (grad_sum optional):
  // -> (grad_x = g·(1 + a_h·a_w), grad_a_h = Σ_w g·x·a_w, grad_a_w = Σ_h g·x·a_h)
  m.def("aff_input_backward(Tensor grad_t, Tensor? grad_sum, Tensor x, Tensor a_h, "
        "Tensor a_w) -> (Tensor, Tensor, Tensor)");
}

// Schemas of aff_input, aff_combine and aff_pair_combine: AFF's input and its output from
// its logits, the epilogue of the training path
// that keeps local_att's activations (saffnet_fast/ops/native.py, "stored" local branch):
//   m = a_h ⊗ a_w,  wei = σ(local_logit + global_logit[n, c]),  out = 2·x·(1 + (m − 1)·wei)
// which is AFF(x·m, x) once local_att (convolutions and BNs) has run as its own layers.
// One pass instead of the reference's six full-size elementwise ops (sigmoid, add, two mul,
// sub, add) and their backward graph. Math: csrc/common/attention_math.h (aff_combine).
// Kernels: cpu/aff_combine_kernel.cpp, cuda/aff_combine_kernel.cu (aff_combine),
// cpu/ and cuda/aff_pair_combine_kernel.* (aff_pair_combine).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(saffnet_fast, m) {
  // -> (t, t_sum): t = x·(1 + a_h ⊗ a_w), AFF's xa, N×C×H×W stored channel-major (memory
  // order C, N, H, W): the local branch's 1×1 convolutions then run as single GEMMs on t's
  // C×(N·H·W) view; t_sum = Σ_hw t, N×C, the global branch's input (times 1/(H·W)), from
  // the same pass. Kernels: the coord_scale kernels with offset 1 (cpu/ and
  // cuda/coord_scale_kernel.*).
  m.def("aff_input(Tensor x, Tensor a_h, Tensor a_w) -> (Tensor, Tensor)");
  // with g = grad_t + grad_sum[n, c] (grad_sum optional):
  // -> (grad_x = g·(1 + a_h·a_w), grad_a_h = Σ_w g·x·a_w, grad_a_w = Σ_h g·x·a_h)
  m.def("aff_input_backward(Tensor grad_t, Tensor? grad_sum, Tensor x, Tensor a_h, "
        "Tensor a_w) -> (Tensor, Tensor, Tensor)");
  // local_logit N×C×H×W (the BN'd local_att output), global_logit N×C
  m.def("aff_combine(Tensor x, Tensor a_h, Tensor a_w, Tensor local_logit, "
        "Tensor global_logit) -> Tensor");
  // -> (grad_x, grad_a_h, grad_a_w, grad_local_logit, grad_global_logit)
  m.def("aff_combine_backward(Tensor grad_out, Tensor x, Tensor a_h, Tensor a_w, "
        "Tensor local_logit, Tensor global_logit) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The official AFF(x, residual) from its logits (FastAFF's stored local branch):
  //   wei = σ(local_logit + global_logit[n, c]),  out = 2·residual + 2·(x − residual)·wei
  m.def("aff_pair_combine(Tensor x, Tensor residual, Tensor local_logit, "
        "Tensor global_logit) -> Tensor");
  // -> (grad_x, grad_residual, grad_local_logit, grad_global_logit)
  m.def("aff_pair_combine_backward(Tensor grad_out, Tensor x, Tensor residual, "
        "Tensor local_logit, Tensor global_logit) -> (Tensor, Tensor, Tensor, Tensor)");
}

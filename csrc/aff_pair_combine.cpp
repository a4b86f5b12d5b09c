// Schemas of aff_pair_combine: the official AFF(x, residual) from its logits, the epilogue
// of FastAFF's training path that keeps local_att's activations (as aff_combine is SCAFF's
// and SAWF's). Math: csrc/common/attention_math.h (aff_pair_combine). Kernels:
// cpu/aff_pair_combine_kernel.cpp, cuda/aff_pair_combine_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(saffnet_fast, m) {
  //   wei = σ(local_logit + global_logit[n, c]),  out = 2·residual + 2·(x − residual)·wei
  m.def("aff_pair_combine(Tensor x, Tensor residual, Tensor local_logit, "
        "Tensor global_logit) -> Tensor");
  // -> (grad_x, grad_residual, grad_local_logit, grad_global_logit)
  m.def("aff_pair_combine_backward(Tensor grad_out, Tensor x, Tensor residual, "
        "Tensor local_logit, Tensor global_logit) -> (Tensor, Tensor, Tensor, Tensor)");
}

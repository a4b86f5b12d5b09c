// Schemas of aff_combine: AFF's output from its logits, the epilogue of the training path
// that keeps local_att's activations (saffnet_fast/ops/native.py, "stored" local branch):
//   m = a_h ⊗ a_w,  wei = σ(local_logit + global_logit[n, c]),  out = 2·x·(1 + (m − 1)·wei)
// which is AFF(x·m, x) once local_att (convolutions and BNs) has run as its own layers.
// One pass instead of the reference's six full-size elementwise ops (sigmoid, add, two mul,
// sub, add) and their backward graph. Math: csrc/common/attention_math.h (aff_combine).
// Kernels: cpu/aff_combine_kernel.cpp, cuda/aff_combine_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(saffnet_fast, m) {
  // local_logit N×C×H×W (the BN'd local_att output), global_logit N×C
  m.def("aff_combine(Tensor x, Tensor a_h, Tensor a_w, Tensor local_logit, "
        "Tensor global_logit) -> Tensor");
  // -> (grad_x, grad_a_h, grad_a_w, grad_local_logit, grad_global_logit)
  m.def("aff_combine_backward(Tensor grad_out, Tensor x, Tensor a_h, Tensor a_w, "
        "Tensor local_logit, Tensor global_logit) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

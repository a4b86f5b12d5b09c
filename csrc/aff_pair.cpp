// Schemas of aff_pair: the official AFF(x, residual) on two N×C×H×W tensors, inference form
// (local_att's BNs folded into (w1, b1), (w2, b2); the global branch's logit given), the
// per-pixel pass of the drop-in FastAFF. In training, FastAFF takes local_att's batch
// statistics with aff_moments on xa = x + residual (factors zero) and then calls this op.
// Math: csrc/common/attention_math.h. Kernels: cpu/aff_pair_kernel.cpp,
// cuda/aff_pair_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(saffnet_fast, m) {
  m.def("aff_pair(Tensor x, Tensor residual, Tensor global_logit, Tensor w1, Tensor b1, "
        "Tensor w2, Tensor b2) -> Tensor");
  // -> (grad_x, grad_residual, grad_global_logit, grad_w1, grad_b1, grad_w2, grad_b2)
  m.def("aff_pair_backward(Tensor grad_out, Tensor x, Tensor residual, Tensor global_logit, "
        "Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

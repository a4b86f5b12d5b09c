// Schemas of aff_fuse: AFF(x·m, x) with m = a_h ⊗ a_w, the full-size pass of SCAFF
// (m = coordinate attention) and SAWF (m = the SE+ gate, a_h = gate broadcast over H and
// a_w = 1), inference form: local_att's BNs folded into (w1, b1), (w2, b2), the global
// branch's logit given. Math: csrc/common/attention_math.h. Kernels:
// cpu/aff_fuse_kernel.cpp, cuda/aff_fuse_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(saffnet_fast, m) {
  m.def("aff_fuse(Tensor x, Tensor a_h, Tensor a_w, Tensor global_logit, Tensor w1, Tensor b1, "
        "Tensor w2, Tensor b2) -> Tensor");
  m.def("aff_fuse_out(Tensor x, Tensor a_h, Tensor a_w, Tensor global_logit, Tensor w1, "
        "Tensor b1, Tensor w2, Tensor b2, Tensor(a!) out) -> ()");
  // -> (grad_x, grad_a_h, grad_a_w, grad_global_logit, grad_w1, grad_b1, grad_w2, grad_b2)
  m.def("aff_fuse_backward(Tensor grad_out, Tensor x, Tensor a_h, Tensor a_w, "
        "Tensor global_logit, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

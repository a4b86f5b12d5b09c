// Schemas of aff_moments: the batch statistics of AFF's local branch in training mode, the
// producing half of "BN statistics in the producer, BN-apply in the consumer". With
// t = x·(1 + a_h ⊗ a_w) (AFF's xa, as in aff_fuse):
//   stage 1 (w2, b2 None):  y = W1·t + b1                     (local_att conv1, pre-BN)
//   stage 2 (w2, b2 given): y = W2·relu(W1·t + b1) + b2       (conv2 pre-BN; (w1, b1) is
//                                                             conv1 with BN1 already folded
//                                                             from stage 1's statistics)
// and returns each channel's mean and biased variance over N·H·W, without writing y: the
// consumer (aff_fuse) applies the BNs folded from these statistics. Math:
// csrc/common/attention_math.h. Kernels: cpu/aff_moments_kernel.cpp,
// cuda/aff_moments_kernel.cu. Fake kernels, autograd and the running-statistics update:
// saffnet_fast/ops/native.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(saffnet_fast, m) {
  // -> (mean, var), each of y's channel count (Ci in stage 1, C in stage 2)
  m.def("aff_moments(Tensor x, Tensor a_h, Tensor a_w, Tensor w1, Tensor b1, Tensor? w2, "
        "Tensor? b2) -> (Tensor, Tensor)");
  // -> (grad_x, grad_a_h, grad_a_w, grad_w1, grad_b1, grad_w2, grad_b2); grad_w2 / grad_b2
  // are empty (0 elements) in stage 1.
  m.def("aff_moments_backward(Tensor grad_mean, Tensor grad_var, Tensor x, Tensor a_h, "
        "Tensor a_w, Tensor w1, Tensor b1, Tensor? w2, Tensor? b2, Tensor mean) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// Schemas of split_resplice_train: SR(C, s) in training mode, each step
//   v_j = conv3×3(in_j; W_j)                       (pre-BN, stored for backward)
//   y_j = Dropout_p(LeakyReLU(BN_batch(v_j; γ_j, β_j)))
// with in_0 = slice 1 of x and in_j = cat(slice j+1, carry(j−1)). Per step: the convolution
// (ATen: oneDNN on the CPU, cuDNN on CUDA), one fused statistics pass over v_j, and one fused
// BN-apply + LeakyReLU + dropout pass that writes y_j's kept channels straight into their
// slice of `out` and its carried channels straight into the next step's input buffer (no
// cat of outputs). Dropout masks come from Philox keyed by (seed, step, element) and are
// regenerated in backward (csrc/common/batch_norm_act.h). Backward per step, in reverse: one
// fused pass for the BN/LeakyReLU/dropout statistics, one fused pass writing grad v_j, then
// ATen's convolution_backward. Driver: csrc/common/split_resplice_train.h; kernels:
// cpu/split_resplice_train_kernel.cpp, cuda/split_resplice_train_kernel.cu. The running
// statistics are updated from the returned batch mean / biased variance in
// saffnet_fast/ops/native.py, as nn.BatchNorm2d does.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(saffnet_fast, m) {
  // -> (out N×C×H×W, pre [v_j], inputs [in_j for j ≥ 1], mean Σc_j, var Σc_j (biased))
  // seed: a one-element int64 tensor, on the CPU or on x's device (drawn there, it costs no
  // host sync and a CUDA graph replay draws a new one: see StepArgs); torch.compile traces
  // a freshly drawn seed either way.
  m.def("split_resplice_train(Tensor x, Tensor[] weights, Tensor[] gammas, Tensor[] betas, "
        "float eps, float negative_slope, float dropout, Tensor seed) -> "
        "(Tensor, Tensor[], Tensor[], Tensor, Tensor)");
  // -> (grad_x, grad_weights, grad_gammas, grad_betas)
  m.def("split_resplice_train_backward(Tensor grad_out, Tensor x, Tensor[] weights, "
        "Tensor[] gammas, Tensor[] betas, Tensor[] pre, Tensor[] inputs, Tensor mean, "
        "Tensor var, float eps, float negative_slope, float dropout, Tensor seed) -> "
        "(Tensor, Tensor[], Tensor[], Tensor[])");
}

// Schema of split_resplice: SR(C, s) in inference form (BN folded into each step's conv,
// Dropout the identity), every step's output written straight into its slice of the result
// (no cat copies). Channel plan: csrc/common/split_resplice.h. Kernels:
// cpu/split_resplice_kernel.cpp, cuda/split_resplice_kernel.cu. The backward is ATen
// convolution-gradient arithmetic registered from saffnet_fast/ops/native.py, fed by the
// second output (the carried channels of every step but the last).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(saffnet_fast, m) {
  // -> (out N×C×H×W, carries N×Σ_j floor(c_j/2)×H×W)
  m.def("split_resplice(Tensor x, Tensor[] weights, Tensor[] biases, float negative_slope) -> "
        "(Tensor, Tensor)");
  // The same into caller-provided contiguous outputs; every element is written.
  m.def("split_resplice_out(Tensor x, Tensor[] weights, Tensor[] biases, float negative_slope, "
        "Tensor(a!) out, Tensor(b!) carries) -> ()");
}

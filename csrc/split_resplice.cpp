// Schemas of split_resplice: SR(C, s) in inference form (BN folded into each step's conv,
// Dropout the identity), every step's output written straight into its slice of the result
// (no cat copies). Channel plan: csrc/common/split_resplice.h. Kernels:
// cpu/split_resplice_kernel.cpp, cuda/split_resplice_kernel.cu; split_resplice_tiled:
// common/split_resplice_tile.h, run by cuda/split_resplice_kernel.cu and emulated serially
// by cpu/split_resplice_tiled_kernel.cpp. The backward is ATen
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
  // The single-launch halo-tiled program (common/split_resplice_tile.h) with an explicit
  // tile (0, 0: automatic; when no tile fits, split_resplice's per-step kernels). On CUDA, one launch; on the CPU, a serial emulation of the same
  // program for testing it (slow: the CPU split_resplice is the fast CPU path). With
  // write_carries false the second output is N×0×H×W (inference without autograd).
  m.def("split_resplice_tiled(Tensor x, Tensor[] weights, Tensor[] biases, float negative_slope, "
        "int tile_h=0, int tile_w=0, bool write_carries=True) -> (Tensor, Tensor)");
}

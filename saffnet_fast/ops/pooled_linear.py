"""The 1×1 convolutions on pooled vectors (CA's conv1 / bn1 / h_swish and conv_h / conv_w,
AFF's global branch, SE+'s layers).

``pooled_linear``: act(BN(y·Wᵀ + b)) on pooled M×K rows, BN on the rows' batch
statistics. Native only; its autograd is registered in C++ (csrc/pooled_linear.cpp,
PooledLinearFunction): torch.library's Python registration cost ~60 µs per call forward +
backward, three times the op (103 against 57 µs measured at 224×128 → 8).

Schema (csrc/pooled_linear.cpp):
  pooled_linear(y, weight, bias?, bn_weight?, bn_bias?, batch_norm, eps, act)
      -> (out, normalised, mean, var)      (mean / var empty without batch_norm)

``pooled_conv1x1(y, weight, bias?)``: one 1×1 convolution on N×C×L pooled vectors as an
ATen matmul, the native backend's row (see its docstring for the measurement); a backend
without it runs the module's own convolution, as the reference does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# act codes of the op
ACT_IDENTITY, ACT_RELU, ACT_HSWISH, ACT_SIGMOID = 0, 1, 2, 3


def pooled_conv1x1(y: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """A 1×1 convolution (weight M×C) on pooled N×C×L vectors (L = H + W, H, W or 1) as one
    matmul (F.linear for L = 1). Why: oneDNN's 1×1 convolution on these tiny maps costs
    220–340 µs forward + backward at 2 threads, a matmul / linear 56–116 µs (SCAFF(128) at
    batch 8: 5 such convolutions)."""
    if y.shape[2] == 1:
        return F.linear(y.squeeze(2), weight, bias).unsqueeze(2)
    y = torch.matmul(weight, y)
    return y if bias is None else y + bias[:, None]


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def register_native() -> None:
    @torch.library.register_fake("saffnet_fast::pooled_linear")
    def _pooled_linear_fake(y, weight, bias, bn_weight, bn_bias, batch_norm, eps, act):
        rows, features = y.shape[0], weight.shape[0]
        acc = _opmath(y.dtype)
        stats = features if batch_norm else 0
        return (y.new_empty((rows, features)), y.new_empty((rows, features), dtype=acc),
                y.new_empty((stats,), dtype=acc), y.new_empty((stats,), dtype=acc))

    @torch.library.register_fake("saffnet_fast::pooled_linear_backward")
    def _pooled_linear_backward_fake(grad_out, y, weight, bias, bn_weight, bn_bias, batch_norm,
                                     eps, act, out, normalised, var):
        features = weight.shape[0]
        stats = features if batch_norm else 0
        return (y.new_empty(y.shape), y.new_empty(weight.shape), y.new_empty((features,)),
                y.new_empty((stats,)), y.new_empty((stats,)))

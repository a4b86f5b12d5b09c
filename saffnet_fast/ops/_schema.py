"""What the ops' schema-side Python shares: the C++ argument checks for fake tensors, the
output layout the kernels allocate, and the autograd of an op whose backward is one op."""
from __future__ import annotations

import torch

# Namespaces of the op vocabulary: one op name and schema per function, one namespace per
# backend (csrc/ defines the first, ops/triton/ the second with the same schemas).
NATIVE = "saffnet_fast"
TRITON = "saffnet_fast_triton"


def check_nchw(x: torch.Tensor, op: str, name: str = "x") -> None:
    """The checks of csrc/common/checks.h, for fake tensors (the C++ kernels do not run)."""
    torch._check(x.dim() == 4,
                 lambda: f"{op}: {name}: expected a 4-D N×C×H×W tensor, got shape {tuple(x.shape)}")
    torch._check(x.is_floating_point(),
                 lambda: f"{op}: {name}: expected a floating-point tensor, got {x.dtype}")


def out_like(x: torch.Tensor) -> torch.Tensor:
    """A full-size output as the kernels allocate it: channels_last when x is (and is not
    also contiguous), else contiguous."""
    channels_last = (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(
        x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def register_backward_op_autograd(namespace: str, op: str) -> None:
    """Autograd for ``<namespace>::<op>`` whose backward is the one op
    ``<op>_backward(grad_out, *inputs)`` of the same namespace returning a gradient for
    every input: the inputs are saved as they are, and only the gradients autograd asks
    for are handed back."""
    backward_op = getattr(getattr(torch.ops, namespace), f"{op}_backward")

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_out):
        grads = backward_op(grad_out, *ctx.saved_tensors)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))

    torch.library.register_autograd(f"{namespace}::{op}", _backward, setup_context=_setup)

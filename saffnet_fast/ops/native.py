"""Python side of the native ops: fake kernels, autograd, and the entry points.

The C++ side (``csrc/``) defines the schemas and the CPU / CUDA kernels of every op in the
``saffnet_fast`` namespace. Here, only when the extension loaded, each op gets
  * a fake kernel (``torch.library.register_fake``) so ``torch.compile`` and FakeTensor
    tracing see its output shapes without running it, and
  * an autograd formula (``torch.library.register_autograd``) whose backward is itself a
    native op (fused kernels), except the inference form of split_resplice, whose backward
    is ATen convolution gradients.

Two modes, as in ``../shared/spec/kernels.md``:
  * inference (module.eval()): every BN folded into the adjacent convolution from its
    running statistics; Dropout off;
  * training: the SR steps take their BN batch statistics from a fused statistics pass
    inside ``split_resplice_train``, apply them in the consuming fused kernel, and the
    running statistics are updated here exactly as ``nn.BatchNorm2d`` does (momentum or
    cumulative average, unbiased running variance, ``num_batches_tracked``). AFF's local
    branch in SCAFF / SAWF runs, by default, as GEMMs between ``aff_input`` and
    ``aff_combine`` with the module's own BN layers (``TRAINING_LOCAL_BRANCH = "stored"``);
    ``"recompute"`` (and the official AFF's ``native_aff``) take local_att's statistics from
    ``aff_moments`` and apply them in ``aff_fuse`` / ``aff_pair``. The layers on pooled
    vectors (CA's conv1 / bn1 / h_swish and conv_h / conv_w, AFF's global branch) run as
    ``pooled_linear`` ops (BN on the batch statistics of the pooled rows, running
    statistics updated here), or through the module's own layers when a BN there is not a
    training-mode nn.BatchNorm2d.

The entry points ``native_*`` take a reference module (``saffnet_fast.nn.reference``) and
its input and compute the module's output with the native kernels. Parameters enter the
ops as inputs (BN folded with differentiable ATen arithmetic in eval mode), so autograd
reaches the module's parameters exactly as it does through the reference.
"""
from __future__ import annotations

import weakref
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._native import has_native, require_native
from ._modules import is_1x1_conv
from ..nn.reference import SplitResplice, _check_aff_inputs, _check_input

__all__ = [
    "KERNEL_DTYPES",
    "NATIVE_OPS",
    "native_aff",
    "native_coord_pool",
    "native_coordinate_attention",
    "native_scaff",
    "native_sawf",
    "native_split_resplice",
    "unsupported_reason",
]

# Every op the extension defines (qualified names); the CUDA build check and the tests walk
# this list.
NATIVE_OPS = (
    "saffnet_fast::coord_pool",
    "saffnet_fast::coord_pool_out",
    "saffnet_fast::coord_pool_backward",
    "saffnet_fast::aff_fuse",
    "saffnet_fast::aff_fuse_out",
    "saffnet_fast::aff_fuse_backward",
    "saffnet_fast::coord_scale",
    "saffnet_fast::coord_scale_out",
    "saffnet_fast::coord_scale_backward",
    "saffnet_fast::split_resplice",
    "saffnet_fast::split_resplice_out",
    "saffnet_fast::split_resplice_tiled",
    "saffnet_fast::aff_moments",
    "saffnet_fast::aff_moments_backward",
    "saffnet_fast::split_resplice_train",
    "saffnet_fast::split_resplice_train_backward",
    "saffnet_fast::aff_pair",
    "saffnet_fast::aff_pair_backward",
    "saffnet_fast::aff_input",
    "saffnet_fast::aff_input_backward",
    "saffnet_fast::aff_combine",
    "saffnet_fast::aff_combine_backward",
    "saffnet_fast::aff_pair_combine",
    "saffnet_fast::aff_pair_combine_backward",
    "saffnet_fast::pooled_linear",
    "saffnet_fast::pooled_linear_backward",
)


def _check_nchw(x: torch.Tensor, op: str, name: str = "x") -> None:
    """The checks of csrc/common/checks.h, for fake tensors (the C++ kernels do not run)."""
    torch._check(x.dim() == 4,
                 lambda: f"{op}: {name}: expected a 4-D N×C×H×W tensor, got shape {tuple(x.shape)}")
    torch._check(x.is_floating_point(),
                 lambda: f"{op}: {name}: expected a floating-point tensor, got {x.dtype}")


# ---------------------------------------------------------------------------------------
# coord_pool
# ---------------------------------------------------------------------------------------
def _register_coord_pool() -> None:
    @torch.library.register_fake("saffnet_fast::coord_pool")
    def _coord_pool_fake(x):
        _check_nchw(x, "coord_pool")
        n, c, h, w = x.shape
        return x.new_empty((n, c, h)), x.new_empty((n, c, w))

    @torch.library.register_fake("saffnet_fast::coord_pool_out")
    def _coord_pool_out_fake(x, pool_h, pool_w):
        _check_nchw(x, "coord_pool")
        return None

    @torch.library.register_fake("saffnet_fast::coord_pool_backward")
    def _coord_pool_backward_fake(grad_h, grad_w):
        n, c, h = grad_h.shape
        return grad_h.new_empty((n, c, h, grad_w.shape[2]))

    def _coord_pool_setup(ctx, inputs, output):
        (x,) = inputs
        ctx.x_shape = tuple(x.shape)

    def _coord_pool_backward(ctx, grad_h, grad_w):
        n, c, h, w = ctx.x_shape
        ref = grad_h if grad_h is not None else grad_w
        if grad_h is None:
            grad_h = ref.new_zeros((n, c, h))
        if grad_w is None:
            grad_w = ref.new_zeros((n, c, w))
        return torch.ops.saffnet_fast.coord_pool_backward(grad_h, grad_w)

    torch.library.register_autograd("saffnet_fast::coord_pool", _coord_pool_backward,
                                    setup_context=_coord_pool_setup)

    # coord_pool_backward is linear in (grad_h, grad_w); its adjoint is coord_pool itself
    # (mean over W of the incoming gradient for grad_h, mean over H for grad_w), which gives
    # double backward for free.
    def _coord_pool_backward_setup(ctx, inputs, output):
        pass

    def _coord_pool_backward_backward(ctx, grad_grad_x):
        return torch.ops.saffnet_fast.coord_pool(grad_grad_x.contiguous())

    torch.library.register_autograd("saffnet_fast::coord_pool_backward",
                                    _coord_pool_backward_backward,
                                    setup_context=_coord_pool_backward_setup)


def _register_backward_op_autograd(op: str) -> None:
    """Autograd for ``saffnet_fast::<op>`` whose backward is the one fused op
    ``<op>_backward(grad_out, *inputs)`` returning a gradient for every input: the inputs are
    saved as they are, and only the gradients autograd asks for are handed back."""
    backward_op = getattr(torch.ops.saffnet_fast, f"{op}_backward")

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_out):
        grads = backward_op(grad_out, *ctx.saved_tensors)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))

    torch.library.register_autograd(f"saffnet_fast::{op}", _backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------
# aff_fuse: AFF(x·m, x), m = a_h ⊗ a_w, local_att BN folded, global logit given
# ---------------------------------------------------------------------------------------
def _aff_out_like(x: torch.Tensor) -> torch.Tensor:
    channels_last = (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(
        x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _register_aff_fuse() -> None:
    @torch.library.register_fake("saffnet_fast::aff_fuse")
    def _aff_fuse_fake(x, a_h, a_w, global_logit, w1, b1, w2, b2):
        _check_nchw(x, "aff_fuse")
        return _aff_out_like(x)

    @torch.library.register_fake("saffnet_fast::aff_fuse_out")
    def _aff_fuse_out_fake(x, a_h, a_w, global_logit, w1, b1, w2, b2, out):
        _check_nchw(x, "aff_fuse")
        return None

    @torch.library.register_fake("saffnet_fast::aff_fuse_backward")
    def _aff_fuse_backward_fake(grad_out, x, a_h, a_w, global_logit, w1, b1, w2, b2):
        n, c, h, w = x.shape
        return (_aff_out_like(x), x.new_empty((n, c, h)), x.new_empty((n, c, w)),
                x.new_empty((n, c)), x.new_empty(w1.shape), x.new_empty(b1.shape),
                x.new_empty(w2.shape), x.new_empty(b2.shape))

    _register_backward_op_autograd("aff_fuse")


def _register_aff_pair() -> None:
    @torch.library.register_fake("saffnet_fast::aff_pair")
    def _aff_pair_fake(x, residual, global_logit, w1, b1, w2, b2):
        _check_nchw(x, "aff_pair")
        return _aff_out_like(x)

    @torch.library.register_fake("saffnet_fast::aff_pair_backward")
    def _aff_pair_backward_fake(grad_out, x, residual, global_logit, w1, b1, w2, b2):
        return (_aff_out_like(x), _aff_out_like(residual), global_logit.new_empty(
            global_logit.shape), w1.new_empty(w1.shape), b1.new_empty(b1.shape),
            w2.new_empty(w2.shape), b2.new_empty(b2.shape))

    _register_backward_op_autograd("aff_pair")


def _grad_local_like(local_logit: torch.Tensor) -> torch.Tensor:
    """grad_local_logit as the kernels allocate it: local_logit's layout when it is dense
    (dense_local_logit in csrc/common/aff_fuse_checks.h), else contiguous."""
    plane_dense = local_logit.stride(3) == 1 and local_logit.stride(2) == local_logit.shape[3]
    dense = plane_dense or local_logit.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(local_logit if dense else local_logit.contiguous())


def _register_aff_combine() -> None:
    @torch.library.register_fake("saffnet_fast::aff_combine")
    def _aff_combine_fake(x, a_h, a_w, local_logit, global_logit):
        _check_nchw(x, "aff_combine")
        return _aff_out_like(x)

    @torch.library.register_fake("saffnet_fast::aff_combine_backward")
    def _aff_combine_backward_fake(grad_out, x, a_h, a_w, local_logit, global_logit):
        n, c, h, w = x.shape
        # grad_local_logit keeps local_logit's layout when it is dense (dense_local_logit in
        # csrc/common/aff_fuse_checks.h), as the kernels do
        return (_aff_out_like(x), x.new_empty((n, c, h)), x.new_empty((n, c, w)),
                _grad_local_like(local_logit), x.new_empty((n, c)))

    _register_backward_op_autograd("aff_combine")

    @torch.library.register_fake("saffnet_fast::aff_input")
    def _aff_input_fake(x, a_h, a_w):
        _check_nchw(x, "aff_input")
        n, c, h, w = x.shape
        # t channel-major, as the kernels write it; its plane sums N×C
        return x.new_empty((c, n, h, w)).permute(1, 0, 2, 3), x.new_empty((n, c))

    @torch.library.register_fake("saffnet_fast::aff_input_backward")
    def _aff_input_backward_fake(grad_t, grad_sum, x, a_h, a_w):
        n, c, h, w = x.shape
        return _aff_out_like(x), x.new_empty((n, c, h)), x.new_empty((n, c, w))

    def _aff_input_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _aff_input_backward(ctx, grad_t, grad_sum):
        # grad_sum is None when the plane sums are not used (SAWF), or t's gradient is
        # None when only the sums are
        x = ctx.saved_tensors[0]
        if grad_t is None:
            grad_t = x.new_zeros(x.shape)
        grads = torch.ops.saffnet_fast.aff_input_backward(grad_t, grad_sum, *ctx.saved_tensors)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))

    torch.library.register_autograd("saffnet_fast::aff_input", _aff_input_backward,
                                    setup_context=_aff_input_setup)

    @torch.library.register_fake("saffnet_fast::aff_pair_combine")
    def _aff_pair_combine_fake(x, residual, local_logit, global_logit):
        _check_nchw(x, "aff_pair_combine")
        return _aff_out_like(x)

    @torch.library.register_fake("saffnet_fast::aff_pair_combine_backward")
    def _aff_pair_combine_backward_fake(grad_out, x, residual, local_logit, global_logit):
        return (_aff_out_like(x), _aff_out_like(residual), _grad_local_like(local_logit),
                x.new_empty(global_logit.shape))

    _register_backward_op_autograd("aff_pair_combine")


# ---------------------------------------------------------------------------------------
# pooled_linear: act(BN(y·Wᵀ + b)) on pooled M×K rows, BN with the rows' batch statistics
# ---------------------------------------------------------------------------------------
# act codes of the op (csrc/pooled_mlp.cpp)
_ACT_IDENTITY, _ACT_RELU, _ACT_HSWISH, _ACT_SIGMOID = 0, 1, 2, 3


def _register_pooled_linear() -> None:
    def _opmath(dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

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

    # autograd: registered in C++ (csrc/pooled_mlp.cpp, PooledLinearFunction), where it
    # costs a tenth of the Python registration's overhead


def _pooled_linear(conv: nn.Conv2d, rows: torch.Tensor, bn: nn.Module | None = None,
                   act: int = _ACT_IDENTITY, bn_input_shape: tuple = ()) -> torch.Tensor:
    """act(bn(conv(·))) on M×K pooled rows with one pooled_linear; ``bn`` (optional) takes
    the rows' batch statistics and its running statistics are updated as nn.BatchNorm2d
    does. ``bn_input_shape`` is the shape the reference's BN sees, for its error message."""
    weight, bias = _linear(conv)
    if bn is None:
        return torch.ops.saffnet_fast.pooled_linear(rows, weight, bias, None, None, False, 0.0,
                                                    act)[0]
    _check_batch_count(bn, rows.shape[0], bn_input_shape)
    out, _, mean, var = torch.ops.saffnet_fast.pooled_linear(
        rows, weight, bias, bn.weight, bn.bias, True, bn.eps, act)
    _update_running_stats(bn, mean, var, rows.shape[0])
    return out


def _fusable_bn(bn: nn.Module) -> bool:
    return type(bn) is nn.BatchNorm2d and _bn_uses_batch_stats(bn)


# ---------------------------------------------------------------------------------------
# coord_scale: x·a_h·a_w
# ---------------------------------------------------------------------------------------
def _register_coord_scale() -> None:
    @torch.library.register_fake("saffnet_fast::coord_scale")
    def _coord_scale_fake(x, a_h, a_w):
        _check_nchw(x, "coord_scale")
        return _aff_out_like(x)

    @torch.library.register_fake("saffnet_fast::coord_scale_out")
    def _coord_scale_out_fake(x, a_h, a_w, out):
        _check_nchw(x, "coord_scale")
        return None

    @torch.library.register_fake("saffnet_fast::coord_scale_backward")
    def _coord_scale_backward_fake(grad_out, x, a_h, a_w):
        n, c, h, w = x.shape
        return _aff_out_like(x), x.new_empty((n, c, h)), x.new_empty((n, c, w))

    _register_backward_op_autograd("coord_scale")


# ---------------------------------------------------------------------------------------
# split_resplice: SR(C, s), inference form
# ---------------------------------------------------------------------------------------
def _split_resplice_plan(channels: int, widths: list[int]):
    """Python twin of csrc/common/split_resplice.h: per step (width, x_offset, carry_in,
    keep, out_offset, carry_out)."""
    w = channels // (len(widths) + 1)
    plan, out_offset, carry_offset, prev_carry = [], w, 0, -1
    for j, width in enumerate(widths):
        last = j == len(widths) - 1
        keep = width if last else (width + 1) // 2
        carry_out = -1 if last else carry_offset
        plan.append((width, (j + 1) * w, prev_carry, keep, out_offset, carry_out))
        out_offset += keep
        if not last:
            prev_carry = carry_offset
            carry_offset += width - keep
    return plan


def _register_split_resplice() -> None:
    @torch.library.register_fake("saffnet_fast::split_resplice")
    def _split_resplice_fake(x, weights, biases, negative_slope):
        _check_nchw(x, "split_resplice")
        n, c, h, w = x.shape
        widths = [int(wt.shape[0]) for wt in weights]
        carry = sum(cj - (cj + 1) // 2 for cj in widths[:-1])
        return x.new_empty((n, c, h, w)), x.new_empty((n, carry, h, w))

    @torch.library.register_fake("saffnet_fast::split_resplice_out")
    def _split_resplice_out_fake(x, weights, biases, negative_slope, out, carries):
        _check_nchw(x, "split_resplice")
        return None

    def _setup(ctx, inputs, output):
        x, weights, biases, negative_slope = inputs
        out, carries = output
        ctx.save_for_backward(x, out, carries, *weights)
        ctx.negative_slope = negative_slope

    def _backward(ctx, grad_out, grad_carries):
        # Not a fused kernel: ATen convolution gradients, step by step in reverse, fed by
        # the op's own outputs (each step's activation is in `out` or `carries`).
        x, out, carries, *weights = ctx.saved_tensors
        slope = ctx.negative_slope
        n, c, h, w = x.shape
        widths = [int(wt.shape[0]) for wt in weights]
        w0 = c // (len(widths) + 1)
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_x = torch.zeros_like(x, memory_format=torch.contiguous_format)
        grad_x[:, :w0] = grad_out[:, :w0]
        grad_weights, grad_biases = [None] * len(widths), [None] * len(widths)
        grad_carry_in = None  # gradient w.r.t. the carry that step j+1 read
        for j, (width, x_offset, carry_in, keep, out_offset, carry_out) in reversed(
                list(enumerate(_split_resplice_plan(c, widths)))):
            y = out[:, out_offset:out_offset + keep]
            grad_y = grad_out[:, out_offset:out_offset + keep]
            if carry_out >= 0:
                carried = slice(carry_out, carry_out + width - keep)
                y = torch.cat([y, carries[:, carried]], dim=1)
                grad_c = grad_carry_in
                if grad_carries is not None:
                    grad_c = grad_c + grad_carries[:, carried]
                grad_y = torch.cat([grad_y, grad_c], dim=1)
            # LeakyReLU'(pre) from its output: y > 0 exactly where pre > 0 (slope ≥ 0)
            grad_pre = torch.where(y > 0, grad_y, grad_y * slope)
            inp = x[:, x_offset:x_offset + w0]
            if carry_in >= 0:
                inp = torch.cat([inp, carries[:, carry_in:carry_in + width - w0]], dim=1)
            grad_weights[j] = torch.nn.grad.conv2d_weight(inp, weights[j].shape, grad_pre,
                                                          padding=1)
            grad_biases[j] = grad_pre.sum(dim=(0, 2, 3))
            grad_in = torch.nn.grad.conv2d_input(inp.shape, weights[j], grad_pre, padding=1)
            grad_x[:, x_offset:x_offset + w0] = grad_in[:, :w0]
            grad_carry_in = grad_in[:, w0:]
        return grad_x, grad_weights, grad_biases, None

    torch.library.register_autograd("saffnet_fast::split_resplice", _backward,
                                    setup_context=_setup)

    # split_resplice_tiled: the same function in one launch on CUDA (an explicit tile, and
    # the carries only when asked), the same autograd.
    @torch.library.register_fake("saffnet_fast::split_resplice_tiled")
    def _split_resplice_tiled_fake(x, weights, biases, negative_slope, tile_h=0, tile_w=0,
                                   write_carries=True):
        out, carries = _split_resplice_fake(x, weights, biases, negative_slope)
        return out, carries if write_carries else x.new_empty((x.shape[0], 0, *x.shape[2:]))

    def _tiled_setup(ctx, inputs, output):
        ctx.write_carries = inputs[6] if len(inputs) > 6 else True
        _setup(ctx, inputs[:4], output)

    def _tiled_backward(ctx, grad_out, grad_carries):
        if not ctx.write_carries:
            raise RuntimeError("split_resplice_tiled: backward needs the carried channels; "
                               "call it with write_carries=True when gradients are needed")
        grads = _backward(ctx, grad_out, grad_carries)
        # None for each tile / write_carries argument the call passed
        return (*grads, *[None] * (len(ctx.needs_input_grad) - len(grads)))

    torch.library.register_autograd("saffnet_fast::split_resplice_tiled", _tiled_backward,
                                    setup_context=_tiled_setup)


# ---------------------------------------------------------------------------------------
# aff_moments: batch mean / biased variance of AFF's local_att pre-BN activations
# ---------------------------------------------------------------------------------------
def _register_aff_moments() -> None:
    @torch.library.register_fake("saffnet_fast::aff_moments")
    def _aff_moments_fake(x, a_h, a_w, w1, b1, w2, b2):
        _check_nchw(x, "aff_moments")
        channels = x.shape[1] if w2 is not None else w1.shape[0]
        return x.new_empty((channels,)), x.new_empty((channels,))

    @torch.library.register_fake("saffnet_fast::aff_moments_backward")
    def _aff_moments_backward_fake(grad_mean, grad_var, x, a_h, a_w, w1, b1, w2, b2, mean):
        n, c, h, w = x.shape
        return (_aff_out_like(x), x.new_empty((n, c, h)), x.new_empty((n, c, w)),
                x.new_empty(w1.shape), x.new_empty(b1.shape),
                x.new_empty(w2.shape if w2 is not None else (0,)),
                x.new_empty(b2.shape if b2 is not None else (0,)))

    def _setup(ctx, inputs, output):
        x, a_h, a_w, w1, b1, w2, b2 = inputs
        ctx.stage2 = w2 is not None
        extra = (w2, b2) if ctx.stage2 else ()
        ctx.save_for_backward(x, a_h, a_w, w1, b1, output[0], *extra)

    def _backward(ctx, grad_mean, grad_var):
        x, a_h, a_w, w1, b1, mean, *extra = ctx.saved_tensors
        w2, b2 = extra if ctx.stage2 else (None, None)
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
        grads = torch.ops.saffnet_fast.aff_moments_backward(
            grad_mean.contiguous(), grad_var.contiguous(), x, a_h, a_w, w1, b1, w2, b2, mean)
        if not ctx.stage2:
            grads = (*grads[:5], None, None)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))

    torch.library.register_autograd("saffnet_fast::aff_moments", _backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------
# split_resplice_train: SR(C, s) in training mode
# ---------------------------------------------------------------------------------------
def _register_split_resplice_train() -> None:
    @torch.library.register_fake("saffnet_fast::split_resplice_train")
    def _split_resplice_train_fake(x, weights, gammas, betas, eps, negative_slope, dropout,
                                   seed):
        _check_nchw(x, "split_resplice_train")
        n, c, h, w = x.shape
        widths = [int(wt.shape[0]) for wt in weights]
        out = x.new_empty((n, c, h, w))
        pre = [x.new_empty((n, cj, h, w)) for cj in widths]
        inputs = [x.new_empty((n, cj, h, w)) for cj in widths[1:]]
        total = sum(widths)
        return out, pre, inputs, x.new_empty((total,)), x.new_empty((total,))

    @torch.library.register_fake("saffnet_fast::split_resplice_train_backward")
    def _split_resplice_train_backward_fake(grad_out, x, weights, gammas, betas, pre, inputs,
                                            mean, var, eps, negative_slope, dropout, seed):
        return (x.new_empty(x.shape), [wt.new_empty(wt.shape) for wt in weights],
                [g.new_empty(g.shape) for g in gammas], [b.new_empty(b.shape) for b in betas])

    def _setup(ctx, inputs, output):
        x, weights, gammas, betas, eps, slope, dropout, seed = inputs
        _, pre, step_inputs, mean, var = output
        # pre / inputs / mean / var are saved activations and statistics for backward and for
        # the running-statistics update: not differentiable outputs.
        ctx.mark_non_differentiable(*pre, *step_inputs, mean, var)
        ctx.steps = len(weights)
        ctx.save_for_backward(x, seed, mean, var, *weights, *gammas, *betas, *pre,
                              *step_inputs)
        ctx.eps, ctx.slope, ctx.dropout = eps, slope, dropout

    def _backward(ctx, grad_out, *unused):
        x, seed, mean, var, *rest = ctx.saved_tensors
        s = ctx.steps
        weights, gammas, betas = rest[:s], rest[s:2 * s], rest[2 * s:3 * s]
        pre, step_inputs = rest[3 * s:4 * s], rest[4 * s:]
        grad_x, grad_w, grad_g, grad_b = torch.ops.saffnet_fast.split_resplice_train_backward(
            grad_out, x, weights, gammas, betas, pre, step_inputs, mean, var, ctx.eps,
            ctx.slope, ctx.dropout, seed)
        return grad_x, grad_w, grad_g, grad_b, None, None, None, None

    torch.library.register_autograd("saffnet_fast::split_resplice_train", _backward,
                                    setup_context=_setup)


def native_coord_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x.mean(3), x.mean(2)) of an N×C×H×W tensor from a single read of x."""
    require_native(x.device if isinstance(x, torch.Tensor) else None)
    return torch.ops.saffnet_fast.coord_pool(x)


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of the 1×1 conv followed by eval-mode BN, as differentiable ATen arithmetic so
    gradients reach conv.weight, conv.bias, bn.weight and bn.bias."""
    if not bn.track_running_stats or bn.running_var is None:
        raise NotImplementedError(
            "native ops fold BN with running statistics; BatchNorm2d(track_running_stats=False) "
            "uses batch statistics in eval mode too: use the reference backend")
    weight = conv.weight.reshape(conv.out_channels, -1)
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    bias = (bias - bn.running_mean) * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    return weight * scale[:, None], bias


# ---------------------------------------------------------------------------------------
# Folded-parameter cache (eval mode, no gradient needed)
# ---------------------------------------------------------------------------------------
# Folding BN into the 1×1 / 3×3 convolutions is ~8 small ATen ops per BN; at batch 1 that cost
# more than the fused kernels themselves. In inference the folded tensors only change when a
# source tensor does, so they are kept per module and rebuilt when any source tensor is a
# different object, was modified in place (_version), had its storage swapped (.data = …,
# module.to(...): data_ptr, dtype, device), or a BN's eps changed. Never used when autograd
# must reach a parameter: then the folding runs as differentiable ATen arithmetic per call.
_FOLDED_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _source_state(sources: Sequence[torch.Tensor | None]) -> tuple:
    # id(t) equal to a cached id means the same object: the cache entry holds its sources,
    # so no other object can have been given that id meanwhile.
    return tuple(None if t is None else (id(t), t._version, t.data_ptr(), t.dtype, t.device)
                 for t in sources)


def _needs_param_grad(sources: Sequence[torch.Tensor | None]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources)


def _module_sources(module: nn.Module) -> tuple[list, tuple]:
    """Every parameter and buffer of ``module`` and its submodules (None entries included),
    and every BN's (eps, track_running_stats). Walks the _parameters / _buffers / _modules
    dicts directly: nn.Module.__getattr__ per tensor cost more than the folding saved."""
    sources: list = []
    extras: list = []
    stack = [module]
    while stack:
        m = stack.pop()
        sources.extend(m._parameters.values())
        sources.extend(m._buffers.values())
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            extras.append((m.eps, m.track_running_stats))
        stack.extend(m._modules.values())
    return sources, tuple(extras)


def _folded_params(module: nn.Module, fold: Callable[[], tuple]) -> tuple:
    """fold() of ``module``'s parameters, from the cache when no gradient can reach them."""
    if torch.compiler.is_compiling():
        # Traced: the folding becomes part of the graph (data_ptr/_version/ids would break
        # fullgraph tracing, and the compiled graph is where such hoisting belongs).
        return fold()
    sources, extras = _module_sources(module)
    if _needs_param_grad(sources):
        return fold()
    try:
        state = _source_state(sources)
    except RuntimeError:
        # Inference tensors (parameters created under inference_mode) have no version
        # counter: nothing to key on, so fold per call.
        return fold()
    entry = _FOLDED_CACHE.get(module)
    if entry is not None and entry[2] == state and entry[3] == extras:
        return entry[0]
    # Plain tensors even when called under inference_mode, so a later call with autograd on
    # (frozen parameters, x requiring grad) can save them for backward.
    with torch.inference_mode(False), torch.no_grad():
        params = fold()
    # Strong references to the sources: while the entry lives, no new tensor can reuse their
    # id or storage address and pass as unchanged.
    _FOLDED_CACHE[module] = (params, tuple(sources), state, extras)
    return params


def _clear_folded_cache() -> None:
    """Drop every cached folding (tests, or to release memory)."""
    _FOLDED_CACHE.clear()


def _linear(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W as out×in, bias) of a 1×1 convolution."""
    return conv.weight.reshape(conv.out_channels, -1), conv.bias


def _fold_aff(aff) -> tuple:
    """(local w1, b1, w2, b2, global g1, gb1, g2ᵀ, gb2) with every BN folded; g1 and g2 are
    stored transposed for addmm on the pooled N×C rows."""
    local, glob = aff.local_att, aff.global_att
    w1, b1 = _fold_bn(local[0], local[1])
    w2, b2 = _fold_bn(local[3], local[4])
    g1, gb1 = _fold_bn(glob[1], glob[2])
    g2, gb2 = _fold_bn(glob[4], glob[5])
    return w1, b1, w2, b2, g1.t(), gb1, g2.t(), gb2


def _global_logit(folded_aff: tuple, pooled: torch.Tensor) -> torch.Tensor:
    """AFF's global_att on the already pooled N×C mean of its xa (AdaptiveAvgPool2d skipped)."""
    g1t, gb1, g2t, gb2 = folded_aff[4:]
    return torch.addmm(gb2, torch.addmm(gb1, pooled, g1t).relu_(), g2t)


def _coord_attention_factors(ca, x: torch.Tensor):
    """(pool_h, a_h N×C×H, a_w N×C×W) of CoordAttention ``ca``, any mode: the pooling is the
    native coord_pool (one read of x); the vector-sized rest runs through ca's own layers, so
    BN behaves exactly as in the reference (batch statistics and running-stat updates in
    training, running statistics in eval)."""
    h, w = x.shape[2], x.shape[3]
    pool_h, pool_w = torch.ops.saffnet_fast.coord_pool(x)
    if _coord_layers_fusable(ca):
        return (pool_h,) + _coord_attention_gates_fused(ca, pool_h, pool_w)
    y = torch.cat([pool_h, pool_w], dim=2)                          # N×C×(H+W)
    y = _pooled_layers([ca.conv1, ca.bn1, ca.act], y)
    y_h, y_w = torch.split(y, [h, w], dim=2)
    a_h = _pooled_layers([ca.conv_h], y_h).sigmoid()
    a_w = _pooled_layers([ca.conv_w], y_w).sigmoid()
    return pool_h, a_h, a_w


def _coord_layers_fusable(ca) -> bool:
    """CA's pooled layers as three pooled_linear calls: plain 1×1 convolutions, bn1 an
    nn.BatchNorm2d on batch statistics, the reference's h_swish."""
    from ..nn.reference import HSwish

    return (all(is_1x1_conv(conv) for conv in (ca.conv1, ca.conv_h, ca.conv_w))
            and _fusable_bn(ca.bn1) and type(ca.act) is HSwish)


def _coord_attention_gates_fused(ca, pool_h: torch.Tensor, pool_w: torch.Tensor):
    """(a_h N×C×H, a_w N×C×W) from the pooled rows with three pooled_linear ops (one autograd
    node each) instead of ~15 ATen calls: the N·H row positions, then the N·W column ones,
    as rows of a (N·H + N·W)×C matrix, so conv1 / bn1 / h_swish is one call over all of them
    (bn1's statistics over the same N·(H+W) values as the reference's) and conv_h / conv_w
    each take a contiguous block of rows. a_h and a_w are transposed views (N×C×H with
    stride C along H), which the kernels read through their strides."""
    n, c, h = pool_h.shape
    w = pool_w.shape[2]
    rows = torch.cat([pool_h.transpose(1, 2).reshape(n * h, c),
                      pool_w.transpose(1, 2).reshape(n * w, c)])
    z = _pooled_linear(ca.conv1, rows, ca.bn1, _ACT_HSWISH,
                       (n, ca.conv1.out_channels, h + w, 1))
    a_h = _pooled_linear(ca.conv_h, z[:n * h], act=_ACT_SIGMOID)
    a_w = _pooled_linear(ca.conv_w, z[n * h:], act=_ACT_SIGMOID)
    return a_h.view(n, h, -1).transpose(1, 2), a_w.view(n, w, -1).transpose(1, 2)


def _pooled_layers(layers, y: torch.Tensor) -> torch.Tensor:
    """The module's own layers on pooled N×C×L vectors (L = H + W, H, W or 1), each 1×1
    convolution as a matmul and every other layer (BN, activation) called as it is on the
    N×C×L×1 view, so BN keeps the reference's batch statistics and running-stat updates.
    Why: oneDNN's 1×1 convolution on these tiny maps costs 220–340 µs forward + backward at 2
    threads, a matmul / linear 56–116 µs (SCAFF(128) at batch 8: 5 such convolutions)."""
    for layer in layers:
        if is_1x1_conv(layer):
            weight, bias = _linear(layer)
            if y.shape[2] == 1:
                y = torch.nn.functional.linear(y.squeeze(2), weight, bias).unsqueeze(2)
            else:
                y = torch.matmul(weight, y)
                y = y if bias is None else y + bias[:, None]
        else:
            y = layer(y.unsqueeze(-1)).squeeze(-1)
    return y


def _fold_coord_attention(ca) -> tuple:
    """(W1, b1) of conv1 with bn1 folded (eval), and conv_h / conv_w stacked into one
    2C×mip map with its 2C bias: both factors from one matmul."""
    w1, b1 = _fold_bn(ca.conv1, ca.bn1)
    wh, bh = _linear(ca.conv_h)
    ww, bw = _linear(ca.conv_w)
    zeros = w1.new_zeros(ca.channels)
    bh = zeros if bh is None else bh
    bw = zeros if bw is None else bw
    return w1, b1, torch.cat([wh, ww], 0), torch.cat([bh, bw], 0)


def _coord_attention_factors_eval(folded_ca: tuple, x: torch.Tensor):
    """(pool_h, a_h N×C×H, a_w N×C×W) of an eval-mode CoordAttention from its folded
    parameters. The pooled vectors are laid out N×(H+W)×C so each 1×1 conv is one
    F.linear (a single GEMM over all N·(H+W) positions), not a batched matmul."""
    c, h = x.shape[1], x.shape[2]
    w1, b1, w_hw, b_hw = folded_ca
    pool_h, pool_w = torch.ops.saffnet_fast.coord_pool(x)
    y = torch.cat([pool_h.transpose(1, 2), pool_w.transpose(1, 2)], dim=1)  # N×(H+W)×C
    y = F.linear(y, w1, b1)
    # the reference's HSwish, x·relu6(x + 3)/6, not F.hardswish: PyTorch's CUDA hardswish
    # kernel rounds its 1/6 to float32 even for float64 (1.8e-9 off in a_h on an H100)
    y = y * F.relu6(y + 3.0) / 6.0
    # Both heads on all H+W positions (2× the flops of a tiny GEMM, one call instead of
    # two); a_h and a_w are strided views, which aff_fuse reads through their strides.
    a = torch.sigmoid(F.linear(y, w_hw, b_hw))                            # N×(H+W)×2C
    return pool_h, a[:, :h, :c].transpose(1, 2), a[:, h:, c:].transpose(1, 2)


# ---------------------------------------------------------------------------------------
# Training mode: BN with batch statistics, running statistics updated as nn.BatchNorm2d does
# ---------------------------------------------------------------------------------------
def _bn_uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """What nn.BatchNorm2d.forward decides: batch statistics in training, or always when it
    keeps no running statistics."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor,
                          count: int) -> None:
    """nn.BatchNorm2d's update from a batch's mean and biased variance over `count` values:
    momentum (or the cumulative average when momentum is None), unbiased running variance."""
    if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
        return
    with torch.no_grad():
        factor = bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if factor is None:
                factor = 1.0 / float(bn.num_batches_tracked)
        elif factor is None:
            factor = 0.0
        bn.running_mean.mul_(1.0 - factor).add_(mean.detach(), alpha=factor)
        bn.running_var.mul_(1.0 - factor).add_(var.detach(), alpha=factor * count / (count - 1))


def _batch_scale_shift(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor):
    """(scale, shift) with BN(v) = v·scale + shift for the batch statistics (differentiable:
    gradients reach the statistics and γ, β)."""
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _check_batch_count(bn: nn.BatchNorm2d, count: int, shape) -> None:
    if count <= 1:  # the message nn.BatchNorm2d gives
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(shape)}")


def _local_att_train(aff, x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> tuple:
    """(w1, b1, w2, b2) of AFF's local_att for aff_fuse in training mode: each BN folded
    from the batch statistics of its input, which aff_moments computes from x (the pre-BN
    activations are never stored); the running statistics are updated."""
    local = aff.local_att
    conv1, bn1, conv2, bn2 = local[0], local[1], local[3], local[4]
    n, _, h, w = x.shape
    count = n * h * w
    w1, cb1 = _linear(conv1)
    cb1 = w1.new_zeros(w1.shape[0]) if cb1 is None else cb1
    if _bn_uses_batch_stats(bn1):
        _check_batch_count(bn1, count, (n, w1.shape[0], h, w))
        mean1, var1 = torch.ops.saffnet_fast.aff_moments(x, a_h, a_w, w1, cb1, None, None)
        _update_running_stats(bn1, mean1, var1, count)
        scale1, shift1 = _batch_scale_shift(bn1, mean1, var1)
        w1, b1 = w1 * scale1[:, None], cb1 * scale1 + shift1
    else:
        w1, b1 = _fold_bn(conv1, bn1)
    w2, cb2 = _linear(conv2)
    cb2 = w2.new_zeros(w2.shape[0]) if cb2 is None else cb2
    if _bn_uses_batch_stats(bn2):
        mean2, var2 = torch.ops.saffnet_fast.aff_moments(x, a_h, a_w, w1, b1, w2, cb2)
        _update_running_stats(bn2, mean2, var2, count)
        scale2, shift2 = _batch_scale_shift(bn2, mean2, var2)
        w2, b2 = w2 * scale2[:, None], cb2 * scale2 + shift2
    else:
        w2, b2 = _fold_bn(conv2, bn2)
    return w1, b1, w2, b2


def _stored_local_att(local: nn.Sequential, t: torch.Tensor) -> torch.Tensor:
    """AFF's local_att on aff_input's channel-major t (memory order C, N, H, W), keeping its
    activations for backward as the reference does: each 1×1 convolution is one GEMM on the
    C×(N·H·W) matrix view, and every other layer (BN, ReLU) is the module's own layer on a
    (1, C, N·H, W) view, so BN takes its batch statistics over the same N·H·W values and
    updates its running statistics itself. Returns the logits N×C×H×W (channel-major)."""
    n, c, h, w = t.shape
    y = t.permute(1, 0, 2, 3).reshape(c, n * h * w)  # a view: t is channel-major
    for layer in local:
        if is_1x1_conv(layer):
            weight, bias = _linear(layer)
            y = weight @ y if bias is None else torch.addmm(bias[:, None], weight, y)
        else:
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and _bn_uses_batch_stats(layer):
                # the reference's message and shape, not those of the (1, C, N·H, W) view
                _check_batch_count(layer, n * h * w, (n, y.shape[0], h, w))
            y = layer(y.view(1, y.shape[0], n * h, w)).view(y.shape[0], n * h * w)
    return y.view(-1, n, h, w).permute(1, 0, 2, 3)


def _stored_local_supported(local: nn.Module) -> bool:
    """_stored_local_att's assumption: local_att is 1×1 convolutions and per-channel layers."""
    return isinstance(local, nn.Sequential) and all(
        is_1x1_conv(layer) or isinstance(layer, (nn.modules.batchnorm._BatchNorm, nn.ReLU))
        for layer in local)


# How native_scaff / native_sawf run AFF's local branch in training mode:
#   "stored" (default): aff_input writes t = x·(1 + m) once (channel-major), the 1×1
#     convolutions run as GEMMs and the BNs / ReLU as the module's own layers, keeping their
#     activations for backward as the reference does, and aff_combine forms the output.
#     Arithmetic as the reference's (forward + backward: the two convolutions' 3 GEMMs each).
#   "recompute": aff_moments (×2) and aff_fuse, which recompute the local branch from x in
#     every pass and store no activation: less memory, but 3.3× the reference's arithmetic,
#     which costs more than the saved traffic on these CPUs. Measured, training forward +
#     backward at batch 8, 2 threads (eager / recompute / stored, ms): SCAFF(128) 16×12
#     4.94 / 5.01 / 3.56, SCAFF(64) 32×24 7.06 / 6.17 / 4.68, SAWF(64) 64×48 33.4 / 16.7 /
#     14.6 (benchmarks/README.md has the benchmark suite's figures).
TRAINING_LOCAL_BRANCH = "stored"
_LOCAL_BRANCH_MODES = ("stored", "recompute")


def _use_stored_local(aff) -> bool:
    if TRAINING_LOCAL_BRANCH not in _LOCAL_BRANCH_MODES:
        raise ValueError(f"saffnet_fast.ops.native.TRAINING_LOCAL_BRANCH: expected one of "
                         f"{_LOCAL_BRANCH_MODES}, got {TRAINING_LOCAL_BRANCH!r}")
    return TRAINING_LOCAL_BRANCH == "stored" and _stored_local_supported(aff.local_att)


def _global_logit_modules(aff, pooled: torch.Tensor) -> torch.Tensor:
    """AFF's global_att on the already pooled N×C mean of its xa: two pooled_linear ops
    (conv → BN → ReLU, conv → BN; BN on the batch statistics of the N rows, running
    statistics updated) when the branch has the official layout and its BNs are in training
    mode, else the module's own layers (so its BNs behave exactly as in the reference)."""
    layers = list(aff.global_att[1:])
    if (len(layers) == 5 and is_1x1_conv(layers[0]) and _fusable_bn(layers[1])
            and type(layers[2]) is nn.ReLU and is_1x1_conv(layers[3])
            and _fusable_bn(layers[4])):
        n = pooled.shape[0]
        conv1, bn1, _, conv2, bn2 = layers
        hidden = _pooled_linear(conv1, pooled, bn1, _ACT_RELU, (n, conv1.out_channels, 1, 1))
        return _pooled_linear(conv2, hidden, bn2, _ACT_IDENTITY, (n, conv2.out_channels, 1, 1))
    return _pooled_layers(aff.global_att[1:], pooled[:, :, None]).flatten(1)


# ---------------------------------------------------------------------------------------
# What the native kernels take: the one place nn/fast.py's dispatch asks
# ---------------------------------------------------------------------------------------
# Input dtypes of the compiled kernels per device type (csrc/common/checks.h:
# check_cpu_dtype, check_cuda_dtype); parameters must have the input's dtype (check_like).
# Under autocast, nn/fast.py hands the kernels inputs of the parameters' dtype.
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


def _split_resplice_reason(module) -> str | None:
    """Why the split_resplice kernels cannot serve this module's configuration or mode."""
    slopes = {float(step.negative_slope) for step in module.steps}
    if len(slopes) != 1 or min(slopes) < 0:
        return f"needs one negative_slope ≥ 0 for all steps, got {sorted(slopes)}"
    if not module.training:
        return None
    steps = module.steps
    if any(step.conv.bias is not None for step in steps):
        return ("training mode expects the FC convolutions without bias (as SplitResplice "
                "builds them)")
    if not all(_bn_uses_batch_stats(step.bn) for step in steps):
        return ("training mode with some step BNs in eval mode (frozen statistics) has no "
                "native kernel")
    eps = {float(step.bn.eps) for step in steps}
    rates = {float(step.drop.p) if step.drop.training else 0.0 for step in steps}
    if len(eps) != 1 or len(rates) != 1:
        return (f"needs one BN eps and one dropout rate for all steps, got eps {sorted(eps)}, "
                f"dropout {sorted(rates)}")
    return None


def unsupported_reason(module: nn.Module, x: torch.Tensor) -> str | None:
    """Why the native kernels cannot run ``module`` on ``x`` (its dtype against
    :data:`KERNEL_DTYPES` and the parameters', a folded BN, the module's mode); None when they
    can. Whether the extension loaded and has kernels for x's device is
    :func:`saffnet_fast.backend.backend_unavailable_reason`'s answer."""
    if getattr(module, "_bn_folded", False):
        # optimize_for_inference folds BN inside a fused block only when the native backend
        # does not serve it
        return ("its BatchNorm layers were folded by optimize_for_inference and the native "
                "kernels expect the BatchNorm modules")
    allowed = KERNEL_DTYPES.get(x.device.type)
    if allowed is not None and x.dtype not in allowed:
        names = [str(d).replace("torch.", "") for d in allowed]
        return (f"the {x.device.type.upper()} kernels take {', '.join(names[:-1])} or "
                f"{names[-1]}, got {x.dtype}")
    for name, p in module.named_parameters():
        if p.dtype != x.dtype or p.device != x.device:
            return (f"parameter {name} is {p.dtype} on {p.device} but the input is {x.dtype} "
                    f"on {x.device}")
    if isinstance(module, SplitResplice):
        return _split_resplice_reason(module)
    return None


def native_coordinate_attention(module, x: torch.Tensor) -> torch.Tensor:
    """CoordAttention(x) = x·a_h·a_w with native pooling and scaling. Both modes: the only
    BN (bn1) acts on the pooled N×C×(H+W) tensor and runs through the module itself."""
    require_native(x.device if isinstance(x, torch.Tensor) else None)
    _check_input(x, module.channels)
    _, a_h, a_w = _coord_attention_factors(module, x)
    return torch.ops.saffnet_fast.coord_scale(x, a_h, a_w)


def _scaff_folded(module) -> tuple:
    return _folded_params(module, lambda: (_fold_coord_attention(module.ca),
                                           _fold_aff(module.aff)))


def _pooled_xa(x: torch.Tensor, pool_h: torch.Tensor, a_h: torch.Tensor,
               a_w: torch.Tensor) -> torch.Tensor:
    """AFF's global input mean_hw(x·(1 + a_h·a_w)) = mean_h(pool_h + a_h·(x @ a_w)/W), N×C,
    as one batched matvec over x (a_w made contiguous: 2× faster matvec, and it is tiny;
    in eval it is a strided slice, on which bmm falls back to a per-matrix loop: 250 µs for
    1×64×32×24 instead of 11). Contiguous x goes to bmm on the (N·C)×H×W view: forward + backward 246 µs against
    549 µs for the broadcasting matmul at 8×64×32×24 (772 vs 1784 µs at 64×48; 2 threads)."""
    n, c, h, w = x.shape
    if x.is_contiguous():
        a_w_col = a_w.contiguous().view(n * c, w, 1)
        weighted = torch.bmm(x.view(n * c, h, w), a_w_col).view(n, c, h)
    else:
        weighted = torch.matmul(x, a_w.contiguous().unsqueeze(-1)).squeeze(-1)  # N×C×H
    return torch.addcmul(pool_h, a_h, weighted, value=1.0 / x.shape[3]).mean(dim=2)


def _plane_mean(x: torch.Tensor) -> torch.Tensor:
    """mean_hw(x), N×C, as a sum then a scale: the sum's backward is a broadcast view of the
    N×C gradient, where mean's materialises an N×C×H×W tensor (expand, then divide) that
    the engine then adds into x's gradient (8×128×16×12, 2 threads: ~110 µs per call)."""
    return x.sum(dim=(2, 3)) * (1.0 / (x.shape[2] * x.shape[3]))


def native_scaff(module, x: torch.Tensor) -> torch.Tensor:
    """SCAFF(x) = AFF(CA(x), x), either mode.

    Inference: passes over the N×C×H×W tensor are coord_pool (read x), the global-branch
    mean mean_hw(x·(1 + a_h·a_w)) = mean_h(pool_h + a_h·(x @ a_w)/W) as one batched matvec
    (read x), aff_fuse (read x, write out): 3 reads + 1 write; no full-size intermediate.
    Every BN is folded (cached per module when no gradient reaches the parameters).

    Training (TRAINING_LOCAL_BRANCH "stored", the default): coord_pool (read x), aff_input
    (read x, write t = x·(1 + a_h·a_w) channel-major), local_att as GEMMs and the module's own
    BN / ReLU layers on t (its activations kept for backward, as the reference keeps them),
    aff_combine (read x and the local logits, write out); the global branch's input is
    t's plane sums / (H·W), from aff_input's pass. "recompute": the inference passes plus
    two aff_moments passes (read x each) for the batch statistics of local_att's two BNs,
    which aff_fuse then applies; 5 reads + 1 write and no stored activation. Either way CA's pooled layers and the global branch
    run as pooled_linear ops (_coord_attention_factors, _global_logit_modules).
    """
    require_native(x.device if isinstance(x, torch.Tensor) else None)
    _check_input(x, module.channels)
    if module.training:
        pool_h, a_h, a_w = _coord_attention_factors(module.ca, x)
        if _use_stored_local(module.aff):
            # t and its plane sums (the global branch's input) from one pass
            t, t_sum = torch.ops.saffnet_fast.aff_input(x, a_h, a_w)
            global_logit = _global_logit_modules(
                module.aff, t_sum * (1.0 / (x.shape[2] * x.shape[3])))
            local_logit = _stored_local_att(module.aff.local_att, t)
            return torch.ops.saffnet_fast.aff_combine(x, a_h, a_w, local_logit, global_logit)
        global_logit = _global_logit_modules(module.aff, _pooled_xa(x, pool_h, a_h, a_w))
        local = _local_att_train(module.aff, x, a_h, a_w)
        return torch.ops.saffnet_fast.aff_fuse(x, a_h, a_w, global_logit, *local)
    folded_ca, folded_aff = _scaff_folded(module)
    pool_h, a_h, a_w = _coord_attention_factors_eval(folded_ca, x)
    global_logit = _global_logit(folded_aff, _pooled_xa(x, pool_h, a_h, a_w))
    return torch.ops.saffnet_fast.aff_fuse(x, a_h, a_w, global_logit, *folded_aff[:4])


def _aff_folded(module) -> tuple:
    return _folded_params(module, lambda: _fold_aff(module))


def native_aff(module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The official AFF(x, residual) of any model (``saffnet_fast.nn.AFF``), either mode.

    Inference: the global branch's input mean_hw(x + residual) = mean_hw(x) + mean_hw(residual)
    (one read of each), then aff_pair (read both, write out): every BN folded (cached per
    module when no gradient reaches the parameters), no full-size intermediate.

    Training (TRAINING_LOCAL_BRANCH "stored", the default): xa = x + residual written once,
    channel-major; local_att as GEMMs and the module's own BN / ReLU layers on it (as in
    native_scaff); aff_pair_combine forms the output (x, residual and the local logits read
    once, 1 write). "recompute": local_att's two BNs take their batch statistics with
    aff_moments on xa = x + residual with zero factors (t = xa; one write and two reads of
    xa, the only full-size intermediate), and aff_pair applies them. Either way the global
    branch runs as two pooled_linear ops (_global_logit_modules).
    """
    require_native(x.device if isinstance(x, torch.Tensor) else None)
    _check_aff_inputs(x, residual, module.channels, same_dtype_device=True)
    if module.training and _use_stored_local(module):
        # xa written once, channel-major, for the local branch's GEMMs (a copy_ into the
        # permuted buffer, then the residual added in place: autograd sees both)
        n, c, h, w = x.shape
        xa = x.new_empty((c, n, h, w)).permute(1, 0, 2, 3)
        xa.copy_(x)
        xa.add_(residual)
        global_logit = _global_logit_modules(module, _plane_mean(xa))
        local_logit = _stored_local_att(module.local_att, xa)
        return torch.ops.saffnet_fast.aff_pair_combine(x, residual, local_logit, global_logit)
    pooled = x.mean(dim=(2, 3)) + residual.mean(dim=(2, 3))
    if module.training:
        n, c, h, w = x.shape
        global_logit = _global_logit_modules(module, pooled)
        xa = x + residual
        zero = xa.new_zeros(())
        local = _local_att_train(module, xa, zero.expand(n, c, h), zero.expand(n, c, w))
        return torch.ops.saffnet_fast.aff_pair(x, residual, global_logit, *local)
    folded = _aff_folded(module)
    global_logit = _global_logit(folded, pooled)
    return torch.ops.saffnet_fast.aff_pair(x, residual, global_logit, *folded[:4])


def _fold_se_plus(se) -> tuple:
    """(fc1ᵀ, b1, fc2ᵀ, fc_avgᵀ, b2 + b_avg) for addmm on pooled N×C rows."""
    w1, b1 = _linear(se.fc1)
    w2, b2 = _linear(se.fc2)
    wa, ba = _linear(se.fc_avg)
    b1 = w1.new_zeros(w1.shape[0]) if b1 is None else b1
    b2 = w2.new_zeros(w2.shape[0]) if b2 is None else b2
    ba = wa.new_zeros(wa.shape[0]) if ba is None else ba
    return w1.t(), b1, w2.t(), wa.t(), b2 + ba


def _sawf_folded(module) -> tuple:
    return _folded_params(module, lambda: (_fold_se_plus(module.se), _fold_aff(module.aff)))


def _se_plus_gate(folded_se: tuple, s: torch.Tensor) -> torch.Tensor:
    fc1t, b1, fc2t, fc_avgt, b_out = folded_se
    hidden = torch.addmm(b1, s, fc1t).relu()
    return torch.addmm(torch.addmm(b_out, s, fc_avgt), hidden, fc2t).sigmoid()


def native_sawf(module, x: torch.Tensor) -> torch.Tensor:
    """SAWF(x) = AFF(SE+(x), x), either mode.

    SE+'s gate depends on x only through s = mean_hw(x), and AFF's global input is
    mean_hw(x·(1 + gate)) = s·(1 + gate): passes over the tensor are x.mean (read x) and
    aff_fuse (read x, write out), with m = gate broadcast (a_h = gate over H, a_w = 1).
    Training: SE+ has no BN, and the global branch runs as two pooled_linear ops;
    local_att runs as in native_scaff (TRAINING_LOCAL_BRANCH: aff_input, GEMMs and the
    module's layers, aff_combine; or two aff_moments passes and aff_fuse).
    """
    require_native(x.device if isinstance(x, torch.Tensor) else None)
    _check_input(x, module.channels)
    n, c, h, w = x.shape
    s = _plane_mean(x) if module.training else x.mean(dim=(2, 3))
    if module.training:
        gate = _se_plus_gate(_fold_se_plus(module.se), s)
        a_h = gate.unsqueeze(-1).expand(n, c, h)
        a_w = gate.new_ones(()).expand(n, c, w)
        global_logit = _global_logit_modules(module.aff, torch.addcmul(s, s, gate))
        if _use_stored_local(module.aff):
            t, _ = torch.ops.saffnet_fast.aff_input(x, a_h, a_w)
            local_logit = _stored_local_att(module.aff.local_att, t)
            return torch.ops.saffnet_fast.aff_combine(x, a_h, a_w, local_logit, global_logit)
        local = _local_att_train(module.aff, x, a_h, a_w)
        return torch.ops.saffnet_fast.aff_fuse(x, a_h, a_w, global_logit, *local)
    folded_se, folded_aff = _sawf_folded(module)
    gate = _se_plus_gate(folded_se, s)
    global_logit = _global_logit(folded_aff, torch.addcmul(s, s, gate))
    a_h = gate.unsqueeze(-1).expand(n, c, h)
    a_w = gate.new_ones(()).expand(n, c, w)
    return torch.ops.saffnet_fast.aff_fuse(x, a_h, a_w, global_logit, *folded_aff[:4])


def _fold_split_resplice(module) -> tuple:
    weights, biases = [], []
    for step in module.steps:
        weight, bias = _fold_bn(step.conv, step.bn)
        weights.append(weight.reshape(step.conv.weight.shape))
        biases.append(bias)
    return weights, biases


def _split_resplice_train(module, x: torch.Tensor, slope: float) -> torch.Tensor:
    """SplitResplice(x) in training mode: one split_resplice_train op (per step: ATen conv,
    fused statistics pass, fused BN + LeakyReLU + dropout pass writing into the output slice
    and the next step's input; fused backward), then nn.BatchNorm2d's running-statistics
    update from the returned batch statistics."""
    steps = module.steps
    bns = [step.bn for step in steps]
    eps = {float(bn.eps) for bn in bns}  # one value each: native_split_resplice checked
    rates = {float(step.drop.p) if step.drop.training else 0.0 for step in steps}
    n, _, h, w = x.shape
    count = n * h * w
    _check_batch_count(bns[0], count, x.shape)
    p = rates.pop()
    # The dropout seed is drawn from torch's default CPU generator, so torch.manual_seed
    # makes training runs repeatable; a 0-d tensor so torch.compile traces it.
    seed = (torch.randint(0, 2 ** 62, (), dtype=torch.int64) if p > 0
            else torch.zeros((), dtype=torch.int64))
    weights = [step.conv.weight for step in steps]
    gammas = [bn.weight if bn.weight is not None else x.new_ones(bn.num_features) for bn in bns]
    betas = [bn.bias if bn.bias is not None else x.new_zeros(bn.num_features) for bn in bns]
    out, _, _, mean, var = torch.ops.saffnet_fast.split_resplice_train(
        x, weights, gammas, betas, eps.pop(), slope, p, seed)
    widths = [bn.num_features for bn in bns]
    for bn, mean_j, var_j in zip(bns, mean.split(widths), var.split(widths)):
        _update_running_stats(bn, mean_j, var_j, count)
    return out


def native_split_resplice(module, x: torch.Tensor) -> torch.Tensor:
    """SplitResplice(x), either mode.

    Inference (module.eval(): BN folded, Dropout the identity): one native op, the 7 (for
    s = 8) conv3×3 + BN + LeakyReLU steps, each writing its kept channels straight into its
    slice of the output; its backward is ATen convolution gradients.
    Training: see _split_resplice_train.
    """
    require_native(x.device if isinstance(x, torch.Tensor) else None)
    _check_input(x, module.channels)
    reason = _split_resplice_reason(module)
    if reason is not None:
        raise NotImplementedError(f"native_split_resplice: {reason}")
    slopes = {float(step.negative_slope) for step in module.steps}
    if module.training:
        return _split_resplice_train(module, x, slopes.pop())
    weights, biases = _folded_params(module, lambda: _fold_split_resplice(module))
    if x.is_cuda and not (torch.is_grad_enabled() and
                          (x.requires_grad or any(w.requires_grad for w in weights))):
        # No autograd: the single-launch tiled kernel without writing the carries.
        out, _ = torch.ops.saffnet_fast.split_resplice_tiled(x, weights, biases, slopes.pop(),
                                                             0, 0, False)
        return out
    out, _ = torch.ops.saffnet_fast.split_resplice(x, weights, biases, slopes.pop())
    return out


if has_native():
    _register_pooled_linear()
    _register_coord_pool()
    _register_aff_fuse()
    _register_coord_scale()
    _register_split_resplice()
    _register_aff_moments()
    _register_split_resplice_train()
    _register_aff_pair()
    _register_aff_combine()

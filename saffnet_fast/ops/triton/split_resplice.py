"""Split-resplice (SR) in Triton. Inference (eval, no autograd) here; training, and eval
with gradients, forward and backward, in split_resplice_train.py.

Eval: one launch per FC step: conv3×3 (BN folded into weights and bias) + LeakyReLU as an
implicit GEMM (9 shifted taps, each a tl.dot over the input channels), reading its input
straight from the input tensor's slice S(j+1) and from the previous step's carry, and
writing its first ceil(c/2) channels straight into their slice of the output (no split or
cat copies); the other channels go to a small carry buffer for the next step. Dropout is
the identity in eval.

Not written in Triton: the single-launch inference version with a halo shrinking per step
(spec/kernels.md); the CUDA extension has it (csrc/common/split_resplice_tile.h).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import nn
from torch.library import triton_op, wrap_triton

from ._common import (acc_dtype, channel_block, common_unsupported_reason, conv3x3_tile,
                      launch_is_traced_away, split_resplice_layout, step_tile,
                      store_output_and_carry)


@triton.jit
def _sr_step_kernel(x_ptr, carry_in_ptr, w_ptr, b_ptr, out_ptr, carry_out_ptr,
                    H, W, HW, X_C0, CX, CC_IN, CIN, COUT, KEEP, OUT_C0,
                    sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w,
                    SLOPE: tl.constexpr, HAS_CARRY: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_X: tl.constexpr,
                    BLOCK_CC: tl.constexpr, BLOCK_O: tl.constexpr, PRECISION: tl.constexpr):
    n64, _, offs_p, mask_p, hh, ww, offs_o, mask_o = step_tile(HW, W, COUT, BLOCK_P, BLOCK_O)
    acc = conv3x3_tile(x_ptr, carry_in_ptr, w_ptr, n64, hh, ww, mask_p,
                       H, W, HW, X_C0, CX, CC_IN, CIN, COUT, sx_n, sx_c, sx_h, sx_w,
                       HAS_CARRY, BLOCK_P, BLOCK_X, BLOCK_CC, BLOCK_O, PRECISION)
    acc += tl.load(b_ptr + offs_o, mask=mask_o, other=0.0)[None, :]
    y = tl.where(acc >= 0.0, acc, acc * SLOPE)
    store_output_and_carry(y, out_ptr, carry_out_ptr, n64, offs_p, hh, ww, mask_p, offs_o,
                           mask_o, HW, COUT, KEEP, OUT_C0, so_n, so_c, so_h, so_w)


def launch_split_resplice(x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
                          splits: int, negative_slope: float, out: Optional[torch.Tensor] = None):
    """weights[j]: Cout×Cin×3×3 and biases[j]: Cout, BN folded, contiguous, accumulation
    dtype. Output: x's dtype and layout."""
    n, c, h, w = x.shape
    width = c // splits
    out = torch.empty_like(x) if out is None else out
    out[:, :width].copy_(x[:, :width])  # S1 goes straight to the output
    if launch_is_traced_away(x):
        return out
    acc = weights[0].dtype
    block_p = 16 if h * w <= 256 else 64
    grid = (triton.cdiv(h * w, block_p), n)
    carry = x.new_empty((1,), dtype=acc)  # placeholder for step 1, which has no carry
    for j, (weight, bias, (cout, cin, cc_in, keep, out_c0)) in enumerate(
            zip(weights, biases, split_resplice_layout(weights, width))):
        carry_out = x.new_empty((n, cout - keep, h, w), dtype=acc) if keep < cout else carry
        wrap_triton(_sr_step_kernel)[grid](
            x, carry, weight, bias, out, carry_out,
            h, w, h * w, (j + 1) * width, width, cc_in, cin, cout, keep, out_c0,
            *x.stride(), *out.stride(),
            SLOPE=negative_slope, HAS_CARRY=j > 0, BLOCK_P=block_p, BLOCK_X=channel_block(width),
            BLOCK_CC=channel_block(cc_in), BLOCK_O=channel_block(cout), PRECISION="ieee",
            num_warps=4)
        carry = carry_out
    return out


@triton_op("saffnet_triton::split_resplice_eval", mutates_args={})
def split_resplice_eval(x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
                        splits: int, negative_slope: float) -> torch.Tensor:
    """SR forward in eval mode with BN folded into (weights, biases); no autograd."""
    return launch_split_resplice(x, weights, biases, splits, negative_slope)


def _folded_step(step: nn.Module, acc: torch.dtype):
    conv, bn = step.conv, step.bn
    weight = conv.weight.to(acc)
    bias = conv.bias.to(acc) if conv.bias is not None else weight.new_zeros(conv.out_channels)
    if isinstance(bn, nn.BatchNorm2d):
        scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(acc)
        shift = -bn.running_mean.to(acc) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(acc)
        weight, bias = weight * scale[:, None, None, None], bias * scale + shift
    return weight.contiguous(), bias.contiguous()


def unsupported_reason(module: nn.Module, x: torch.Tensor) -> Optional[str]:
    reason = common_unsupported_reason(module, x)
    if reason is not None:
        return reason
    steps = module.steps
    grad_needed = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in module.parameters()))
    if module.training or grad_needed:
        from .split_resplice_train import unsupported_reason as autograd_reason

        reason = autograd_reason(module)
        if reason is not None:
            return reason
    if len({float(step.bn.eps) for step in steps if hasattr(step.bn, "eps")}) > 1:
        return "the FC steps use different BN eps"
    if module.training:
        if not all(step.bn.training and step.drop.training for step in steps):
            return "training with some FC steps in eval mode is not supported"
        if len({float(step.drop.p) for step in steps}) != 1:
            return "the FC steps use different dropout rates"
    elif any(step.bn.training or step.drop.training for step in steps):
        return "eval mode with some FC steps in training mode is not supported"
    for step in module.steps:
        conv, bn, act = step.conv, step.bn, step.act
        if not (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
                and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
                and (isinstance(bn, nn.Identity)
                     or (type(bn) is nn.BatchNorm2d and bn.running_mean is not None))
                and isinstance(act, nn.LeakyReLU)):
            return "the FC steps do not have the reference layout"
    if len({float(step.act.negative_slope) for step in module.steps}) != 1:
        return "the FC steps use different LeakyReLU slopes"
    return None


def triton_split_resplice(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if module.training or (torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in module.parameters()))):
        from .split_resplice_train import split_resplice_train

        return split_resplice_train(module, x)
    acc = acc_dtype(x.dtype)
    folded = [_folded_step(step, acc) for step in module.steps]
    slope = float(module.steps[0].act.negative_slope)
    return split_resplice_eval(x, [w for w, _ in folded], [b for _, b in folded],
                               module.splits, slope)

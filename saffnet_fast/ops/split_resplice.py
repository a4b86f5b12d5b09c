"""SR(C, s), the separation and re-splicing chain: ``split_resplice`` (inference form, BN
folded into the convolutions; ``split_resplice_tiled`` the same in one launch) and
``split_resplice_train`` (training form, BN on batch statistics, dropout).

Schema (csrc/split_resplice.cpp, csrc/split_resplice_train.cpp; the Triton namespace has
split_resplice and split_resplice_train with the same schemas):
  split_resplice(x, weights[], biases[], negative_slope) -> (out, carries)
      carries: every step's carried channels, N×Σcarry×H×W, what backward reads
  split_resplice_tiled(x, weights[], biases[], negative_slope, tile_h=0, tile_w=0,
                       write_carries=True) -> (out, carries)            [native only]
  split_resplice_train(x, weights[], gammas[], betas[], eps, negative_slope, dropout, seed)
      -> (out, saved[], saved[], mean, var)
      the two lists are what the backend's backward reads (opaque to the caller); mean and
      var (biased) are every step's batch statistics, concatenated, for the running
      statistics; seed: a one-element int64 tensor (on the CPU or x's device) keying the
      dropout mask
  split_resplice_train_backward(grad_out, x, weights[], gammas[], betas[], saved[], saved[],
      mean, var, eps, negative_slope, dropout, seed) -> (grad_x, grad_weights[],
      grad_gammas[], grad_betas[])
"""
from __future__ import annotations

from typing import List, NamedTuple, Sequence

import torch

from ._schema import NATIVE, check_nchw


class Step(NamedTuple):
    """One FC step of SR: conv3×3 width → width (its input is x's slice, then the previous
    step's carry), the first ``keep`` channels of its result to the output, the rest
    carried on."""
    width: int
    x_offset: int    # its slice of x: channels x_offset … x_offset + w0
    carry_in: int    # where its carried input starts in the carries; -1 for the first step
    keep: int
    out_offset: int  # where its kept channels go in the output
    carry_out: int   # where its carried channels go in the carries; -1 for the last step


def split_resplice_plan(channels: int, widths: Sequence[int]) -> List[Step]:
    """The channel plan of SR(channels, len(widths) + 1) with these step widths: the one
    Python copy of csrc/common/split_resplice.h's plan (the carries of all steps are
    stacked in step order, as split_resplice returns them)."""
    w0 = channels // (len(widths) + 1)
    plan, out_offset, carry_offset, prev_carry = [], w0, 0, -1
    for j, width in enumerate(widths):
        last = j == len(widths) - 1
        keep = width if last else (width + 1) // 2
        plan.append(Step(width, (j + 1) * w0, prev_carry, keep, out_offset,
                         -1 if last else carry_offset))
        out_offset += keep
        if not last:
            prev_carry = carry_offset
            carry_offset += width - keep
    return plan


def carry_channels(widths: Sequence[int]) -> int:
    """How many channels the carries of SR with these step widths hold."""
    return sum(width - (width + 1) // 2 for width in widths[:-1])


def register_split_resplice_autograd(namespace: str) -> None:
    """split_resplice's backward: not a fused kernel but ATen convolution gradients, step by
    step in reverse, fed by the op's own outputs (each step's activation is in ``out`` or
    ``carries``), so it is the same for every backend."""

    def _setup(ctx, inputs, output):
        x, weights, biases, negative_slope = inputs
        out, carries = output
        ctx.save_for_backward(x, out, carries, *weights)
        ctx.negative_slope = negative_slope

    torch.library.register_autograd(f"{namespace}::split_resplice", _split_resplice_backward,
                                    setup_context=_setup)


def _split_resplice_backward(ctx, grad_out, grad_carries):
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
    for j, step in reversed(list(enumerate(split_resplice_plan(c, widths)))):
        width, x_offset, carry_in, keep, out_offset, carry_out = step
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


def register_split_resplice_train_autograd(namespace: str) -> None:
    """split_resplice_train's gradient is its backward op (fused per step); the saved lists
    and the statistics are not differentiable outputs."""
    backward_op = getattr(torch.ops, namespace).split_resplice_train_backward

    def _setup(ctx, inputs, output):
        x, weights, gammas, betas, eps, slope, dropout, seed = inputs
        _, saved_a, saved_b, mean, var = output
        # saved_a / saved_b / mean / var are saved activations and statistics for backward
        # and for the running-statistics update: not differentiable outputs.
        ctx.mark_non_differentiable(*saved_a, *saved_b, mean, var)
        ctx.steps, ctx.saved_a = len(weights), len(saved_a)
        ctx.save_for_backward(x, seed, mean, var, *weights, *gammas, *betas, *saved_a,
                              *saved_b)
        ctx.eps, ctx.slope, ctx.dropout = eps, slope, dropout

    def _backward(ctx, grad_out, *unused):
        x, seed, mean, var, *rest = ctx.saved_tensors
        s, a = ctx.steps, ctx.saved_a
        weights, gammas, betas = rest[:s], rest[s:2 * s], rest[2 * s:3 * s]
        saved_a, saved_b = rest[3 * s:3 * s + a], rest[3 * s + a:]
        if grad_out is None:
            grad_out = torch.zeros_like(x)
        grad_x, grad_w, grad_g, grad_b = backward_op(
            grad_out, x, weights, gammas, betas, saved_a, saved_b, mean, var, ctx.eps,
            ctx.slope, ctx.dropout, seed)
        return grad_x, grad_w, grad_g, grad_b, None, None, None, None

    torch.library.register_autograd(f"{namespace}::split_resplice_train", _backward,
                                    setup_context=_setup)


def register_native() -> None:
    @torch.library.register_fake("saffnet_fast::split_resplice")
    def _split_resplice_fake(x, weights, biases, negative_slope):
        check_nchw(x, "split_resplice")
        n, c, h, w = x.shape
        carry = carry_channels([int(wt.shape[0]) for wt in weights])
        return x.new_empty((n, c, h, w)), x.new_empty((n, carry, h, w))

    @torch.library.register_fake("saffnet_fast::split_resplice_out")
    def _split_resplice_out_fake(x, weights, biases, negative_slope, out, carries):
        check_nchw(x, "split_resplice")
        return None

    @torch.library.register_fake("saffnet_fast::split_resplice_tiled")
    def _split_resplice_tiled_fake(x, weights, biases, negative_slope, tile_h=0, tile_w=0,
                                   write_carries=True):
        out, carries = _split_resplice_fake(x, weights, biases, negative_slope)
        return out, carries if write_carries else x.new_empty((x.shape[0], 0, *x.shape[2:]))

    @torch.library.register_fake("saffnet_fast::split_resplice_train")
    def _split_resplice_train_fake(x, weights, gammas, betas, eps, negative_slope, dropout,
                                   seed):
        check_nchw(x, "split_resplice_train")
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

    register_split_resplice_autograd(NATIVE)
    register_split_resplice_train_autograd(NATIVE)
    register_split_resplice_tiled_autograd(NATIVE)


def register_split_resplice_tiled_autograd(namespace: str) -> None:
    """split_resplice_tiled: split_resplice's function in one launch (an explicit tile, and
    the carries only when asked), the same autograd (native, and Triton's tensor-core
    kernel, ops/triton/split_resplice_tc.py)."""

    def _tiled_setup(ctx, inputs, output):
        ctx.write_carries = inputs[6] if len(inputs) > 6 else True
        x, weights, biases, negative_slope = inputs[:4]
        out, carries = output
        ctx.save_for_backward(x, out, carries, *weights)
        ctx.negative_slope = negative_slope

    def _tiled_backward(ctx, grad_out, grad_carries):
        if not ctx.write_carries:
            raise RuntimeError("split_resplice_tiled: backward needs the carried channels; "
                               "call it with write_carries=True when gradients are needed")
        grads = _split_resplice_backward(ctx, grad_out, grad_carries)
        # None for each tile / write_carries argument the call passed
        return (*grads, *[None] * (len(ctx.needs_input_grad) - len(grads)))

    torch.library.register_autograd(f"{namespace}::split_resplice_tiled", _tiled_backward,
                                    setup_context=_tiled_setup)

"""Split-resplice (SR) in Triton with autograd: training mode, and eval mode when gradients
are needed (BN then uses its running statistics and dropout is off).

Per FC step j (conv3×3 → BN with batch statistics → LeakyReLU → Dropout):
forward
  * ``_conv_stats_kernel``: z = conv3×3(input) as an implicit GEMM (9 taps × tl.dot), input
    read straight from x's slice S(j+1) and the previous step's carry; z is kept for the
    backward and each tile writes its mean and centred sum of squares, merged into the batch
    statistics (Chan et al.) without the cancellation of E[z²] − E[z]²;
  * ``_act_kernel``: BN apply + LeakyReLU + dropout, writing the first ceil(c/2) channels
    straight into their slice of the output and the rest into the carry of the next step.
    The dropout mask comes from a counter-based RNG (tl.rand(seed, element index)) and is
    regenerated in backward, never stored.
backward (steps in reverse)
  * ``_act_backward_kernel``: dL/dŷ through dropout and LeakyReLU (from the output slice's
    gradient and the carry's gradient) plus per-tile sums for the BN backward;
  * dL/dz = γ/σ·(dL/dŷ − mean(dL/dŷ) − x̂·mean(dL/dŷ·x̂)) (PyTorch, elementwise);
  * ``_conv_input_backward_kernel``: dL/d(input) as a transposed implicit GEMM, written
    straight into dL/dx's slice and the previous carry's gradient;
  * ``_conv_weight_backward_kernel``: dL/dW, one program column per tap, accumulated in
    registers over the program's tiles and added once.
Running statistics are updated as nn.BatchNorm2d does (SplitResplice module level).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import nn

from ._common import INTERPRET, acc_dtype, next_pow2

BLOCK_P = 16 if INTERPRET else 64


def _block(c: int) -> int:
    return max(16, next_pow2(c))


@triton.jit
def _conv_stats_kernel(x_ptr, carry_ptr, w_ptr, z_ptr, mean_ptr, m2_ptr,
                       H, W, HW, X_C0, CX, CC_IN, CIN, COUT, TILES,
                       sx_n, sx_c, sx_h, sx_w,
                       HAS_CARRY: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_X: tl.constexpr,
                       BLOCK_CC: tl.constexpr, BLOCK_O: tl.constexpr):
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    n64 = n.to(tl.int64)
    acc_t = z_ptr.dtype.element_ty
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    hh = offs_p // W
    ww = offs_p % W
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < COUT
    offs_x = tl.arange(0, BLOCK_X)
    mask_x = offs_x < CX
    offs_cc = tl.arange(0, BLOCK_CC)
    mask_cc = offs_cc < CC_IN
    acc = tl.zeros([BLOCK_P, BLOCK_O], dtype=acc_t)
    for ky in tl.static_range(3):
        for kx in tl.static_range(3):
            h2 = hh + (ky - 1)
            w2 = ww + (kx - 1)
            valid = mask_p & (h2 >= 0) & (h2 < H) & (w2 >= 0) & (w2 < W)
            a = tl.load(x_ptr + n64 * sx_n + (X_C0 + offs_x[None, :]) * sx_c + h2[:, None] * sx_h
                        + w2[:, None] * sx_w, mask=valid[:, None] & mask_x[None, :],
                        other=0.0).to(acc_t)
            wt = tl.load(w_ptr + offs_o[None, :] * (CIN * 9) + offs_x[:, None] * 9 + (ky * 3 + kx),
                         mask=mask_x[:, None] & mask_o[None, :], other=0.0)
            acc += tl.dot(a, wt, input_precision="ieee")
            if HAS_CARRY:
                c = tl.load(carry_ptr + (n64 * CC_IN + offs_cc[None, :]) * HW + h2[:, None] * W
                            + w2[:, None], mask=valid[:, None] & mask_cc[None, :], other=0.0)
                wc = tl.load(w_ptr + offs_o[None, :] * (CIN * 9) + (CX + offs_cc[:, None]) * 9
                             + (ky * 3 + kx), mask=mask_cc[:, None] & mask_o[None, :], other=0.0)
                acc += tl.dot(c, wc, input_precision="ieee")
    mask = mask_p[:, None] & mask_o[None, :]
    tl.store(z_ptr + (n64 * COUT + offs_o[None, :]) * HW + offs_p[:, None], acc, mask=mask)
    count = tl.sum(mask_p.to(acc_t), axis=0)
    tile_mean = tl.sum(tl.where(mask, acc, 0.0), axis=0) / count
    dev = tl.where(mask, acc - tile_mean[None, :], 0.0)
    tile = n * TILES + pid_p
    tl.store(mean_ptr + tile * COUT + offs_o, tile_mean, mask=mask_o)
    tl.store(m2_ptr + tile * COUT + offs_o, tl.sum(dev * dev, axis=0), mask=mask_o)


@triton.jit
def _act_kernel(z_ptr, scale_ptr, shift_ptr, out_ptr, carry_ptr,
                HW, COUT, KEEP, OUT_C0, SLOPE, P_DROP, seed_ptr, STEP,
                so_n, so_c, so_h, so_w, W,
                BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    n64 = n.to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < COUT
    mask = mask_p[:, None] & mask_o[None, :]
    index = (n64 * COUT + offs_o[None, :]) * HW + offs_p[:, None]
    z = tl.load(z_ptr + index, mask=mask, other=0.0)
    y = z * tl.load(scale_ptr + offs_o, mask=mask_o, other=0.0)[None, :] \
        + tl.load(shift_ptr + offs_o, mask=mask_o, other=0.0)[None, :]
    y = tl.where(y > 0.0, y, y * SLOPE)
    if P_DROP > 0.0:
        keep = tl.rand(tl.load(seed_ptr) + STEP, index.to(tl.int32)) >= P_DROP
        y = tl.where(keep, y / (1.0 - P_DROP), 0.0)
    hh = offs_p // W
    ww = offs_p % W
    to_out = mask & (offs_o < KEEP)[None, :]
    tl.store(out_ptr + n64 * so_n + (OUT_C0 + offs_o[None, :]) * so_c + hh[:, None] * so_h
             + ww[:, None] * so_w, y.to(out_ptr.dtype.element_ty), mask=to_out)
    to_carry = mask & (offs_o >= KEEP)[None, :]
    tl.store(carry_ptr + (n64 * (COUT - KEEP) + (offs_o[None, :] - KEEP)) * HW + offs_p[:, None],
             y, mask=to_carry)


@triton.jit
def _act_backward_kernel(g_ptr, gcarry_ptr, z_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
                         gy_ptr, sum_g_ptr, sum_gx_ptr,
                         HW, COUT, KEEP, OUT_C0, SLOPE, P_DROP, seed_ptr, STEP, TILES,
                         sg_n, sg_c, sg_h, sg_w, W,
                         BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    n64 = n.to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < COUT
    mask = mask_p[:, None] & mask_o[None, :]
    hh = offs_p // W
    ww = offs_p % W
    index = (n64 * COUT + offs_o[None, :]) * HW + offs_p[:, None]
    g = tl.load(g_ptr + n64 * sg_n + (OUT_C0 + offs_o[None, :]) * sg_c + hh[:, None] * sg_h
                + ww[:, None] * sg_w, mask=mask & (offs_o < KEEP)[None, :], other=0.0)
    g = g.to(z_ptr.dtype.element_ty)
    g += tl.load(gcarry_ptr + (n64 * (COUT - KEEP) + (offs_o[None, :] - KEEP)) * HW
                 + offs_p[:, None], mask=mask & (offs_o >= KEEP)[None, :], other=0.0)
    z = tl.load(z_ptr + index, mask=mask, other=0.0)
    y = z * tl.load(scale_ptr + offs_o, mask=mask_o, other=0.0)[None, :] \
        + tl.load(shift_ptr + offs_o, mask=mask_o, other=0.0)[None, :]
    if P_DROP > 0.0:
        keep = tl.rand(tl.load(seed_ptr) + STEP, index.to(tl.int32)) >= P_DROP
        g = tl.where(keep, g / (1.0 - P_DROP), 0.0)
    gy = tl.where(y > 0.0, g, g * SLOPE)
    gy = tl.where(mask, gy, 0.0)
    tl.store(gy_ptr + index, gy, mask=mask)
    xhat = (z - tl.load(mean_ptr + offs_o, mask=mask_o, other=0.0)[None, :]) \
        * tl.load(rstd_ptr + offs_o, mask=mask_o, other=0.0)[None, :]
    tile = n * TILES + pid_p
    tl.store(sum_g_ptr + tile * COUT + offs_o, tl.sum(gy, axis=0), mask=mask_o)
    tl.store(sum_gx_ptr + tile * COUT + offs_o, tl.sum(gy * xhat, axis=0), mask=mask_o)


@triton.jit
def _conv_input_backward_kernel(gz_ptr, w_ptr, gx_ptr, gcarry_ptr,
                                H, W, HW, X_C0, CX, CC_IN, CIN, COUT,
                                sg_n, sg_c, sg_h, sg_w,
                                HAS_CARRY: tl.constexpr, BLOCK_P: tl.constexpr,
                                BLOCK_X: tl.constexpr, BLOCK_CC: tl.constexpr,
                                BLOCK_O: tl.constexpr):
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    n64 = n.to(tl.int64)
    acc_t = gz_ptr.dtype.element_ty
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    hh = offs_p // W
    ww = offs_p % W
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < COUT
    offs_x = tl.arange(0, BLOCK_X)
    mask_x = offs_x < CX
    offs_cc = tl.arange(0, BLOCK_CC)
    mask_cc = offs_cc < CC_IN
    acc_x = tl.zeros([BLOCK_P, BLOCK_X], dtype=acc_t)
    acc_c = tl.zeros([BLOCK_P, BLOCK_CC], dtype=acc_t)
    for ky in tl.static_range(3):
        for kx in tl.static_range(3):
            # input pixel q feeds output pixel q − (ky − 1, kx − 1) through tap (ky, kx)
            h2 = hh - (ky - 1)
            w2 = ww - (kx - 1)
            valid = mask_p & (h2 >= 0) & (h2 < H) & (w2 >= 0) & (w2 < W)
            gz = tl.load(gz_ptr + (n64 * COUT + offs_o[None, :]) * HW + h2[:, None] * W
                         + w2[:, None], mask=valid[:, None] & mask_o[None, :], other=0.0)
            wx = tl.load(w_ptr + offs_o[:, None] * (CIN * 9) + offs_x[None, :] * 9 + (ky * 3 + kx),
                         mask=mask_o[:, None] & mask_x[None, :], other=0.0)
            acc_x += tl.dot(gz, wx, input_precision="ieee")
            if HAS_CARRY:
                wc = tl.load(w_ptr + offs_o[:, None] * (CIN * 9) + (CX + offs_cc[None, :]) * 9
                             + (ky * 3 + kx), mask=mask_o[:, None] & mask_cc[None, :], other=0.0)
                acc_c += tl.dot(gz, wc, input_precision="ieee")
    tl.store(gx_ptr + n64 * sg_n + (X_C0 + offs_x[None, :]) * sg_c + hh[:, None] * sg_h
             + ww[:, None] * sg_w, acc_x.to(gx_ptr.dtype.element_ty),
             mask=mask_p[:, None] & mask_x[None, :])
    if HAS_CARRY:
        tl.store(gcarry_ptr + (n64 * CC_IN + offs_cc[None, :]) * HW + offs_p[:, None], acc_c,
                 mask=mask_p[:, None] & mask_cc[None, :])


@triton.jit
def _conv_weight_backward_kernel(x_ptr, carry_ptr, gz_ptr, gw_ptr,
                                 H, W, HW, X_C0, CX, CC_IN, CIN, COUT, NUM_TILES, TILE_STEP,
                                 sx_n, sx_c, sx_h, sx_w,
                                 HAS_CARRY: tl.constexpr, BLOCK_P: tl.constexpr,
                                 BLOCK_X: tl.constexpr, BLOCK_CC: tl.constexpr,
                                 BLOCK_O: tl.constexpr):
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    tap = tl.program_id(2)
    ky = tap // 3
    kx = tap % 3
    n64 = n.to(tl.int64)
    acc_t = gz_ptr.dtype.element_ty
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < COUT
    offs_x = tl.arange(0, BLOCK_X)
    mask_x = offs_x < CX
    offs_cc = tl.arange(0, BLOCK_CC)
    mask_cc = offs_cc < CC_IN
    acc_x = tl.zeros([BLOCK_X, BLOCK_O], dtype=acc_t)
    acc_c = tl.zeros([BLOCK_CC, BLOCK_O], dtype=acc_t)
    for tile in range(pid_p, NUM_TILES, TILE_STEP):
        offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        hh = offs_p // W
        ww = offs_p % W
        gz = tl.load(gz_ptr + (n64 * COUT + offs_o[None, :]) * HW + offs_p[:, None],
                     mask=mask_p[:, None] & mask_o[None, :], other=0.0)
        h2 = hh + (ky - 1)
        w2 = ww + (kx - 1)
        valid = mask_p & (h2 >= 0) & (h2 < H) & (w2 >= 0) & (w2 < W)
        a = tl.load(x_ptr + n64 * sx_n + (X_C0 + offs_x[None, :]) * sx_c + h2[:, None] * sx_h
                    + w2[:, None] * sx_w, mask=valid[:, None] & mask_x[None, :],
                    other=0.0).to(acc_t)
        acc_x += tl.dot(tl.trans(a), gz, input_precision="ieee")
        if HAS_CARRY:
            c = tl.load(carry_ptr + (n64 * CC_IN + offs_cc[None, :]) * HW + h2[:, None] * W
                        + w2[:, None], mask=valid[:, None] & mask_cc[None, :], other=0.0)
            acc_c += tl.dot(tl.trans(c), gz, input_precision="ieee")
    tl.atomic_add(gw_ptr + offs_o[None, :] * (CIN * 9) + offs_x[:, None] * 9 + tap, acc_x,
                  mask=mask_x[:, None] & mask_o[None, :])
    if HAS_CARRY:
        tl.atomic_add(gw_ptr + offs_o[None, :] * (CIN * 9) + (CX + offs_cc[:, None]) * 9 + tap,
                      acc_c, mask=mask_cc[:, None] & mask_o[None, :])


def _merge_moments(tile_mean, tile_m2, n, hw, block_p):
    tiles = triton.cdiv(hw, block_p)
    starts = torch.arange(tiles, device=tile_mean.device) * block_p
    counts = (hw - starts).clamp(max=block_p).to(tile_mean.dtype).repeat(n)[:, None]
    total = n * hw
    mean = (tile_mean * counts).sum(0) / total
    m2 = tile_m2.sum(0) + (counts * (tile_mean - mean) ** 2).sum(0)
    return mean, m2 / total


class SplitRespliceTrainFunction(torch.autograd.Function):
    """SR in training mode. Inputs: x, then per step (conv weight, BN weight, BN bias).
    Returns (out, batch means, batch biased variances); the statistics feed the running
    averages and carry no gradient."""

    @staticmethod
    def forward(ctx, x, splits: int, slope: float, p_drop: float, eps: float,
                seed: torch.Tensor, running_stats, *params):
        n, c, h, w = x.shape
        hw = h * w
        width = c // splits
        acc = acc_dtype(x.dtype)
        steps = len(params) // 3
        out = torch.empty_like(x)
        out[:, :width].copy_(x[:, :width])
        tiles = triton.cdiv(hw, BLOCK_P)
        grid = (tiles, n)
        carry = x.new_empty((1,), dtype=acc)
        out_c0 = width
        saved, means, variances, layout = [], [], [], []
        for j in range(steps):
            weight = params[3 * j].to(acc).contiguous()
            gamma, beta = params[3 * j + 1].to(acc), params[3 * j + 2].to(acc)
            cout, cin = weight.shape[0], weight.shape[1]
            cc_in = cin - width
            keep = cout if j == steps - 1 else math.ceil(cout / 2)
            z = x.new_empty((n, cout, h, w), dtype=acc)
            tile_mean = x.new_empty((n * tiles, cout), dtype=acc)
            tile_m2 = torch.empty_like(tile_mean)
            _conv_stats_kernel[grid](
                x, carry, weight, z, tile_mean, tile_m2,
                h, w, hw, (j + 1) * width, width, cc_in, cin, cout, tiles, *x.stride(),
                HAS_CARRY=j > 0, BLOCK_P=BLOCK_P, BLOCK_X=_block(width),
                BLOCK_CC=_block(cc_in), BLOCK_O=_block(cout), num_warps=4)
            if running_stats is None:
                mean, var = _merge_moments(tile_mean, tile_m2, n, hw, BLOCK_P)
            else:  # eval mode with autograd: BN uses its running statistics
                mean, var = (t.to(acc) for t in running_stats[j])
            rstd = torch.rsqrt(var + eps)
            scale = (gamma * rstd).contiguous()
            shift = (beta - mean * scale).contiguous()
            carry_out = (x.new_empty((n, cout - keep, h, w), dtype=acc) if keep < cout
                         else carry)
            _act_kernel[grid](
                z, scale, shift, out, carry_out, hw, cout, keep, out_c0, slope, p_drop,
                seed, j, *out.stride(), w, BLOCK_P=BLOCK_P, BLOCK_O=_block(cout),
                num_warps=4)
            saved += [carry, z, weight, gamma, mean, rstd, scale, shift]
            layout.append((cout, cin, cc_in, keep, out_c0))
            means.append(mean)
            variances.append(var)
            out_c0 += keep
            carry = carry_out
        ctx.save_for_backward(x, seed, *saved)
        ctx.meta = (splits, slope, p_drop, layout, [p.dtype for p in params],
                    running_stats is None)
        means_t, vars_t = torch.cat(means), torch.cat(variances)
        ctx.mark_non_differentiable(means_t, vars_t)
        return out, means_t, vars_t

    @staticmethod
    def backward(ctx, grad_out, _grad_means, _grad_vars):
        x, seed, *saved = ctx.saved_tensors
        splits, slope, p_drop, layout, param_dtypes, batch_stats = ctx.meta
        n, c, h, w = x.shape
        hw = h * w
        width = c // splits
        tiles = triton.cdiv(hw, BLOCK_P)
        grid = (tiles, n)
        acc = saved[1].dtype
        grad_x = torch.empty_like(x)
        grad_x[:, :width].copy_(grad_out[:, :width])
        grads: List[Optional[torch.Tensor]] = [None] * (3 * len(layout))
        grad_carry = x.new_empty((1,), dtype=acc)  # the last step has no carry out
        for j in reversed(range(len(layout))):
            carry, z, weight, gamma, mean, rstd, scale, shift = saved[8 * j: 8 * j + 8]
            cout, cin, cc_in, keep, out_c0 = layout[j]
            gy = torch.empty_like(z)
            sum_g = x.new_empty((n * tiles, cout), dtype=acc)
            sum_gx = torch.empty_like(sum_g)
            _act_backward_kernel[grid](
                grad_out, grad_carry, z, scale, shift, mean, rstd, gy, sum_g, sum_gx,
                hw, cout, keep, out_c0, slope, p_drop, seed, j, tiles,
                *grad_out.stride(), w, BLOCK_P=BLOCK_P, BLOCK_O=_block(cout), num_warps=4)
            sum_g, sum_gx = sum_g.sum(0), sum_gx.sum(0)
            total = n * hw
            grads[3 * j + 1] = sum_gx.to(param_dtypes[3 * j + 1])  # dL/dγ = Σ dL/dŷ · x̂
            grads[3 * j + 2] = sum_g.to(param_dtypes[3 * j + 2])   # dL/dβ = Σ dL/dŷ
            if batch_stats:  # the statistics depend on z too
                xhat = (z - mean[None, :, None, None]) * rstd[None, :, None, None]
                gz = (gamma * rstd)[None, :, None, None] * (
                    gy - (sum_g / total)[None, :, None, None]
                    - xhat * (sum_gx / total)[None, :, None, None])
            else:
                gz = (gamma * rstd)[None, :, None, None] * gy
            gz = gz.contiguous()
            grad_carry_in = (x.new_empty((n, cc_in, h, w), dtype=acc) if j > 0
                             else grad_carry)
            _conv_input_backward_kernel[grid](
                gz, weight, grad_x, grad_carry_in, h, w, hw, (j + 1) * width, width, cc_in,
                cin, cout, *grad_x.stride(), HAS_CARRY=j > 0, BLOCK_P=BLOCK_P,
                BLOCK_X=_block(width), BLOCK_CC=_block(cc_in), BLOCK_O=_block(cout),
                num_warps=4)
            grad_w = torch.zeros_like(weight)
            tile_step = max(1, min(tiles, 1024 // (9 * n)))
            _conv_weight_backward_kernel[(tile_step, n, 9)](
                x, carry, gz, grad_w, h, w, hw, (j + 1) * width, width, cc_in, cin, cout,
                tiles, tile_step, *x.stride(), HAS_CARRY=j > 0, BLOCK_P=BLOCK_P,
                BLOCK_X=_block(width), BLOCK_CC=_block(cc_in), BLOCK_O=_block(cout),
                num_warps=4)
            grads[3 * j] = grad_w.to(param_dtypes[3 * j])
            grad_carry = grad_carry_in
        return (grad_x, None, None, None, None, None, None, *grads)


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why the autograd path (training, or eval with gradients) cannot serve ``module``."""
    for step in module.steps:
        bn = step.bn
        if not (type(bn) is nn.BatchNorm2d and bn.affine):
            return "autograd needs affine nn.BatchNorm2d layers in every FC step"
        if not module.training and bn.running_mean is None:
            return "eval mode with autograd needs BatchNorm running statistics"
        if step.conv.bias is not None:
            return "training expects FC convolutions without bias (the reference layout)"
    return None


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm2d, mean, var, count: int) -> None:
    if bn.running_mean is None:
        return
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    dtype = bn.running_mean.dtype
    bn.running_mean.mul_(1 - factor).add_(mean.to(dtype) * factor)
    bn.running_var.mul_(1 - factor).add_((var * (count / (count - 1))).to(dtype) * factor)


def split_resplice_train(module: nn.Module, x: torch.Tensor,
                         seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SR forward with autograd: training mode (batch statistics, dropout), or eval mode
    (running statistics, no dropout) when gradients are needed."""
    n, c, h, w = x.shape
    if not module.training:
        params = []
        for step in module.steps:
            params += [step.conv.weight, step.bn.weight, step.bn.bias]
        running = tuple((s.bn.running_mean, s.bn.running_var) for s in module.steps)
        return SplitRespliceTrainFunction.apply(
            x, module.splits, float(module.steps[0].act.negative_slope), 0.0,
            float(module.steps[0].bn.eps), x.new_zeros((1,), dtype=torch.int32), running,
            *params)[0]
    if n * h * w <= 1:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {tuple(x.shape)}")
    steps = module.steps
    p_drop = float(steps[0].drop.p) if steps[0].drop.training else 0.0
    if seed is None:
        # drawn on the device from torch's generator: torch.manual_seed makes runs
        # reproducible, and neither a host sync nor a graph break is needed
        seed = torch.randint(0, 2 ** 30, (1,), device=x.device, dtype=torch.int32)
    params = []
    for step in steps:
        params += [step.conv.weight, step.bn.weight, step.bn.bias]
    out, means, variances = SplitRespliceTrainFunction.apply(
        x, module.splits, float(steps[0].act.negative_slope), p_drop, float(steps[0].bn.eps),
        seed, None, *params)
    offset = 0
    for step in steps:
        cout = step.conv.out_channels
        _update_running_stats(step.bn, means[offset:offset + cout],
                              variances[offset:offset + cout], n * h * w)
        offset += cout
    return out

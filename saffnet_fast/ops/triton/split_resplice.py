"""Triton kernels of SR (:mod:`saffnet_fast.ops.split_resplice`), registered as
``saffnet_fast_triton::split_resplice`` and ``split_resplice_train`` (+ its backward) with
the native schemas.

split_resplice (inference, BN folded into the convolutions): one launch per step,
``_sr_step_kernel``: conv3×3 + bias + LeakyReLU as an implicit GEMM (9 shifted taps, each a
tl.dot over the input channels), reading its input straight from x's slice S(j+1) and from
the previous step's carry, writing its first ceil(c/2) channels straight into their slice
of the output (no split or cat copies) and the others into a carry buffer for the next
step. The op returns the carries stacked (N×Σcarry×H×W in x's dtype, one copy) because its
autograd, shared with the native op, reads them: ATen convolution gradients. Not written in
Triton: the single-launch version with a halo shrinking per step (the native
split_resplice_tiled, csrc/common/split_resplice_tile.h).

split_resplice_train (BN on batch statistics, dropout), per FC step j (conv3×3 → BN →
LeakyReLU → Dropout):
forward
  * ``_conv_stats_kernel``: z = conv3×3(input) as an implicit GEMM (9 taps × tl.dot), input
    read straight from x's slice S(j+1) and the previous step's carry; each tile writes its
    mean and centred sum of squares, merged into the batch statistics (Chan et al.);
  * ``_act_kernel``: BN apply + LeakyReLU + dropout, writing the first ceil(c/2) channels
    straight into their slice of the output and the rest into the carry of the next step.
  Its saved lists are each step's pre-BN z and each step's carry (the arithmetic dtype).
backward (steps in reverse, split_resplice_train_backward)
  * ``_act_backward_kernel``: dL/dŷ through dropout and LeakyReLU (from the output slice's
    gradient and the carry's gradient) plus per-tile sums for the BN backward;
  * ``_bn_input_grad_kernel``: dL/dz = γ/σ·(dL/dŷ − mean(dL/dŷ) − x̂·mean(dL/dŷ·x̂)) in place.
    The per-tile sums are added up by PyTorch before it: a reduction over N·TILES×C values,
    which one kernel per program could only redo;
  * ``_conv_input_backward_kernel``: dL/d(input) as a transposed implicit GEMM, written
    straight into dL/dx's slice and the previous carry's gradient;
  * ``_conv_weight_backward_kernel``: dL/dW, one program column per tap, accumulated in
    registers over the program's tiles and added once.

The dropout mask comes from a counter-based RNG: tl.rand(seed + step, element index). The
seed is an op input (the native schema's one-element int64 tensor; its low 30 bits go to x's
device, copied without a sync when it is on the CPU), so the op is a pure function of its
inputs and the backward regenerates the mask instead of storing it.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .._schema import TRITON, out_like
from ..split_resplice import (register_split_resplice_autograd,
                              register_split_resplice_train_autograd, split_resplice_plan)
from ._common import (INTERPRET, acc_dtype, channel_block, conv3x3_tile, conv_channel_ranges,
                      launch_is_traced_away, load_conv_inputs, merge_tile_moments, pixel_tile,
                      step_tile, store_output_and_carry, tile_moments)


def _layout(channels: int, weights) -> List[Tuple[int, int, int, int, int]]:
    """Per FC step, from the SR plan: (cout, cin, cc_in, keep, out_c0): its output and input
    channels (FC(c) is c → c), how many input channels come from the previous carry, how
    many outputs go to the output and where they start there."""
    w0 = channels // (len(weights) + 1)
    return [(s.width, s.width, s.width - w0 if s.carry_in >= 0 else 0, s.keep, s.out_offset)
            for s in split_resplice_plan(channels, [int(w.shape[0]) for w in weights])]


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


def launch_split_resplice(x: torch.Tensor, weights: List[torch.Tensor],
                          biases: List[torch.Tensor], negative_slope: float,
                          out: Optional[torch.Tensor] = None):
    """SR in inference form, one launch per step: (out, every step's carry). weights[j]:
    Cout×Cin×3×3 and biases[j]: Cout, BN folded, contiguous, in the arithmetic dtype (the
    carries' dtype too). out: x's dtype, channels_last when x is, else contiguous."""
    n, c, h, w = x.shape
    width = c // (len(weights) + 1)
    out = out_like(x) if out is None else out
    out[:, :width].copy_(x[:, :width])  # S1 goes straight to the output
    acc = weights[0].dtype
    launch = not launch_is_traced_away(x)
    block_p = 16 if h * w <= 256 else 64
    grid = (triton.cdiv(h * w, block_p), n)
    carry = x.new_empty((1,), dtype=acc)  # placeholder for step 1, which has no carry
    carries = []
    for j, (weight, bias, (cout, cin, cc_in, keep, out_c0)) in enumerate(
            zip(weights, biases, _layout(c, weights))):
        carry_out = x.new_empty((n, cout - keep, h, w), dtype=acc) if keep < cout else carry
        if launch:
            wrap_triton(_sr_step_kernel)[grid](
                x, carry, weight, bias, out, carry_out,
                h, w, h * w, (j + 1) * width, width, cc_in, cin, cout, keep, out_c0,
                *x.stride(), *out.stride(),
                SLOPE=negative_slope, HAS_CARRY=j > 0, BLOCK_P=block_p,
                BLOCK_X=channel_block(width), BLOCK_CC=channel_block(cc_in),
                BLOCK_O=channel_block(cout), PRECISION="ieee", num_warps=4)
        if keep < cout:
            carries.append(carry_out)
        carry = carry_out
    return out, carries


BLOCK_P = 16 if INTERPRET else 64


@triton.jit
def _dropout_keep(seed_ptr, STEP, index, P_DROP):
    """The counter-based dropout mask of step STEP at the flat element indices ``index``."""
    return tl.rand(tl.load(seed_ptr) + STEP, index.to(tl.int32)) >= P_DROP


@triton.jit
def _conv_stats_kernel(x_ptr, carry_ptr, w_ptr, z_ptr, mean_ptr, m2_ptr,
                       H, W, HW, X_C0, CX, CC_IN, CIN, COUT,
                       sx_n, sx_c, sx_h, sx_w,
                       HAS_CARRY: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_X: tl.constexpr,
                       BLOCK_CC: tl.constexpr, BLOCK_O: tl.constexpr):
    n64, tile, offs_p, mask_p, hh, ww, offs_o, mask_o = step_tile(HW, W, COUT, BLOCK_P, BLOCK_O)
    acc = conv3x3_tile(x_ptr, carry_ptr, w_ptr, n64, hh, ww, mask_p,
                       H, W, HW, X_C0, CX, CC_IN, CIN, COUT, sx_n, sx_c, sx_h, sx_w,
                       HAS_CARRY, BLOCK_P, BLOCK_X, BLOCK_CC, BLOCK_O, "ieee")
    tl.store(z_ptr + (n64 * COUT + offs_o[None, :]) * HW + offs_p[:, None], acc,
             mask=mask_p[:, None] & mask_o[None, :])
    tile_moments(acc, mask_p, tile, mean_ptr, m2_ptr, offs_o, mask_o, COUT)


@triton.jit
def _act_kernel(z_ptr, scale_ptr, shift_ptr, out_ptr, carry_ptr,
                HW, COUT, KEEP, OUT_C0, seed_ptr, STEP,
                so_n, so_c, so_h, so_w, W, SLOPE: tl.constexpr, P_DROP: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):
    n64, _, offs_p, mask_p, hh, ww, offs_o, mask_o = step_tile(HW, W, COUT, BLOCK_P, BLOCK_O)
    index = (n64 * COUT + offs_o[None, :]) * HW + offs_p[:, None]
    z = tl.load(z_ptr + index, mask=mask_p[:, None] & mask_o[None, :], other=0.0)
    y = z * tl.load(scale_ptr + offs_o, mask=mask_o, other=0.0)[None, :] \
        + tl.load(shift_ptr + offs_o, mask=mask_o, other=0.0)[None, :]
    y = tl.where(y > 0.0, y, y * SLOPE)
    if P_DROP > 0.0:
        y = tl.where(_dropout_keep(seed_ptr, STEP, index, P_DROP), y / (1.0 - P_DROP), 0.0)
    store_output_and_carry(y, out_ptr, carry_ptr, n64, offs_p, hh, ww, mask_p, offs_o, mask_o,
                           HW, COUT, KEEP, OUT_C0, so_n, so_c, so_h, so_w)


@triton.jit
def _act_backward_kernel(g_ptr, gcarry_ptr, z_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
                         gy_ptr, sum_g_ptr, sum_gx_ptr,
                         HW, COUT, KEEP, OUT_C0, seed_ptr, STEP,
                         sg_n, sg_c, sg_h, sg_w, W, SLOPE: tl.constexpr, P_DROP: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):
    n64, tile, offs_p, mask_p, hh, ww, offs_o, mask_o = step_tile(HW, W, COUT, BLOCK_P, BLOCK_O)
    mask = mask_p[:, None] & mask_o[None, :]
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
        g = tl.where(_dropout_keep(seed_ptr, STEP, index, P_DROP), g / (1.0 - P_DROP), 0.0)
    gy = tl.where(y > 0.0, g, g * SLOPE)
    gy = tl.where(mask, gy, 0.0)
    tl.store(gy_ptr + index, gy, mask=mask)
    xhat = (z - tl.load(mean_ptr + offs_o, mask=mask_o, other=0.0)[None, :]) \
        * tl.load(rstd_ptr + offs_o, mask=mask_o, other=0.0)[None, :]
    tl.store(sum_g_ptr + tile * COUT + offs_o, tl.sum(gy, axis=0), mask=mask_o)
    tl.store(sum_gx_ptr + tile * COUT + offs_o, tl.sum(gy * xhat, axis=0), mask=mask_o)


@triton.jit
def _bn_input_grad_kernel(g_ptr, z_ptr, mean_ptr, rstd_ptr, gamma_ptr, sum_g_ptr, sum_gx_ptr,
                          HW, COUT, COUNT, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):
    """dL/dz from dL/dŷ (g, overwritten in place), BN on batch statistics:
    dL/dz = γσ⁻¹·(dL/dŷ − Σ dL/dŷ / M − x̂ · Σ dL/dŷ·x̂ / M), M = N·H·W, x̂ = (z − μ)σ⁻¹."""
    n64, _, offs_p, mask_p, _, _, offs_o, mask_o = step_tile(HW, 1, COUT, BLOCK_P, BLOCK_O)
    mask = mask_p[:, None] & mask_o[None, :]
    index = (n64 * COUT + offs_o[None, :]) * HW + offs_p[:, None]
    g = tl.load(g_ptr + index, mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + offs_o, mask=mask_o, other=0.0)
    scale = tl.load(gamma_ptr + offs_o, mask=mask_o, other=0.0) * rstd
    z = tl.load(z_ptr + index, mask=mask, other=0.0)
    xhat = (z - tl.load(mean_ptr + offs_o, mask=mask_o, other=0.0)[None, :]) * rstd[None, :]
    mean_g = tl.load(sum_g_ptr + offs_o, mask=mask_o, other=0.0) / COUNT
    mean_gx = tl.load(sum_gx_ptr + offs_o, mask=mask_o, other=0.0) / COUNT
    g = g - mean_g[None, :] - xhat * mean_gx[None, :]
    tl.store(g_ptr + index, scale[None, :] * g, mask=mask)


@triton.jit
def _conv_input_backward_kernel(gz_ptr, w_ptr, gx_ptr, gcarry_ptr,
                                H, W, HW, X_C0, CX, CC_IN, CIN, COUT,
                                sg_n, sg_c, sg_h, sg_w,
                                HAS_CARRY: tl.constexpr, BLOCK_P: tl.constexpr,
                                BLOCK_X: tl.constexpr, BLOCK_CC: tl.constexpr,
                                BLOCK_O: tl.constexpr):
    n64 = tl.program_id(1).to(tl.int64)
    acc_t = gz_ptr.dtype.element_ty
    offs_p, mask_p, hh, ww = pixel_tile(tl.program_id(0), HW, W, BLOCK_P)
    offs_o, mask_o, offs_x, mask_x, offs_cc, mask_cc = conv_channel_ranges(
        COUT, CX, CC_IN, BLOCK_O, BLOCK_X, BLOCK_CC)
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
    offs_o, mask_o, offs_x, mask_x, offs_cc, mask_cc = conv_channel_ranges(
        COUT, CX, CC_IN, BLOCK_O, BLOCK_X, BLOCK_CC)
    acc_x = tl.zeros([BLOCK_X, BLOCK_O], dtype=acc_t)
    acc_c = tl.zeros([BLOCK_CC, BLOCK_O], dtype=acc_t)
    for tile in range(pid_p, NUM_TILES, TILE_STEP):
        offs_p, mask_p, hh, ww = pixel_tile(tile, HW, W, BLOCK_P)
        gz = tl.load(gz_ptr + (n64 * COUT + offs_o[None, :]) * HW + offs_p[:, None],
                     mask=mask_p[:, None] & mask_o[None, :], other=0.0)
        h2 = hh + (ky - 1)
        w2 = ww + (kx - 1)
        valid = mask_p & (h2 >= 0) & (h2 < H) & (w2 >= 0) & (w2 < W)
        a, c = load_conv_inputs(x_ptr, carry_ptr, n64, h2, w2, valid, offs_x, mask_x, offs_cc,
                                mask_cc, HW, W, X_C0, CC_IN, sx_n, sx_c, sx_h, sx_w, HAS_CARRY)
        acc_x += tl.dot(tl.trans(a), gz, input_precision="ieee")
        if HAS_CARRY:
            acc_c += tl.dot(tl.trans(c), gz, input_precision="ieee")
    tl.atomic_add(gw_ptr + offs_o[None, :] * (CIN * 9) + offs_x[:, None] * 9 + tap, acc_x,
                  mask=mask_x[:, None] & mask_o[None, :])
    if HAS_CARRY:
        tl.atomic_add(gw_ptr + offs_o[None, :] * (CIN * 9) + (CX + offs_cc[:, None]) * 9 + tap,
                      acc_c, mask=mask_cc[:, None] & mask_o[None, :])


def _vector(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return t.to(acc).contiguous()


def launch_split_resplice_train_forward(x, weights, gammas, betas, seed, negative_slope, p_drop,
                                        eps):
    n, c, h, w = x.shape
    hw = h * w
    width = c // (len(weights) + 1)
    acc = acc_dtype(x.dtype)
    launch = not launch_is_traced_away(x)
    out = torch.empty_like(x)
    out[:, :width].copy_(x[:, :width])  # S1 goes straight to the output
    tiles = triton.cdiv(hw, BLOCK_P)
    grid = (tiles, n)
    layout = _layout(c, weights)
    carry = x.new_empty((1,), dtype=acc)  # placeholder: step 1 has no carry in
    zs, carries, means, variances = [], [], [], []
    for j, (cout, cin, cc_in, keep, out_c0) in enumerate(layout):
        weight = weights[j].to(acc).contiguous()
        z = x.new_empty((n, cout, h, w), dtype=acc)
        tile_mean = x.new_empty((n * tiles, cout), dtype=acc)
        tile_m2 = torch.empty_like(tile_mean)
        if launch:
            wrap_triton(_conv_stats_kernel)[grid](
                x, carry, weight, z, tile_mean, tile_m2,
                h, w, hw, (j + 1) * width, width, cc_in, cin, cout, *x.stride(),
                HAS_CARRY=j > 0, BLOCK_P=BLOCK_P, BLOCK_X=channel_block(width),
                BLOCK_CC=channel_block(cc_in), BLOCK_O=channel_block(cout), num_warps=4)
        mean, var = merge_tile_moments(tile_mean, tile_m2, n, hw, BLOCK_P)
        scale = gammas[j].to(acc) * torch.rsqrt(var + eps)
        shift = (betas[j].to(acc) - mean * scale).contiguous()
        last = j == len(layout) - 1
        carry_out = carry if last else x.new_empty((n, cout - keep, h, w), dtype=acc)
        if launch:
            wrap_triton(_act_kernel)[grid](
                z, scale.contiguous(), shift, out, carry_out, hw, cout, keep, out_c0,
                seed, j, *out.stride(), w, SLOPE=negative_slope, P_DROP=p_drop,
                BLOCK_P=BLOCK_P, BLOCK_O=channel_block(cout), num_warps=4)
        zs.append(z)
        if not last:
            carries.append(carry_out)
        means.append(mean)
        variances.append(var)
        carry = carry_out
    return out, zs, carries, torch.cat(means), torch.cat(variances)


def launch_split_resplice_train_backward(grad_out, x, weights, gammas, betas, zs, carries,
                                         means, variances, seed, negative_slope, p_drop, eps):
    n, c, h, w = x.shape
    hw = h * w
    width = c // (len(weights) + 1)
    tiles = triton.cdiv(hw, BLOCK_P)
    grid = (tiles, n)
    acc = zs[0].dtype
    launch = not launch_is_traced_away(x, grad_out)
    grad_x = torch.empty_like(x)
    grad_x[:, :width].copy_(grad_out[:, :width])
    layout = _layout(c, weights)
    steps = len(layout)
    grad_weights: List[torch.Tensor] = [None] * steps  # type: ignore[list-item]
    grad_gammas: List[torch.Tensor] = [None] * steps  # type: ignore[list-item]
    grad_betas: List[torch.Tensor] = [None] * steps  # type: ignore[list-item]
    placeholder = x.new_empty((1,), dtype=acc)
    grad_carry = placeholder  # the last step has no carry out
    channel_starts = [0]
    for cout, *_ in layout:
        channel_starts.append(channel_starts[-1] + cout)
    for j in reversed(range(steps)):
        cout, cin, cc_in, keep, out_c0 = layout[j]
        lo, hi = channel_starts[j], channel_starts[j + 1]
        mean = _vector(means[lo:hi], acc)
        rstd = torch.rsqrt(_vector(variances[lo:hi], acc) + eps)
        gamma = _vector(gammas[j], acc)
        scale = (gamma * rstd).contiguous()
        shift = (_vector(betas[j], acc) - mean * scale).contiguous()
        weight = weights[j].to(acc).contiguous()
        carry_in = carries[j - 1] if j > 0 else placeholder
        gz = torch.empty_like(zs[j])
        tile_sum_g = x.new_empty((n * tiles, cout), dtype=acc)
        tile_sum_gx = torch.empty_like(tile_sum_g)
        if launch:
            wrap_triton(_act_backward_kernel)[grid](
                grad_out, grad_carry, zs[j], scale, shift, mean, rstd, gz, tile_sum_g,
                tile_sum_gx, hw, cout, keep, out_c0, seed, j, *grad_out.stride(), w,
                SLOPE=negative_slope, P_DROP=p_drop, BLOCK_P=BLOCK_P, BLOCK_O=channel_block(cout),
                num_warps=4)
        sum_g, sum_gx = tile_sum_g.sum(0), tile_sum_gx.sum(0)
        grad_gammas[j] = sum_gx.to(gammas[j].dtype)  # dL/dγ = Σ dL/dŷ · x̂
        grad_betas[j] = sum_g.to(betas[j].dtype)  # dL/dβ = Σ dL/dŷ
        grad_carry_in = x.new_empty((n, cc_in, h, w), dtype=acc) if j > 0 else placeholder
        grad_w = torch.zeros_like(weight)
        if launch:
            wrap_triton(_bn_input_grad_kernel)[grid](
                gz, zs[j], mean, rstd, gamma, sum_g, sum_gx, hw, cout, n * hw,
                BLOCK_P=BLOCK_P, BLOCK_O=channel_block(cout), num_warps=4)
            blocks = dict(HAS_CARRY=j > 0, BLOCK_P=BLOCK_P, BLOCK_X=channel_block(width),
                          BLOCK_CC=channel_block(cc_in), BLOCK_O=channel_block(cout),
                          num_warps=4)
            wrap_triton(_conv_input_backward_kernel)[grid](
                gz, weight, grad_x, grad_carry_in, h, w, hw, (j + 1) * width, width, cc_in,
                cin, cout, *grad_x.stride(), **blocks)
            tile_step = max(1, min(tiles, 1024 // (9 * n)))
            wrap_triton(_conv_weight_backward_kernel)[(tile_step, n, 9)](
                x, carry_in, gz, grad_w, h, w, hw, (j + 1) * width, width, cc_in, cin, cout,
                tiles, tile_step, *x.stride(), **blocks)
        grad_weights[j] = grad_w.to(weights[j].dtype)
        grad_carry = grad_carry_in
    return grad_x, grad_weights, grad_gammas, grad_betas


def _device_seed(seed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The kernels' seed: an int32 of one element on x's device, from the op's int64 seed
    (its low 30 bits; a CPU seed copied without waiting for the device)."""
    return torch.bitwise_and(seed, 2 ** 30 - 1).reshape(1).to(
        device=x.device, dtype=torch.int32, non_blocking=True)


@triton_op("saffnet_fast_triton::split_resplice", mutates_args={})
def split_resplice(x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
                   negative_slope: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """SR forward with BN folded into (weights, biases): (out, carries)."""
    n, c, h, w = x.shape
    acc = acc_dtype(x.dtype)
    out, carries = launch_split_resplice(x, [t.to(acc).contiguous() for t in weights],
                                         [t.to(acc).contiguous() for t in biases],
                                         negative_slope)
    if not carries:
        return out, x.new_empty((n, 0, h, w))
    return out, torch.cat(carries, dim=1).to(x.dtype)


@triton_op("saffnet_fast_triton::split_resplice_train", mutates_args={})
def split_resplice_train(
        x: torch.Tensor, weights: List[torch.Tensor], gammas: List[torch.Tensor],
        betas: List[torch.Tensor], eps: float, negative_slope: float, dropout: float,
        seed: torch.Tensor
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor], torch.Tensor, torch.Tensor]:
    """SR forward with BN on batch statistics: (out, pre-BN z per step, carries, means,
    biased variances); weights[j]: Cout×Cin×3×3 (no bias), gammas/betas[j]: Cout."""
    return launch_split_resplice_train_forward(x, weights, gammas, betas, _device_seed(seed, x),
                                               negative_slope, dropout, eps)


@triton_op("saffnet_fast_triton::split_resplice_train_backward", mutates_args={})
def split_resplice_train_backward(
        grad_out: torch.Tensor, x: torch.Tensor, weights: List[torch.Tensor],
        gammas: List[torch.Tensor], betas: List[torch.Tensor], pre: List[torch.Tensor],
        inputs: List[torch.Tensor], mean: torch.Tensor, var: torch.Tensor, eps: float,
        negative_slope: float, dropout: float, seed: torch.Tensor
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """(dL/dx, dL/dW, dL/dγ, dL/dβ) of split_resplice_train's ``out``; ``pre`` and
    ``inputs`` are its saved lists (z per step, carries)."""
    return launch_split_resplice_train_backward(grad_out, x, weights, gammas, betas, pre,
                                                inputs, mean, var, _device_seed(seed, x),
                                                negative_slope, dropout, eps)


register_split_resplice_autograd(TRITON)
register_split_resplice_train_autograd(TRITON)

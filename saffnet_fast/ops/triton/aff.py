"""The official AFF(x, residual) of any model in Triton (the drop-in FastAFF), training and
eval.

    xa  = x + residual
    xl  = W2·relu(W1·xa + b1) + b2        (local_att, both BNs folded: running statistics in
                                           eval, batch statistics in training)
    wei = σ(xl + xg[n, c])                (xg: the global branch on mean_hw(xa))
    out = 2·x·wei + 2·residual·(1 − wei)

pass 1: the global pool mean_hw(x) + mean_hw(residual) (PyTorch reductions, one read each);
middle: AFF's global branch on the N×C vector through the module's own layers (its BNs use
batch statistics over N in training, as in the reference);
training only: xa materialised once and ``local_stats`` stage 1 and 2 (aff_fuse.py, with
zero coordinate factors, so its t = xa) give the local BNs' batch statistics, running
statistics updated as nn.BatchNorm2d does;
pass 2 ``aff_pair``: per tile of pixels × all channels, the bottleneck as two tl.dot's, the
sigmoid weighting and the output (x and residual read once, out written once).
Backward: ``aff_pair_backward`` is one fused pass (the tile's forward recomputed, grad_x and
grad_residual written once; weight and xg gradients accumulated per program, one atomic add
each); local_stats has its fused backward; the vector-sized middles are differentiated by
autograd.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import nn
from torch.library import triton_op, wrap_triton

from ...nn.reference import _check_aff_inputs

from ._common import (INTERPRET, acc_dtype, aff_structure_reason, common_unsupported_reason,
                      configs, launch_is_traced_away, pixel_tile)
from .aff_fuse import (_add_bottleneck_grads, _bottleneck_backward, _bottleneck_ranges,
                       _bottleneck_recompute, _bottleneck_weights, _channel_blocks,
                       _load_pixels, _local_weight, _precision)
from .scaff import aff_global, aff_local_weights


@triton.autotune(
    configs=configs([({"BLOCK_P": 16}, 2), ({"BLOCK_P": 32}, 4), ({"BLOCK_P": 64}, 4),
                     ({"BLOCK_P": 128}, 8)], {"BLOCK_P": 16}),
    key=["C", "HW"],
)
@triton.jit
def _aff_pair_kernel(x_ptr, r_ptr, xg_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
                     C, CI, H, W, HW,
                     sx_n, sx_c, sx_h, sx_w, sr_n, sr_c, sr_h, sr_w, so_n, so_c, so_h, so_w,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
                     PRECISION: tl.constexpr):
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    offs_p, mask_p, hh, ww = pixel_tile(pid_p, HW, W, BLOCK_P)
    offs_c, mask_c, offs_i, mask_i = _bottleneck_ranges(C, CI, BLOCK_C, BLOCK_I)
    mask = mask_p[:, None] & mask_c[None, :]
    acc_t = xg_ptr.dtype.element_ty
    n64 = n.to(tl.int64)

    x = _load_pixels(x_ptr, n64, offs_c, hh, ww, mask, sx_n, sx_c, sx_h, sx_w).to(acc_t)
    r = _load_pixels(r_ptr, n64, offs_c, hh, ww, mask, sr_n, sr_c, sr_h, sr_w).to(acc_t)
    wei = _local_weight(x + r, n, w1_ptr, b1_ptr, w2_ptr, b2_ptr, xg_ptr, C, CI, offs_c,
                        mask_c, offs_i, mask_i, PRECISION)
    out = 2.0 * r + 2.0 * (x - r) * wei
    tl.store(out_ptr + n64 * so_n + offs_c[None, :] * so_c + hh[:, None] * so_h
             + ww[:, None] * so_w, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _aff_pair_backward_kernel(g_ptr, x_ptr, r_ptr, xg_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                              dx_ptr, dr_ptr, dxg_ptr, dw1_ptr, db1_ptr, dw2_ptr,
                              C, CI, H, W, HW, NUM_TILES, TILE_STEP,
                              sg_n, sg_c, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w,
                              sr_n, sr_c, sr_h, sr_w, sd_n, sd_c, sd_h, sd_w,
                              se_n, se_c, se_h, se_w,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_I: tl.constexpr, PRECISION: tl.constexpr):
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    n64 = n.to(tl.int64)
    acc_t = xg_ptr.dtype.element_ty
    offs_c, mask_c, offs_i, mask_i = _bottleneck_ranges(C, CI, BLOCK_C, BLOCK_I)
    w1, w1t, w2, w2t, b1, shift = _bottleneck_weights(w1_ptr, b1_ptr, w2_ptr, b2_ptr, xg_ptr,
                                                      n, C, CI, offs_c, mask_c, offs_i, mask_i)

    acc_dxg = tl.zeros([BLOCK_C], dtype=acc_t)
    acc_db1 = tl.zeros([BLOCK_I], dtype=acc_t)
    acc_dw1 = tl.zeros([BLOCK_I, BLOCK_C], dtype=acc_t)
    acc_dw2 = tl.zeros([BLOCK_C, BLOCK_I], dtype=acc_t)
    for tile in range(pid_p, NUM_TILES, TILE_STEP):
        offs_p, mask_p, hh, ww = pixel_tile(tile, HW, W, BLOCK_P)
        mask = mask_p[:, None] & mask_c[None, :]
        x = _load_pixels(x_ptr, n64, offs_c, hh, ww, mask, sx_n, sx_c, sx_h, sx_w).to(acc_t)
        r = _load_pixels(r_ptr, n64, offs_c, hh, ww, mask, sr_n, sr_c, sr_h, sr_w).to(acc_t)
        g = _load_pixels(g_ptr, n64, offs_c, hh, ww, mask, sg_n, sg_c, sg_h, sg_w).to(acc_t)
        xa = x + r
        u, t, wei = _bottleneck_recompute(xa, w1t, b1, w2t, shift, PRECISION)
        # masked pixels/channels have g = 0, hence dz = 0 and no contribution below
        dz = 2.0 * g * (x - r) * wei * (1.0 - wei)
        dxg, dw2, db1, dw1, dxa = _bottleneck_backward(dz, u, t, xa, w1, w2, PRECISION)
        acc_dxg += dxg
        acc_dw2 += dw2
        acc_db1 += db1
        acc_dw1 += dw1
        dx = 2.0 * g * wei + dxa
        dr = 2.0 * g * (1.0 - wei) + dxa
        tl.store(dx_ptr + n64 * sd_n + offs_c[None, :] * sd_c + hh[:, None] * sd_h
                 + ww[:, None] * sd_w, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dr_ptr + n64 * se_n + offs_c[None, :] * se_c + hh[:, None] * se_h
                 + ww[:, None] * se_w, dr.to(dr_ptr.dtype.element_ty), mask=mask)
    _add_bottleneck_grads(dxg_ptr, db1_ptr, dw1_ptr, dw2_ptr, n, C, CI, acc_dxg, acc_db1,
                          acc_dw1, acc_dw2, offs_c, mask_c, offs_i, mask_i)


def launch_aff_pair(x, residual, xg, w1, b1, w2, b2):
    n, c, h, w = x.shape
    ci = w1.shape[0]
    out = torch.empty_like(x)
    if launch_is_traced_away(x):
        return out
    block_c, block_i = _channel_blocks(c, ci)
    grid = lambda meta: (triton.cdiv(h * w, meta["BLOCK_P"]), n)  # noqa: E731
    wrap_triton(_aff_pair_kernel)[grid](
        x, residual, xg, w1, b1, w2, b2, out, c, ci, h, w, h * w,
        *x.stride(), *residual.stride(), *out.stride(),
        BLOCK_C=block_c, BLOCK_I=block_i, PRECISION=_precision(x))
    return out


def launch_aff_pair_backward(grad, x, residual, xg, w1, b1, w2, b2):
    n, c, h, w = x.shape
    ci = w1.shape[0]
    grad_x = torch.empty_like(x)
    grad_r = torch.empty_like(residual)
    grad_xg = torch.zeros_like(xg)
    grad_w1, grad_b1, grad_w2 = torch.zeros_like(w1), torch.zeros_like(b1), torch.zeros_like(w2)
    if launch_is_traced_away(x):
        return grad_x, grad_r, grad_xg, grad_w1, grad_b1, grad_w2, grad_xg.sum(0)
    block_c, block_i = _channel_blocks(c, ci)
    block_p = 16 if INTERPRET or block_c >= 256 else 32
    num_tiles = triton.cdiv(h * w, block_p)
    # enough programs to fill the GPU, few enough that the weight-gradient atomics stay rare
    tile_step = max(1, min(num_tiles, 1024 // n))
    wrap_triton(_aff_pair_backward_kernel)[(tile_step, n)](
        grad, x, residual, xg, w1, b1, w2, b2, grad_x, grad_r, grad_xg, grad_w1, grad_b1,
        grad_w2, c, ci, h, w, h * w, num_tiles, tile_step,
        *grad.stride(), *x.stride(), *residual.stride(), *grad_x.stride(), *grad_r.stride(),
        BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_I=block_i, PRECISION=_precision(x),
        num_warps=4)
    return grad_x, grad_r, grad_xg, grad_w1, grad_b1, grad_w2, grad_xg.sum(0)


@triton_op("saffnet_triton::aff_pair", mutates_args={})
def aff_pair(x: torch.Tensor, residual: torch.Tensor, xg: torch.Tensor, w1: torch.Tensor,
             b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Fused AFF(x, residual) pixel pass (BNs folded into w1, b1, w2, b2). x, residual:
    N×C×H×W of one dtype (float16/bfloat16/float32/float64), any layout; xg N×C, w1 CI×C,
    b1 CI, w2 C×CI, b2 C: contiguous, float32 (float64 for float64 x). Output: x's dtype
    and layout."""
    return launch_aff_pair(x, residual, xg, w1, b1, w2, b2)


@triton_op("saffnet_triton::aff_pair_backward", mutates_args={})
def aff_pair_backward(grad: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                      xg: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                      b2: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_aff_pair_backward(grad, x, residual, xg, w1, b1, w2, b2)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    return aff_pair_backward(grad, *ctx.saved_tensors)


torch.library.register_autograd("saffnet_triton::aff_pair", _backward, setup_context=_setup)


def unsupported_reason(module: nn.Module, x: torch.Tensor) -> Optional[str]:
    return common_unsupported_reason(module, x) or aff_structure_reason(module)


def triton_aff(module: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    _check_aff_inputs(x, residual, module.channels, same_dtype_device=True)
    acc = acc_dtype(x.dtype)
    pooled = x.mean(dim=(2, 3), dtype=acc) + residual.mean(dim=(2, 3), dtype=acc)
    xg = aff_global(module, pooled, acc, x.dtype)
    if module.training:
        # local_stats reads xa = x·(1 + a_h·a_w): zero factors make it x + residual
        xa = x + residual
        n, c, h, w = x.shape
        weights = aff_local_weights(module, xa, xa.new_zeros((n, c, h), dtype=acc),
                                    xa.new_zeros((n, c, w), dtype=acc), acc)
    else:
        weights = aff_local_weights(module, x, None, None, acc)
    return aff_pair(x, residual, xg, *weights)

"""Coordinate attention (``CoordAttention``) in Triton.

forward: pass 1 ``coord_pool`` (row and column means, one read of x); the vector-sized middle
(conv1 → BN → h_swish → conv_h / conv_w → sigmoid on N×C×(H+W)) runs as PyTorch ops on the
module's own layers, so BN behaves exactly as in the reference in both modes (batch
statistics and running-stat updates in training); pass 2 ``coord_apply`` writes
x·a_h·a_w (one read, one write).
backward: ``coord_apply_backward`` is one pass per plane giving dx, da_h and da_w together;
the pooling backward is one broadcast.
Modes: training and eval. Dtypes: float32, float16, bfloat16 (float32 arithmetic), float64.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import nn
from torch.library import triton_op, wrap_triton

from ._common import (acc_dtype, common_unsupported_reason, configs, is_1x1_conv,
                      launch_is_traced_away)
from .coord_pool import _blocks, coord_pool


@triton.jit
def _plane_and_column_weights(aw_ptr, C, W, BLOCK_W: tl.constexpr):
    """The (n, c) plane of this program (flat index, n and c as int64), its columns (offsets,
    mask) and a_w's values there."""
    plane = tl.program_id(0)
    offs_w = tl.arange(0, BLOCK_W)
    mask_w = offs_w < W
    aw = tl.load(aw_ptr + plane * W + offs_w, mask=mask_w, other=0.0)
    return plane, (plane // C).to(tl.int64), (plane % C).to(tl.int64), offs_w, mask_w, aw


@triton.jit
def _row_block(ah_ptr, plane, h0, H, mask_w, BLOCK_H: tl.constexpr):
    """Rows h0 … h0+BLOCK_H−1 of the plane: offsets, mask, the block's 2-D mask, a_h there."""
    offs_h = h0 + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    ah = tl.load(ah_ptr + plane * H + offs_h, mask=mask_h, other=0.0)
    return offs_h, mask_h, mask_h[:, None] & mask_w[None, :], ah


@triton.autotune(configs=configs([({}, 1), ({}, 2), ({}, 4), ({}, 8)], {}), key=["C", "HW"])
@triton.jit
def _coord_apply_kernel(x_ptr, ah_ptr, aw_ptr, out_ptr, C, H, W, HW,
                        sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w,
                        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    plane, n, c, offs_w, mask_w, aw = _plane_and_column_weights(aw_ptr, C, W, BLOCK_W)
    for h0 in range(0, H, BLOCK_H):
        offs_h, mask_h, mask, ah = _row_block(ah_ptr, plane, h0, H, mask_w, BLOCK_H)
        v = tl.load(x_ptr + n * sx_n + c * sx_c + offs_h[:, None] * sx_h + offs_w[None, :] * sx_w,
                    mask=mask, other=0.0).to(aw.dtype)
        out = v * aw[None, :] * ah[:, None]
        tl.store(out_ptr + n * so_n + c * so_c + offs_h[:, None] * so_h + offs_w[None, :] * so_w,
                 out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=configs([({}, 1), ({}, 2), ({}, 4), ({}, 8)], {}), key=["C", "HW"])
@triton.jit
def _coord_apply_backward_kernel(g_ptr, x_ptr, ah_ptr, aw_ptr, dx_ptr, dah_ptr, daw_ptr,
                                 C, H, W, HW,
                                 sg_n, sg_c, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w,
                                 sd_n, sd_c, sd_h, sd_w, PLUS_ONE: tl.constexpr,
                                 BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Gradients of x·a_h·a_w (PLUS_ONE false) or of x·(1 + a_h·a_w) (PLUS_ONE true, the
    weighted mean's backward with g the broadcast dL/dmean / HW) from dL/dout = g."""
    plane, n, c, offs_w, mask_w, aw = _plane_and_column_weights(aw_ptr, C, W, BLOCK_W)
    daw_acc = tl.zeros([BLOCK_W], dtype=aw.dtype)
    for h0 in range(0, H, BLOCK_H):
        offs_h, mask_h, mask, ah = _row_block(ah_ptr, plane, h0, H, mask_w, BLOCK_H)
        g = tl.load(g_ptr + n * sg_n + c * sg_c + offs_h[:, None] * sg_h + offs_w[None, :] * sg_w,
                    mask=mask, other=0.0).to(aw.dtype)
        v = tl.load(x_ptr + n * sx_n + c * sx_c + offs_h[:, None] * sx_h + offs_w[None, :] * sx_w,
                    mask=mask, other=0.0).to(aw.dtype)
        m = aw[None, :] * ah[:, None]
        if PLUS_ONE:
            m += 1.0
        tl.store(dx_ptr + n * sd_n + c * sd_c + offs_h[:, None] * sd_h + offs_w[None, :] * sd_w,
                 (g * m).to(dx_ptr.dtype.element_ty), mask=mask)
        gx = g * v
        tl.store(dah_ptr + plane * H + offs_h, tl.sum(gx * aw[None, :], axis=1), mask=mask_h)
        daw_acc += tl.sum(gx * ah[:, None], axis=0)
    tl.store(daw_ptr + plane * W + offs_w, daw_acc, mask=mask_w)


def launch_coord_apply(x, a_h, a_w, out=None):
    n, c, h, w = x.shape
    out = torch.empty_like(x) if out is None else out
    if launch_is_traced_away(x):
        return out
    block_h, block_w = _blocks(h, w)
    wrap_triton(_coord_apply_kernel)[(n * c,)](
        x, a_h, a_w, out, c, h, w, h * w, *x.stride(), *out.stride(),
        BLOCK_H=block_h, BLOCK_W=block_w)
    return out


def launch_coord_apply_backward(grad, x, a_h, a_w, grad_x=None, grad_ah=None, grad_aw=None,
                                plus_one: bool = False):
    n, c, h, w = x.shape
    grad_x = torch.empty_like(x) if grad_x is None else grad_x
    grad_ah = torch.empty_like(a_h) if grad_ah is None else grad_ah
    grad_aw = torch.empty_like(a_w) if grad_aw is None else grad_aw
    if launch_is_traced_away(x):
        return grad_x, grad_ah, grad_aw
    block_h, block_w = _blocks(h, w)
    wrap_triton(_coord_apply_backward_kernel)[(n * c,)](
        grad, x, a_h, a_w, grad_x, grad_ah, grad_aw, c, h, w, h * w,
        *grad.stride(), *x.stride(), *grad_x.stride(), PLUS_ONE=plus_one, BLOCK_H=block_h,
        BLOCK_W=block_w)
    return grad_x, grad_ah, grad_aw


@triton_op("saffnet_triton::coord_apply", mutates_args={})
def coord_apply(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """x · a_h[..., h, None] · a_w[..., None, w]; a_h N×C×H and a_w N×C×W contiguous in the
    accumulation dtype (float32, float64 for float64 x). Output: x's dtype and layout."""
    return launch_coord_apply(x, a_h, a_w)


@triton_op("saffnet_triton::coord_apply_backward", mutates_args={})
def coord_apply_backward(grad: torch.Tensor, x: torch.Tensor, a_h: torch.Tensor,
                         a_w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_coord_apply_backward(grad, x, a_h, a_w)


@triton_op("saffnet_triton::weighted_mean_backward", mutates_args={})
def weighted_mean_backward(grad: torch.Tensor, x: torch.Tensor, a_h: torch.Tensor,
                           a_w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/da_h, dL/da_w) of coord_pool.weighted_mean from dL/dmean (N×C) in one pass
    over x: the coord_apply backward with dL/dout = dL/dmean / HW (a stride-0 broadcast,
    never materialised) and the extra identity term of x·(1 + a_h·a_w)."""
    n, c, h, w = x.shape
    per_pixel = (grad / (h * w))[:, :, None, None].expand(n, c, h, w)
    return launch_coord_apply_backward(per_pixel, x, a_h, a_w, plus_one=True)


def _coord_apply_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _coord_apply_grad(ctx, grad):
    x, a_h, a_w = ctx.saved_tensors
    return coord_apply_backward(grad, x, a_h, a_w)


torch.library.register_autograd("saffnet_triton::coord_apply", _coord_apply_grad,
                                setup_context=_coord_apply_setup)


# --------------------------------------------------------------------------- module level


def ca_vectors(ca: nn.Module, rows: torch.Tensor, cols: torch.Tensor):
    """a_h (N×C×H), a_w (N×C×W) from the pooled rows/cols, through the module's own layers
    (so BN runs as in the reference, in training or eval)."""
    h = rows.shape[2]
    y = torch.cat([rows, cols], dim=2).unsqueeze(3)  # N×C×(H+W)×1, as the reference's cat
    y = ca.act(ca.bn1(ca.conv1(y)))
    y_h, y_w = torch.split(y, [h, y.shape[2] - h], dim=2)
    return ca.conv_h(y_h).sigmoid().squeeze(3), ca.conv_w(y_w).sigmoid().squeeze(3)


def ca_structure_reason(ca: nn.Module) -> Optional[str]:
    ok = all(is_1x1_conv(getattr(ca, name, None)) for name in ("conv1", "conv_h", "conv_w"))
    return None if ok else "the CoordAttention layers do not have the reference layout"


def unsupported_reason(module: nn.Module, x: torch.Tensor) -> Optional[str]:
    return common_unsupported_reason(module, x) or ca_structure_reason(module)


def triton_coordinate_attention(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    rows, cols = coord_pool(x)
    a_h, a_w = ca_vectors(module, rows, cols)
    acc = acc_dtype(x.dtype)
    return coord_apply(x, a_h.to(acc).contiguous(), a_w.to(acc).contiguous())

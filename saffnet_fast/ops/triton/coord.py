"""Triton kernels of the per-plane ops (:mod:`saffnet_fast.ops.coord`), registered as
``saffnet_fast_triton::coord_pool / coord_scale / weighted_mean / plane_mean`` with the
native schemas.

One program takes one (n, c) plane, reading it once with any strides (contiguous,
channels_last, sliced):
  * ``coord_pool(x)``: row means (over W, N×C×H) and column means (over H, N×C×W);
  * ``weighted_mean(x, a_h, a_w)``: mean over the plane of x·(1 + a_h·a_w), the global
    pool of xa = x + CA(x) in SCAFF;
  * ``plane_mean(x)``: mean over the plane, the pooling of SE+ in SAWF;
  * ``coord_scale(x, a_h, a_w)``: x·a_h·a_w (one read, one write); its backward gives dx,
    da_h and da_w in one pass per plane, and so does weighted_mean's.
Arithmetic in float32 (float64 for float64 input); outputs in x's dtype (coord_pool,
coord_scale) or float32/float64 (the means feeding the fused kernels). The factors a_h,
a_w may come in any dtype and layout: the ops make them contiguous in the arithmetic dtype.
The backward of coord_pool and plane_mean is one broadcast expression, left to PyTorch
(see coord_pool_backward for why).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import coord
from .._schema import TRITON, out_like, register_backward_op_autograd
from ._common import (acc_dtype, configs, grads_like, in_arithmetic_dtype, launch_is_traced_away,
                      next_pow2)

MODE_COORD, MODE_WEIGHTED, MODE_MEAN = 0, 1, 2


@triton.autotune(
    configs=configs([({}, 1), ({}, 2), ({}, 4), ({}, 8)], {}),
    key=["C", "HW"],
)
@triton.jit
def _plane_reduce_kernel(x_ptr, ah_ptr, aw_ptr, rows_ptr, cols_ptr, mean_ptr,
                         C, H, W, HW, s_n, s_c, s_h, s_w,
                         MODE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    plane = tl.program_id(0)  # n * C + c
    n = plane // C
    c = plane % C
    base = x_ptr + n.to(tl.int64) * s_n + c.to(tl.int64) * s_c
    offs_w = tl.arange(0, BLOCK_W)
    mask_w = offs_w < W
    col_acc = tl.zeros([BLOCK_W], dtype=mean_ptr.dtype.element_ty)
    if MODE == 1:
        aw = tl.load(aw_ptr + plane * W + offs_w, mask=mask_w, other=0.0)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        mask = mask_h[:, None] & mask_w[None, :]
        v = tl.load(base + offs_h[:, None] * s_h + offs_w[None, :] * s_w, mask=mask, other=0.0)
        v = v.to(mean_ptr.dtype.element_ty)
        if MODE == 0:
            row = tl.sum(v, axis=1) / W
            tl.store(rows_ptr + plane * H + offs_h, row.to(rows_ptr.dtype.element_ty),
                     mask=mask_h)
            col_acc += tl.sum(v, axis=0)
        elif MODE == 1:
            ah = tl.load(ah_ptr + plane * H + offs_h, mask=mask_h, other=0.0)
            col_acc += tl.sum(v * (1.0 + ah[:, None] * aw[None, :]), axis=0)
        else:
            col_acc += tl.sum(v, axis=0)
    if MODE == 0:
        tl.store(cols_ptr + plane * W + offs_w, (col_acc / H).to(cols_ptr.dtype.element_ty),
                 mask=mask_w)
    else:
        tl.store(mean_ptr + plane, tl.sum(col_acc, axis=0) / HW)


def _blocks(h: int, w: int) -> Tuple[int, int]:
    block_w = next_pow2(w)
    # a tile of ~4K elements: whole rows, as many as fit
    block_h = max(1, min(next_pow2(h), 4096 // block_w))
    return block_h, block_w


def launch_plane_reduce(x, mode, a_h=None, a_w=None, rows=None, cols=None, mean=None):
    """Run the reduction into the given (or new) outputs; tests pass NaN-poisoned ones."""
    n, c, h, w = x.shape
    acc = acc_dtype(x.dtype)
    if mode == MODE_COORD:
        rows = x.new_empty((n, c, h)) if rows is None else rows
        cols = x.new_empty((n, c, w)) if cols is None else cols
        mean_buf = x.new_empty((1,), dtype=acc)  # only its dtype is used
    else:
        mean = x.new_empty((n, c), dtype=acc) if mean is None else mean
        mean_buf = mean
    if launch_is_traced_away(x):
        return (rows, cols) if mode == MODE_COORD else mean
    block_h, block_w = _blocks(h, w)
    dummy = mean_buf
    wrap_triton(_plane_reduce_kernel)[(n * c,)](
        x, a_h if a_h is not None else dummy, a_w if a_w is not None else dummy,
        rows if rows is not None else dummy, cols if cols is not None else dummy, mean_buf,
        c, h, w, h * w, *x.stride(),
        MODE=mode, BLOCK_H=block_h, BLOCK_W=block_w)
    return (rows, cols) if mode == MODE_COORD else mean


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
def _coord_scale_kernel(x_ptr, ah_ptr, aw_ptr, out_ptr, C, H, W, HW,
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


# No 1-warp config: on a 64×64 tile it kept 128 elements of four tensors per thread and
# spilled 16–616 B (benchmarks/results/kernel-report-20261207.md, sm_90).
@triton.autotune(configs=configs([({}, 2), ({}, 4), ({}, 8)], {}), key=["C", "HW"])
@triton.jit
def _coord_scale_backward_kernel(g_ptr, x_ptr, ah_ptr, aw_ptr, dx_ptr, dah_ptr, daw_ptr,
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


def launch_coord_scale(x, a_h, a_w, out=None):
    n, c, h, w = x.shape
    out = out_like(x) if out is None else out
    if launch_is_traced_away(x):
        return out
    block_h, block_w = _blocks(h, w)
    wrap_triton(_coord_scale_kernel)[(n * c,)](
        x, a_h, a_w, out, c, h, w, h * w, *x.stride(), *out.stride(),
        BLOCK_H=block_h, BLOCK_W=block_w)
    return out


def launch_coord_scale_backward(grad, x, a_h, a_w, grad_x=None, grad_ah=None, grad_aw=None,
                                plus_one: bool = False):
    n, c, h, w = x.shape
    grad_x = torch.empty_like(x) if grad_x is None else grad_x
    grad_ah = torch.empty_like(a_h) if grad_ah is None else grad_ah
    grad_aw = torch.empty_like(a_w) if grad_aw is None else grad_aw
    if launch_is_traced_away(x):
        return grad_x, grad_ah, grad_aw
    block_h, block_w = _blocks(h, w)
    wrap_triton(_coord_scale_backward_kernel)[(n * c,)](
        grad, x, a_h, a_w, grad_x, grad_ah, grad_aw, c, h, w, h * w,
        *grad.stride(), *x.stride(), *grad_x.stride(), PLUS_ONE=plus_one, BLOCK_H=block_h,
        BLOCK_W=block_w)
    return grad_x, grad_ah, grad_aw


# --------------------------------------------------------------------------- the ops


@triton_op("saffnet_fast_triton::coord_pool", mutates_args={})
def coord_pool(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean over W: N×C×H, mean over H: N×C×W), in x's dtype."""
    return launch_plane_reduce(x, MODE_COORD)


@triton_op("saffnet_fast_triton::coord_pool_backward", mutates_args={})
def coord_pool_backward(grad_h: torch.Tensor, grad_w: torch.Tensor) -> torch.Tensor:
    """dL/dx = dL/drows / W broadcast along w + dL/dcols / H broadcast along h. No kernel on
    purpose: the divisions touch N×C×(H+W) values and the one broadcast add writes the
    N×C×H×W result once, which is all a Triton kernel would do too (torch.compile fuses it
    into one pointwise kernel anyway). What a kernel could still save is autograd's separate
    accumulation of this term into coord_scale's dL/dx, which needs the pooling and the
    scaling of CA in one autograd op (not done)."""
    h, w = grad_h.shape[2], grad_w.shape[2]
    return ((grad_h / w).unsqueeze(3) + (grad_w / h).unsqueeze(2)).contiguous()


@triton_op("saffnet_fast_triton::coord_scale", mutates_args={})
def coord_scale(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """x · a_h[..., h, None] · a_w[..., None, w]; a_h N×C×H, a_w N×C×W. Output: x's dtype,
    channels_last when x is, else contiguous."""
    return launch_coord_scale(x, *in_arithmetic_dtype(x, a_h, a_w))


@triton_op("saffnet_fast_triton::coord_scale_backward", mutates_args={})
def coord_scale_backward(grad_out: torch.Tensor, x: torch.Tensor, a_h: torch.Tensor,
                         a_w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = launch_coord_scale_backward(grad_out, x, *in_arithmetic_dtype(x, a_h, a_w))
    return grads_like(grads, x, a_h, a_w)


@triton_op("saffnet_fast_triton::weighted_mean", mutates_args={})
def weighted_mean(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """mean over H, W of x·(1 + a_h[..., h]·a_w[..., w]) → N×C (float32, float64 for
    float64). a_h: N×C×H, a_w: N×C×W."""
    a_h, a_w = in_arithmetic_dtype(x, a_h, a_w)
    return launch_plane_reduce(x, MODE_WEIGHTED, a_h=a_h, a_w=a_w)


@triton_op("saffnet_fast_triton::weighted_mean_backward", mutates_args={})
def weighted_mean_backward(grad: torch.Tensor, x: torch.Tensor, a_h: torch.Tensor,
                           a_w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/da_h, dL/da_w) of weighted_mean from dL/dmean (N×C) in one pass over x:
    coord_scale's backward with dL/dout = dL/dmean / HW (a stride-0 broadcast, never
    materialised) and the extra identity term of x·(1 + a_h·a_w)."""
    n, c, h, w = x.shape
    per_pixel = (grad.contiguous() / (h * w))[:, :, None, None].expand(n, c, h, w)
    grads = launch_coord_scale_backward(per_pixel, x, *in_arithmetic_dtype(x, a_h, a_w),
                                        plus_one=True)
    return grads_like(grads, x, a_h, a_w)


@triton_op("saffnet_fast_triton::plane_mean", mutates_args={})
def plane_mean(x: torch.Tensor) -> torch.Tensor:
    """mean over H, W → N×C (float32, float64 for float64)."""
    return launch_plane_reduce(x, MODE_MEAN)


coord.register_coord_pool_autograd(TRITON)
coord.register_plane_mean_autograd(TRITON)
register_backward_op_autograd(TRITON, "coord_scale")
register_backward_op_autograd(TRITON, "weighted_mean")

"""Per-plane reductions shared by the coordinate-attention, SCAFF and SAWF ops.

One program reduces one (n, c) plane, reading it once with any strides (contiguous,
channels_last, sliced):
  * ``coord_pool(x)``: row means (over W, N×C×H) and column means (over H, N×C×W), the
    pooling of coordinate attention;
  * ``weighted_mean(x, a_h, a_w)``: mean over the plane of x·(1 + a_h·a_w), the global
    pool of xa = x + CA(x) in SCAFF;
  * ``plane_mean(x)``: mean over the plane, the pooling of SE+ in SAWF.
Arithmetic in float32 (float64 for float64 input); outputs in x's dtype (coord_pool, as the
reference's means) or float32/float64 (the weighted/plain means feeding the fused kernels).
The backward of coord_pool and plane_mean is one broadcast expression, left to PyTorch (see
_coord_pool_backward for why); weighted_mean's is one fused pass over x
(coordinate_attention.weighted_mean_backward).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import acc_dtype, configs, launch_is_traced_away, next_pow2

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


# --------------------------------------------------------------------------- coord_pool


@triton_op("saffnet_triton::coord_pool", mutates_args={})
def coord_pool(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean over W: N×C×H, mean over H: N×C×W), in x's dtype."""
    return launch_plane_reduce(x, MODE_COORD)


def _coord_pool_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.shape = x.shape


def _coord_pool_backward(ctx, grad_rows, grad_cols):
    # dL/dx = dL/drows / W broadcast along w + dL/dcols / H broadcast along h. Left to
    # PyTorch on purpose: the divisions touch N×C×(H+W) values, ``expand`` copies nothing,
    # and the one add writes the N×C×H×W result once, which is all a Triton kernel would do
    # too (torch.compile fuses it into one pointwise kernel anyway). What a kernel could
    # still save is autograd's separate accumulation of this term into coord_apply's dL/dx,
    # which needs the pooling and the apply pass of CA in one autograd op (not done).
    n, c, h, w = ctx.shape
    grad = None
    if grad_rows is not None:
        grad = (grad_rows / w).unsqueeze(3).expand(n, c, h, w)
    if grad_cols is not None:
        g = (grad_cols / h).unsqueeze(2).expand(n, c, h, w)
        grad = g if grad is None else grad + g
    return grad.contiguous() if grad is not None else None


torch.library.register_autograd("saffnet_triton::coord_pool", _coord_pool_backward,
                                setup_context=_coord_pool_setup)


# --------------------------------------------------------------------------- weighted_mean


@triton_op("saffnet_triton::weighted_mean", mutates_args={})
def weighted_mean(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """mean over H, W of x·(1 + a_h[..., h]·a_w[..., w]) → N×C (float32, float64 for
    float64). a_h: N×C×H, a_w: N×C×W, contiguous, in that accumulation dtype."""
    return launch_plane_reduce(x, MODE_WEIGHTED, a_h=a_h, a_w=a_w)


def _weighted_mean_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _weighted_mean_backward(ctx, grad):
    # one fused pass (coordinate_attention.weighted_mean_backward); imported here because
    # coordinate_attention imports this module
    from .coordinate_attention import weighted_mean_backward

    return weighted_mean_backward(grad.contiguous(), *ctx.saved_tensors)


torch.library.register_autograd("saffnet_triton::weighted_mean", _weighted_mean_backward,
                                setup_context=_weighted_mean_setup)


# --------------------------------------------------------------------------- plane_mean


@triton_op("saffnet_triton::plane_mean", mutates_args={})
def plane_mean(x: torch.Tensor) -> torch.Tensor:
    """mean over H, W → N×C (float32, float64 for float64)."""
    return launch_plane_reduce(x, MODE_MEAN)


def _plane_mean_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.shape, ctx.dtype = x.shape, x.dtype


def _plane_mean_backward(ctx, grad):
    n, c, h, w = ctx.shape
    return (grad / (h * w)).to(ctx.dtype)[:, :, None, None].expand(n, c, h, w).contiguous()


torch.library.register_autograd("saffnet_triton::plane_mean", _plane_mean_backward,
                                setup_context=_plane_mean_setup)

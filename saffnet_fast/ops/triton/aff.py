"""Triton kernels of AFF's per-pixel ops (:mod:`saffnet_fast.ops.aff`), registered as
``saffnet_fast_triton::aff_fuse / aff_pair / aff_moments`` with the native schemas.

With m[n,c,h,w] = a_h[n,c,h]·a_w[n,c,w] (SCAFF: coordinate attention; SAWF: a_h = the SE+
gate broadcast over H, a_w = 1):
    aff_fuse:  att = x·m,  xa = x + att,  out = 2·att·wei + 2·x·(1 − wei)
    aff_pair:  xa = x + residual,         out = 2·x·wei + 2·residual·(1 − wei)
    xl  = W2·relu(W1·xa + b1) + b2        (local_att with both BNs folded in: C→C/r→C;
                                           running statistics in eval, batch statistics
                                           from ``aff_moments`` in training)
    wei = σ(xl + xg[n, c])                (xg: the global branch, computed on N×C vectors)
Each program takes a tile of BLOCK_P pixels × all C channels, runs the bottleneck as two
tl.dot's, and writes the output: x (and residual) read once, the output written once.

Backward (``aff_fuse_backward``, ``aff_pair_backward``): one pass that recomputes the tile's
forward and writes dx (and d residual); da_h, da_w go out through atomics (each pixel adds
to its row and column); the weight and xg gradients accumulate in registers over the tiles
a program loops over and are added once per program.

The ops take their vectors (a_h, a_w, global_logit, the weights) in any dtype and layout
and make them contiguous in the arithmetic dtype (float32, float64 for float64 x);
gradients come back in each input's dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..aff import register_aff_moments_autograd
from .._schema import TRITON, out_like, register_backward_op_autograd
from ._common import (INTERPRET, configs, grads_like, in_arithmetic_dtype, launch_is_traced_away,
                      merge_tile_moments, next_pow2, pixel_tile, tile_moments)


@triton.jit
def _bottleneck_ranges(C, CI, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """Offsets and masks of the C channels and the CI bottleneck channels."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_i = tl.arange(0, BLOCK_I)
    return offs_c, offs_c < C, offs_i, offs_i < CI


@triton.jit
def _load_pixels(ptr, n64, offs_c, hh, ww, mask, s_n, s_c, s_h, s_w):
    """Pixels × channels tile of image n of an N×C×H×W tensor read through its strides."""
    return tl.load(ptr + n64 * s_n + offs_c[None, :] * s_c + hh[:, None] * s_h
                   + ww[:, None] * s_w, mask=mask, other=0.0)


@triton.jit
def _load_coord_weights(ah_ptr, aw_ptr, plane, hh, ww, mask, H, W):
    """Coordinate attention's a_h (N×C×H) and a_w (N×C×W), contiguous, at the tile's pixels
    (``plane``: the flat n·C + c index of each column)."""
    ah = tl.load(ah_ptr + plane * H + hh[:, None], mask=mask, other=0.0)
    aw = tl.load(aw_ptr + plane * W + ww[:, None], mask=mask, other=0.0)
    return ah, aw


@triton.jit
def _load_both_ways(ptr, offs_r, mask_r, offs_k, mask_k, K):
    """A contiguous R×K matrix and its transpose (K×R), for the dots of both directions."""
    m = tl.load(ptr + offs_r[:, None] * K + offs_k[None, :],
                mask=mask_r[:, None] & mask_k[None, :], other=0.0)
    mt = tl.load(ptr + offs_r[None, :] * K + offs_k[:, None],
                 mask=mask_k[:, None] & mask_r[None, :], other=0.0)
    return m, mt


@triton.jit
def _local_weight(xa, n, w1_ptr, b1_ptr, w2_ptr, b2_ptr, xg_ptr, C, CI, offs_c, mask_c, offs_i,
                  mask_i, PRECISION: tl.constexpr):
    """wei = σ(W2·relu(W1·xa + b1) + b2 + xg[n]) for a pixels × C tile: AFF's weighting
    from the local bottleneck (two tl.dot's, BN folded) and the global logit. Shared by
    AFF(x·m, x) and AFF(x, residual). ``xa`` comes in the dots' operand dtype (x's own for
    float16 / bfloat16 inputs: tensor-core dots with float32 accumulation; else the
    arithmetic dtype); the weights and vectors are read in whatever float dtype they have."""
    # W1 is CI×C: load its transpose C×CI; W2 is C×CI: load its transpose CI×C
    w1t = tl.load(w1_ptr + offs_i[None, :] * C + offs_c[:, None],
                  mask=mask_c[:, None] & mask_i[None, :], other=0.0).to(xa.dtype)
    u = tl.dot(xa, w1t, input_precision=PRECISION)
    u = u + tl.load(b1_ptr + offs_i, mask=mask_i, other=0.0).to(u.dtype)[None, :]
    t = tl.maximum(u, 0.0).to(xa.dtype)
    w2t = tl.load(w2_ptr + offs_c[None, :] * CI + offs_i[:, None],
                  mask=mask_i[:, None] & mask_c[None, :], other=0.0).to(xa.dtype)
    z = tl.dot(t, w2t, input_precision=PRECISION)
    shift = tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0).to(z.dtype) \
        + tl.load(xg_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(z.dtype)
    z = z + shift[None, :]
    return 1.0 / (1.0 + tl.exp(-z))


# (BLOCK_P, warps) of the forward kernels. At C = 128 (Ci = 32, SAFFNet's widest AFF) every
# config of the first kernel report spilled: BLOCK_P 16 on 2 warps held both weight
# matrices, 128 registers a thread, beside the pixel tiles. With float32's tf32x3 dots
# (hi / lo operand splits) BLOCK_P 32 spilled too (344-2824 B on 4 or 8 warps, sm_90,
# 2026-12-07); BLOCK_P 16 on 4 warps held aff_pair at 253 registers without a spill, but
# aff_fuse (a_h and a_w read through six strides) spilled 16 B there, and held at 241
# registers on 8 warps. Smaller C only lightens them. Static lists rather than an
# early_config_prune hook, which user-defined kernels under torch.compile may not run.
_FUSE_TILES = [({"BLOCK_P": 16}, 8)]
_PAIR_TILES = [({"BLOCK_P": 16}, 4), ({"BLOCK_P": 16}, 8)]


@triton.jit
def _bottleneck_weights(w1_ptr, b1_ptr, w2_ptr, b2_ptr, xg_ptr, n, C, CI, offs_c, mask_c,
                        offs_i, mask_i):
    """The backward passes' weights: W1 and W2 both ways, b1, and b2 + xg[n]."""
    w1, w1t = _load_both_ways(w1_ptr, offs_i, mask_i, offs_c, mask_c, C)
    w2, w2t = _load_both_ways(w2_ptr, offs_c, mask_c, offs_i, mask_i, CI)
    b1 = tl.load(b1_ptr + offs_i, mask=mask_i, other=0.0)
    shift = tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0) \
        + tl.load(xg_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    return w1, w1t, w2, w2t, b1, shift


@triton.jit
def _bottleneck_recompute(xa, w1t, b1, w2t, shift, PRECISION: tl.constexpr):
    """(u, t = relu(u), wei) of a tile, the forward of _local_weight from loaded weights."""
    u = tl.dot(xa, w1t, input_precision=PRECISION) + b1[None, :]
    t = tl.maximum(u, 0.0)
    z = tl.dot(t, w2t, input_precision=PRECISION) + shift[None, :]
    return u, t, 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _bottleneck_backward(dz, u, t, xa, w1, w2, PRECISION: tl.constexpr):
    """From dz = dL/d(logit), the tile's contributions to the gradients of xg (Σ over
    pixels), W2, b1 and W1, and dL/dxa."""
    dxg = tl.sum(dz, axis=0)
    dw2 = tl.dot(tl.trans(dz), t, input_precision=PRECISION)
    dt = tl.dot(dz, w2, input_precision=PRECISION)
    du = tl.where(u > 0.0, dt, 0.0)
    db1 = tl.sum(du, axis=0)
    dw1 = tl.dot(tl.trans(du), xa, input_precision=PRECISION)
    dxa = tl.dot(du, w1, input_precision=PRECISION)
    return dxg, dw2, db1, dw1, dxa


@triton.jit
def _add_bottleneck_grads(dxg_ptr, db1_ptr, dw1_ptr, dw2_ptr, n, C, CI, acc_dxg, acc_db1,
                          acc_dw1, acc_dw2, offs_c, mask_c, offs_i, mask_i):
    """One program's accumulated weight and xg gradients, added once (atomics)."""
    tl.atomic_add(dxg_ptr + n * C + offs_c, acc_dxg, mask=mask_c)
    tl.atomic_add(db1_ptr + offs_i, acc_db1, mask=mask_i)
    tl.atomic_add(dw1_ptr + offs_i[:, None] * C + offs_c[None, :], acc_dw1,
                  mask=mask_i[:, None] & mask_c[None, :])
    tl.atomic_add(dw2_ptr + offs_c[:, None] * CI + offs_i[None, :], acc_dw2,
                  mask=mask_c[:, None] & mask_i[None, :])


@triton.jit
def _dot_operand(xa, x_ptr, HALF_DOTS: tl.constexpr):
    """The local bottleneck's input as the dots take it: in x's float16 / bfloat16 when
    HALF_DOTS, else as computed (float32 / float64)."""
    if HALF_DOTS:
        xa = xa.to(x_ptr.dtype.element_ty)
    return xa


@triton.autotune(configs=configs(_FUSE_TILES, {"BLOCK_P": 16}), key=["C", "CI", "HW"])
@triton.jit
def _aff_fuse_kernel(x_ptr, ah_ptr, aw_ptr, xg_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
                     C, CI, H, W, HW,
                     sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w,
                     sah_n, sah_c, sah_h, saw_n, saw_c, saw_w,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
                     PRECISION: tl.constexpr, HALF_DOTS: tl.constexpr, ACC_F64: tl.constexpr):
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    offs_p, mask_p, hh, ww = pixel_tile(pid_p, HW, W, BLOCK_P)
    offs_c, mask_c, offs_i, mask_i = _bottleneck_ranges(C, CI, BLOCK_C, BLOCK_I)
    mask = mask_p[:, None] & mask_c[None, :]
    n64 = n.to(tl.int64)

    x = _load_pixels(x_ptr, n64, offs_c, hh, ww, mask, sx_n, sx_c, sx_h, sx_w)
    x = x.to(tl.float64) if ACC_F64 else x.to(tl.float32)
    # a_h, a_w through their strides: SAWF's are the SE+ gate expanded over H (stride 0)
    # and a broadcast one, read in place instead of copied out first
    ah = tl.load(ah_ptr + n64 * sah_n + offs_c[None, :] * sah_c + hh[:, None] * sah_h,
                 mask=mask, other=0.0)
    aw = tl.load(aw_ptr + n64 * saw_n + offs_c[None, :] * saw_c + ww[:, None] * saw_w,
                 mask=mask, other=0.0)
    att = x * (ah.to(x.dtype) * aw.to(x.dtype))
    wei = _local_weight(_dot_operand(x + att, x_ptr, HALF_DOTS), n, w1_ptr, b1_ptr, w2_ptr,
                        b2_ptr, xg_ptr, C, CI, offs_c, mask_c, offs_i, mask_i, PRECISION)
    out = 2.0 * x + 2.0 * (att - x) * wei
    tl.store(out_ptr + n64 * so_n + offs_c[None, :] * so_c + hh[:, None] * so_h
             + ww[:, None] * so_w, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _aff_fuse_backward_kernel(g_ptr, x_ptr, ah_ptr, aw_ptr, xg_ptr, w1_ptr, b1_ptr, w2_ptr,
                              b2_ptr, dx_ptr, dah_ptr, daw_ptr, dxg_ptr, dw1_ptr, db1_ptr,
                              dw2_ptr,
                              C, CI, H, W, HW, NUM_TILES, TILE_STEP,
                              sg_n, sg_c, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w,
                              sd_n, sd_c, sd_h, sd_w,
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
        g = _load_pixels(g_ptr, n64, offs_c, hh, ww, mask, sg_n, sg_c, sg_h, sg_w).to(acc_t)
        plane = n * C + offs_c[None, :]
        ah, aw = _load_coord_weights(ah_ptr, aw_ptr, plane, hh, ww, mask, H, W)
        m = ah * aw
        att = x * m
        xa = x + att
        u, t, wei = _bottleneck_recompute(xa, w1t, b1, w2t, shift, PRECISION)
        # masked pixels/channels have g = 0, hence dz = 0 and no contribution below
        dz = 2.0 * g * (att - x) * wei * (1.0 - wei)
        dxg, dw2, db1, dw1, dxa = _bottleneck_backward(dz, u, t, xa, w1, w2, PRECISION)
        acc_dxg += dxg
        acc_dw2 += dw2
        acc_db1 += db1
        acc_dw1 += dw1
        datt = 2.0 * g * wei + dxa
        dx = 2.0 * g * (1.0 - wei) + dxa + datt * m
        tl.store(dx_ptr + n64 * sd_n + offs_c[None, :] * sd_c + hh[:, None] * sd_h
                 + ww[:, None] * sd_w, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        q = datt * x
        tl.atomic_add(dah_ptr + plane * H + hh[:, None], q * aw, mask=mask)
        tl.atomic_add(daw_ptr + plane * W + ww[:, None], q * ah, mask=mask)
    _add_bottleneck_grads(dxg_ptr, db1_ptr, dw1_ptr, dw2_ptr, n, C, CI, acc_dxg, acc_db1,
                          acc_dw1, acc_dw2, offs_c, mask_c, offs_i, mask_i)


def _precision(x: torch.Tensor) -> str:
    # The backward and statistics kernels: float32 in, float32 out: IEEE products (TF32 would
    # miss the 1e-5 parity); half inputs already carry ~1e-3 error, so TF32 is fine there.
    return "tf32" if x.dtype in (torch.float16, torch.bfloat16) and not INTERPRET else "ieee"


def _forward_dot_args(x: torch.Tensor) -> dict:
    """The forward kernels' dots: float16 / bfloat16 inputs multiply in their own dtype on
    tensor cores (wgmma .f16 / .bf16, float32 accumulation; xa rounded to x's dtype, which
    x itself already is); float32 on tensor cores as tf32x3 (three tf32 products, float32
    accuracy: the 1e-5 parity holds); float64 in IEEE; the interpreter IEEE throughout."""
    half = x.dtype in (torch.float16, torch.bfloat16)
    precision = "ieee" if INTERPRET or x.dtype == torch.float64 else (
        "tf32" if half else "tf32x3")
    return dict(PRECISION=precision, HALF_DOTS=half, ACC_F64=x.dtype == torch.float64)


def _channel_blocks(c: int, ci: int) -> Tuple[int, int]:
    return max(16, next_pow2(c)), max(16, next_pow2(ci))


def launch_aff_fuse(x, a_h, a_w, xg, w1, b1, w2, b2, out=None):
    n, c, h, w = x.shape
    ci = w1.shape[0]
    out = out_like(x) if out is None else out
    if launch_is_traced_away(x):
        return out
    block_c, block_i = _channel_blocks(c, ci)
    grid = lambda meta: (triton.cdiv(h * w, meta["BLOCK_P"]), n)  # noqa: E731
    wrap_triton(_aff_fuse_kernel)[grid](
        x, a_h, a_w, xg, w1, b1, w2, b2, out, c, ci, h, w, h * w,
        *x.stride(), *out.stride(), *a_h.stride(), *a_w.stride(),
        BLOCK_C=block_c, BLOCK_I=block_i, **_forward_dot_args(x))
    return out


def launch_aff_fuse_backward(grad, x, a_h, a_w, xg, w1, b1, w2, b2, grad_x=None):
    n, c, h, w = x.shape
    ci = w1.shape[0]
    grad_x = torch.empty_like(x) if grad_x is None else grad_x
    grad_ah = torch.zeros_like(a_h)
    grad_aw = torch.zeros_like(a_w)
    grad_xg = torch.zeros_like(xg)
    grad_w1 = torch.zeros_like(w1)
    grad_b1 = torch.zeros_like(b1)
    grad_w2 = torch.zeros_like(w2)
    if launch_is_traced_away(x):
        return grad_x, grad_ah, grad_aw, grad_xg, grad_w1, grad_b1, grad_w2, grad_xg.sum(0)
    block_c, block_i = _channel_blocks(c, ci)
    block_p = 16 if INTERPRET or block_c >= 256 else 32
    num_tiles = triton.cdiv(h * w, block_p)
    # enough programs to fill the GPU, few enough that the weight-gradient atomics stay rare
    tile_step = max(1, min(num_tiles, 1024 // n))
    wrap_triton(_aff_fuse_backward_kernel)[(tile_step, n)](
        grad, x, a_h, a_w, xg, w1, b1, w2, b2,
        grad_x, grad_ah, grad_aw, grad_xg, grad_w1, grad_b1, grad_w2,
        c, ci, h, w, h * w, num_tiles, tile_step,
        *grad.stride(), *x.stride(), *grad_x.stride(),
        BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_I=block_i, PRECISION=_precision(x),
        num_warps=4)
    grad_b2 = grad_xg.sum(0)
    return grad_x, grad_ah, grad_aw, grad_xg, grad_w1, grad_b1, grad_w2, grad_b2


@triton.autotune(configs=configs(_PAIR_TILES, {"BLOCK_P": 16}), key=["C", "CI", "HW"])
@triton.jit
def _aff_pair_kernel(x_ptr, r_ptr, xg_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
                     C, CI, H, W, HW,
                     sx_n, sx_c, sx_h, sx_w, sr_n, sr_c, sr_h, sr_w, so_n, so_c, so_h, so_w,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
                     PRECISION: tl.constexpr, HALF_DOTS: tl.constexpr, ACC_F64: tl.constexpr):
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    offs_p, mask_p, hh, ww = pixel_tile(pid_p, HW, W, BLOCK_P)
    offs_c, mask_c, offs_i, mask_i = _bottleneck_ranges(C, CI, BLOCK_C, BLOCK_I)
    mask = mask_p[:, None] & mask_c[None, :]
    n64 = n.to(tl.int64)

    x = _load_pixels(x_ptr, n64, offs_c, hh, ww, mask, sx_n, sx_c, sx_h, sx_w)
    x = x.to(tl.float64) if ACC_F64 else x.to(tl.float32)
    r = _load_pixels(r_ptr, n64, offs_c, hh, ww, mask, sr_n, sr_c, sr_h, sr_w).to(x.dtype)
    wei = _local_weight(_dot_operand(x + r, x_ptr, HALF_DOTS), n, w1_ptr, b1_ptr, w2_ptr,
                        b2_ptr, xg_ptr, C, CI, offs_c, mask_c, offs_i, mask_i, PRECISION)
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
    out = out_like(x)
    if launch_is_traced_away(x):
        return out
    block_c, block_i = _channel_blocks(c, ci)
    grid = lambda meta: (triton.cdiv(h * w, meta["BLOCK_P"]), n)  # noqa: E731
    wrap_triton(_aff_pair_kernel)[grid](
        x, residual, xg, w1, b1, w2, b2, out, c, ci, h, w, h * w,
        *x.stride(), *residual.stride(), *out.stride(),
        BLOCK_C=block_c, BLOCK_I=block_i, **_forward_dot_args(x))
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


# --------------------------------------------------------------------------- training mode
#
# In training, AFF's local branch normalises u = W1·xa + b1 and v = W2·relu(BN1(u)) + b2
# with batch statistics over N×H×W. ``aff_moments`` gives (mean, biased variance) of u
# (stage 1) or of v (stage 2, with BN1 already folded into W1, b1): one pass in which each
# tile writes its own mean and centred sum of squares (exact within the tile), merged
# afterwards (Chan et al.), which avoids the cancellation of E[y²] − E[y]². Its backward is
# one fused pass too, so autograd differentiates through the batch statistics exactly as it
# does through nn.BatchNorm2d.

STATS_BLOCK_P = 16 if INTERPRET else 32


@triton.jit
def _aff_moments_kernel(x_ptr, ah_ptr, aw_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, mean_ptr, m2_ptr,
                        C, CI, H, W, HW, TILES_PER_IMAGE,
                        sx_n, sx_c, sx_h, sx_w,
                        STAGE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_I: tl.constexpr, PRECISION: tl.constexpr):
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    n64 = n.to(tl.int64)
    acc_t = w1_ptr.dtype.element_ty
    offs_p, mask_p, hh, ww = pixel_tile(pid_p, HW, W, BLOCK_P)
    offs_c, mask_c, offs_i, mask_i = _bottleneck_ranges(C, CI, BLOCK_C, BLOCK_I)
    mask = mask_p[:, None] & mask_c[None, :]
    x = _load_pixels(x_ptr, n64, offs_c, hh, ww, mask, sx_n, sx_c, sx_h, sx_w).to(acc_t)
    plane = n * C + offs_c[None, :]
    ah, aw = _load_coord_weights(ah_ptr, aw_ptr, plane, hh, ww, mask, H, W)
    xa = x * (1.0 + ah * aw)
    w1t = tl.load(w1_ptr + offs_i[None, :] * C + offs_c[:, None],
                  mask=mask_c[:, None] & mask_i[None, :], other=0.0)
    b1 = tl.load(b1_ptr + offs_i, mask=mask_i, other=0.0)
    u = tl.dot(xa, w1t, input_precision=PRECISION) + b1[None, :]
    tile = n * TILES_PER_IMAGE + pid_p
    if STAGE == 1:
        tile_moments(u, mask_p, tile, mean_ptr, m2_ptr, offs_i, mask_i, CI)
    else:
        t = tl.maximum(u, 0.0)
        w2t = tl.load(w2_ptr + offs_c[None, :] * CI + offs_i[:, None],
                      mask=mask_i[:, None] & mask_c[None, :], other=0.0)
        b2 = tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0)
        v = tl.dot(t, w2t, input_precision=PRECISION) + b2[None, :]
        tile_moments(v, mask_p, tile, mean_ptr, m2_ptr, offs_c, mask_c, C)


@triton.jit
def _aff_moments_backward_kernel(gmean_ptr, gvar_ptr, mean_ptr, x_ptr, ah_ptr, aw_ptr,
                                 w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                                 dx_ptr, dah_ptr, daw_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
                                 C, CI, H, W, HW, COUNT, NUM_TILES, TILE_STEP,
                                 sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w,
                                 STAGE: tl.constexpr, BLOCK_P: tl.constexpr,
                                 BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
                                 PRECISION: tl.constexpr):
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    n64 = n.to(tl.int64)
    acc_t = w1_ptr.dtype.element_ty
    offs_c, mask_c, offs_i, mask_i = _bottleneck_ranges(C, CI, BLOCK_C, BLOCK_I)
    w1, w1t = _load_both_ways(w1_ptr, offs_i, mask_i, offs_c, mask_c, C)
    b1 = tl.load(b1_ptr + offs_i, mask=mask_i, other=0.0)
    if STAGE == 1:
        g_mean = tl.load(gmean_ptr + offs_i, mask=mask_i, other=0.0)
        g_var = tl.load(gvar_ptr + offs_i, mask=mask_i, other=0.0)
        mu = tl.load(mean_ptr + offs_i, mask=mask_i, other=0.0)
    else:
        g_mean = tl.load(gmean_ptr + offs_c, mask=mask_c, other=0.0)
        g_var = tl.load(gvar_ptr + offs_c, mask=mask_c, other=0.0)
        mu = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
        w2, w2t = _load_both_ways(w2_ptr, offs_c, mask_c, offs_i, mask_i, CI)
        b2 = tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0)
    acc_dw1 = tl.zeros([BLOCK_I, BLOCK_C], dtype=acc_t)
    acc_db1 = tl.zeros([BLOCK_I], dtype=acc_t)
    acc_dw2 = tl.zeros([BLOCK_C, BLOCK_I], dtype=acc_t)
    acc_db2 = tl.zeros([BLOCK_C], dtype=acc_t)
    for tile in range(pid_p, NUM_TILES, TILE_STEP):
        offs_p, mask_p, hh, ww = pixel_tile(tile, HW, W, BLOCK_P)
        mask = mask_p[:, None] & mask_c[None, :]
        x = _load_pixels(x_ptr, n64, offs_c, hh, ww, mask, sx_n, sx_c, sx_h, sx_w).to(acc_t)
        plane = n * C + offs_c[None, :]
        ah, aw = _load_coord_weights(ah_ptr, aw_ptr, plane, hh, ww, mask, H, W)
        m1 = 1.0 + ah * aw
        xa = x * m1
        u = tl.dot(xa, w1t, input_precision=PRECISION) + b1[None, :]
        if STAGE == 1:
            # d mean/du = 1/M, d var/du = 2(u − μ)/M
            du = (g_mean[None, :] + 2.0 * g_var[None, :] * (u - mu[None, :])) / COUNT
            du = tl.where(mask_p[:, None], du, 0.0)
        else:
            t = tl.maximum(u, 0.0)
            v = tl.dot(t, w2t, input_precision=PRECISION) + b2[None, :]
            dv = (g_mean[None, :] + 2.0 * g_var[None, :] * (v - mu[None, :])) / COUNT
            dv = tl.where(mask, dv, 0.0)
            acc_dw2 += tl.dot(tl.trans(dv), t, input_precision=PRECISION)
            acc_db2 += tl.sum(dv, axis=0)
            dt = tl.dot(dv, w2, input_precision=PRECISION)
            du = tl.where(u > 0.0, dt, 0.0)
        acc_dw1 += tl.dot(tl.trans(du), xa, input_precision=PRECISION)
        acc_db1 += tl.sum(du, axis=0)
        dxa = tl.dot(du, w1, input_precision=PRECISION)
        tl.store(dx_ptr + n64 * sd_n + offs_c[None, :] * sd_c + hh[:, None] * sd_h
                 + ww[:, None] * sd_w, (dxa * m1).to(dx_ptr.dtype.element_ty), mask=mask)
        q = dxa * x
        tl.atomic_add(dah_ptr + plane * H + hh[:, None], q * aw, mask=mask)
        tl.atomic_add(daw_ptr + plane * W + ww[:, None], q * ah, mask=mask)
    tl.atomic_add(dw1_ptr + offs_i[:, None] * C + offs_c[None, :], acc_dw1,
                  mask=mask_i[:, None] & mask_c[None, :])
    tl.atomic_add(db1_ptr + offs_i, acc_db1, mask=mask_i)
    if STAGE == 2:
        tl.atomic_add(dw2_ptr + offs_c[:, None] * CI + offs_i[None, :], acc_dw2,
                  mask=mask_c[:, None] & mask_i[None, :])
        tl.atomic_add(db2_ptr + offs_c, acc_db2, mask=mask_c)


def launch_aff_moments(x, a_h, a_w, w1, b1, w2, b2, stage: int):
    n, c, h, w = x.shape
    ci = w1.shape[0]
    channels = ci if stage == 1 else c
    tiles_per_image = triton.cdiv(h * w, STATS_BLOCK_P)
    tile_mean = x.new_empty((n * tiles_per_image, channels), dtype=w1.dtype)
    tile_m2 = torch.empty_like(tile_mean)
    if not launch_is_traced_away(x):
        block_c, block_i = _channel_blocks(c, ci)
        wrap_triton(_aff_moments_kernel)[(tiles_per_image, n)](
            x, a_h, a_w, w1, b1, w2, b2, tile_mean, tile_m2,
            c, ci, h, w, h * w, tiles_per_image, *x.stride(),
            STAGE=stage, BLOCK_P=STATS_BLOCK_P, BLOCK_C=block_c, BLOCK_I=block_i,
            PRECISION=_precision(x), num_warps=4)
    return merge_tile_moments(tile_mean, tile_m2, n, h * w, STATS_BLOCK_P)


def launch_aff_moments_backward(grad_mean, grad_var, mean, x, a_h, a_w, w1, b1, w2, b2,
                                stage: int):
    n, c, h, w = x.shape
    ci = w1.shape[0]
    grad_x = torch.empty_like(x)
    grad_ah, grad_aw = torch.zeros_like(a_h), torch.zeros_like(a_w)
    grad_w1, grad_b1 = torch.zeros_like(w1), torch.zeros_like(b1)
    grad_w2, grad_b2 = torch.zeros_like(w2), torch.zeros_like(b2)
    if not launch_is_traced_away(x):
        block_c, block_i = _channel_blocks(c, ci)
        num_tiles = triton.cdiv(h * w, STATS_BLOCK_P)
        tile_step = max(1, min(num_tiles, 1024 // n))
        wrap_triton(_aff_moments_backward_kernel)[(tile_step, n)](
            grad_mean.contiguous(), grad_var.contiguous(), mean.contiguous(), x, a_h, a_w,
            w1, b1, w2, b2, grad_x, grad_ah, grad_aw, grad_w1, grad_b1, grad_w2, grad_b2,
            c, ci, h, w, h * w, n * h * w, num_tiles, tile_step,
            *x.stride(), *grad_x.stride(),
            STAGE=stage, BLOCK_P=STATS_BLOCK_P, BLOCK_C=block_c, BLOCK_I=block_i,
            PRECISION=_precision(x), num_warps=4)
    return grad_x, grad_ah, grad_aw, grad_w1, grad_b1, grad_w2, grad_b2


# --------------------------------------------------------------------------- the ops


@triton_op("saffnet_fast_triton::aff_fuse", mutates_args={})
def aff_fuse(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor, global_logit: torch.Tensor,
             w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
             b2: torch.Tensor) -> torch.Tensor:
    """AFF(x·a_h·a_w, x) per pixel (BNs folded into w1, b1, w2, b2). x: N×C×H×W, any layout
    (float16/bfloat16/float32/float64); a_h N×C×H, a_w N×C×W, global_logit N×C, w1 CI×C,
    b1 CI, w2 C×CI, b2 C. Output: x's dtype."""
    # the kernel converts the vectors and weights as it loads them and reads a_h / a_w
    # through their strides: no cast or copy launches
    return launch_aff_fuse(x, a_h, a_w, *(t.contiguous() for t in (global_logit, w1, b1, w2,
                                                                   b2)))


@triton_op("saffnet_fast_triton::aff_fuse_backward", mutates_args={})
def aff_fuse_backward(grad_out: torch.Tensor, x: torch.Tensor, a_h: torch.Tensor,
                      a_w: torch.Tensor, global_logit: torch.Tensor, w1: torch.Tensor,
                      b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs = (x, a_h, a_w, global_logit, w1, b1, w2, b2)
    grads = launch_aff_fuse_backward(grad_out, x, *in_arithmetic_dtype(x, *inputs[1:]))
    return grads_like(grads, *inputs)


@triton_op("saffnet_fast_triton::aff_pair", mutates_args={})
def aff_pair(x: torch.Tensor, residual: torch.Tensor, global_logit: torch.Tensor,
             w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
             b2: torch.Tensor) -> torch.Tensor:
    """AFF(x, residual) per pixel (BNs folded into w1, b1, w2, b2). x, residual: N×C×H×W of
    one dtype, any layouts; global_logit N×C, w1 CI×C, b1 CI, w2 C×CI, b2 C. Output: x's
    dtype."""
    # the kernel converts the vectors and weights as it loads them: no cast launches
    return launch_aff_pair(x, residual, *(t.contiguous() for t in (global_logit, w1, b1, w2,
                                                                   b2)))


@triton_op("saffnet_fast_triton::aff_pair_backward", mutates_args={})
def aff_pair_backward(grad_out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                      global_logit: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                      w2: torch.Tensor, b2: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs = (x, residual, global_logit, w1, b1, w2, b2)
    grads = launch_aff_pair_backward(grad_out, x, residual, *in_arithmetic_dtype(x, *inputs[2:]))
    return grads_like(grads, *inputs)


@triton_op("saffnet_fast_triton::aff_moments", mutates_args={})
def aff_moments(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor, w1: torch.Tensor,
                b1: torch.Tensor, w2: Optional[torch.Tensor],
                b2: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch (mean, biased variance) over N×H×W of u = W1·xa + b1 (stage 1: w2, b2 None; CI
    channels) or of v = W2·relu(u) + b2 (stage 2, C channels), xa = x·(1 + a_h·a_w); in the
    arithmetic dtype."""
    stage = 1 if w2 is None else 2
    a_h, a_w, w1, b1 = in_arithmetic_dtype(x, a_h, a_w, w1, b1)
    # stage 1 reads no w2 / b2: w1 / b1 stand in for the pointers
    w2, b2 = (w1, b1) if stage == 1 else in_arithmetic_dtype(x, w2, b2)
    return launch_aff_moments(x, a_h, a_w, w1, b1, w2, b2, stage)


@triton_op("saffnet_fast_triton::aff_moments_backward", mutates_args={})
def aff_moments_backward(grad_mean: torch.Tensor, grad_var: torch.Tensor, x: torch.Tensor,
                         a_h: torch.Tensor, a_w: torch.Tensor, w1: torch.Tensor,
                         b1: torch.Tensor, w2: Optional[torch.Tensor],
                         b2: Optional[torch.Tensor], mean: torch.Tensor
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of aff_moments for (x, a_h, a_w, w1, b1, w2, b2); those of w2 and b2 are
    empty in stage 1."""
    stage = 1 if w2 is None else 2
    inputs = (x, a_h, a_w, w1, b1)
    vectors = in_arithmetic_dtype(x, a_h, a_w, w1, b1)
    # stage 1 reads no w2 / b2: w1 / b1 stand in for the pointers
    second = vectors[2:] if stage == 1 else in_arithmetic_dtype(x, w2, b2)
    grads = launch_aff_moments_backward(grad_mean, grad_var, mean, x, *vectors, *second, stage)
    if stage == 1:
        return (*grads_like(grads[:5], *inputs), x.new_empty((0,)), x.new_empty((0,)))
    return grads_like(grads, *inputs, w2, b2)


for _op in ("aff_fuse", "aff_pair"):
    register_backward_op_autograd(TRITON, _op)
register_aff_moments_autograd(TRITON)

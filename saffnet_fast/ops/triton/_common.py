"""Helpers shared by the Triton kernels: dtype rules, autotune configs, the pieces of the
SR step kernels, per-tile batch statistics."""
from __future__ import annotations

import os
from typing import Tuple

import torch
import triton
import triton.language as tl


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fix_interpreter_scalar_index() -> None:
    """triton <= 3.6's interpreter turns a scalar into a Python int with int(array of shape
    (1,)), which numpy >= 2.4 rejects, so any loop with a runtime bound fails under
    TRITON_INTERPRET=1 (triton-lang/triton#9171, fixed upstream by #9172). Apply the same
    one-line fix to the interpreter when it is in use and still has the bug."""
    import numpy as np
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_saffnet_scalar_index_fix", False):
        return
    try:
        int(np.zeros(1))
        return  # this numpy still converts size-1 arrays: nothing to fix
    except TypeError:
        pass

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._saffnet_scalar_index_fix = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _fix_interpreter_scalar_index()

# Storage dtypes the kernels read and write; arithmetic runs in float32 (float64 for
# float64 inputs, so the interpreter can check the math tightly).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def launch_is_traced_away(*tensors: torch.Tensor) -> bool:
    """True when a launch must be skipped: fake/meta tensors under the interpreter.

    torch.library's wrap_triton hands interpreter kernels back unwrapped, so a fake-tensor
    trace (triton_op's fake kernel, opcheck) would run them on fake data. Compiled kernels
    are wrapped and traced by torch itself; this never skips those."""
    if not INTERPRET:
        return False
    from torch._subclasses.fake_tensor import is_fake

    if not any(t.device.type == "meta" or is_fake(t) for t in tensors):
        return False
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if get_proxy_mode() is not None:
        # a graph traced here would hold no kernels and return uninitialised memory
        raise RuntimeError("torch.compile cannot trace Triton kernels run by the interpreter "
                           "(TRITON_INTERPRET=1): compile on a CUDA device, or run eagerly")
    return True


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def in_arithmetic_dtype(x: torch.Tensor, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """``tensors`` as the kernels read them: contiguous, in x's arithmetic dtype (the ops take
    their factors, vectors and weights in any dtype and layout)."""
    acc = acc_dtype(x.dtype)
    return tuple(t.to(acc).contiguous() for t in tensors)


def grads_like(grads, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Gradients in their inputs' dtypes (the kernels accumulate in float32 / float64)."""
    return tuple(g.to(t.dtype) for g, t in zip(grads, inputs))


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def configs(options, interpret_choice):
    """Autotune configs; under the interpreter only one (autotuning times CUDA events)."""
    if INTERPRET:
        return [triton.Config(interpret_choice, num_warps=1)]
    return [triton.Config(kw, num_warps=warps) for kw, warps in options]


def channel_block(c: int) -> int:
    """Block size of a channel axis: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_pow2(c))


# ----------------------------------------------------------------- split-resplice pieces
# Shared by the inference kernel and the training kernels (split_resplice.py): both run
# step j of SR as a 3×3 convolution whose input channels are x's slice S(j+1) followed by
# the previous step's carry, and both write the first KEEP channels of the step's result
# into the output's slice and the rest into the next carry.


@triton.jit
def pixel_tile(pid_p, HW, W, BLOCK_P: tl.constexpr):
    """The BLOCK_P flat pixel indices of tile pid_p of an H×W plane, their mask, row, column."""
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    return offs_p, offs_p < HW, offs_p // W, offs_p % W


@triton.jit
def step_tile(HW, W, COUT, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):
    """Where a program of a (pixel tiles, N) grid over one SR step works: image n (int64), the
    flat index of its tile among all N·TILES, its pixels (flat index, mask, row, column) and
    the step's output channels (offsets, mask)."""
    pid_p = tl.program_id(0)
    n = tl.program_id(1)
    offs_p, mask_p, hh, ww = pixel_tile(pid_p, HW, W, BLOCK_P)
    offs_o = tl.arange(0, BLOCK_O)
    return (n.to(tl.int64), n * tl.num_programs(0) + pid_p, offs_p, mask_p, hh, ww, offs_o,
            offs_o < COUT)


@triton.jit
def conv_channel_ranges(COUT, CX, CC_IN, BLOCK_O: tl.constexpr, BLOCK_X: tl.constexpr,
                        BLOCK_CC: tl.constexpr):
    """Offsets and masks of a step's output channels, its input channels from x's slice, and
    its input channels from the carry."""
    offs_o = tl.arange(0, BLOCK_O)
    offs_x = tl.arange(0, BLOCK_X)
    offs_cc = tl.arange(0, BLOCK_CC)
    return offs_o, offs_o < COUT, offs_x, offs_x < CX, offs_cc, offs_cc < CC_IN


@triton.jit
def load_conv_inputs(x_ptr, carry_ptr, n64, h2, w2, valid, offs_x, mask_x, offs_cc, mask_cc,
                     HW, W, X_C0, CC_IN, sx_n, sx_c, sx_h, sx_w, HAS_CARRY: tl.constexpr):
    """A step's input at pixels (h2, w2) (zero where not ``valid``): x's slice, read through
    its strides and cast to the accumulation dtype, and the contiguous carry (already in
    it). Without a carry the second tile is x's again, unused."""
    a = tl.load(x_ptr + n64 * sx_n + (X_C0 + offs_x[None, :]) * sx_c + h2[:, None] * sx_h
                + w2[:, None] * sx_w, mask=valid[:, None] & mask_x[None, :],
                other=0.0).to(carry_ptr.dtype.element_ty)
    c = a
    if HAS_CARRY:
        c = tl.load(carry_ptr + (n64 * CC_IN + offs_cc[None, :]) * HW + h2[:, None] * W
                    + w2[:, None], mask=valid[:, None] & mask_cc[None, :], other=0.0)
    return a, c


@triton.jit
def conv3x3_tile(x_ptr, carry_ptr, w_ptr, n64, hh, ww, mask_p,
                 H, W, HW, X_C0, CX, CC_IN, CIN, COUT, sx_n, sx_c, sx_h, sx_w,
                 HAS_CARRY: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_X: tl.constexpr,
                 BLOCK_CC: tl.constexpr, BLOCK_O: tl.constexpr, PRECISION: tl.constexpr):
    """BLOCK_P×BLOCK_O tile of conv3×3(cat(x[n, X_C0:X_C0+CX], carry[n])) (padding 1, no bias)
    as an implicit GEMM: 9 shifted taps, each a tl.dot over the input channels. x is read
    through its strides; the carry is contiguous N×CC_IN×H×W in the accumulation dtype, as
    are the weights (Cout×Cin×3×3 contiguous)."""
    acc_t = w_ptr.dtype.element_ty
    offs_o, mask_o, offs_x, mask_x, offs_cc, mask_cc = conv_channel_ranges(
        COUT, CX, CC_IN, BLOCK_O, BLOCK_X, BLOCK_CC)
    acc = tl.zeros([BLOCK_P, BLOCK_O], dtype=acc_t)
    for ky in tl.static_range(3):
        for kx in tl.static_range(3):
            h2 = hh + (ky - 1)
            w2 = ww + (kx - 1)
            valid = mask_p & (h2 >= 0) & (h2 < H) & (w2 >= 0) & (w2 < W)
            a, c = load_conv_inputs(x_ptr, carry_ptr, n64, h2, w2, valid, offs_x, mask_x,
                                    offs_cc, mask_cc, HW, W, X_C0, CC_IN, sx_n, sx_c, sx_h,
                                    sx_w, HAS_CARRY)
            wt = tl.load(w_ptr + offs_o[None, :] * (CIN * 9) + offs_x[:, None] * 9 + (ky * 3 + kx),
                         mask=mask_x[:, None] & mask_o[None, :], other=0.0)
            acc += tl.dot(a, wt, input_precision=PRECISION)
            if HAS_CARRY:
                wc = tl.load(w_ptr + offs_o[None, :] * (CIN * 9) + (CX + offs_cc[:, None]) * 9
                             + (ky * 3 + kx), mask=mask_cc[:, None] & mask_o[None, :], other=0.0)
                acc += tl.dot(c, wc, input_precision=PRECISION)
    return acc


@triton.jit
def store_output_and_carry(y, out_ptr, carry_ptr, n64, offs_p, hh, ww, mask_p, offs_o, mask_o,
                           HW, COUT, KEEP, OUT_C0, so_n, so_c, so_h, so_w):
    """Channels o < KEEP of a step's result go to out[n, OUT_C0 + o] (through the output's
    strides, in its dtype), the others to the contiguous carry of the next step."""
    to_out = mask_p[:, None] & (mask_o & (offs_o < KEEP))[None, :]
    tl.store(out_ptr + n64 * so_n + (OUT_C0 + offs_o[None, :]) * so_c + hh[:, None] * so_h
             + ww[:, None] * so_w, y.to(out_ptr.dtype.element_ty), mask=to_out)
    to_carry = mask_p[:, None] & (mask_o & (offs_o >= KEEP))[None, :]
    tl.store(carry_ptr + (n64 * (COUT - KEEP) + (offs_o[None, :] - KEEP)) * HW
             + offs_p[:, None], y, mask=to_carry)


# ----------------------------------------------------------------- batch statistics by tiles
# Training-mode BN needs the mean and variance of an intermediate over N×H×W. The producing
# kernel's epilogue writes, per tile of pixels, the tile's mean and centred sum of squares
# (exact within the tile); merging them (Chan et al.) avoids the cancellation of E[y²] − E[y]².


@triton.jit
def tile_moments(y, valid, tile, mean_ptr, m2_ptr, offs_y, mask_y, CY):
    """Mean and centred sum of squares over the valid rows of the tile y (rows: pixels,
    columns: CY channels), stored in row ``tile`` of the N·TILES×CY buffers."""
    count = tl.sum(valid.to(y.dtype), axis=0)
    yv = tl.where(valid[:, None], y, 0.0)
    tile_mean = tl.sum(yv, axis=0) / count
    dev = tl.where(valid[:, None], y - tile_mean[None, :], 0.0)
    tl.store(mean_ptr + tile * CY + offs_y, tile_mean, mask=mask_y)
    tl.store(m2_ptr + tile * CY + offs_y, tl.sum(dev * dev, axis=0), mask=mask_y)


@triton.jit
def _tile_rows(tile_mean_ptr, r0, ROWS, TILES, HW, C, offs_c, mask_c,
               TILE_PIXELS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows r0 … r0+BLOCK_R−1 of the per-tile means: row indices, 2-D mask, each row's pixel
    count (row r is tile r % TILES of its image: TILE_PIXELS pixels but for the last one)
    and the means."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask = (offs_r < ROWS)[:, None] & mask_c[None, :]
    count = tl.minimum(HW - (offs_r % TILES) * TILE_PIXELS, TILE_PIXELS)
    m = tl.load(tile_mean_ptr + offs_r[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
    return offs_r, mask, count.to(m.dtype), m


@triton.jit
def _merge_moments_kernel(tile_mean_ptr, tile_m2_ptr, mean_ptr, var_ptr,
                          ROWS, TILES, HW, C, TOTAL,
                          TILE_PIXELS: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc_t = mean_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_C], dtype=acc_t)
    for r0 in range(0, ROWS, BLOCK_R):
        offs_r, mask, count, m = _tile_rows(tile_mean_ptr, r0, ROWS, TILES, HW, C, offs_c,
                                            mask_c, TILE_PIXELS, BLOCK_R)
        total += tl.sum(count[:, None] * m, axis=0)
    # an integer count, divided in the accumulation dtype: a Python float argument is
    # passed as float32, which put a 3e-8 error into float64 means (seen on H100)
    mean = total / TOTAL
    m2 = tl.zeros([BLOCK_C], dtype=acc_t)
    for r0 in range(0, ROWS, BLOCK_R):
        offs_r, mask, count, m = _tile_rows(tile_mean_ptr, r0, ROWS, TILES, HW, C, offs_c,
                                            mask_c, TILE_PIXELS, BLOCK_R)
        d = tl.where(mask, m - mean[None, :], 0.0)
        m2 += tl.sum(tl.load(tile_m2_ptr + offs_r[:, None] * C + offs_c[None, :], mask=mask,
                             other=0.0) + count[:, None] * d * d, axis=0)
    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(var_ptr + offs_c, m2 / TOTAL, mask=mask_c)


def merge_tile_moments(tile_mean: torch.Tensor, tile_m2: torch.Tensor, n: int, hw: int,
                       block_p: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) over N×H×W from tile_moments' N·TILES×C rows (each image's
    tiles hold block_p pixels but for its last one), in one launch: these ops are
    launch-bound, and the merge as PyTorch vector ops was about ten launches per BN."""
    from torch.library import wrap_triton

    rows, c = tile_mean.shape
    mean = tile_mean.new_empty((c,))
    var = tile_mean.new_empty((c,))
    if not launch_is_traced_away(tile_mean):
        block_c = min(channel_block(c), 64)
        wrap_triton(_merge_moments_kernel)[(triton.cdiv(c, block_c),)](
            tile_mean, tile_m2, mean, var, rows, triton.cdiv(hw, block_p), hw, c,
            n * hw, TILE_PIXELS=block_p, BLOCK_R=16 if INTERPRET else 64,
            BLOCK_C=block_c, num_warps=4)
    return mean, var

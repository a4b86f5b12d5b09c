"""Helpers shared by the Triton ops: dtype rules, autotune configs, BN folding."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import nn

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

    return any(t.device.type == "meta" or is_fake(t) for t in tensors)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def configs(options, interpret_choice):
    """Autotune configs; under the interpreter only one (autotuning times CUDA events)."""
    if INTERPRET:
        return [triton.Config(interpret_choice, num_warps=1)]
    return [triton.Config(kw, num_warps=warps) for kw, warps in options]


def common_unsupported_reason(module: nn.Module, x: torch.Tensor) -> Optional[str]:
    """Reasons shared by every op: device, dtype, parameter dtype/device match."""
    if x.device.type != "cuda" and not INTERPRET:
        return "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import)"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not supported (expected one of {SUPPORTED_DTYPES})"
    for name, p in module.named_parameters():
        if p.dtype != x.dtype or p.device != x.device:
            return (f"parameter {name} is {p.dtype} on {p.device} but the input is "
                    f"{x.dtype} on {x.device}")
    if x.numel() >= 2 ** 31:
        return "inputs of 2**31 elements or more are not supported (32-bit indexing)"
    return None


def conv_bn_affine(conv: nn.Conv2d, bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of the eval-mode composition bn(conv(x)) for a 1×1 conv, W of shape out×in.
    Differentiable: gradients reach conv.weight/bias and bn.weight/bias."""
    weight = conv.weight.reshape(conv.out_channels, conv.in_channels)
    bias = conv.bias if conv.bias is not None else weight.new_zeros(conv.out_channels)
    if isinstance(bn, nn.Identity):  # folded by optimize_for_inference
        return weight, bias
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return weight * scale[:, None], bias * scale + shift


def is_1x1_conv(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1)
            and m.padding == (0, 0) and m.dilation == (1, 1) and m.groups == 1)


def is_bn_or_identity(m: nn.Module) -> bool:
    # exactly BatchNorm2d: SyncBatchNorm's training statistics span processes
    return isinstance(m, nn.Identity) or type(m) is nn.BatchNorm2d


def aff_structure_reason(aff: nn.Module) -> Optional[str]:
    """The fused AFF kernels assume the reference AFF layout (possibly BN-folded)."""
    local, glob = aff.local_att, aff.global_att
    ok = (len(local) == 5 and is_1x1_conv(local[0]) and is_bn_or_identity(local[1])
          and isinstance(local[2], nn.ReLU) and is_1x1_conv(local[3]) and is_bn_or_identity(local[4])
          and len(glob) == 6 and isinstance(glob[0], nn.AdaptiveAvgPool2d))
    return None if ok else "the AFF submodules do not have the reference layout"


def channel_block(c: int) -> int:
    """Block size of a channel axis: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_pow2(c))


# ----------------------------------------------------------------- split-resplice pieces
# Shared by the inference kernel (split_resplice.py) and the training kernels
# (split_resplice_train.py): both run step j of SR as a 3×3 convolution whose input channels
# are x's slice S(j+1) followed by the previous step's carry, and both write the first KEEP
# channels of the step's result into the output's slice and the rest into the next carry.


def split_resplice_layout(weights, width: int):
    """Per FC step j: (cout, cin, cc_in, keep, out_c0): its output/input channels, how many
    input channels come from the previous step's carry, how many of its outputs go to the
    output (all for the last step, ceil(cout/2) otherwise) and where they start there."""
    layout, out_c0 = [], width
    last = len(weights) - 1
    for j, weight in enumerate(weights):
        cout, cin = int(weight.shape[0]), int(weight.shape[1])
        keep = cout if j == last else -(-cout // 2)
        layout.append((cout, cin, cin - width, keep, out_c0))
        out_c0 += keep
    return layout


@triton.jit
def pixel_tile(pid_p, HW, W, BLOCK_P: tl.constexpr):
    """The BLOCK_P flat pixel indices of tile pid_p of an H×W plane, their mask, row, column."""
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    return offs_p, offs_p < HW, offs_p // W, offs_p % W


@triton.jit
def conv3x3_tile(x_ptr, carry_ptr, w_ptr, n64, hh, ww, mask_p,
                 H, W, HW, X_C0, CX, CC_IN, CIN, COUT, sx_n, sx_c, sx_h, sx_w,
                 HAS_CARRY: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_X: tl.constexpr,
                 BLOCK_CC: tl.constexpr, BLOCK_O: tl.constexpr, PRECISION: tl.constexpr):
    """BLOCK_P×BLOCK_O tile of conv3×3(cat(x[n, X_C0:X_C0+CX], carry[n])) (padding 1, no bias)
    as an implicit GEMM: 9 shifted taps, each a tl.dot over the input channels. x is read
    through its strides; the carry is contiguous N×CC_IN×H×W in the accumulation dtype (the
    weights' dtype, Cout×Cin×3×3 contiguous)."""
    acc_t = w_ptr.dtype.element_ty
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
            acc += tl.dot(a, wt, input_precision=PRECISION)
            if HAS_CARRY:
                c = tl.load(carry_ptr + (n64 * CC_IN + offs_cc[None, :]) * HW + h2[:, None] * W
                            + w2[:, None], mask=valid[:, None] & mask_cc[None, :], other=0.0)
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


def merge_tile_moments(tile_mean: torch.Tensor, tile_m2: torch.Tensor, n: int, hw: int,
                       block_p: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) over N×H×W from tile_moments' per-tile rows (each image's
    tiles hold block_p pixels but for its last one). A few vector operations over
    N·TILES×C values: left to PyTorch, a kernel would save one launch at most."""
    tiles = triton.cdiv(hw, block_p)
    starts = torch.arange(tiles, device=tile_mean.device) * block_p
    counts = (hw - starts).clamp(max=block_p).to(tile_mean.dtype).repeat(n)[:, None]
    total = n * hw
    mean = (tile_mean * counts).sum(0) / total
    m2 = tile_m2.sum(0) + (counts * (tile_mean - mean) ** 2).sum(0)
    return mean, m2 / total

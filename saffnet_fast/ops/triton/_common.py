"""Helpers shared by the Triton ops: dtype rules, autotune configs, BN folding."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
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

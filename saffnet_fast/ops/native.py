"""Python side of the native ops: fake kernels, autograd, and the entry points.

The C++ side (``csrc/``) defines the schemas and the CPU / CUDA kernels of every op in the
``saffnet_fast`` namespace. Here, only when the extension loaded, each op gets
  * a fake kernel (``torch.library.register_fake``) so ``torch.compile`` and FakeTensor
    tracing see its output shapes without running it, and
  * an autograd formula (``torch.library.register_autograd``) whose backward is itself a
    native op (fused kernel), except split_resplice, whose backward is ATen convolution
    gradients (no fused backward kernel yet).

The entry points ``native_*`` take a reference module (``saffnet_fast.nn.reference``) and
its input and compute the module's output with the native kernels. Parameters enter the
ops as inputs (BN folded with differentiable ATen arithmetic in eval mode), so autograd
reaches the module's parameters exactly as it does through the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._native import has_native, require_native
from ..nn.reference import _check_input

__all__ = [
    "NATIVE_OPS",
    "native_coord_pool",
    "native_coordinate_attention",
    "native_scaff",
    "native_sawf",
    "native_split_resplice",
]

# Every op the extension defines (qualified names); the CUDA build check and the tests walk
# this list.
NATIVE_OPS = (
    "saffnet_fast::coord_pool",
    "saffnet_fast::coord_pool_out",
    "saffnet_fast::coord_pool_backward",
    "saffnet_fast::aff_fuse",
    "saffnet_fast::aff_fuse_out",
    "saffnet_fast::aff_fuse_backward",
    "saffnet_fast::coord_scale",
    "saffnet_fast::coord_scale_out",
    "saffnet_fast::coord_scale_backward",
    "saffnet_fast::split_resplice",
    "saffnet_fast::split_resplice_out",
)


def _check_nchw(x: torch.Tensor, op: str, name: str = "x") -> None:
    """The checks of csrc/common/checks.h, for fake tensors (the C++ kernels do not run)."""
    torch._check(x.dim() == 4,
                 lambda: f"{op}: {name}: expected a 4-D N×C×H×W tensor, got shape {tuple(x.shape)}")
    torch._check(x.is_floating_point(),
                 lambda: f"{op}: {name}: expected a floating-point tensor, got {x.dtype}")


# ---------------------------------------------------------------------------------------
# coord_pool
# ---------------------------------------------------------------------------------------
def _register_coord_pool() -> None:
    @torch.library.register_fake("saffnet_fast::coord_pool")
    def _coord_pool_fake(x):
        _check_nchw(x, "coord_pool")
        n, c, h, w = x.shape
        return x.new_empty((n, c, h)), x.new_empty((n, c, w))

    @torch.library.register_fake("saffnet_fast::coord_pool_out")
    def _coord_pool_out_fake(x, pool_h, pool_w):
        _check_nchw(x, "coord_pool")
        return None

    @torch.library.register_fake("saffnet_fast::coord_pool_backward")
    def _coord_pool_backward_fake(grad_h, grad_w):
        n, c, h = grad_h.shape
        return grad_h.new_empty((n, c, h, grad_w.shape[2]))

    def _coord_pool_setup(ctx, inputs, output):
        (x,) = inputs
        ctx.x_shape = tuple(x.shape)

    def _coord_pool_backward(ctx, grad_h, grad_w):
        n, c, h, w = ctx.x_shape
        ref = grad_h if grad_h is not None else grad_w
        if grad_h is None:
            grad_h = ref.new_zeros((n, c, h))
        if grad_w is None:
            grad_w = ref.new_zeros((n, c, w))
        return torch.ops.saffnet_fast.coord_pool_backward(grad_h, grad_w)

    torch.library.register_autograd("saffnet_fast::coord_pool", _coord_pool_backward,
                                    setup_context=_coord_pool_setup)

    # coord_pool_backward is linear in (grad_h, grad_w); its adjoint is coord_pool itself
    # (mean over W of the incoming gradient for grad_h, mean over H for grad_w), which gives
    # double backward for free.
    def _coord_pool_backward_setup(ctx, inputs, output):
        pass

    def _coord_pool_backward_backward(ctx, grad_grad_x):
        return torch.ops.saffnet_fast.coord_pool(grad_grad_x.contiguous())

    torch.library.register_autograd("saffnet_fast::coord_pool_backward",
                                    _coord_pool_backward_backward,
                                    setup_context=_coord_pool_backward_setup)


# ---------------------------------------------------------------------------------------
# aff_fuse: AFF(x·m, x), m = a_h ⊗ a_w, local_att BN folded, global logit given
# ---------------------------------------------------------------------------------------
def _aff_out_like(x: torch.Tensor) -> torch.Tensor:
    channels_last = (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(
        x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _register_aff_fuse() -> None:
    @torch.library.register_fake("saffnet_fast::aff_fuse")
    def _aff_fuse_fake(x, a_h, a_w, global_logit, w1, b1, w2, b2):
        _check_nchw(x, "aff_fuse")
        return _aff_out_like(x)

    @torch.library.register_fake("saffnet_fast::aff_fuse_out")
    def _aff_fuse_out_fake(x, a_h, a_w, global_logit, w1, b1, w2, b2, out):
        _check_nchw(x, "aff_fuse")
        return None

    @torch.library.register_fake("saffnet_fast::aff_fuse_backward")
    def _aff_fuse_backward_fake(grad_out, x, a_h, a_w, global_logit, w1, b1, w2, b2):
        n, c, h, w = x.shape
        return (_aff_out_like(x), x.new_empty((n, c, h)), x.new_empty((n, c, w)),
                x.new_empty((n, c)), x.new_empty(w1.shape), x.new_empty(b1.shape),
                x.new_empty(w2.shape), x.new_empty(b2.shape))

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_out):
        grads = torch.ops.saffnet_fast.aff_fuse_backward(grad_out, *ctx.saved_tensors)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))

    torch.library.register_autograd("saffnet_fast::aff_fuse", _backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------
# coord_scale: x·a_h·a_w
# ---------------------------------------------------------------------------------------
def _register_coord_scale() -> None:
    @torch.library.register_fake("saffnet_fast::coord_scale")
    def _coord_scale_fake(x, a_h, a_w):
        _check_nchw(x, "coord_scale")
        return _aff_out_like(x)

    @torch.library.register_fake("saffnet_fast::coord_scale_out")
    def _coord_scale_out_fake(x, a_h, a_w, out):
        _check_nchw(x, "coord_scale")
        return None

    @torch.library.register_fake("saffnet_fast::coord_scale_backward")
    def _coord_scale_backward_fake(grad_out, x, a_h, a_w):
        n, c, h, w = x.shape
        return _aff_out_like(x), x.new_empty((n, c, h)), x.new_empty((n, c, w))

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_out):
        grads = torch.ops.saffnet_fast.coord_scale_backward(grad_out, *ctx.saved_tensors)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))

    torch.library.register_autograd("saffnet_fast::coord_scale", _backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------
# split_resplice: SR(C, s), inference form
# ---------------------------------------------------------------------------------------
def _split_resplice_plan(channels: int, widths: list[int]):
    """Python twin of csrc/common/split_resplice.h: per step (width, x_offset, carry_in,
    keep, out_offset, carry_out)."""
    w = channels // (len(widths) + 1)
    plan, out_offset, carry_offset, prev_carry = [], w, 0, -1
    for j, width in enumerate(widths):
        last = j == len(widths) - 1
        keep = width if last else (width + 1) // 2
        carry_out = -1 if last else carry_offset
        plan.append((width, (j + 1) * w, prev_carry, keep, out_offset, carry_out))
        out_offset += keep
        if not last:
            prev_carry = carry_offset
            carry_offset += width - keep
    return plan


def _register_split_resplice() -> None:
    @torch.library.register_fake("saffnet_fast::split_resplice")
    def _split_resplice_fake(x, weights, biases, negative_slope):
        _check_nchw(x, "split_resplice")
        n, c, h, w = x.shape
        widths = [int(wt.shape[0]) for wt in weights]
        carry = sum(cj - (cj + 1) // 2 for cj in widths[:-1])
        return x.new_empty((n, c, h, w)), x.new_empty((n, carry, h, w))

    @torch.library.register_fake("saffnet_fast::split_resplice_out")
    def _split_resplice_out_fake(x, weights, biases, negative_slope, out, carries):
        _check_nchw(x, "split_resplice")
        return None

    def _setup(ctx, inputs, output):
        x, weights, biases, negative_slope = inputs
        out, carries = output
        ctx.save_for_backward(x, out, carries, *weights)
        ctx.negative_slope = negative_slope

    def _backward(ctx, grad_out, grad_carries):
        # Not a fused kernel: ATen convolution gradients, step by step in reverse, fed by
        # the op's own outputs (each step's activation is in `out` or `carries`).
        x, out, carries, *weights = ctx.saved_tensors
        slope = ctx.negative_slope
        n, c, h, w = x.shape
        widths = [int(wt.shape[0]) for wt in weights]
        w0 = c // (len(widths) + 1)
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_x = torch.zeros_like(x, memory_format=torch.contiguous_format)
        grad_x[:, :w0] = grad_out[:, :w0]
        grad_weights, grad_biases = [None] * len(widths), [None] * len(widths)
        grad_carry_in = None  # gradient w.r.t. the carry that step j+1 read
        for j, (width, x_offset, carry_in, keep, out_offset, carry_out) in reversed(
                list(enumerate(_split_resplice_plan(c, widths)))):
            y = out[:, out_offset:out_offset + keep]
            grad_y = grad_out[:, out_offset:out_offset + keep]
            if carry_out >= 0:
                carried = slice(carry_out, carry_out + width - keep)
                y = torch.cat([y, carries[:, carried]], dim=1)
                grad_c = grad_carry_in
                if grad_carries is not None:
                    grad_c = grad_c + grad_carries[:, carried]
                grad_y = torch.cat([grad_y, grad_c], dim=1)
            # LeakyReLU'(pre) from its output: y > 0 exactly where pre > 0 (slope ≥ 0)
            grad_pre = torch.where(y > 0, grad_y, grad_y * slope)
            inp = x[:, x_offset:x_offset + w0]
            if carry_in >= 0:
                inp = torch.cat([inp, carries[:, carry_in:carry_in + width - w0]], dim=1)
            grad_weights[j] = torch.nn.grad.conv2d_weight(inp, weights[j].shape, grad_pre,
                                                          padding=1)
            grad_biases[j] = grad_pre.sum(dim=(0, 2, 3))
            grad_in = torch.nn.grad.conv2d_input(inp.shape, weights[j], grad_pre, padding=1)
            grad_x[:, x_offset:x_offset + w0] = grad_in[:, :w0]
            grad_carry_in = grad_in[:, w0:]
        return grad_x, grad_weights, grad_biases, None

    torch.library.register_autograd("saffnet_fast::split_resplice", _backward,
                                    setup_context=_setup)


def native_coord_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x.mean(3), x.mean(2)) of an N×C×H×W tensor from a single read of x."""
    require_native(x.device if isinstance(x, torch.Tensor) else None)
    return torch.ops.saffnet_fast.coord_pool(x)


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of the 1×1 conv followed by eval-mode BN, as differentiable ATen arithmetic so
    gradients reach conv.weight, conv.bias, bn.weight and bn.bias."""
    if not bn.track_running_stats or bn.running_var is None:
        raise NotImplementedError(
            "native ops fold BN with running statistics; BatchNorm2d(track_running_stats=False) "
            "uses batch statistics in eval mode too: use the reference backend")
    weight = conv.weight.reshape(conv.out_channels, -1)
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    bias = (bias - bn.running_mean) * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    return weight * scale[:, None], bias


def _coord_attention_factors(ca, x: torch.Tensor):
    """(pool_h, a_h N×C×H, a_w N×C×W) of CoordAttention ``ca``: the pooling is the native
    coord_pool (one read of x); the vector-sized rest runs through ca's own layers, so BN
    behaves exactly as in the reference in both modes (batch statistics and running-stat
    updates in training, running statistics in eval)."""
    h, w = x.shape[2], x.shape[3]
    pool_h, pool_w = torch.ops.saffnet_fast.coord_pool(x)
    y = torch.cat([pool_h, pool_w], dim=2).unsqueeze(-1)            # N×C×(H+W)×1
    y = ca.act(ca.bn1(ca.conv1(y)))
    y_h, y_w = torch.split(y, [h, w], dim=2)
    a_h = ca.conv_h(y_h).sigmoid().squeeze(-1)
    a_w = ca.conv_w(y_w).sigmoid().squeeze(-1)
    return pool_h, a_h, a_w


def _local_att_folded(aff):
    local = aff.local_att
    w1, b1 = _fold_bn(local[0], local[1])
    w2, b2 = _fold_bn(local[3], local[4])
    return w1, b1, w2, b2


def _global_att_logit(aff, pooled: torch.Tensor) -> torch.Tensor:
    """global_att on the already pooled N×C mean of AFF's xa (its AdaptiveAvgPool2d skipped)."""
    n, c = pooled.shape
    return aff.global_att[1:](pooled.reshape(n, c, 1, 1)).reshape(n, c)


def _require_inference_local_att(module, name: str) -> None:
    if module.training:
        raise NotImplementedError(
            f"{name}: training mode (batch statistics of AFF's local_att BNs) has no native "
            "kernel yet; call module.eval() or use the reference backend")


def native_coordinate_attention(module, x: torch.Tensor) -> torch.Tensor:
    """CoordAttention(x) = x·a_h·a_w with native pooling and scaling. Both modes: the only
    BN (bn1) acts on the pooled N×C×(H+W) tensor and runs through the module itself."""
    require_native(x.device if isinstance(x, torch.Tensor) else None)
    _check_input(x, module.channels)
    _, a_h, a_w = _coord_attention_factors(module, x)
    return torch.ops.saffnet_fast.coord_scale(x, a_h, a_w)


def native_scaff(module, x: torch.Tensor) -> torch.Tensor:
    """SCAFF(x) = AFF(CA(x), x), inference mode (module.eval()).

    Passes over the N×C×H×W tensor: coord_pool (read x), the global-branch mean
    mean_hw(x·(1 + a_h·a_w)) = mean(x) + Σ_h a_h·(x @ a_w) / HW as one batched matvec (read
    x), aff_fuse (read x, write out): 3 reads + 1 write; no full-size intermediate.
    """
    require_native(x.device if isinstance(x, torch.Tensor) else None)
    _check_input(x, module.channels)
    _require_inference_local_att(module, "native_scaff")
    h, w = x.shape[2], x.shape[3]
    pool_h, a_h, a_w = _coord_attention_factors(module.ca, x)
    weighted = torch.matmul(x, a_w.unsqueeze(-1)).squeeze(-1)        # N×C×H: Σ_w x·a_w
    pooled = pool_h.mean(dim=2) + (weighted * a_h).sum(dim=2) / (h * w)
    global_logit = _global_att_logit(module.aff, pooled)
    return torch.ops.saffnet_fast.aff_fuse(x, a_h, a_w, global_logit,
                                           *_local_att_folded(module.aff))


def native_sawf(module, x: torch.Tensor) -> torch.Tensor:
    """SAWF(x) = AFF(SE+(x), x), inference mode (module.eval()).

    SE+'s gate depends on x only through s = mean_hw(x), and AFF's global input is
    mean_hw(x·(1 + gate)) = s·(1 + gate): passes over the tensor are x.mean (read x) and
    aff_fuse (read x, write out), with m = gate broadcast (a_h = gate over H, a_w = 1).
    """
    require_native(x.device if isinstance(x, torch.Tensor) else None)
    _check_input(x, module.channels)
    _require_inference_local_att(module, "native_sawf")
    n, c, h, w = x.shape
    se = module.se
    s = x.mean(dim=(2, 3))
    sv = s.reshape(n, c, 1, 1)
    gate = torch.sigmoid(se.fc2(F.relu(se.fc1(sv))) + se.fc_avg(sv)).reshape(n, c)
    global_logit = _global_att_logit(module.aff, s * (1 + gate))
    a_h = gate.unsqueeze(-1).expand(n, c, h)
    a_w = x.new_ones(()).expand(n, c, w)
    return torch.ops.saffnet_fast.aff_fuse(x, a_h, a_w, global_logit,
                                           *_local_att_folded(module.aff))


def native_split_resplice(module, x: torch.Tensor) -> torch.Tensor:
    """SplitResplice(x) in inference mode (module.eval(): BN folded, Dropout the identity).

    One native op: the 7 (for s = 8) conv3×3 + BN + LeakyReLU steps, each writing its kept
    channels straight into their slice of the output. Its backward is ATen convolution
    gradients (see _register_split_resplice), not a fused kernel.
    """
    require_native(x.device if isinstance(x, torch.Tensor) else None)
    _check_input(x, module.channels)
    if module.training:
        raise NotImplementedError(
            "native_split_resplice: training mode (BN batch statistics, dropout) has no native "
            "kernel yet; call module.eval() or use the reference backend")
    slopes = {float(step.negative_slope) for step in module.steps}
    if len(slopes) != 1 or min(slopes) < 0:
        raise NotImplementedError(
            f"native_split_resplice: needs one negative_slope ≥ 0 for all steps, got {slopes}")
    weights, biases = [], []
    for step in module.steps:
        weight, bias = _fold_bn(step.conv, step.bn)
        weights.append(weight.reshape(step.conv.weight.shape))
        biases.append(bias)
    out, _ = torch.ops.saffnet_fast.split_resplice(x, weights, biases, slopes.pop())
    return out


if has_native():
    _register_coord_pool()
    _register_aff_fuse()
    _register_coord_scale()
    _register_split_resplice()

"""Each block's fast algorithm, written once against the op table: a backend is a set of
kernels (:data:`saffnet_fast.ops.OPS`), not a set of compositions.

``f(module, x[, residual], *, backend)`` computes the reference module's output with
``backend``'s kernels; the parameters enter the ops as inputs (BN folded with
differentiable ATen arithmetic), so autograd reaches the module's parameters exactly as it
does through the reference. Where a backend lacks an op, the algorithm takes its other
form: AFF's stored local branch needs aff_input / aff_combine (else the recompute branch);
the layers on pooled vectors run as pooled_linear ops, as pooled_conv1x1 matmuls, or as
the module's own layers; SCAFF's global pool is one weighted_mean pass or a batched matvec
on coord_pool's rows; SR without autograd on CUDA is one split_resplice_tiled launch or
the per-step split_resplice.

Two modes:
  * inference (module.eval()): every BN folded into the adjacent convolution from its
    running statistics (cached per module when no gradient reaches the parameters);
    Dropout off;
  * training: BN on batch statistics from the fused statistics passes (aff_moments,
    split_resplice_train, pooled_linear) or from the module's own BN layers, the running
    statistics updated exactly as nn.BatchNorm2d does (fast.bn.update_running_stats).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.reference import HSwish, _check_aff_inputs, _check_input
from ..ops import has_kernel, kernel
from ..ops.coord import weighted_mean_from_rows
from ..ops.pooled_linear import ACT_HSWISH, ACT_IDENTITY, ACT_RELU, ACT_SIGMOID
from .bn import (batch_scale_shift, check_batch_count, fold_bn, folded_params,
                 update_running_stats, uses_batch_stats)

__all__ = ["coordinate_attention", "scaff", "sawf", "aff", "split_resplice",
           "TRAINING_LOCAL_BRANCH", "fold_split_resplice", "is_1x1_conv"]


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------
def is_1x1_conv(m: nn.Module) -> bool:
    """A plain 1×1 convolution (a per-pixel matrix product): exactly nn.Conv2d, stride 1,
    no padding or dilation, one group."""
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1)
            and m.padding == (0, 0) and m.dilation == (1, 1) and m.groups == 1)


def _linear(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W as out×in, bias) of a 1×1 convolution."""
    return conv.weight.reshape(conv.out_channels, -1), conv.bias


def _fold_linear(conv: nn.Conv2d, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W out×in, b) of a 1×1 convolution followed by eval-mode ``bn``."""
    weight, bias = fold_bn(conv, bn)
    return weight.reshape(conv.out_channels, -1), bias


def _fusable_bn(bn: nn.Module) -> bool:
    return type(bn) is nn.BatchNorm2d and uses_batch_stats(bn)


def _pooled_layers(layers, y: torch.Tensor, backend: str) -> torch.Tensor:
    """The module's own layers on pooled N×C×L vectors (L = H + W, H, W or 1), each called
    on the N×C×L×1 view, so BN keeps the reference's batch statistics and running-stat
    updates; a 1×1 convolution as the backend's pooled_conv1x1 where it has one."""
    conv1x1 = kernel("pooled_conv1x1", backend) if has_kernel("pooled_conv1x1", backend) else None
    for layer in layers:
        if conv1x1 is not None and is_1x1_conv(layer):
            y = conv1x1(y, *_linear(layer))
        else:
            y = layer(y.unsqueeze(-1)).squeeze(-1)
    return y


def _pooled_linear(conv: nn.Conv2d, rows: torch.Tensor, backend: str, bn: nn.Module | None = None,
                   act: int = ACT_IDENTITY, bn_input_shape: tuple = ()) -> torch.Tensor:
    """act(bn(conv(·))) on M×K pooled rows with one pooled_linear; ``bn`` (optional) takes
    the rows' batch statistics and its running statistics are updated as nn.BatchNorm2d
    does. ``bn_input_shape`` is the shape the reference's BN sees, for its error message."""
    op = kernel("pooled_linear", backend)
    weight, bias = _linear(conv)
    if bn is None:
        return op(rows, weight, bias, None, None, False, 0.0, act)[0]
    check_batch_count(rows.shape[0], bn_input_shape)
    out, _, mean, var = op(rows, weight, bias, bn.weight, bn.bias, True, bn.eps, act)
    update_running_stats(bn, mean, var, rows.shape[0])
    return out


# ---------------------------------------------------------------------------------------
# Coordinate attention's factors
# ---------------------------------------------------------------------------------------
def _coord_layers_fusable(ca, backend: str) -> bool:
    """CA's pooled layers as three pooled_linear calls: plain 1×1 convolutions, bn1 an
    nn.BatchNorm2d on batch statistics, the reference's h_swish."""
    return (has_kernel("pooled_linear", backend)
            and all(is_1x1_conv(conv) for conv in (ca.conv1, ca.conv_h, ca.conv_w))
            and _fusable_bn(ca.bn1) and type(ca.act) is HSwish)


def _coord_attention_factors(ca, x: torch.Tensor, backend: str):
    """(pool_h, a_h N×C×H, a_w N×C×W) of CoordAttention ``ca``, any mode: the pooling is
    coord_pool (one read of x); the vector-sized rest runs as pooled_linear ops or through
    ca's own layers, so BN behaves exactly as in the reference (batch statistics and
    running-stat updates in training, running statistics in eval)."""
    h, w = x.shape[2], x.shape[3]
    pool_h, pool_w = kernel("coord_pool", backend)(x)
    if _coord_layers_fusable(ca, backend):
        return (pool_h,) + _coord_attention_gates_fused(ca, pool_h, pool_w, backend)
    y = torch.cat([pool_h, pool_w], dim=2)                          # N×C×(H+W)
    y = _pooled_layers([ca.conv1, ca.bn1, ca.act], y, backend)
    y_h, y_w = torch.split(y, [h, w], dim=2)
    a_h = _pooled_layers([ca.conv_h], y_h, backend).sigmoid()
    a_w = _pooled_layers([ca.conv_w], y_w, backend).sigmoid()
    return pool_h, a_h, a_w


def _coord_attention_gates_fused(ca, pool_h: torch.Tensor, pool_w: torch.Tensor,
                                 backend: str):
    """(a_h N×C×H, a_w N×C×W) from the pooled rows with three pooled_linear ops (one autograd
    node each) instead of ~15 ATen calls: the N·H row positions, then the N·W column ones,
    as rows of a (N·H + N·W)×C matrix, so conv1 / bn1 / h_swish is one call over all of them
    (bn1's statistics over the same N·(H+W) values as the reference's) and conv_h / conv_w
    each take a contiguous block of rows. a_h and a_w are transposed views (N×C×H with
    stride C along H), which the kernels read through their strides."""
    n, c, h = pool_h.shape
    w = pool_w.shape[2]
    rows = torch.cat([pool_h.transpose(1, 2).reshape(n * h, c),
                      pool_w.transpose(1, 2).reshape(n * w, c)])
    z = _pooled_linear(ca.conv1, rows, backend, ca.bn1, ACT_HSWISH,
                       (n, ca.conv1.out_channels, h + w, 1))
    a_h = _pooled_linear(ca.conv_h, z[:n * h], backend, act=ACT_SIGMOID)
    a_w = _pooled_linear(ca.conv_w, z[n * h:], backend, act=ACT_SIGMOID)
    return a_h.view(n, h, -1).transpose(1, 2), a_w.view(n, w, -1).transpose(1, 2)


def _fold_coord_attention(ca) -> tuple:
    """(W1, b1) of conv1 with bn1 folded (eval), and conv_h / conv_w stacked into one
    2C×mip map with its 2C bias: both factors from one matmul."""
    w1, b1 = _fold_linear(ca.conv1, ca.bn1)
    wh, bh = _linear(ca.conv_h)
    ww, bw = _linear(ca.conv_w)
    zeros = w1.new_zeros(ca.channels)
    bh = zeros if bh is None else bh
    bw = zeros if bw is None else bw
    return w1, b1, torch.cat([wh, ww], 0), torch.cat([bh, bw], 0)


def _coord_attention_factors_eval(folded_ca: tuple, x: torch.Tensor, backend: str):
    """(pool_h, a_h N×C×H, a_w N×C×W) of an eval-mode CoordAttention from its folded
    parameters. The pooled vectors are laid out N×(H+W)×C so each 1×1 conv is one
    F.linear (a single GEMM over all N·(H+W) positions), not a batched matmul."""
    c, h = x.shape[1], x.shape[2]
    w1, b1, w_hw, b_hw = folded_ca
    pool_h, pool_w = kernel("coord_pool", backend)(x)
    y = torch.cat([pool_h.transpose(1, 2), pool_w.transpose(1, 2)], dim=1)  # N×(H+W)×C
    y = F.linear(y, w1, b1)
    # the reference's HSwish, x·relu6(x + 3)/6, not F.hardswish: PyTorch's CUDA hardswish
    # kernel rounds its 1/6 to float32 even for float64 (1.8e-9 off in a_h on an H100)
    y = y * F.relu6(y + 3.0) / 6.0
    # Both heads on all H+W positions (2× the flops of a tiny GEMM, one call instead of
    # two); a_h and a_w are strided views, which aff_fuse reads through their strides.
    a = torch.sigmoid(F.linear(y, w_hw, b_hw))                            # N×(H+W)×2C
    return pool_h, a[:, :h, :c].transpose(1, 2), a[:, h:, c:].transpose(1, 2)


# ---------------------------------------------------------------------------------------
# AFF's branches
# ---------------------------------------------------------------------------------------
def _fold_aff(aff) -> tuple:
    """(local w1, b1, w2, b2, global g1ᵀ, gb1, g2ᵀ, gb2) with every BN folded; g1 and g2 are
    stored transposed for addmm on the pooled N×C rows."""
    local, glob = aff.local_att, aff.global_att
    w1, b1 = _fold_linear(local[0], local[1])
    w2, b2 = _fold_linear(local[3], local[4])
    g1, gb1 = _fold_linear(glob[1], glob[2])
    g2, gb2 = _fold_linear(glob[4], glob[5])
    return w1, b1, w2, b2, g1.t(), gb1, g2.t(), gb2


def _global_logit(folded_aff: tuple, pooled: torch.Tensor) -> torch.Tensor:
    """AFF's global_att on the already pooled N×C mean of its xa (AdaptiveAvgPool2d skipped)."""
    g1t, gb1, g2t, gb2 = folded_aff[4:]
    return torch.addmm(gb2, torch.addmm(gb1, pooled, g1t).relu_(), g2t)


def _global_logit_modules(aff, pooled: torch.Tensor, backend: str) -> torch.Tensor:
    """AFF's global_att on the already pooled N×C mean of its xa: two pooled_linear ops
    (conv → BN → ReLU, conv → BN; BN on the batch statistics of the N rows, running
    statistics updated) when the backend has them, the branch has the official layout and
    its BNs are in training mode, else the module's own layers (so its BNs behave exactly
    as in the reference)."""
    layers = list(aff.global_att[1:])
    if (has_kernel("pooled_linear", backend) and len(layers) == 5
            and is_1x1_conv(layers[0]) and _fusable_bn(layers[1])
            and type(layers[2]) is nn.ReLU and is_1x1_conv(layers[3])
            and _fusable_bn(layers[4])):
        n = pooled.shape[0]
        conv1, bn1, _, conv2, bn2 = layers
        hidden = _pooled_linear(conv1, pooled, backend, bn1, ACT_RELU,
                                (n, conv1.out_channels, 1, 1))
        return _pooled_linear(conv2, hidden, backend, bn2, ACT_IDENTITY,
                              (n, conv2.out_channels, 1, 1))
    return _pooled_layers(aff.global_att[1:], pooled[:, :, None], backend).flatten(1)


def _weighted_mean(x: torch.Tensor, pool_h: torch.Tensor, a_h: torch.Tensor,
                   a_w: torch.Tensor, backend: str) -> torch.Tensor:
    """AFF's global input mean_hw(x·(1 + a_h·a_w)), N×C in x's dtype: one weighted_mean
    pass where the backend has it, else the batched matvec on coord_pool's row means."""
    if has_kernel("weighted_mean", backend):
        return kernel("weighted_mean", backend)(x, a_h, a_w).to(x.dtype)
    return weighted_mean_from_rows(x, pool_h, a_h, a_w)


def _local_att_train(aff, x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor,
                     backend: str) -> tuple:
    """(w1, b1, w2, b2) of AFF's local_att for aff_fuse / aff_pair in training mode: each BN
    folded from the batch statistics of its input, which aff_moments computes from x (the
    pre-BN activations are never stored); the running statistics are updated. A BN in eval
    mode (or folded away) is folded from its running statistics."""
    moments = kernel("aff_moments", backend)
    local = aff.local_att
    n, _, h, w = x.shape
    count = n * h * w

    def fold(conv, bn, moments_inputs):
        """(W, b) of conv then bn; ``moments_inputs(W, b)``: aff_moments' weight arguments
        for the statistics of this conv's output."""
        if not uses_batch_stats(bn):
            return _fold_linear(conv, bn)
        weight, bias = _linear(conv)
        bias = weight.new_zeros(weight.shape[0]) if bias is None else bias
        check_batch_count(count, (n, weight.shape[0], h, w))
        mean, var = moments(x, a_h, a_w, *moments_inputs(weight, bias))
        update_running_stats(bn, mean, var, count)
        scale, shift = batch_scale_shift(bn, mean, var)
        return weight * scale[:, None], bias * scale + shift

    w1, b1 = fold(local[0], local[1], lambda weight, bias: (weight, bias, None, None))
    w2, b2 = fold(local[3], local[4], lambda weight, bias: (w1, b1, weight, bias))
    return w1, b1, w2, b2


def _stored_local_att(local: nn.Sequential, t: torch.Tensor) -> torch.Tensor:
    """AFF's local_att on aff_input's channel-major t (memory order C, N, H, W), keeping its
    activations for backward as the reference does: each 1×1 convolution is one GEMM on the
    C×(N·H·W) matrix view, and every other layer (BN, ReLU) is the module's own layer on a
    (1, C, N·H, W) view, so BN takes its batch statistics over the same N·H·W values and
    updates its running statistics itself. Returns the logits N×C×H×W (channel-major)."""
    n, c, h, w = t.shape
    y = t.permute(1, 0, 2, 3).reshape(c, n * h * w)  # a view: t is channel-major
    for layer in local:
        if is_1x1_conv(layer):
            weight, bias = _linear(layer)
            y = weight @ y if bias is None else torch.addmm(bias[:, None], weight, y)
        else:
            if uses_batch_stats(layer):
                # the reference's message and shape, not those of the (1, C, N·H, W) view
                check_batch_count(n * h * w, (n, y.shape[0], h, w))
            y = layer(y.view(1, y.shape[0], n * h, w)).view(y.shape[0], n * h * w)
    return y.view(-1, n, h, w).permute(1, 0, 2, 3)


# How AFF's local branch runs in training mode:
#   "stored" (default): aff_input writes t = x·(1 + m) once (channel-major), the 1×1
#     convolutions run as GEMMs and the BNs / ReLU as the module's own layers, keeping their
#     activations for backward as the reference does, and aff_combine forms the output.
#     Arithmetic as the reference's (forward + backward: the two convolutions' 3 GEMMs each).
#   "recompute": aff_moments (×2) and aff_fuse, which recompute the local branch from x in
#     every pass and store no activation: less memory, but 3.3× the reference's arithmetic,
#     which costs more than the saved traffic on these CPUs. Measured (native), training
#     forward + backward at batch 8, 2 threads (eager / recompute / stored, ms): SCAFF(128)
#     16×12 4.94 / 5.01 / 3.56, SCAFF(64) 32×24 7.06 / 6.17 / 4.68, SAWF(64) 64×48 33.4 /
#     16.7 / 14.6 (benchmarks/README.md has the benchmark suite's figures).
# A backend without the stored form's ops (Triton) runs "recompute".
TRAINING_LOCAL_BRANCH = "stored"
_LOCAL_BRANCH_MODES = ("stored", "recompute")


def _use_stored_local(aff, backend: str, ops: Sequence[str]) -> bool:
    if TRAINING_LOCAL_BRANCH not in _LOCAL_BRANCH_MODES:
        raise ValueError(f"saffnet_fast.fast.blocks.TRAINING_LOCAL_BRANCH: expected one of "
                         f"{_LOCAL_BRANCH_MODES}, got {TRAINING_LOCAL_BRANCH!r}")
    local = aff.local_att
    return (TRAINING_LOCAL_BRANCH == "stored"
            and all(has_kernel(op, backend) for op in ops)
            and isinstance(local, nn.Sequential) and all(
                is_1x1_conv(layer) or isinstance(layer, (nn.modules.batchnorm._BatchNorm, nn.ReLU))
                for layer in local))


def _usable(op: str, backend: str, avoid: frozenset) -> bool:
    return op not in avoid and has_kernel(op, backend)


def _require(ops: Sequence[str], backend: str, avoid: frozenset) -> None:
    """NotImplementedError (the dispatch's "this backend cannot serve the call") when one of
    ``ops`` ("<op>.backward": an op's backward) is missing from the backend or avoided for
    this call: backend='auto' on CUDA avoids the ops whose GPU kernels
    fail the compiled-kernel bar (fast.dispatch.CUDA_UNROUTED)."""
    for op in ops:
        if op in avoid:
            raise NotImplementedError(
                f"this case needs {backend}'s {op}, whose GPU kernels backend='auto' does not "
                "route to (saffnet_fast.fast.dispatch.CUDA_UNROUTED)")
        if not op.endswith(".backward") and not has_kernel(op, backend):
            raise NotImplementedError(f"this case needs {op}, which {backend} does not have")


def _needs_grad(module, *tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (any(t.requires_grad for t in tensors)
                                        or any(p.requires_grad for p in module.parameters()))


def _avoids(op: str, avoid: frozenset, module, *tensors: torch.Tensor) -> bool:
    """Whether this call must not use ``op``: avoided itself, or its backward is
    ("<op>.backward" in ``avoid``) and the call needs autograd. The parameters are walked
    only in that last case: on CUDA the native set avoids the op outright, on every call."""
    if op in avoid:
        return True
    return f"{op}.backward" in avoid and _needs_grad(module, *tensors)


def _gemm_local_logit(folded_aff: tuple, t: torch.Tensor) -> torch.Tensor:
    """AFF's local_att in inference (BNs folded) on channel-major t (memory order C, N, H, W)
    as two GEMMs with their bias (and the ReLU) in the GEMM's epilogue: the path for a
    device whose fused per-pixel bottleneck (aff_fuse / aff_pair) is not used, so the matrix
    work runs on the BLAS library's tensor-core GEMMs. Computed transposed, (N·H·W)×C, so
    each bias is a per-column vector; the logits come back N×C×H×W in channels_last."""
    w1, b1, w2, b2 = folded_aff[:4]
    n, c, h, w = t.shape
    rows = t.permute(1, 0, 2, 3).reshape(c, n * h * w).t()  # a view: t is channel-major
    if torch.is_grad_enabled() and any(t.requires_grad for t in (rows, w1, b1)):
        hidden = torch.addmm(b1, rows, w1.t()).relu()  # _addmm_activation has no derivative
    else:
        hidden = torch._addmm_activation(b1, rows, w1.t())  # ReLU in the GEMM's epilogue
    logits = torch.addmm(b2, hidden, w2.t())
    return logits.view(n, h, w, -1).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------
# The blocks
# ---------------------------------------------------------------------------------------
def coordinate_attention(module, x: torch.Tensor, *, backend: str,
                         avoid: frozenset = frozenset()) -> torch.Tensor:
    """CoordAttention(x) = x·a_h·a_w: coord_pool, the pooled layers, coord_scale. Both modes:
    the only BN (bn1) acts on the pooled N×C×(H+W) tensor."""
    _check_input(x, module.channels)
    _, a_h, a_w = _coord_attention_factors(module, x, backend)
    return kernel("coord_scale", backend)(x, a_h, a_w)


def scaff(module, x: torch.Tensor, *, backend: str,
          avoid: frozenset = frozenset()) -> torch.Tensor:
    """SCAFF(x) = AFF(CA(x), x), either mode.

    Inference: passes over the N×C×H×W tensor are coord_pool (read x), the global-branch
    mean mean_hw(x·(1 + a_h·a_w)) (read x: weighted_mean, or a batched matvec on the row
    means), aff_fuse (read x, write out): 3 reads + 1 write; no full-size intermediate.

    Training, stored local branch: coord_pool (read x), aff_input (read x, write
    t = x·(1 + a_h·a_w) channel-major), local_att as GEMMs and the module's own BN / ReLU
    layers on t (its activations kept for backward, as the reference keeps them),
    aff_combine (read x and the local logits, write out); the global branch's input is t's
    plane sums / (H·W), from aff_input's pass. Recompute: the inference passes plus two
    aff_moments passes (read x each) for the batch statistics of local_att's two BNs, which
    aff_fuse then applies; 5 reads + 1 write and no stored activation.

    ``avoid``: ops not to use (the dispatch's, see :func:`_require`). Inference without
    aff_fuse: aff_input (read x, write t), local_att as two GEMMs on t
    (:func:`_gemm_local_logit`), aff_combine (read x and the logits, write out).
    """
    _check_input(x, module.channels)
    if module.training:
        pool_h, a_h, a_w = _coord_attention_factors(module.ca, x, backend)
        if _use_stored_local(module.aff, backend, ("aff_input", "aff_combine")) and not (
                avoid & {"aff_input", "aff_combine"}):
            # t and its plane sums (the global branch's input) from one pass
            t, t_sum = kernel("aff_input", backend)(x, a_h, a_w)
            global_logit = _global_logit_modules(
                module.aff, t_sum * (1.0 / (x.shape[2] * x.shape[3])), backend)
            local_logit = _stored_local_att(module.aff.local_att, t)
            return kernel("aff_combine", backend)(x, a_h, a_w, local_logit, global_logit)
        _require(("aff_moments", "aff_fuse", "aff_fuse.backward"), backend, avoid)
        global_logit = _global_logit_modules(
            module.aff, _weighted_mean(x, pool_h, a_h, a_w, backend), backend)
        local = _local_att_train(module.aff, x, a_h, a_w, backend)
        return kernel("aff_fuse", backend)(x, a_h, a_w, global_logit, *local)
    folded_ca, folded_aff = folded_params(
        module, lambda: (_fold_coord_attention(module.ca), _fold_aff(module.aff)))
    pool_h, a_h, a_w = _coord_attention_factors_eval(folded_ca, x, backend)
    if _avoids("aff_fuse", avoid, module, x):
        _require(("aff_input", "aff_combine"), backend, avoid)
        t, t_sum = kernel("aff_input", backend)(x, a_h, a_w)
        global_logit = _global_logit(folded_aff, t_sum * (1.0 / (x.shape[2] * x.shape[3])))
        return kernel("aff_combine", backend)(x, a_h, a_w, _gemm_local_logit(folded_aff, t),
                                              global_logit)
    global_logit = _global_logit(folded_aff, _weighted_mean(x, pool_h, a_h, a_w, backend))
    return kernel("aff_fuse", backend)(x, a_h, a_w, global_logit, *folded_aff[:4])


def _fold_se_plus(se) -> tuple:
    """(fc1ᵀ, b1, fc2ᵀ, fc_avgᵀ, b2 + b_avg) for addmm on pooled N×C rows."""
    w1, b1 = _linear(se.fc1)
    w2, b2 = _linear(se.fc2)
    wa, ba = _linear(se.fc_avg)
    b1 = w1.new_zeros(w1.shape[0]) if b1 is None else b1
    b2 = w2.new_zeros(w2.shape[0]) if b2 is None else b2
    ba = wa.new_zeros(wa.shape[0]) if ba is None else ba
    return w1.t(), b1, w2.t(), wa.t(), b2 + ba


def _se_plus_gate(folded_se: tuple, s: torch.Tensor) -> torch.Tensor:
    fc1t, b1, fc2t, fc_avgt, b_out = folded_se
    hidden = torch.addmm(b1, s, fc1t).relu()
    return torch.addmm(torch.addmm(b_out, s, fc_avgt), hidden, fc2t).sigmoid()


def sawf(module, x: torch.Tensor, *, backend: str,
         avoid: frozenset = frozenset()) -> torch.Tensor:
    """SAWF(x) = AFF(SE+(x), x), either mode.

    SE+'s gate depends on x only through s = mean_hw(x), and AFF's global input is
    mean_hw(x·(1 + gate)) = s·(1 + gate): passes over the tensor are plane_mean (read x)
    and aff_fuse (read x, write out), with m = gate broadcast (a_h = gate over H, a_w = 1).
    Training: SE+ has no BN; local_att runs as in :func:`scaff` (stored: aff_input, GEMMs and
    the module's layers, aff_combine; recompute: two aff_moments passes and aff_fuse).
    Inference without aff_fuse (``avoid``): aff_input, two GEMMs, aff_combine (as SCAFF).
    """
    _check_input(x, module.channels)
    n, c, h, w = x.shape
    s = kernel("plane_mean", backend)(x).to(x.dtype)
    if module.training:
        gate = _se_plus_gate(_fold_se_plus(module.se), s)
        global_logit = _global_logit_modules(module.aff, torch.addcmul(s, s, gate), backend)
    else:
        folded_se, folded_aff = folded_params(
            module, lambda: (_fold_se_plus(module.se), _fold_aff(module.aff)))
        gate = _se_plus_gate(folded_se, s)
        global_logit = _global_logit(folded_aff, torch.addcmul(s, s, gate))
    a_h = gate.unsqueeze(-1).expand(n, c, h)
    a_w = gate.new_ones(()).expand(n, c, w)
    if not module.training:
        if _avoids("aff_fuse", avoid, module, x):
            _require(("aff_input", "aff_combine"), backend, avoid)
            t, _ = kernel("aff_input", backend)(x, a_h, a_w)
            return kernel("aff_combine", backend)(
                x, a_h, a_w, _gemm_local_logit(folded_aff, t), global_logit)
        return kernel("aff_fuse", backend)(x, a_h, a_w, global_logit, *folded_aff[:4])
    if _use_stored_local(module.aff, backend, ("aff_input", "aff_combine")) and not (
            avoid & {"aff_input", "aff_combine"}):
        t, _ = kernel("aff_input", backend)(x, a_h, a_w)
        local_logit = _stored_local_att(module.aff.local_att, t)
        return kernel("aff_combine", backend)(x, a_h, a_w, local_logit, global_logit)
    _require(("aff_moments", "aff_fuse", "aff_fuse.backward"), backend, avoid)
    local = _local_att_train(module.aff, x, a_h, a_w, backend)
    return kernel("aff_fuse", backend)(x, a_h, a_w, global_logit, *local)


def aff(module, x: torch.Tensor, residual: torch.Tensor, *, backend: str,
        avoid: frozenset = frozenset()) -> torch.Tensor:
    """The official AFF(x, residual) of any model (``saffnet_fast.nn.AFF``), either mode.

    Inference: the global branch's input mean_hw(x + residual) = mean_hw(x) + mean_hw(residual)
    (one read of each), then aff_pair (read both, write out): no full-size intermediate.

    Training, stored local branch: xa = x + residual written once, channel-major; local_att
    as GEMMs and the module's own BN / ReLU layers on it (as in :func:`scaff`);
    aff_pair_combine forms the output (x, residual and the local logits read once, 1
    write). Recompute: local_att's two BNs take their batch statistics with aff_moments on
    xa = x + residual with zero factors (t = xa; one write and two reads of xa, the only
    full-size intermediate), and aff_pair applies them.
    Inference without aff_pair (``avoid``): xa written channel-major as in training, its
    plane means, two GEMMs (:func:`_gemm_local_logit`), aff_pair_combine.
    """
    _check_aff_inputs(x, residual, module.channels, same_dtype_device=True)
    plane_mean = kernel("plane_mean", backend)
    gemm_eval = not module.training and _avoids("aff_pair", avoid, module, x, residual)
    if gemm_eval:
        _require(("aff_pair_combine",), backend, avoid)
    if gemm_eval or (module.training and "aff_pair_combine" not in avoid
                     and _use_stored_local(module, backend, ("aff_pair_combine",))):
        # xa written once, channel-major, for the local branch's GEMMs (a copy_ into the
        # permuted buffer, then the residual added in place: autograd sees both)
        n, c, h, w = x.shape
        xa = x.new_empty((c, n, h, w)).permute(1, 0, 2, 3)
        xa.copy_(x)
        xa.add_(residual)
        if gemm_eval:
            folded = folded_params(module, lambda: _fold_aff(module))
            return kernel("aff_pair_combine", backend)(
                x, residual, _gemm_local_logit(folded, xa),
                _global_logit(folded, plane_mean(xa).to(x.dtype)))
        global_logit = _global_logit_modules(module, plane_mean(xa).to(x.dtype), backend)
        local_logit = _stored_local_att(module.local_att, xa)
        return kernel("aff_pair_combine", backend)(x, residual, local_logit, global_logit)
    _require(("aff_pair",) + (("aff_moments", "aff_pair.backward") if module.training else ()),
             backend, avoid)
    pooled = (plane_mean(x) + plane_mean(residual)).to(x.dtype)
    if module.training:
        n, c, h, w = x.shape
        global_logit = _global_logit_modules(module, pooled, backend)
        xa = x + residual
        zero = xa.new_zeros(())
        local = _local_att_train(module, xa, zero.expand(n, c, h), zero.expand(n, c, w),
                                 backend)
        return kernel("aff_pair", backend)(x, residual, global_logit, *local)
    folded = folded_params(module, lambda: _fold_aff(module))
    return kernel("aff_pair", backend)(x, residual, _global_logit(folded, pooled), *folded[:4])


# ---------------------------------------------------------------------------------------
# Split-resplice
# ---------------------------------------------------------------------------------------
def fold_split_resplice(module) -> tuple[list, list]:
    """(weights, biases) of every FC step with its BN folded (eval mode)."""
    folded = [fold_bn(step.conv, step.bn) for step in module.steps]
    return [w for w, _ in folded], [b for _, b in folded]


def split_resplice_reason(module, x: torch.Tensor) -> str | None:
    """What the split_resplice ops cannot take from this module (its configuration, or its
    mode); None when they can."""
    steps = module.steps
    slopes = {float(step.negative_slope) for step in steps}
    if len(slopes) != 1:
        return f"needs one negative_slope for all steps, got {sorted(slopes)}"
    if not module.training:
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in module.parameters()))
        if needs_grad and min(slopes) < 0:
            # split_resplice's backward reads LeakyReLU' from the output's sign
            return f"autograd needs negative_slope ≥ 0, got {min(slopes)}"
        return None
    if any(step.conv.bias is not None for step in steps):
        return ("training mode expects the FC convolutions without bias (as SplitResplice "
                "builds them)")
    if not all(uses_batch_stats(step.bn) for step in steps):
        return ("training mode with some step BNs in eval mode (frozen statistics) has no "
                "fused kernel")
    eps = {float(step.bn.eps) for step in steps}
    rates = {float(step.drop.p) if step.drop.training else 0.0 for step in steps}
    if len(eps) != 1 or len(rates) != 1:
        return (f"needs one BN eps and one dropout rate for all steps, got eps {sorted(eps)}, "
                f"dropout {sorted(rates)}")
    return None


def _dropout_seed(seed: torch.Tensor | None, p: float, device: torch.device) -> torch.Tensor:
    """The dropout seed as the ops take it, a one-element int64 tensor on ``device`` (x's):
    drawn from that device's default generator, so torch.manual_seed makes training runs
    repeatable; on the GPU no host sync (the kernels read it from device memory), and a
    CUDA graph replay re-runs the captured randint, a new seed and a new mask each step
    (a CPU seed would be frozen into the graph). A tensor so torch.compile traces it.
    ``seed``: a one-element integer tensor to use instead."""
    if seed is None:
        return (torch.randint(0, 2 ** 62, (), dtype=torch.int64, device=device) if p > 0
                else torch.zeros((), dtype=torch.int64, device=device))
    if not (isinstance(seed, torch.Tensor) and seed.numel() == 1
            and seed.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"seed: expected a one-element int32 or int64 tensor, got "
                         f"{getattr(seed, 'dtype', type(seed).__name__)} of shape "
                         f"{tuple(getattr(seed, 'shape', ()))}")
    return seed.reshape(()).to(dtype=torch.int64)


def _split_resplice_train(module, x: torch.Tensor, slope: float, backend: str,
                          seed: torch.Tensor | None) -> torch.Tensor:
    """SplitResplice(x) in training mode: one split_resplice_train op (per step: the 3×3
    convolution, a fused statistics pass, a fused BN + LeakyReLU + dropout pass writing into
    the output slice and the next step's input; fused backward), then nn.BatchNorm2d's
    running-statistics update from the returned batch statistics."""
    steps = module.steps
    bns = [step.bn for step in steps]
    n, _, h, w = x.shape
    count = n * h * w
    check_batch_count(count, x.shape)
    p = float(steps[0].drop.p) if steps[0].drop.training else 0.0
    weights = [step.conv.weight for step in steps]
    gammas = [bn.weight if bn.weight is not None else x.new_ones(bn.num_features) for bn in bns]
    betas = [bn.bias if bn.bias is not None else x.new_zeros(bn.num_features) for bn in bns]
    out, _, _, mean, var = kernel("split_resplice_train", backend)(
        x, weights, gammas, betas, float(bns[0].eps), slope, p, _dropout_seed(seed, p, x.device))
    widths = [bn.num_features for bn in bns]
    for bn, mean_j, var_j in zip(bns, mean.split(widths), var.split(widths)):
        update_running_stats(bn, mean_j, var_j, count)
    return out


def split_resplice(module, x: torch.Tensor, *, backend: str, seed: torch.Tensor | None = None,
                   avoid: frozenset = frozenset()) -> torch.Tensor:
    """SplitResplice(x), either mode.

    Inference (module.eval(): BN folded, Dropout the identity): one split_resplice op, the
    7 (for s = 8) conv3×3 + BN + LeakyReLU steps, each writing its kept channels straight
    into its slice of the output; its backward is ATen convolution gradients. Without
    autograd on CUDA, split_resplice_tiled where the backend has it: the whole chain in
    one launch, without writing the carries.
    Training: see :func:`_split_resplice_train`; ``seed`` fixes its dropout mask.
    """
    _check_input(x, module.channels)
    reason = split_resplice_reason(module, x)
    if reason is not None:
        raise NotImplementedError(f"split_resplice: {reason}")
    slope = float(module.steps[0].negative_slope)
    if module.training:
        _require(("split_resplice_train",), backend, avoid)
        return _split_resplice_train(module, x, slope, backend, seed)
    weights, biases = folded_params(module, lambda: fold_split_resplice(module))
    if (x.is_cuda and _usable("split_resplice_tiled", backend, avoid)
            and not (torch.is_grad_enabled()
                     and (x.requires_grad or any(w.requires_grad for w in weights)))):
        # No autograd: the single-launch tiled kernel without writing the carries.
        return kernel("split_resplice_tiled", backend)(x, weights, biases, slope, 0, 0,
                                                       False)[0]
    _require(("split_resplice",), backend, avoid)
    return kernel("split_resplice", backend)(x, weights, biases, slope)[0]

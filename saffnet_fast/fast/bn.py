"""BatchNorm arithmetic the fast paths share, written once: folding an eval-mode BN into
the convolution before it, the scale and shift of batch statistics, nn.BatchNorm2d's
running-statistics update, and the per-module cache of folded parameters."""
from __future__ import annotations

import weakref
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["fold_bn", "batch_scale_shift", "update_running_stats", "uses_batch_stats",
           "check_batch_count", "folded_params", "clear_folded_cache"]


def fold_bn(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype | None = None):
    """(W, b) with conv_{W,b}(x) == bn(conv(x)) for ``bn`` in eval mode (running statistics),
    W of conv.weight's shape; ``bn`` an nn.Identity (a BN already folded by
    optimize_for_inference) gives the conv's own (W, b). Differentiable ATen arithmetic, so
    gradients reach conv.weight, conv.bias, bn.weight and bn.bias; computed in ``dtype``
    when given (convert.fold_conv_bn_ folds in float32 or float64), else in the
    parameters' dtype."""
    weight = conv.weight if dtype is None else conv.weight.to(dtype)
    bias = conv.bias if dtype is None or conv.bias is None else conv.bias.to(dtype)
    if isinstance(bn, nn.Identity):
        return weight, bias if bias is not None else weight.new_zeros(conv.out_channels)
    if not bn.track_running_stats or bn.running_var is None:
        raise NotImplementedError(
            "the fused kernels fold BN with running statistics; "
            "BatchNorm2d(track_running_stats=False) uses batch statistics in eval mode too: "
            "use the reference backend")
    dtype = weight.dtype
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    running_mean = bn.running_mean.to(dtype)
    bias = -running_mean * scale if bias is None else (bias - running_mean) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.to(dtype)
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), bias


def uses_batch_stats(bn: nn.Module) -> bool:
    """What nn.BatchNorm2d.forward decides: batch statistics in training, or always when it
    keeps no running statistics (False for anything that is not a BN)."""
    return isinstance(bn, nn.modules.batchnorm._BatchNorm) and (
        bn.training or (bn.running_mean is None and bn.running_var is None))


def batch_scale_shift(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor):
    """(scale, shift) with BN(v) = v·scale + shift for the batch statistics (differentiable:
    gradients reach the statistics and γ, β)."""
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def update_running_stats(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor,
                         count: int) -> None:
    """nn.BatchNorm2d's update from a batch's mean and biased variance over ``count`` values,
    with its exact semantics: num_batches_tracked += 1 (when it exists); the factor is the
    momentum, or with momentum None the cumulative average 1/num_batches_tracked, or 0 when
    there is no num_batches_tracked; the running variance is unbiased."""
    if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
        return
    with torch.no_grad():
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1.0 - factor).add_(mean.detach(), alpha=factor)
        bn.running_var.mul_(1.0 - factor).add_(var.detach(), alpha=factor * count / (count - 1))


def check_batch_count(count: int, shape) -> None:
    """nn.BatchNorm2d's refusal of a single value per channel in training, its message."""
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(shape)}")


# ---------------------------------------------------------------------------------------
# Folded-parameter cache (eval mode, no gradient needed)
# ---------------------------------------------------------------------------------------
# Folding BN into the 1×1 / 3×3 convolutions is ~8 small ATen ops per BN; at batch 1 that cost
# more than the fused kernels themselves. In inference the folded tensors only change when a
# source tensor does, so they are kept per module and rebuilt when any source tensor is a
# different object, was modified in place (_version), had its storage swapped (.data = …,
# module.to(...): data_ptr, dtype, device), or a BN's eps changed. Never used when autograd
# must reach a parameter: then the folding runs as differentiable ATen arithmetic per call.
_FOLDED_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _source_state(sources: Sequence[torch.Tensor | None]) -> tuple:
    # id(t) equal to a cached id means the same object: the cache entry holds its sources,
    # so no other object can have been given that id meanwhile.
    return tuple(None if t is None else (id(t), t._version, t.data_ptr(), t.dtype, t.device)
                 for t in sources)


def _needs_param_grad(sources: Sequence[torch.Tensor | None]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources)


def _module_sources(module: nn.Module) -> tuple[list, tuple]:
    """Every parameter and buffer of ``module`` and its submodules (None entries included),
    and every BN's (eps, track_running_stats). Walks the _parameters / _buffers / _modules
    dicts directly: nn.Module.__getattr__ per tensor cost more than the folding saved."""
    sources: list = []
    extras: list = []
    stack = [module]
    while stack:
        m = stack.pop()
        sources.extend(m._parameters.values())
        sources.extend(m._buffers.values())
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            extras.append((m.eps, m.track_running_stats))
        stack.extend(m._modules.values())
    return sources, tuple(extras)


def folded_params(module: nn.Module, fold: Callable[[], tuple]) -> tuple:
    """fold() of ``module``'s parameters, from the cache when no gradient can reach them."""
    if torch.compiler.is_compiling():
        # Traced: the folding becomes part of the graph (data_ptr/_version/ids would break
        # fullgraph tracing, and the compiled graph is where such hoisting belongs).
        return fold()
    sources, extras = _module_sources(module)
    if _needs_param_grad(sources):
        return fold()
    try:
        state = _source_state(sources)
    except RuntimeError:
        # Inference tensors (parameters created under inference_mode) have no version
        # counter: nothing to key on, so fold per call.
        return fold()
    entry = _FOLDED_CACHE.get(module)
    if entry is not None and entry[2] == state and entry[3] == extras:
        return entry[0]
    # Plain tensors even when called under inference_mode, so a later call with autograd on
    # (frozen parameters, x requiring grad) can save them for backward.
    with torch.inference_mode(False), torch.no_grad():
        params = fold()
    # Strong references to the sources: while the entry lives, no new tensor can reuse their
    # id or storage address and pass as unchanged.
    _FOLDED_CACHE[module] = (params, tuple(sources), state, extras)
    return params


def clear_folded_cache() -> None:
    """Drop every cached folding (tests, or to release memory)."""
    _FOLDED_CACHE.clear()

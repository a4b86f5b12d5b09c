"""AFF's per-pixel ops: the whole weighting with the local bottleneck inside
(``aff_fuse`` for AFF(x·m, x), ``aff_pair`` for AFF(x, residual)), the batch statistics of
that bottleneck's BNs (``aff_moments``), and the stored-branch pieces (``aff_input``,
``aff_combine``, ``aff_pair_combine``) around a local branch run as GEMMs.

Schema (csrc/aff_*.cpp; the Triton namespace has aff_fuse, aff_pair and aff_moments with
the same schemas), m = a_h ⊗ a_w:
  aff_fuse(x, a_h, a_w, global_logit, w1, b1, w2, b2) -> AFF(x·m, x), local_att's BNs folded
  aff_pair(x, residual, global_logit, w1, b1, w2, b2) -> AFF(x, residual)
  aff_moments(x, a_h, a_w, w1, b1, w2?, b2?) -> (mean, biased var) over N×H×W of
      u = W1·x(1 + m) + b1 (stage 1, w2 None) or W2·relu(u) + b2 (stage 2)
  aff_input(x, a_h, a_w) -> (t = x·(1 + m) channel-major, its plane sums N×C)
  aff_combine(x, a_h, a_w, local_logit, global_logit) -> AFF(x·m, x) from the logits
  aff_pair_combine(x, residual, local_logit, global_logit) -> AFF(x, residual) from them
each with ``<op>_backward(grad(s), *inputs)`` returning a gradient for every input.
"""
from __future__ import annotations

import torch

from ._schema import NATIVE, check_nchw, out_like, register_backward_op_autograd


def _grad_local_like(local_logit: torch.Tensor) -> torch.Tensor:
    """grad_local_logit as the kernels allocate it: local_logit's layout when it is dense
    (dense_local_logit in csrc/common/aff_checks.h), else contiguous."""
    plane_dense = local_logit.stride(3) == 1 and local_logit.stride(2) == local_logit.shape[3]
    dense = plane_dense or local_logit.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(local_logit if dense else local_logit.contiguous())


def register_aff_moments_autograd(namespace: str) -> None:
    """The statistics' gradients flow back through one fused pass (aff_moments_backward),
    so autograd differentiates through the batch statistics as it does through
    nn.BatchNorm2d. Stage 1 has no w2 / b2 and gets no gradient for them."""
    backward_op = getattr(torch.ops, namespace).aff_moments_backward

    def _setup(ctx, inputs, output):
        x, a_h, a_w, w1, b1, w2, b2 = inputs
        ctx.stage2 = w2 is not None
        extra = (w2, b2) if ctx.stage2 else ()
        ctx.save_for_backward(x, a_h, a_w, w1, b1, output[0], *extra)

    def _backward(ctx, grad_mean, grad_var):
        x, a_h, a_w, w1, b1, mean, *extra = ctx.saved_tensors
        w2, b2 = extra if ctx.stage2 else (None, None)
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
        grads = backward_op(grad_mean.contiguous(), grad_var.contiguous(), x, a_h, a_w, w1, b1,
                            w2, b2, mean)
        if not ctx.stage2:
            grads = (*grads[:5], None, None)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))

    torch.library.register_autograd(f"{namespace}::aff_moments", _backward,
                                    setup_context=_setup)


def register_native() -> None:
    @torch.library.register_fake("saffnet_fast::aff_fuse")
    def _aff_fuse_fake(x, a_h, a_w, global_logit, w1, b1, w2, b2):
        check_nchw(x, "aff_fuse")
        return out_like(x)

    @torch.library.register_fake("saffnet_fast::aff_fuse_out")
    def _aff_fuse_out_fake(x, a_h, a_w, global_logit, w1, b1, w2, b2, out):
        check_nchw(x, "aff_fuse")
        return None

    @torch.library.register_fake("saffnet_fast::aff_fuse_backward")
    def _aff_fuse_backward_fake(grad_out, x, a_h, a_w, global_logit, w1, b1, w2, b2):
        n, c, h, w = x.shape
        return (out_like(x), x.new_empty((n, c, h)), x.new_empty((n, c, w)),
                x.new_empty((n, c)), x.new_empty(w1.shape), x.new_empty(b1.shape),
                x.new_empty(w2.shape), x.new_empty(b2.shape))

    @torch.library.register_fake("saffnet_fast::aff_pair")
    def _aff_pair_fake(x, residual, global_logit, w1, b1, w2, b2):
        check_nchw(x, "aff_pair")
        return out_like(x)

    @torch.library.register_fake("saffnet_fast::aff_pair_backward")
    def _aff_pair_backward_fake(grad_out, x, residual, global_logit, w1, b1, w2, b2):
        return (out_like(x), out_like(residual), global_logit.new_empty(
            global_logit.shape), w1.new_empty(w1.shape), b1.new_empty(b1.shape),
            w2.new_empty(w2.shape), b2.new_empty(b2.shape))

    @torch.library.register_fake("saffnet_fast::aff_moments")
    def _aff_moments_fake(x, a_h, a_w, w1, b1, w2, b2):
        check_nchw(x, "aff_moments")
        channels = x.shape[1] if w2 is not None else w1.shape[0]
        return x.new_empty((channels,)), x.new_empty((channels,))

    @torch.library.register_fake("saffnet_fast::aff_moments_backward")
    def _aff_moments_backward_fake(grad_mean, grad_var, x, a_h, a_w, w1, b1, w2, b2, mean):
        n, c, h, w = x.shape
        return (out_like(x), x.new_empty((n, c, h)), x.new_empty((n, c, w)),
                x.new_empty(w1.shape), x.new_empty(b1.shape),
                x.new_empty(w2.shape if w2 is not None else (0,)),
                x.new_empty(b2.shape if b2 is not None else (0,)))

    @torch.library.register_fake("saffnet_fast::aff_combine")
    def _aff_combine_fake(x, a_h, a_w, local_logit, global_logit):
        check_nchw(x, "aff_combine")
        return out_like(x)

    @torch.library.register_fake("saffnet_fast::aff_combine_backward")
    def _aff_combine_backward_fake(grad_out, x, a_h, a_w, local_logit, global_logit):
        n, c, h, w = x.shape
        return (out_like(x), x.new_empty((n, c, h)), x.new_empty((n, c, w)),
                _grad_local_like(local_logit), x.new_empty((n, c)))

    @torch.library.register_fake("saffnet_fast::aff_input")
    def _aff_input_fake(x, a_h, a_w):
        check_nchw(x, "aff_input")
        n, c, h, w = x.shape
        # t channel-major, as the kernels write it; its plane sums N×C
        return x.new_empty((c, n, h, w)).permute(1, 0, 2, 3), x.new_empty((n, c))

    @torch.library.register_fake("saffnet_fast::aff_input_backward")
    def _aff_input_backward_fake(grad_t, grad_sum, x, a_h, a_w):
        n, c, h, w = x.shape
        return out_like(x), x.new_empty((n, c, h)), x.new_empty((n, c, w))

    @torch.library.register_fake("saffnet_fast::aff_pair_combine")
    def _aff_pair_combine_fake(x, residual, local_logit, global_logit):
        check_nchw(x, "aff_pair_combine")
        return out_like(x)

    @torch.library.register_fake("saffnet_fast::aff_pair_combine_backward")
    def _aff_pair_combine_backward_fake(grad_out, x, residual, local_logit, global_logit):
        return (out_like(x), out_like(residual), _grad_local_like(local_logit),
                x.new_empty(global_logit.shape))

    def _aff_input_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _aff_input_backward(ctx, grad_t, grad_sum):
        # grad_sum is None when the plane sums are not used (SAWF), or t's gradient is
        # None when only the sums are
        x = ctx.saved_tensors[0]
        if grad_t is None:
            grad_t = x.new_zeros(x.shape)
        grads = torch.ops.saffnet_fast.aff_input_backward(grad_t, grad_sum, *ctx.saved_tensors)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))

    torch.library.register_autograd("saffnet_fast::aff_input", _aff_input_backward,
                                    setup_context=_aff_input_setup)
    for op in ("aff_fuse", "aff_pair", "aff_combine", "aff_pair_combine"):
        register_backward_op_autograd(NATIVE, op)
    register_aff_moments_autograd(NATIVE)

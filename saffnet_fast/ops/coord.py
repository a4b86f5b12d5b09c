"""Per-plane ops: ``coord_pool`` (row and column means), ``coord_scale`` (x·a_h·a_w), the
global means ``plane_mean`` and ``weighted_mean``.

Schema (csrc/coord_pool.cpp, csrc/coord_scale.cpp; the Triton namespace the same):
  coord_pool(x) -> (x.mean(3) N×C×H, x.mean(2) N×C×W)
  coord_pool_backward(grad_h, grad_w) -> grad_x
  coord_scale(x, a_h, a_w) -> x·a_h[..., :, None]·a_w[..., None, :]
  coord_scale_backward(grad_out, x, a_h, a_w) -> (grad_x, grad_a_h, grad_a_w)
Triton only (``saffnet_fast_triton``): weighted_mean(x, a_h, a_w) = mean_hw(x·(1 + a_h·a_w))
and plane_mean(x) = mean_hw(x), N×C each, one pass over x. The native table entry of
plane_mean is the ATen composite below; weighted_mean has none (the blocks take its other
form, :func:`weighted_mean_from_rows`, which reuses coord_pool's row means).
"""
from __future__ import annotations

import torch

from ._schema import NATIVE, check_nchw, out_like, register_backward_op_autograd


def register_coord_pool_autograd(namespace: str) -> None:
    """coord_pool's gradient is its backward op; coord_pool_backward is linear in
    (grad_h, grad_w) and its adjoint is coord_pool itself (the mean over W of the incoming
    gradient for grad_h, over H for grad_w), which gives double backward for free."""
    ops = getattr(torch.ops, namespace)

    def _setup(ctx, inputs, output):
        (x,) = inputs
        ctx.x_shape = tuple(x.shape)

    def _backward(ctx, grad_h, grad_w):
        n, c, h, w = ctx.x_shape
        ref = grad_h if grad_h is not None else grad_w
        if grad_h is None:
            grad_h = ref.new_zeros((n, c, h))
        if grad_w is None:
            grad_w = ref.new_zeros((n, c, w))
        return ops.coord_pool_backward(grad_h, grad_w)

    torch.library.register_autograd(f"{namespace}::coord_pool", _backward, setup_context=_setup)

    def _backward_setup(ctx, inputs, output):
        pass

    def _backward_backward(ctx, grad_grad_x):
        return ops.coord_pool(grad_grad_x.contiguous())

    torch.library.register_autograd(f"{namespace}::coord_pool_backward", _backward_backward,
                                    setup_context=_backward_setup)


def register_plane_mean_autograd(namespace: str) -> None:
    def _setup(ctx, inputs, output):
        (x,) = inputs
        ctx.shape, ctx.dtype = x.shape, x.dtype

    def _backward(ctx, grad):
        n, c, h, w = ctx.shape
        return (grad / (h * w)).to(ctx.dtype)[:, :, None, None].expand(n, c, h, w).contiguous()

    torch.library.register_autograd(f"{namespace}::plane_mean", _backward, setup_context=_setup)


def register_native() -> None:
    @torch.library.register_fake("saffnet_fast::coord_pool")
    def _coord_pool_fake(x):
        check_nchw(x, "coord_pool")
        n, c, h, w = x.shape
        return x.new_empty((n, c, h)), x.new_empty((n, c, w))

    @torch.library.register_fake("saffnet_fast::coord_pool_out")
    def _coord_pool_out_fake(x, pool_h, pool_w):
        check_nchw(x, "coord_pool")
        return None

    @torch.library.register_fake("saffnet_fast::coord_pool_backward")
    def _coord_pool_backward_fake(grad_h, grad_w):
        n, c, h = grad_h.shape
        return grad_h.new_empty((n, c, h, grad_w.shape[2]))

    @torch.library.register_fake("saffnet_fast::coord_scale")
    def _coord_scale_fake(x, a_h, a_w):
        check_nchw(x, "coord_scale")
        return out_like(x)

    @torch.library.register_fake("saffnet_fast::coord_scale_out")
    def _coord_scale_out_fake(x, a_h, a_w, out):
        check_nchw(x, "coord_scale")
        return None

    @torch.library.register_fake("saffnet_fast::coord_scale_backward")
    def _coord_scale_backward_fake(grad_out, x, a_h, a_w):
        n, c, h, w = x.shape
        return out_like(x), x.new_empty((n, c, h)), x.new_empty((n, c, w))

    register_coord_pool_autograd(NATIVE)
    register_backward_op_autograd(NATIVE, "coord_scale")


def plane_mean(x: torch.Tensor) -> torch.Tensor:
    """mean_hw(x), N×C, as a sum then a scale: the sum's backward is a broadcast view of the
    N×C gradient, where mean's materialises an N×C×H×W tensor (expand, then divide) that
    the engine then adds into x's gradient (8×128×16×12, 2 threads: ~110 µs per call)."""
    return x.sum(dim=(2, 3)) * (1.0 / (x.shape[2] * x.shape[3]))


def weighted_mean_from_rows(x: torch.Tensor, pool_h: torch.Tensor, a_h: torch.Tensor,
                            a_w: torch.Tensor) -> torch.Tensor:
    """mean_hw(x·(1 + a_h·a_w)) = mean_h(pool_h + a_h·(x @ a_w)/W), N×C, from coord_pool's row
    means ``pool_h``: one batched matvec over x (a_w made contiguous: 2× faster matvec, and
    it is tiny; in eval it is a strided slice, on which bmm falls back to a per-matrix loop:
    250 µs for 1×64×32×24 instead of 11). Contiguous x goes to bmm on the (N·C)×H×W view:
    forward + backward 246 µs against 549 µs for the broadcasting matmul at 8×64×32×24
    (772 vs 1784 µs at 64×48; 2 threads)."""
    n, c, h, w = x.shape
    if x.is_contiguous():
        a_w_col = a_w.contiguous().view(n * c, w, 1)
        weighted = torch.bmm(x.view(n * c, h, w), a_w_col).view(n, c, h)
    else:
        weighted = torch.matmul(x, a_w.contiguous().unsqueeze(-1)).squeeze(-1)  # N×C×H
    return torch.addcmul(pool_h, a_h, weighted, value=1.0 / x.shape[3]).mean(dim=2)

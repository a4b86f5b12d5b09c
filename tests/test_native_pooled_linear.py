"""pooled_linear: act(BN(y·Wᵀ + b)) on pooled M×K rows with the rows' batch statistics, the
op behind CoordAttention's pooled layers and AFF's global branch in training. Forward, the
batch statistics and every gradient against ATen (F.linear, F.batch_norm, the reference's
activations), across dtypes, odd shapes, optional parameters and strided rows."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from saffnet_fast import has_native

from parity_utils import nan_filled_empty, rel_err

pytestmark = pytest.mark.skipif(not has_native(),
                                reason="saffnet_fast._C not built (pip install -e .)")

if has_native():
    OPS = torch.ops.saffnet_fast

ACTS = {0: "identity", 1: "relu", 2: "h_swish", 3: "sigmoid"}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
CUDA_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# (M rows, K in, F out): CA at 8×128×16×12 (224 rows of 128 → 8), AFF's global branch at
# batch 8 (128 → 32), and odd / prime / single-feature ones
SHAPES = [(224, 128, 8), (8, 128, 32), (7, 5, 3), (2, 13, 1), (31, 1, 17), (3, 64, 5)]
# float32 without the two-row case: BN over two rows normalises them to ±1 whatever y is,
# so y's gradient is pure rounding (float32 ATen itself is off by 1–3% there); float64
# covers it, as the module tests do for N = 2 (test_native_training.py)
CASES = ([(shape, torch.float64) for shape in SHAPES]
         + [(shape, torch.float32) for shape in SHAPES if shape[0] > 2] + [((3, 13, 1),
                                                                           torch.float32)])

needs_cuda_build = pytest.mark.skipif(
    not torch.cuda.is_available() or not (has_native() and __import__("saffnet_fast")
                                          .native_build_info().get("with_cuda")),
    reason="no CUDA device or saffnet_fast._C built without CUDA kernels")


def activation(z, act):
    if act == 1:
        return torch.relu(z)
    if act == 2:  # the reference's HSwish
        return z * F.relu6(z + 3.0) / 6.0
    if act == 3:
        return torch.sigmoid(z)
    return z


def reference(y, weight, bias, bn_weight, bn_bias, batch_norm, eps, act):
    z = F.linear(y, weight, bias)
    if batch_norm:
        z = F.batch_norm(z, None, None, bn_weight, bn_bias, training=True, eps=eps)
    return activation(z, act)


def make_args(shape, dtype, seed=0, device="cpu", bias=True, affine=True, batch_norm=True):
    m, k, f = shape
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(m, k, generator=gen, dtype=torch.float64) * 2
    weight = torch.randn(f, k, generator=gen, dtype=torch.float64) / k ** 0.5
    values = [y, weight,
              torch.randn(f, generator=gen, dtype=torch.float64) if bias else None,
              torch.rand(f, generator=gen, dtype=torch.float64) + 0.5
              if batch_norm and affine else None,
              torch.randn(f, generator=gen, dtype=torch.float64) * 0.5
              if batch_norm and affine else None]
    return [None if v is None else v.to(device=device, dtype=dtype).requires_grad_()
            for v in values]


def check_against_reference(args, batch_norm, act, dtype, tol, eps=1e-5):
    out, normalised, mean, var = OPS.pooled_linear(*args, batch_norm, eps, act)
    ref_leaves = [None if a is None else a.detach().cpu().double().requires_grad_()
                  for a in args]
    ref = reference(*ref_leaves, batch_norm, eps, act)
    assert out.dtype == args[0].dtype and out.shape == ref.shape
    assert rel_err(out.cpu(), ref) < tol, "out"
    z = F.linear(*[a.detach() if a is not None else None for a in ref_leaves[:3]])
    if batch_norm:
        assert rel_err(mean.cpu(), z.mean(0)) < tol, "mean"
        assert rel_err(var.cpu(), z.var(0, unbiased=False)) < tol, "var"
    else:
        assert mean.numel() == 0 and var.numel() == 0
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    wanted = [a for a in args if a is not None]
    got = torch.autograd.grad(out, wanted, grad.to(device=out.device, dtype=out.dtype))
    want = torch.autograd.grad(ref, [a for a in ref_leaves if a is not None], grad)
    names = [n for n, a in zip(["y", "weight", "bias", "bn_weight", "bn_bias"], args)
             if a is not None]
    # float32: within tol or within 4× ATen's own float32 error, whichever is larger (BN
    # over two rows makes y's gradient pure rounding: the float32 reference is off by 3%)
    own = [0.0] * len(want)
    if dtype == torch.float32:
        leaves32 = [None if a is None else a.detach().cpu().float().requires_grad_()
                    for a in args]
        ref32 = reference(*leaves32, batch_norm, eps, act)
        got32 = torch.autograd.grad(ref32, [a for a in leaves32 if a is not None], grad.float())
        own = [rel_err(g, w) for g, w in zip(got32, want)]
    scale = max(float(w.norm()) for w in want)
    for name, g, w, err32 in zip(names, got, want, own):
        assert g.shape == w.shape, name
        if batch_norm and name == "bias":
            # BN removes the bias: its gradient is zero up to rounding, so bound it by the
            # largest gradient's norm instead of its own
            assert float((g.cpu().double() - w).norm()) < tol * scale, name
            continue
        bound = max(tol, 4 * err32)
        assert rel_err(g.cpu(), w) < bound, (name, rel_err(g.cpu(), w), bound)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("shape, dtype", CASES)
def test_pooled_linear_forward_backward(shape, dtype, batch_norm, act):
    args = make_args(shape, dtype, batch_norm=batch_norm)
    check_against_reference(args, batch_norm, act, dtype, TOL[dtype])


@pytest.mark.parametrize("bias, affine", [(False, True), (True, False), (False, False)])
def test_pooled_linear_optional_parameters(bias, affine):
    for batch_norm in (True, False):
        if not batch_norm and not affine:
            continue
        args = make_args((9, 6, 4), torch.float64, bias=bias, affine=affine,
                         batch_norm=batch_norm)
        check_against_reference(args, batch_norm, 2, torch.float64, TOL[torch.float64])


def test_pooled_linear_strided_rows_and_weight():
    """Rows as a transposed view and a column slice, the weight transposed: read through
    their strides (the kernels make dense copies where they need them)."""
    y, weight, bias, g, b = make_args((11, 6, 5), torch.float64)
    y_t = y.detach().t().contiguous().t().requires_grad_()
    w_big = torch.randn(5, 12, dtype=torch.float64)
    w_big[:, ::2] = weight.detach()
    w_view = w_big[:, ::2].requires_grad_()
    check_against_reference([y_t, w_view, bias, g, b], True, 1, torch.float64, 1e-10)


def test_pooled_linear_hswish_at_its_kinks():
    """h_swish's gradient at p = ±3 is autograd's for the reference expression (hardtanh
    passes its gradient strictly inside its range): pre-activations placed exactly there."""
    weight = torch.eye(3, dtype=torch.float64).requires_grad_()
    y = torch.tensor([[-3.0, 3.0, 0.0], [1.0, -4.0, 5.0]], dtype=torch.float64,
                     requires_grad=True)
    check_against_reference([y, weight, None, None, None], False, 2, torch.float64, 1e-12)


def test_pooled_linear_gradcheck_and_opcheck():
    for batch_norm in (True, False):
        for act in ACTS:
            args = make_args((5, 4, 3), torch.float64, seed=act, batch_norm=batch_norm)
            def fn(*tensors, batch_norm=batch_norm, act=act):
                return OPS.pooled_linear(*tensors, batch_norm, 1e-3, act)[0]
            assert torch.autograd.gradcheck(fn, tuple(args)), (batch_norm, act)
            torch.library.opcheck(OPS.pooled_linear.default, (*args, batch_norm, 1e-3, act))


def test_only_out_is_differentiable():
    y, weight, bias, g, b = make_args((6, 4, 3), torch.float64)
    out, normalised, mean, var = OPS.pooled_linear(y, weight, bias, g, b, True, 1e-5, 0)
    assert out.requires_grad
    assert not (normalised.requires_grad or mean.requires_grad or var.requires_grad)


def test_outputs_are_fully_written():
    args = [None if a is None else a.detach() for a in make_args((13, 7, 5), torch.float32)]
    with nan_filled_empty():
        outs = list(OPS.pooled_linear(*args, True, 1e-5, 2))
        outs += OPS.pooled_linear_backward(torch.ones(13, 5), *args, True, 1e-5, 2, outs[0],
                                           outs[1], outs[3])
    for out in outs:
        assert not torch.isnan(out).any()


@pytest.mark.parametrize("call, exc, words", [
    (lambda y, w, b, g, be: OPS.pooled_linear(y[None], w, b, g, be, True, 1e-5, 0),
     ValueError, "y: expected 2-D"),
    (lambda y, w, b, g, be: OPS.pooled_linear(y, w[:, :-1], b, g, be, True, 1e-5, 0),
     ValueError, "weight: expected F×K with K = 7"),
    (lambda y, w, b, g, be: OPS.pooled_linear(y, w, b[:-1], g, be, True, 1e-5, 0),
     ValueError, "bias: expected shape"),
    (lambda y, w, b, g, be: OPS.pooled_linear(y, w.float(), b, g, be, True, 1e-5, 0),
     TypeError, "weight: expected dtype"),
    (lambda y, w, b, g, be: OPS.pooled_linear(y, w, b, g, be, True, 1e-5, 7),
     ValueError, "act: expected 0"),
    (lambda y, w, b, g, be: OPS.pooled_linear(y[:1], w, b, g, be, True, 1e-5, 0),
     ValueError, "Expected more than 1 value per channel"),
    (lambda y, w, b, g, be: OPS.pooled_linear(y, w, b, g, be, False, 1e-5, 0),
     ValueError, "bn_weight / bn_bias given with batch_norm=False"),
    (lambda y, w, b, g, be: OPS.pooled_linear(y.half(), w.half(), None, None, None, False,
                                              1e-5, 0),
     TypeError, "float32 or float64"),
])
def test_pooled_linear_bad_input(call, exc, words):
    args = [a.detach() for a in make_args((6, 7, 3), torch.float64)]
    with pytest.raises(exc, match=words):
        call(*args)


def test_pooled_linear_backward_bad_saved_values():
    args = [a.detach() for a in make_args((6, 7, 3), torch.float64)]
    out, normalised, _, var = OPS.pooled_linear(*args, True, 1e-5, 0)
    grad = torch.ones_like(out)
    with pytest.raises(ValueError, match="pooled_linear_backward: normalised: expected shape"):
        OPS.pooled_linear_backward(grad, *args, True, 1e-5, 0, out, normalised[:-1], var)
    with pytest.raises(ValueError, match="pooled_linear_backward: var: expected shape"):
        OPS.pooled_linear_backward(grad, *args, True, 1e-5, 0, out, normalised, var[:0])
    with pytest.raises(TypeError, match="pooled_linear_backward: out: expected dtype"):
        OPS.pooled_linear_backward(grad, *args, True, 1e-5, 0, out.float(), normalised, var)


@needs_cuda_build
@pytest.mark.cuda
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_pooled_linear(shape, batch_norm, act):
    """Every CUDA dtype against the float64 CPU reference, forward and every gradient."""
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        if batch_norm and shape[0] == 2 and dtype != torch.float64:
            continue  # two rows: pure rounding below float64 (see CASES)
        args = make_args(shape, dtype, device="cuda", batch_norm=batch_norm)
        check_against_reference(args, batch_norm, act, dtype, CUDA_TOL[dtype])


@needs_cuda_build
@pytest.mark.cuda
def test_cuda_pooled_linear_gradcheck_and_opcheck():
    args = make_args((5, 4, 3), torch.float64, device="cuda")
    assert torch.autograd.gradcheck(lambda *t: OPS.pooled_linear(*t, True, 1e-3, 2)[0],
                                    tuple(args))
    torch.library.opcheck(OPS.pooled_linear.default, (*args, True, 1e-3, 2))

"""The stored local branch's ops: aff_input (t = x·(1 + a_h ⊗ a_w), channel-major, and its
plane sums),
aff_combine (AFF(x·m, x) = 2·x·(1 + (m − 1)·σ(local + global)) from given logits) and
aff_pair_combine (the official AFF(x, residual) from given logits), each forward and
backward against ATen formulas, across dtypes, layouts and odd shapes."""
from __future__ import annotations

import pytest
import torch

from saffnet_fast import has_native

from parity_utils import nan_filled_empty, rel_err

pytestmark = pytest.mark.skipif(not has_native(),
                                reason="saffnet_fast._C not built (pip install -e .)")

if has_native():
    OPS = torch.ops.saffnet_fast

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
CUDA_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
SHAPES = [(2, 65, 9, 7), (1, 8, 1, 1), (3, 7, 5, 13), (1, 128, 16, 12), (2, 3, 33, 1)]

needs_cuda_build = pytest.mark.skipif(
    not torch.cuda.is_available() or not (has_native() and __import__("saffnet_fast")
                                          .native_build_info().get("with_cuda")),
    reason="no CUDA device or saffnet_fast._C built without CUDA kernels")


def combine_reference(x, a_h, a_w, local, glob):
    m = a_h[..., None] * a_w[..., None, :]
    wei = torch.sigmoid(local + glob[..., None, None])
    return 2 * x * m * wei + 2 * x * (1 - wei)


def input_reference(x, a_h, a_w):
    return x * (1 + a_h[..., None] * a_w[..., None, :])


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in `layout`, built from a leaf that stays differentiable."""
    n, c, h, w = t.shape
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "channel_major":  # the GEMM output of the stored local branch
        return t.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    if layout == "sliced":
        big = t.new_zeros(n, c + 3, h, 2 * w)
        big[:, 1:-2, :, ::2] = t
        return big[:, 1:-2, :, ::2]
    return t


def make_args(shape, dtype, seed=0, device="cpu", broadcast=False):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    local = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    glob = torch.randn(n, c, generator=gen, dtype=torch.float64)
    if broadcast:  # SAWF: a_h = the SE+ gate over H, a_w = 1
        gate = torch.rand(n, c, generator=gen, dtype=torch.float64)
        a_h, a_w = gate, torch.ones((), dtype=torch.float64)
    else:
        a_h = torch.rand(n, c, h, generator=gen, dtype=torch.float64)
        a_w = torch.rand(n, c, w, generator=gen, dtype=torch.float64)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, a_h, a_w, local, glob)]
    return leaves


def expand_factors(leaves, shape):
    x, a_h, a_w, local, glob = leaves
    n, c, h, w = shape
    if a_h.dim() == 2:
        return x, a_h.unsqueeze(-1).expand(n, c, h), a_w.expand(n, c, w), local, glob
    return x, a_h, a_w, local, glob


@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("local_layout", ["contiguous", "channel_major", "channels_last"])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_aff_combine_forward_backward(shape, dtype, x_layout, local_layout, broadcast):
    leaves = make_args(shape, dtype, broadcast=broadcast)
    inputs = expand_factors(leaves, shape)
    x, a_h, a_w, local, glob = inputs
    out = OPS.aff_combine(in_layout(x, x_layout), a_h, a_w, in_layout(local, local_layout), glob)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_inputs = expand_factors(ref_leaves, shape)
    ref = combine_reference(*ref_inputs)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    grad = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    # Gradients of the op's own inputs (the expanded N×C×H / N×C×W factors when broadcast),
    # not of the leaves: reducing SAWF's expanded a_w to its 0-d leaf is autograd's sum of
    # ~1e3 cancelling terms, where even ATen's float32 is off by up to 1e-5 (300 draws).
    got = torch.autograd.grad(out, inputs, grad.to(dtype))
    want = torch.autograd.grad(ref, ref_inputs, grad)
    for name, g, w in zip(["x", "a_h", "a_w", "local_logit", "global_logit"], got, want):
        assert g.shape == w.shape, name
        assert rel_err(g, w) < TOL[dtype], name


def test_aff_combine_grad_local_keeps_the_channel_major_layout():
    x, a_h, a_w, local, glob = make_args((2, 5, 3, 4), torch.float64)
    cm = in_layout(local, "channel_major").detach()
    grads = OPS.aff_combine_backward(torch.ones_like(x), x.detach(), a_h.detach(), a_w.detach(),
                                     cm, glob.detach())
    assert grads[3].stride() == cm.stride()


@pytest.mark.parametrize("grad_layout", ["channel_major", "sliced"])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_aff_input_forward_backward(shape, dtype, x_layout, grad_layout):
    """t and its plane sums, and the gradients through both (t's gradient in the layout the
    GEMMs give, channel-major, or strided: the kernels' two NCHW paths)."""
    x, a_h, a_w, _, _ = make_args(shape, dtype)
    t, t_sum = OPS.aff_input(in_layout(x, x_layout), a_h, a_w)
    n, c, h, w = shape
    # channel-major: the C×(N·H·W) matrix view of the stored local branch is a plain view
    assert t.permute(1, 0, 2, 3).is_contiguous()
    leaves = [v.detach().double().requires_grad_() for v in (x, a_h, a_w)]
    ref = input_reference(*leaves)
    ref_sum = ref.sum(dim=(2, 3))
    assert rel_err(t, ref) < TOL[dtype]
    assert t_sum.shape == (n, c) and rel_err(t_sum, ref_sum) < TOL[dtype]
    gen = torch.Generator().manual_seed(7)
    grad = in_layout(torch.randn(shape, dtype=torch.float64, generator=gen), grad_layout)
    grad_sum = torch.randn(n, c, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad((t, t_sum), (x, a_h, a_w), (grad.to(dtype), grad_sum.to(dtype)))
    want = torch.autograd.grad((ref, ref_sum), leaves, (grad, grad_sum))
    for name, g, wt in zip(["x", "a_h", "a_w"], got, want):
        assert rel_err(g, wt) < TOL[dtype], name
    # t alone (the plane sums unused, as in SAWF)
    t, _ = OPS.aff_input(in_layout(x, x_layout), a_h, a_w)
    got = torch.autograd.grad(t, (x, a_h, a_w), grad.to(dtype))
    want = torch.autograd.grad(input_reference(*leaves), leaves, grad)
    for name, g, wt in zip(["x", "a_h", "a_w"], got, want):
        assert rel_err(g, wt) < TOL[dtype], ("t only", name)


def test_gradcheck_and_opcheck():
    leaves = make_args((2, 3, 4, 5), torch.float64, seed=1)
    assert torch.autograd.gradcheck(OPS.aff_combine, tuple(leaves))
    torch.library.opcheck(OPS.aff_combine.default, tuple(leaves))
    cm = [leaves[0], leaves[1], leaves[2],
          in_layout(leaves[3], "channel_major").detach().requires_grad_(), leaves[4]]
    torch.library.opcheck(OPS.aff_combine.default, tuple(cm))
    assert torch.autograd.gradcheck(OPS.aff_input, tuple(leaves[:3]))
    torch.library.opcheck(OPS.aff_input.default, tuple(leaves[:3]))
    # the plane sums' gradient input of the backward op (gradcheck of the op above takes
    # gradients through both outputs; this checks the backward op's own schema)
    grad_t = torch.randn_like(leaves[0]).detach()
    grad_sum = torch.randn(2, 3, dtype=torch.float64)
    torch.library.opcheck(OPS.aff_input_backward.default,
                          (grad_t, grad_sum, *[v.detach() for v in leaves[:3]]))
    torch.library.opcheck(OPS.aff_input_backward.default,
                          (grad_t, None, *[v.detach() for v in leaves[:3]]))


def test_outputs_are_fully_written():
    leaves = [t.detach() for t in make_args((2, 9, 5, 3), torch.float32, seed=2)]
    with nan_filled_empty():
        outs = [OPS.aff_combine(*leaves), *OPS.aff_input(*leaves[:3]),
                *OPS.aff_combine_backward(torch.ones_like(leaves[0]), *leaves),
                *OPS.aff_input_backward(torch.ones_like(leaves[0]), None, *leaves[:3]),
                *OPS.aff_input_backward(torch.ones_like(leaves[0]), torch.ones(2, 9),
                                        *leaves[:3])]
    for out in outs:
        assert not torch.isnan(out).any()


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda a: a.__setitem__(3, a[3][:, :, :2]), ValueError, "local_logit: expected shape"),
    (lambda a: a.__setitem__(4, a[4][:1]), ValueError, "global_logit: expected shape"),
    (lambda a: a.__setitem__(3, a[3].float()), TypeError, "local_logit: expected dtype"),
    (lambda a: a.__setitem__(1, a[1][:, :, :-1]), ValueError, "a_h: expected shape"),
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, "x: expected a 4-D"),
    (lambda a: [a.__setitem__(i, a[i].half()) for i in range(5)], TypeError, "float32 or float64"),
])
def test_aff_combine_bad_input(mutate, exc, words):
    args = [t.detach() for t in make_args((2, 4, 3, 5), torch.float64)]
    mutate(args)
    with pytest.raises(exc, match=words):
        OPS.aff_combine(*args)


def test_aff_input_bad_input():
    x, a_h, a_w, _, _ = [t.detach() for t in make_args((2, 4, 3, 5), torch.float64)]
    with pytest.raises(ValueError, match="aff_input: a_w: expected shape"):
        OPS.aff_input(x, a_h, a_w[:, :, :2])
    with pytest.raises(ValueError, match="aff_input_backward: grad_t: expected shape"):
        OPS.aff_input_backward(x[:1], None, x, a_h, a_w)
    with pytest.raises(ValueError, match="aff_input_backward: grad_sum: expected shape"):
        OPS.aff_input_backward(x, x[:, :, 0, 0].t(), x, a_h, a_w)


@needs_cuda_build
@pytest.mark.cuda
@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("local_layout", ["contiguous", "channel_major"])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_aff_combine_and_input(shape, local_layout, broadcast):
    """Every CUDA dtype against the float64 CPU reference, forward and every gradient."""
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        leaves = make_args(shape, dtype, device="cuda", broadcast=broadcast)
        inputs = expand_factors(leaves, shape)  # the op's inputs: see the CPU test
        x, a_h, a_w, local, glob = inputs
        out = OPS.aff_combine(x, a_h, a_w, in_layout(local, local_layout), glob)
        t, t_sum = OPS.aff_input(x, a_h, a_w)
        ref_leaves = [v.detach().cpu().double().requires_grad_() for v in leaves]
        ref_inputs = expand_factors(ref_leaves, shape)
        rx, rh, rw, rl, rg = ref_inputs
        ref, ref_t = combine_reference(rx, rh, rw, rl, rg), input_reference(rx, rh, rw)
        assert rel_err(out.cpu(), ref) < CUDA_TOL[dtype], dtype
        assert rel_err(t.cpu(), ref_t) < CUDA_TOL[dtype], dtype
        ref_sum = ref_t.sum(dim=(2, 3))
        assert rel_err(t_sum.cpu(), ref_sum) < CUDA_TOL[dtype], dtype
        gen = torch.Generator().manual_seed(7)
        grad = torch.randn(shape, dtype=torch.float64, generator=gen)
        grad_sum = torch.randn(shape[:2], dtype=torch.float64, generator=gen)
        got = torch.autograd.grad((out, t, t_sum), inputs,
                                  (grad.to(out), grad.to(t), grad_sum.to(t)))
        want = torch.autograd.grad((ref, ref_t, ref_sum), ref_inputs, (grad, grad, grad_sum))
        for name, g, w in zip(["x", "a_h", "a_w", "local_logit", "global_logit"], got, want):
            assert rel_err(g.cpu(), w) < CUDA_TOL[dtype], (dtype, name)


@needs_cuda_build
@pytest.mark.cuda
def test_cuda_gradcheck_and_opcheck():
    leaves = make_args((2, 3, 4, 5), torch.float64, seed=1, device="cuda")
    assert torch.autograd.gradcheck(OPS.aff_combine, tuple(leaves))
    torch.library.opcheck(OPS.aff_combine.default, tuple(leaves))
    assert torch.autograd.gradcheck(OPS.aff_input, tuple(leaves[:3]))
    torch.library.opcheck(OPS.aff_input.default, tuple(leaves[:3]))


# ---------------------------------------------------------------- aff_pair_combine
def pair_reference(x, residual, local, glob):
    wei = torch.sigmoid(local + glob[..., None, None])
    return 2 * x * wei + 2 * residual * (1 - wei)


def pair_args(shape, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    n, c, _, _ = shape
    values = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    values.append(torch.randn(n, c, generator=gen, dtype=torch.float64))
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in values]


@pytest.mark.parametrize("local_layout", ["contiguous", "channel_major", "sliced"])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_aff_pair_combine_forward_backward(shape, dtype, x_layout, local_layout):
    leaves = pair_args(shape, dtype)
    x, residual, local, glob = leaves
    out = OPS.aff_pair_combine(in_layout(x, x_layout), in_layout(residual, "channels_last"),
                               in_layout(local, local_layout), glob)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = pair_reference(*ref_leaves)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    grad = in_layout(torch.randn(shape, dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(7)), "sliced")
    got = torch.autograd.grad(out, leaves, grad.to(dtype))
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for name, g, w in zip(["x", "residual", "local_logit", "global_logit"], got, want):
        assert g.shape == w.shape, name
        assert rel_err(g, w) < TOL[dtype], name


def test_aff_pair_combine_gradcheck_opcheck_poison_and_errors():
    leaves = pair_args((2, 3, 4, 5), torch.float64, seed=1)
    assert torch.autograd.gradcheck(OPS.aff_pair_combine, tuple(leaves))
    torch.library.opcheck(OPS.aff_pair_combine.default, tuple(leaves))
    cm = [leaves[0], leaves[1], in_layout(leaves[2], "channel_major").detach().requires_grad_(),
          leaves[3]]
    torch.library.opcheck(OPS.aff_pair_combine.default, tuple(cm))
    args = [t.detach() for t in leaves]
    with nan_filled_empty():
        outs = [OPS.aff_pair_combine(*args),
                *OPS.aff_pair_combine_backward(torch.ones_like(args[0]), *args)]
    for out in outs:
        assert not torch.isnan(out).any()
    with pytest.raises(ValueError, match="aff_pair_combine: residual: expected shape"):
        OPS.aff_pair_combine(args[0], args[1][:, :2], args[2], args[3])
    with pytest.raises(ValueError, match="aff_pair_combine: global_logit: expected shape"):
        OPS.aff_pair_combine(args[0], args[1], args[2], args[3][:1])
    with pytest.raises(TypeError, match="local_logit: expected dtype"):
        OPS.aff_pair_combine(args[0], args[1], args[2].float(), args[3])


@needs_cuda_build
@pytest.mark.cuda
@pytest.mark.parametrize("local_layout", ["contiguous", "channel_major"])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_aff_pair_combine(shape, local_layout):
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        leaves = pair_args(shape, dtype, device="cuda")
        x, residual, local, glob = leaves
        out = OPS.aff_pair_combine(x, residual, in_layout(local, local_layout), glob)
        ref_leaves = [v.detach().cpu().double().requires_grad_() for v in leaves]
        ref = pair_reference(*ref_leaves)
        assert rel_err(out.cpu(), ref) < CUDA_TOL[dtype], dtype
        grad = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        got = torch.autograd.grad(out, leaves, grad.to(out))
        want = torch.autograd.grad(ref, ref_leaves, grad)
        for name, g, w in zip(["x", "residual", "local_logit", "global_logit"], got, want):
            assert rel_err(g.cpu(), w) < CUDA_TOL[dtype], (dtype, name)
    leaves = pair_args((2, 3, 4, 5), torch.float64, seed=1, device="cuda")
    assert torch.autograd.gradcheck(OPS.aff_pair_combine, tuple(leaves))
    torch.library.opcheck(OPS.aff_pair_combine.default, tuple(leaves))

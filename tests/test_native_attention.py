"""Native attention ops: aff_fuse (AFF(x·a_h·a_w, x), BN folded), coord_scale (x·a_h·a_w), and
the entry points native_scaff / native_sawf / native_coordinate_attention against the
reference modules."""
from __future__ import annotations

import copy

import pytest
import torch

from saffnet_fast import has_native
from saffnet_fast.nn.reference import SAWF, SCAFF, CoordAttention

from parity_utils import native_block, randomize_batchnorm, rel_err

pytestmark = pytest.mark.skipif(not has_native(),
                                reason="saffnet_fast._C not built (pip install -e .)")

if has_native():
    native_coordinate_attention = native_block("coordinate_attention")
    native_scaff = native_block("scaff")
    native_sawf = native_block("sawf")

    OPS = torch.ops.saffnet_fast

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


# ------------------------------------------------------------------ op-level references
def aff_fuse_reference(x, a_h, a_w, g, w1, b1, w2, b2):
    m = a_h[..., None] * a_w[..., None, :]
    t = x * (1 + m)
    z = torch.einsum("jc,nchw->njhw", w1, t) + b1[:, None, None]
    l = torch.einsum("cj,njhw->nchw", w2, z.relu()) + b2[:, None, None]
    wei = torch.sigmoid(l + g[..., None, None])
    return 2 * x * m * wei + 2 * x * (1 - wei)


def aff_args(n, c, h, w, ci, dtype, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, positive=False):
        t = torch.rand(shape, generator=gen, dtype=dtype) if positive else \
            torch.randn(shape, generator=gen, dtype=dtype) * scale
        return t.requires_grad_(requires_grad)

    return [r(n, c, h, w), r(n, c, h, positive=True), r(n, c, w, positive=True), r(n, c),
            r(ci, c, scale=c ** -0.5), r(ci), r(c, ci, scale=ci ** -0.5), r(c)]


AFF_SHAPES = [(1, 32, 17, 3, 8), (2, 64, 3, 17, 16), (1, 8, 1, 1, 2), (3, 7, 5, 9, 1),
              (1, 128, 4, 6, 32), (1, 256, 3, 2, 64), (2, 16, 33, 1, 4)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", AFF_SHAPES)
def test_aff_fuse_parity(shape, dtype):
    args = aff_args(*shape, dtype)
    out = OPS.aff_fuse(*args)
    assert out.shape == args[0].shape and out.dtype == dtype
    assert rel_err(out, aff_fuse_reference(*[a.double() for a in args])) < TOL[dtype]


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "permuted", "expanded_factors"])
def test_aff_fuse_layouts(layout):
    args = aff_args(2, 24, 9, 7, 6, torch.float64)
    x = args[0]
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(2, 30, 18, 9, dtype=torch.float64)[:, 3:27, ::2, 1:8]
    elif layout == "permuted":
        x = torch.randn(2, 7, 24, 9, dtype=torch.float64).permute(0, 2, 3, 1)
    else:  # SAWF's form: a_h a per-channel gate broadcast over H, a_w = 1
        args[1] = torch.rand(2, 24, 1, dtype=torch.float64).expand(2, 24, 9)
        args[2] = torch.ones((), dtype=torch.float64).expand(2, 24, 7)
    args[0] = x
    out = OPS.aff_fuse(*args)
    assert rel_err(out, aff_fuse_reference(*args)) < 1e-10
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
def test_aff_fuse_out_poisoned(channels_last):
    args = aff_args(2, 16, 5, 7, 4, torch.float64)
    if channels_last:
        args[0] = args[0].to(memory_format=torch.channels_last)
    storage = torch.full((2, 16, 5, 14), float("nan"), dtype=torch.float64)
    out = storage[..., ::2]                                  # strided output view
    OPS.aff_fuse_out(*args, out)
    assert not torch.isnan(out).any()
    assert torch.isnan(storage[..., 1::2]).all(), "wrote outside the output view"
    assert rel_err(out, aff_fuse_reference(*args)) < 1e-10


@pytest.mark.parametrize("shape", [(2, 6, 3, 4, 2), (1, 5, 1, 3, 3), (1, 4, 2, 1, 1)])
def test_aff_fuse_gradcheck(shape):
    args = aff_args(*shape, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(OPS.aff_fuse, tuple(args))
    args[0] = args[0].detach().to(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(OPS.aff_fuse, tuple(args))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_aff_fuse_backward_parity(dtype):
    args = aff_args(2, 64, 7, 5, 16, dtype, requires_grad=True, seed=3)
    grad = torch.randn(2, 64, 7, 5, dtype=dtype)
    got = torch.autograd.grad(OPS.aff_fuse(*args), args, grad)
    ref_args = [a.detach().double().requires_grad_() for a in args]
    ref = torch.autograd.grad(aff_fuse_reference(*ref_args), ref_args, grad.double())
    for g, r in zip(got, ref):
        assert rel_err(g, r) < TOL[dtype]


def test_aff_fuse_opcheck():
    args = aff_args(2, 8, 3, 5, 2, torch.float64, requires_grad=True)
    torch.library.opcheck(OPS.aff_fuse.default, tuple(args))
    plain = [a.detach() for a in args]
    torch.library.opcheck(OPS.aff_fuse_out.default, (*plain, torch.empty_like(plain[0])))
    torch.library.opcheck(OPS.aff_fuse_backward.default,
                          (torch.randn_like(plain[0]), *plain))


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, ["x", "4-D"]),
    (lambda a: a.__setitem__(4, a[4][:, :7]), ValueError, ["w1", "C = 8"]),
    (lambda a: a.__setitem__(6, a[6][:, :1]), ValueError, ["w2", "shape"]),
    (lambda a: a.__setitem__(1, a[1][:, :, :2]), ValueError, ["a_h", "shape"]),
    (lambda a: a.__setitem__(3, a[3].float()), TypeError, ["global_logit", "dtype"]),
    (lambda a: a.__setitem__(0, a[0][:0]), ValueError, ["x", "empty batch"]),
    (lambda a: a.__setitem__(0, a[0].long()), TypeError, ["x", "floating"]),
])
def test_aff_fuse_bad_input(mutate, exc, words):
    args = aff_args(2, 8, 3, 5, 2, torch.float64)
    mutate(args)
    with pytest.raises(exc) as info:
        OPS.aff_fuse(*args)
    assert "aff_fuse" in str(info.value)
    for word in words:
        assert word in str(info.value)


# ------------------------------------------------------------------------ coord_scale
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "permuted"])
def test_coord_scale_parity_and_grad(dtype, layout):
    x = torch.randn(2, 65, 9, 7, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(2, 70, 18, 8, dtype=dtype)[:, 2:67, ::2, 1:]
    elif layout == "permuted":
        x = torch.randn(2, 7, 65, 9, dtype=dtype).permute(0, 2, 3, 1)
    x.requires_grad_()
    a_h = torch.rand(2, 65, 9, dtype=dtype, requires_grad=True)
    a_w = torch.rand(2, 65, 7, dtype=dtype, requires_grad=True)
    out = OPS.coord_scale(x, a_h, a_w)
    ref = x * a_h[..., None] * a_w[..., None, :]
    assert rel_err(out, ref) < TOL[dtype]
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (x, a_h, a_w), grad)
    want = torch.autograd.grad(ref, (x, a_h, a_w), grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL[dtype]


def test_coord_scale_gradcheck_opcheck_poison():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    a_h = torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True)
    a_w = torch.rand(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(OPS.coord_scale, (x, a_h, a_w))
    torch.library.opcheck(OPS.coord_scale.default, (x, a_h, a_w))
    out = torch.full((2, 3, 4, 5), float("nan"), dtype=torch.float64)
    OPS.coord_scale_out(x.detach(), a_h.detach(), a_w.detach(), out)
    assert not torch.isnan(out).any()
    with pytest.raises(ValueError, match="a_w: expected shape"):
        OPS.coord_scale(x, a_h, a_w[:, :, :4])


# -------------------------------------------------------------- module entry points
def randomized(module: torch.nn.Module, dtype, seed=0) -> torch.nn.Module:
    return randomize_batchnorm(module, seed).to(dtype)


MODULES = {
    "scaff": (SCAFF, lambda: native_scaff),
    "sawf": (SAWF, lambda: native_sawf),
    "ca": (CoordAttention, lambda: native_coordinate_attention),
}
MODULE_SHAPES = [(1, 32, 17, 3), (2, 64, 8, 6), (1, 128, 3, 1), (1, 256, 1, 4), (2, 12, 5, 7)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", MODULE_SHAPES)
@pytest.mark.parametrize("kind", list(MODULES))
def test_module_eval_parity(kind, shape, dtype):
    cls, fn = MODULES[kind]
    module = randomized(cls(shape[1]), dtype).eval()
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        assert rel_err(fn()(module, x), module(x)) < TOL[dtype]
        xcl = x.to(memory_format=torch.channels_last)
        assert rel_err(fn()(module, xcl), module(xcl)) < TOL[dtype]
        xs = torch.randn(shape[0], shape[1] + 4, shape[2], shape[3] * 2, dtype=dtype)[:, 2:-2, :, ::2]
        assert rel_err(fn()(module, xs), module(xs)) < TOL[dtype]


@pytest.mark.parametrize("kind", list(MODULES))
def test_module_gradients_reach_parameters(kind):
    cls, fn = MODULES[kind]
    module = randomized(cls(32), torch.float64, seed=1).eval()
    x = torch.randn(2, 32, 6, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 32, 6, 5, dtype=torch.float64)
    params = [p for p in module.parameters()]
    got = torch.autograd.grad(fn()(module, x), [x] + params, grad, allow_unused=True)
    want = torch.autograd.grad(module(x), [x] + params, grad, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or g.abs().max() == 0
        else:
            assert g is not None and rel_err(g, w) < 1e-10


@pytest.mark.parametrize("kind", list(MODULES))
def test_module_gradcheck(kind):
    cls, fn = MODULES[kind]
    module = randomized(cls(16), torch.float64, seed=2).eval()
    x = torch.randn(1, 16, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fn()(module, t), (x,))


def test_coordinate_attention_training_matches_reference():
    module = randomized(CoordAttention(32), torch.float64).train()
    twin = copy.deepcopy(module)
    x = torch.randn(3, 32, 7, 5, dtype=torch.float64, requires_grad=True)
    out = native_coordinate_attention(module, x)
    ref = twin(x)
    assert rel_err(out, ref) < 1e-10
    assert torch.allclose(module.bn1.running_mean, twin.bn1.running_mean, rtol=0, atol=1e-12)
    assert torch.allclose(module.bn1.running_var, twin.bn1.running_var, rtol=0, atol=1e-12)
    assert module.bn1.num_batches_tracked.item() == twin.bn1.num_batches_tracked.item() == 1
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x] + list(module.parameters()), grad)
    want = torch.autograd.grad(ref, [x] + list(twin.parameters()), grad)
    for g, w in zip(got, want):
        # conv1.bias feeds a training-mode BN: its true gradient is 0 (both sides ~1e-15)
        assert (g - w).norm() <= 1e-10 * w.norm() + 1e-12


@pytest.mark.parametrize("kind", list(MODULES))
def test_module_bad_input(kind):
    cls, fn = MODULES[kind]
    module = cls(16).eval()
    with pytest.raises(ValueError, match="16 channels"):
        fn()(module, torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="empty batch"):
        fn()(module, torch.randn(0, 16, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        fn()(module, torch.ones(1, 16, 4, 4, dtype=torch.int32))


@pytest.mark.parametrize("kind", list(MODULES))
def test_torch_compile_fullgraph(kind):
    cls, fn = MODULES[kind]
    module = randomized(cls(16), torch.float32).eval()
    x = torch.randn(2, 16, 5, 4)
    compiled = torch.compile(lambda t: fn()(module, t), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert rel_err(compiled(x), module(x)) < 1e-5


# ------------------------------------------------------------------------------- CUDA
needs_cuda_build = pytest.mark.skipif(
    not torch.cuda.is_available() or not (has_native() and __import__("saffnet_fast")
                                          .native_build_info().get("with_cuda")),
    reason="no CUDA device or saffnet_fast._C built without CUDA kernels")
CUDA_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@needs_cuda_build
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(CUDA_TOL))
@pytest.mark.parametrize("shape", AFF_SHAPES)
def test_cuda_aff_fuse_forward_backward(shape, dtype):
    # the truth from the inputs as rounded to dtype: what the kernel's own arithmetic adds,
    # not the input quantisation (a bf16 bias gradient summed over 60 values measured 0.15
    # off the unrounded float64 truth, and as close as float32 to the rounded one)
    args64 = [a.detach().to(dtype).double().requires_grad_()
              for a in aff_args(*shape, torch.float64, requires_grad=True)]
    ref = aff_fuse_reference(*args64)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, args64, grad)
    args = [a.detach().to(device="cuda", dtype=dtype).requires_grad_() for a in args64]
    out = OPS.aff_fuse(*args)
    assert rel_err(out.cpu(), ref) < CUDA_TOL[dtype]
    grads = torch.autograd.grad(out, args, grad.to(device="cuda", dtype=dtype))
    for g, r in zip(grads, ref_grads):
        assert rel_err(g.cpu(), r) < CUDA_TOL[dtype] * (10 if dtype in (torch.float16, torch.bfloat16) else 1)
    poisoned = torch.full_like(args[0], float("nan")).to(memory_format=torch.channels_last)
    OPS.aff_fuse_out(*[a.detach() for a in args], poisoned)
    assert not torch.isnan(poisoned).any()


@needs_cuda_build
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", list(MODULES))
def test_cuda_module_parity(kind, dtype):
    cls, fn = MODULES[kind]
    module = randomized(cls(64), torch.float64).eval()
    x = torch.randn(2, 64, 17, 13, dtype=torch.float64)
    with torch.no_grad():
        ref = module(x)
        cuda_module = module.to(device="cuda", dtype=dtype)
        xc = x.to(device="cuda", dtype=dtype)
        assert rel_err(fn()(cuda_module, xc).cpu(), ref) < CUDA_TOL[dtype]
        xcl = xc.to(memory_format=torch.channels_last)
        assert rel_err(fn()(cuda_module, xcl).cpu(), ref) < CUDA_TOL[dtype]


@needs_cuda_build
@pytest.mark.cuda
def test_cuda_gradcheck_and_opcheck():
    args = [a.cuda().detach().requires_grad_() for a in aff_args(2, 6, 3, 4, 2, torch.float64)]
    assert torch.autograd.gradcheck(OPS.aff_fuse, tuple(args))
    torch.library.opcheck(OPS.aff_fuse.default, tuple(args))
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    a_h = torch.rand(2, 3, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    a_w = torch.rand(2, 3, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(OPS.coord_scale, (x, a_h, a_w))
    torch.library.opcheck(OPS.coord_scale.default, (x, a_h, a_w))

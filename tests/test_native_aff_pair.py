"""The drop-in fast AFF: the native op aff_pair (the official AFF(x, residual) on two tensors,
BN folded), the entry point native_aff in both modes, and FastAFF / convert in a model that is
not SAFFNet, against the reference AFF."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import saffnet_fast
from saffnet_fast import has_native
from saffnet_fast.nn import AFF, FastAFF

from parity_utils import native_block, randomize_batchnorm, rel_err

pytestmark = pytest.mark.skipif(not has_native(),
                                reason="saffnet_fast._C not built (pip install -e .)")

if has_native():
    native_aff = native_block("aff")

    OPS = torch.ops.saffnet_fast

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def aff_pair_reference(x, residual, g, w1, b1, w2, b2):
    t = x + residual
    z = torch.einsum("jc,nchw->njhw", w1, t) + b1[:, None, None]
    l = torch.einsum("cj,njhw->nchw", w2, z.relu()) + b2[:, None, None]
    wei = torch.sigmoid(l + g[..., None, None])
    return 2 * x * wei + 2 * residual * (1 - wei)


def pair_args(n, c, h, w, ci, dtype, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=dtype) * scale).requires_grad_(
            requires_grad)

    return [r(n, c, h, w), r(n, c, h, w), r(n, c), r(ci, c, scale=c ** -0.5), r(ci),
            r(c, ci, scale=ci ** -0.5), r(c)]


# (N, C, H, W, Ci): odd and prime sizes, H or W of 1, the pixel tile boundary (W·H = 51,
# 53), and AFF's model widths.
PAIR_SHAPES = [(1, 32, 17, 3, 8), (2, 64, 3, 17, 16), (1, 8, 1, 1, 2), (3, 7, 5, 9, 1),
               (1, 128, 4, 6, 32), (1, 256, 3, 2, 64), (2, 16, 1, 53, 4)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", PAIR_SHAPES)
def test_aff_pair_forward_backward_parity(shape, dtype):
    args = pair_args(*shape, dtype, requires_grad=True)
    out = OPS.aff_pair(*args)
    ref_args = [a.detach().double().requires_grad_() for a in args]
    ref = aff_pair_reference(*ref_args)
    assert out.shape == args[0].shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    grad = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, args, grad.to(dtype))
    want = torch.autograd.grad(ref, ref_args, grad)
    for name, g, w in zip(["x", "residual", "global_logit", "w1", "b1", "w2", "b2"], got, want):
        assert rel_err(g, w) < TOL[dtype], name


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "mixed"])
def test_aff_pair_layouts(layout):
    args = pair_args(2, 12, 5, 7, 3, torch.float64)
    x, residual = args[0], args[1]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        residual = residual.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.cat([x, x], dim=3)[..., ::2]
        residual = residual.transpose(2, 3).contiguous().transpose(2, 3)  # strided view
    else:  # one NCHW, one NHWC
        residual = residual.contiguous(memory_format=torch.channels_last)
    inputs = [x.requires_grad_(), residual.requires_grad_(), *args[2:]]
    out = OPS.aff_pair(*inputs)
    assert rel_err(out, aff_pair_reference(*inputs)) < 1e-10
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs[:2], grad)
    want = torch.autograd.grad(aff_pair_reference(*inputs), inputs[:2], grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10


def test_aff_pair_gradcheck_and_opcheck():
    args = pair_args(2, 6, 3, 4, 2, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(OPS.aff_pair, tuple(args))
    torch.library.opcheck(OPS.aff_pair.default, tuple(args))
    plain = [a.detach() for a in args]
    torch.library.opcheck(OPS.aff_pair_backward.default, (torch.randn_like(plain[0]), *plain))


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda a: a.__setitem__(1, a[1][:, :, :2]), ValueError, ["residual", "shape"]),
    (lambda a: a.__setitem__(1, a[1].float()), TypeError, ["residual", "dtype"]),
    (lambda a: a.__setitem__(3, a[3][:, :5]), ValueError, ["w1", "C = 6"]),
    (lambda a: a.__setitem__(2, a[2][:1]), ValueError, ["global_logit", "shape"]),
    (lambda a: a.__setitem__(0, a[0][:0]), ValueError, ["x", "empty batch"]),
])
def test_aff_pair_bad_input(mutate, exc, words):
    args = pair_args(2, 6, 3, 4, 2, torch.float64)
    mutate(args)
    with pytest.raises(exc) as info:
        OPS.aff_pair(*args)
    for word in words:
        assert word in str(info.value)


# -------------------------------------------------------------- native_aff, both modes
def randomized_aff(channels, r, dtype, seed=0):
    torch.manual_seed(seed)
    return randomize_batchnorm(AFF(channels, r), seed).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, r", [((2, 64, 7, 5), 4), ((1, 32, 3, 17), 4),
                                      ((3, 16, 1, 9), 16), ((2, 128, 4, 4), 4)])
def test_native_aff_eval_parity(shape, r, dtype):
    module = randomized_aff(shape[1], r, dtype).eval()
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    residual = torch.randn(shape, dtype=dtype, requires_grad=True)
    out = native_aff(module, x, residual)
    ref = module(x, residual)
    assert rel_err(out, ref) < TOL[dtype]
    grad = torch.randn_like(out)
    params = list(module.parameters())
    got = torch.autograd.grad(out, [x, residual] + params, grad)
    want = torch.autograd.grad(ref, [x, residual] + params, grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 10 * TOL[dtype]


class _TwoInputs(nn.Module):
    """A one-input wrapper for the training-parity helper: AFF(x, tanh(x flipped))."""

    def __init__(self, aff: nn.Module):
        super().__init__()
        self.aff = aff

    @staticmethod
    def residual(x):
        return torch.tanh(x.flip(-1)) + 0.25

    def forward(self, x):
        return self.aff(x, self.residual(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 32, 7, 5), (4, 16, 1, 3), (3, 64, 4, 9)])
def test_native_aff_training_parity(shape, dtype, local_branch):
    from test_native_training import train_step_parity
    module = _TwoInputs(randomized_aff(shape[1], 4, dtype)).train()
    fn = lambda m, x: native_aff(m.aff, x, m.residual(x))  # noqa: E731
    train_step_parity(module, fn, torch.randn(shape, dtype=dtype), dtype)


def test_native_aff_training_gradcheck(local_branch):
    module = randomized_aff(8, 4, torch.float64, seed=3).train()
    for m in module.modules():  # gradcheck calls forward many times: keep statistics fixed
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: native_aff(module, a, b), (x, residual))


def test_native_aff_checks_like_the_reference():
    module = AFF(16, 4).eval()
    x = torch.randn(1, 16, 3, 3)
    with pytest.raises(ValueError, match="residual: expected the shape of x"):
        native_aff(module, x, torch.randn(1, 16, 3, 4))
    with pytest.raises(ValueError, match="residual: expected x's dtype"):
        native_aff(module, x, x.double())
    with pytest.raises(ValueError, match="x: expected 16 channels"):
        native_aff(module, torch.randn(1, 8, 3, 3), torch.randn(1, 8, 3, 3))


# ------------------------------------------------------------- FastAFF and convert
class UserFusion(nn.Module):
    """A user's model that is not SAFFNet: two conv branches fused by the official AFF."""

    def __init__(self):
        super().__init__()
        self.branch_a = nn.Conv2d(3, 32, 3, padding=1)
        self.branch_b = nn.Conv2d(3, 32, 5, padding=2)
        self.fuse = AFF(32, 4)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.head(self.fuse(self.branch_a(x), self.branch_b(x)))


def test_fast_aff_state_dict_and_backends():
    ref = randomized_aff(32, 4, torch.float32).eval()
    fast = FastAFF(32, 4, backend="native").eval()
    fast.load_state_dict(ref.state_dict())
    assert list(fast.state_dict()) == list(ref.state_dict())
    x, residual = torch.randn(2, 32, 6, 5), torch.randn(2, 32, 6, 5)
    with torch.no_grad():
        assert rel_err(fast(x, residual), ref(x, residual)) < 1e-5
    with saffnet_fast.use_backend("reference"):
        fast_ref = FastAFF(32, 4).eval()
        fast_ref.load_state_dict(ref.state_dict())
        with torch.no_grad():
            assert rel_err(fast_ref(x, residual), ref(x, residual)) < 1e-6


def test_convert_swaps_a_users_aff_and_back():
    torch.manual_seed(0)
    model = UserFusion()
    randomize_batchnorm(model)
    twin = copy.deepcopy(model)
    params_before = [id(p) for p in model.parameters()]
    saffnet_fast.convert(model, backend="native")
    assert type(model.fuse) is FastAFF
    assert [id(p) for p in model.parameters()] == params_before
    x = torch.randn(3, 3, 9, 7)
    for train in (True, False):
        model.train(train), twin.train(train)
        out, ref = model(x), twin(x)
        assert rel_err(out, ref) < 1e-5
        out.square().mean().backward()
        ref.square().mean().backward()
        for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
            if name.endswith(("local_att.0.bias", "local_att.3.bias", "global_att.1.bias",
                              "global_att.4.bias")) and train:
                continue  # zero in exact arithmetic (a conv bias before a training BN)
            assert rel_err(p.grad, q.grad) < 1e-4, name
        model.zero_grad(), twin.zero_grad()
    saffnet_fast.convert(model, backend="reference")
    assert type(model.fuse) is AFF


def test_fast_aff_torch_compile_fullgraph():
    module = FastAFF(16, 4, backend="native").eval()
    randomize_batchnorm(module)
    x, residual = torch.randn(2, 16, 5, 4), torch.randn(2, 16, 5, 4)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert rel_err(compiled(x, residual), AFF.forward(module, x, residual)) < 1e-5


def test_fast_aff_training_torch_compile_fullgraph(local_branch):
    module = randomize_batchnorm(FastAFF(16, 4, backend="native")).double().train()
    twin = copy.deepcopy(module)
    x, residual = torch.randn(3, 16, 5, 4, dtype=torch.float64), torch.randn(3, 16, 5, 4,
                                                                           dtype=torch.float64)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = compiled(x1, residual), AFF.forward(twin, x2, residual)
    assert rel_err(out, ref) < 1e-10
    out.sum().backward()
    ref.sum().backward()
    assert rel_err(x1.grad, x2.grad) < 1e-10
    for (name, got), (_, want) in zip(module.named_buffers(), twin.named_buffers()):
        assert rel_err(got.double(), want.double()) < 1e-10, name


def test_optimize_for_inference_with_a_users_aff():
    torch.manual_seed(0)
    model = UserFusion()
    randomize_batchnorm(model)
    x = torch.randn(2, 3, 8, 6)
    with torch.no_grad():
        expected = model.eval()(x)
    optimized = saffnet_fast.optimize_for_inference(model, example_input=x)
    assert type(optimized.fuse) is FastAFF
    with torch.no_grad():
        assert rel_err(optimized(x.contiguous(memory_format=torch.channels_last)),
                       expected) < 1e-4

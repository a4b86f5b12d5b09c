"""Native split_resplice (SR(C, s), inference form) against the reference SplitResplice."""
from __future__ import annotations

import pytest
import torch

from saffnet_fast import has_native
from saffnet_fast.nn.reference import SplitResplice

from parity_utils import randomize_batchnorm, rel_err

pytestmark = pytest.mark.skipif(not has_native(),
                                reason="saffnet_fast._C not built (pip install -e .)")

if has_native():
    from saffnet_fast.ops import native_split_resplice
    from saffnet_fast.ops.native import _fold_bn

    OPS = torch.ops.saffnet_fast

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def randomized(module, dtype, seed=0):
    return randomize_batchnorm(module, seed).to(dtype).eval()


def folded(module):
    pairs = [_fold_bn(step.conv, step.bn) for step in module.steps]
    return ([w.reshape(step.conv.weight.shape).detach() for (w, _), step in
             zip(pairs, module.steps)], [b.detach() for _, b in pairs])


SHAPES = [((1, 32, 17, 3), 8), ((2, 64, 3, 17), 8), ((1, 64, 1, 1), 8), ((1, 128, 6, 5), 8),
          ((1, 256, 3, 3), 8), ((3, 12, 5, 7), 4), ((2, 6, 4, 4), 2), ((1, 24, 9, 1), 3),
          # W = 53: the CPU kernel's row groups of 3 and 2 vector chunks with a partial last
          # chunk (float: 4 chunks as 2 + 2; double: 7 as 3 + 3 + 1)
          ((1, 64, 2, 53), 8)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, splits", SHAPES)
def test_forward_parity(shape, splits, dtype):
    module = randomized(SplitResplice(shape[1], splits), dtype)
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        ref = module(x)
        assert rel_err(native_split_resplice(module, x), ref) < TOL[dtype]
        xcl = x.to(memory_format=torch.channels_last)
        assert rel_err(native_split_resplice(module, xcl), ref) < TOL[dtype]
        wide = torch.randn(shape[0], shape[1] + 3, shape[2], shape[3] * 2, dtype=dtype)
        xs = wide[:, 1:-2, :, ::2]
        assert rel_err(native_split_resplice(module, xs), module(xs)) < TOL[dtype]


def test_out_variant_poisoned():
    module = randomized(SplitResplice(64, 8), torch.float64)
    x = torch.randn(2, 64, 5, 7, dtype=torch.float64)
    weights, biases = folded(module)
    _, carries_shape_ref = OPS.split_resplice(x, weights, biases, 0.1)
    out = torch.full_like(x, float("nan"))
    carries = torch.full_like(carries_shape_ref, float("nan"))
    OPS.split_resplice_out(x, weights, biases, 0.1, out, carries)
    assert not torch.isnan(out).any() and not torch.isnan(carries).any()
    with torch.no_grad():
        assert rel_err(out, module(x)) < 1e-10


@pytest.mark.parametrize("splits, channels", [(8, 8), (4, 8), (2, 4)])
def test_gradcheck(splits, channels):
    module = randomized(SplitResplice(channels, splits), torch.float64, seed=1)
    weights, biases = folded(module)
    weights = [w.requires_grad_() for w in weights]
    biases = [b.requires_grad_() for b in biases]
    x = torch.randn(1, channels, 4, 3, dtype=torch.float64, requires_grad=True)
    n = len(weights)

    def fn(x, *params):
        return OPS.split_resplice(x, list(params[:n]), list(params[n:]), 0.1)[0]

    assert torch.autograd.gradcheck(fn, (x, *weights, *biases))


def test_module_gradients_reach_parameters():
    module = randomized(SplitResplice(32, 8), torch.float64, seed=2)
    x = torch.randn(2, 32, 5, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 32, 5, 4, dtype=torch.float64)
    params = list(module.parameters())
    got = torch.autograd.grad(native_split_resplice(module, x), [x] + params, grad)
    want = torch.autograd.grad(module(x), [x] + params, grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10


def test_opcheck():
    module = randomized(SplitResplice(16, 8), torch.float64)
    weights, biases = folded(module)
    x = torch.randn(2, 16, 3, 4, dtype=torch.float64)
    torch.library.opcheck(OPS.split_resplice.default, (x, weights, biases, 0.1))
    _, carries = OPS.split_resplice(x, weights, biases, 0.1)
    torch.library.opcheck(OPS.split_resplice_out.default,
                          (x, weights, biases, 0.1, torch.empty_like(x), torch.empty_like(carries)))


def test_torch_compile_fullgraph():
    module = randomized(SplitResplice(16, 8), torch.float32)
    x = torch.randn(2, 16, 5, 4)
    compiled = torch.compile(lambda t: native_split_resplice(module, t), fullgraph=True,
                             backend="aot_eager")
    with torch.no_grad():
        assert rel_err(compiled(x), module(x)) < 1e-5


def test_bad_input():
    module = randomized(SplitResplice(16, 8), torch.float64)
    weights, biases = folded(module)
    x = torch.randn(1, 16, 3, 3, dtype=torch.float64)
    # widths for C = 16, s = 8: [2, 3, 3, 3, 3, 3, 3]
    with pytest.raises(ValueError, match=r"weights\[2\]: expected shape \[3, 3, 3, 3\]"):
        OPS.split_resplice(x, weights[:2] + [weights[0]] + weights[3:], biases, 0.1)
    with pytest.raises(ValueError, match="divisible by splits"):
        OPS.split_resplice(torch.randn(1, 17, 3, 3, dtype=torch.float64), weights, biases, 0.1)
    with pytest.raises(TypeError, match=r"weights\[0\]: expected dtype"):
        OPS.split_resplice(x, [weights[0].float()] + weights[1:], biases, 0.1)
    with pytest.raises(ValueError, match="biases: expected 7"):
        OPS.split_resplice(x, weights, biases[:6], 0.1)
    with pytest.raises(ValueError, match="16 channels"):
        native_split_resplice(module, torch.randn(1, 8, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty batch"):
        native_split_resplice(module, torch.randn(0, 16, 3, 3, dtype=torch.float64))


# ------------------------------------------------------------------------------- CUDA
needs_cuda_build = pytest.mark.skipif(
    not torch.cuda.is_available() or not (has_native() and __import__("saffnet_fast")
                                          .native_build_info().get("with_cuda")),
    reason="no CUDA device or saffnet_fast._C built without CUDA kernels")


@needs_cuda_build
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape, splits", SHAPES)
def test_cuda_forward_parity(shape, splits, dtype):
    module = randomized(SplitResplice(shape[1], splits), torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        ref = module(x)
        cuda_module = module.to(device="cuda", dtype=dtype)
        out = native_split_resplice(cuda_module, x.to(device="cuda", dtype=dtype))
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
    assert rel_err(out.cpu(), ref) < tol


@needs_cuda_build
@pytest.mark.cuda
def test_cuda_out_poisoned_and_grad():
    module = randomized(SplitResplice(64, 8), torch.float64).cuda()
    x = torch.randn(2, 64, 9, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    weights, biases = folded(module)
    _, carries_ref = OPS.split_resplice(x.detach(), weights, biases, 0.1)
    out = torch.full_like(x, float("nan"), requires_grad=False)
    carries = torch.full_like(carries_ref, float("nan"))
    OPS.split_resplice_out(x.detach(), weights, biases, 0.1, out, carries)
    assert not torch.isnan(out).any() and not torch.isnan(carries).any()
    grad = torch.randn_like(out)
    params = list(module.parameters())
    got = torch.autograd.grad(native_split_resplice(module, x), [x] + params, grad)
    want = torch.autograd.grad(module(x), [x] + params, grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10

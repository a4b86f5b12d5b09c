"""Native coord_pool (saffnet_fast._C): parity with (x.mean(3), x.mean(2)), strides, poisoned
outputs, gradients, opcheck, errors, and the missing-extension fallback."""
from __future__ import annotations

import pytest
import torch

import saffnet_fast
from saffnet_fast import has_native

from parity_utils import rel_err

pytestmark = pytest.mark.skipif(not has_native(),
                                reason="saffnet_fast._C not built (pip install -e .)")

if has_native():
    from saffnet_fast.ops import kernel

    native_coord_pool = kernel("coord_pool", "native")

    OPS = torch.ops.saffnet_fast

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
SHAPES = [
    (1, 32, 17, 3), (2, 64, 1, 17), (1, 128, 3, 1), (2, 256, 8, 6), (3, 7, 17, 17),
    (1, 1, 1, 1), (2, 5, 9, 33), (1, 3, 64, 48),
]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def check_parity(x: torch.Tensor) -> None:
    pool_h, pool_w = native_coord_pool(x)
    ref_h, ref_w = x.double().mean(3), x.double().mean(2)
    assert pool_h.shape == ref_h.shape and pool_w.shape == ref_w.shape
    assert pool_h.dtype == x.dtype and pool_w.dtype == x.dtype
    assert torch.isfinite(pool_h).all() and torch.isfinite(pool_w).all()
    assert rel_err(pool_h, ref_h) < TOL[x.dtype]
    assert rel_err(pool_w, ref_w) < TOL[x.dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_parity(shape, dtype):
    torch.manual_seed(0)
    check_parity(torch.randn(shape, dtype=dtype) + 0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 64, 17, 3), (1, 3, 5, 7), (2, 130, 4, 4), (1, 1, 3, 3)])
def test_channels_last(shape, dtype):
    x = torch.randn(shape, dtype=dtype).to(memory_format=torch.channels_last)
    check_parity(x)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(2, 40, 20, 18, dtype=torch.float64)[:, 3:35:2, 1:18, ::3],
    lambda: torch.randn(2, 9, 11, 6, dtype=torch.float64).permute(0, 1, 3, 2),
    lambda: torch.randn(5, 2, 7, 3, dtype=torch.float64).permute(1, 0, 2, 3),
    lambda: torch.randn(3, 1, 1, 1, dtype=torch.float64).expand(3, 4, 5, 6),
    lambda: torch.randn(2, 6, 7, 8, dtype=torch.float32).permute(0, 3, 2, 1),
])
def test_non_contiguous(make):
    x = make()
    assert not x.is_contiguous()
    check_parity(x)


@pytest.mark.parametrize("channels_last", [False, True])
def test_out_variant_writes_every_element(channels_last):
    x = torch.randn(2, 33, 17, 5, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    pool_h = torch.full((2, 33, 17), float("nan"), dtype=torch.float64)
    # a strided (non-contiguous) output view must be honoured too
    pool_w_storage = torch.full((2, 33, 10), float("nan"), dtype=torch.float64)
    pool_w = pool_w_storage[:, :, ::2]
    OPS.coord_pool_out(x, pool_h, pool_w)
    assert not torch.isnan(pool_h).any() and not torch.isnan(pool_w).any()
    assert rel_err(pool_h, x.mean(3)) < 1e-10 and rel_err(pool_w, x.mean(2)) < 1e-10
    assert torch.isnan(pool_w_storage[:, :, 1::2]).all(), "wrote outside the output view"


def test_backward_matches_reference():
    torch.manual_seed(1)
    x = torch.randn(2, 7, 5, 9, dtype=torch.float64, requires_grad=True)
    gh, gw = torch.randn(2, 7, 5, dtype=torch.float64), torch.randn(2, 7, 9, dtype=torch.float64)
    pool_h, pool_w = native_coord_pool(x)
    (grad,) = torch.autograd.grad((pool_h * gh).sum() + (pool_w * gw).sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    (ref,) = torch.autograd.grad((x_ref.mean(3) * gh).sum() + (x_ref.mean(2) * gw).sum(), x_ref)
    assert rel_err(grad, ref) < 1e-10
    # only one of the two outputs used: the other gradient is None inside autograd
    (grad_h_only,) = torch.autograd.grad((native_coord_pool(x)[0] * gh).sum(), x)
    assert rel_err(grad_h_only, (gh / 9).unsqueeze(-1).expand(2, 7, 5, 9)) < 1e-12


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 1, 3), (1, 4, 3, 1)])
def test_gradcheck(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(native_coord_pool, (x,))
    assert torch.autograd.gradgradcheck(native_coord_pool, (x,))
    xcl = torch.randn(shape, dtype=torch.float64).to(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(native_coord_pool, (xcl.requires_grad_(),))


def test_opcheck():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(OPS.coord_pool.default, (x,))
    torch.library.opcheck(OPS.coord_pool.default,
                          (torch.randn(1, 8, 3, 6).to(memory_format=torch.channels_last),))
    torch.library.opcheck(OPS.coord_pool_backward.default,
                          (torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True),
                           torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)))
    torch.library.opcheck(OPS.coord_pool_out.default,
                          (x.detach(), torch.empty(2, 3, 5, dtype=torch.float64),
                           torch.empty(2, 3, 4, dtype=torch.float64)))


def test_torch_compile_fullgraph():
    x = torch.randn(2, 8, 6, 5, requires_grad=True)
    fn = torch.compile(lambda t: native_coord_pool(t)[0].sum() * 2 + native_coord_pool(t)[1].sum(),
                       fullgraph=True, backend="aot_eager")
    out = fn(x)
    out.backward()
    ref = x.detach().mean(3).sum() * 2 + x.detach().mean(2).sum()
    assert torch.allclose(out, ref, rtol=1e-5)
    assert torch.allclose(x.grad, torch.full_like(x, 2 / 5 + 1 / 6), rtol=1e-5)


@pytest.mark.parametrize("bad, exc, words", [
    (lambda: torch.randn(2, 3, 4), ValueError, ["x", "4-D"]),
    (lambda: torch.randn(2, 3, 4, 5, 6), ValueError, ["x", "4-D"]),
    (lambda: torch.ones(2, 3, 4, 5, dtype=torch.int64), TypeError, ["x", "floating"]),
    (lambda: torch.randn(0, 3, 4, 5), ValueError, ["x", "empty batch"]),
    (lambda: torch.randn(1, 3, 0, 5), ValueError, ["x", "H and W"]),
    (lambda: torch.randn(1, 3, 4, 5).half(), TypeError, ["x", "float32 or float64"]),
])
def test_bad_input_errors(bad, exc, words):
    with pytest.raises(exc) as info:
        native_coord_pool(bad())
    message = str(info.value)
    assert "coord_pool" in message
    for word in words:
        assert word in message


def test_out_variant_rejects_wrong_outputs():
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="pool_h: expected shape"):
        OPS.coord_pool_out(x, torch.empty(2, 3, 5), torch.empty(2, 3, 5))
    with pytest.raises(TypeError, match="pool_w: expected dtype"):
        OPS.coord_pool_out(x, torch.empty(2, 3, 4), torch.empty(2, 3, 5, dtype=torch.float64))


def test_build_info():
    info = saffnet_fast.native_build_info()
    for key in ("with_cuda", "torch_version", "cuda_version", "debug"):
        assert key in info
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["with_cuda"], bool)


# ------------------------------------------------------------------------------- CUDA
@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES + [(2, 32, 5, 2000)])
def test_cuda_forward_parity(shape, dtype):
    if not saffnet_fast.native_build_info().get("with_cuda"):
        pytest.skip("saffnet_fast._C built without CUDA kernels")
    x = torch.randn(shape, device="cuda", dtype=dtype)
    check_parity(x)
    check_parity(x.to(memory_format=torch.channels_last))
    check_parity(x[:, :, ::2])


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_backward_parity(dtype):
    if not saffnet_fast.native_build_info().get("with_cuda"):
        pytest.skip("saffnet_fast._C built without CUDA kernels")
    x = torch.randn(2, 64, 17, 3, device="cuda", dtype=dtype, requires_grad=True)
    gh = torch.randn(2, 64, 17, device="cuda", dtype=dtype)
    gw = torch.randn(2, 64, 3, device="cuda", dtype=dtype)
    pool_h, pool_w = native_coord_pool(x)
    (grad,) = torch.autograd.grad((pool_h * gh).sum() + (pool_w * gw).sum(), x)
    ref = gh.float().unsqueeze(-1) / 3 + gw.float().unsqueeze(-2) / 17
    assert rel_err(grad, ref) < TOL[dtype]
    out_h = torch.full((2, 64, 17), float("nan"), device="cuda", dtype=dtype)
    out_w = torch.full((2, 64, 3), float("nan"), device="cuda", dtype=dtype)
    OPS.coord_pool_out(x.detach(), out_h, out_w)
    assert not torch.isnan(out_h).any() and not torch.isnan(out_w).any()


@needs_cuda
@pytest.mark.cuda
def test_cuda_gradcheck_and_opcheck():
    if not saffnet_fast.native_build_info().get("with_cuda"):
        pytest.skip("saffnet_fast._C built without CUDA kernels")
    x = torch.randn(2, 3, 4, 5, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(native_coord_pool, (x,))
    torch.library.opcheck(OPS.coord_pool.default, (x,))

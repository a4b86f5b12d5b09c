"""The per-module cache of folded (BN-into-conv) parameters used by the native entry points
in eval mode: it must serve exactly what a fresh fold would, and never a stale or
gradient-less copy when autograd needs the parameters."""
from __future__ import annotations

import copy

import pytest
import torch

from saffnet_fast import has_native
from saffnet_fast.nn.reference import SAWF, SCAFF, SplitResplice

from parity_utils import native_block, randomize_batchnorm, rel_err

pytestmark = pytest.mark.skipif(not has_native(),
                                reason="saffnet_fast._C not built (pip install -e .)")

if has_native():
    from saffnet_fast.fast import bn

    native_scaff = native_block("scaff")
    native_sawf = native_block("sawf")
    native_split_resplice = native_block("split_resplice")

MODULES = {
    "scaff": (lambda: SCAFF(16), lambda: native_scaff),
    "sawf": (lambda: SAWF(16, aff_r=4), lambda: native_sawf),
    "split_resplice": (lambda: SplitResplice(16), lambda: native_split_resplice),
}


def make(kind, dtype=torch.float64, seed=0):
    factory, fn = MODULES[kind]
    torch.manual_seed(seed)
    module = randomize_batchnorm(factory(), seed)
    return module.to(dtype).eval(), fn()


def first_bn(module):
    return next(m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))


def check(module, fn, x, tol=1e-10):
    with torch.no_grad():
        assert rel_err(fn(module, x), module(x)) < tol


@pytest.fixture(autouse=True)
def _empty_cache():
    bn.clear_folded_cache()
    yield
    bn.clear_folded_cache()


@pytest.mark.parametrize("kind", list(MODULES))
def test_cache_is_used_and_serves_the_same_result(kind):
    module, fn = make(kind)
    x = torch.randn(2, 16, 5, 4, dtype=torch.float64)
    with torch.inference_mode():
        first = fn(module, x)
        assert module in bn._FOLDED_CACHE
        entry = bn._FOLDED_CACHE[module]
        second = fn(module, x)
        assert bn._FOLDED_CACHE[module] is entry      # a hit, not a rebuild
    assert torch.equal(first, second)
    check(module, fn, x)


@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("change", ["weight_inplace", "running_var_inplace", "data_swap",
                                    "buffer_replaced", "eps"])
def test_cache_invalidates_on_change(kind, change):
    module, fn = make(kind)
    x = torch.randn(1, 16, 4, 3, dtype=torch.float64)
    check(module, fn, x)
    bn = first_bn(module)
    with torch.no_grad():
        if change == "weight_inplace":
            bn.weight.mul_(3.0)
        elif change == "running_var_inplace":
            bn.running_var.add_(2.0)
        elif change == "data_swap":
            bn.weight.data = bn.weight.data * -2.0
        elif change == "buffer_replaced":
            bn.running_mean = torch.full_like(bn.running_mean, 0.75)
        else:
            bn.eps = 0.5
    check(module, fn, x)


@pytest.mark.parametrize("kind", list(MODULES))
def test_cache_follows_dtype_change(kind):
    module, fn = make(kind, torch.float64)
    x = torch.randn(1, 16, 4, 3, dtype=torch.float64)
    check(module, fn, x)
    module.float()
    check(module, fn, x.float(), tol=1e-5)
    module.double()
    check(module, fn, x)


@pytest.mark.parametrize("kind", list(MODULES))
def test_gradients_never_come_from_the_cache(kind):
    module, fn = make(kind)
    x = torch.randn(1, 16, 4, 3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        fn(module, x)                                    # fills the cache
    params = list(module.parameters())
    grad_out = torch.randn(1, 16, 4, 3, dtype=torch.float64)
    got = torch.autograd.grad(fn(module, x), [x] + params, grad_out, allow_unused=True)
    want = torch.autograd.grad(module(x), [x] + params, grad_out, allow_unused=True)
    for g, w in zip(got, want):
        if w is None or w.abs().max() == 0:
            assert g is None or g.abs().max() == 0
        else:
            assert g is not None and rel_err(g, w) < 1e-10


@pytest.mark.parametrize("kind", list(MODULES))
def test_frozen_parameters_with_input_grad_after_inference_mode(kind):
    """Entries built under inference_mode must be plain tensors: autograd saves them when
    only the input needs a gradient."""
    module, fn = make(kind)
    module.requires_grad_(False)
    x = torch.randn(1, 16, 4, 3, dtype=torch.float64)
    with torch.inference_mode():
        fn(module, x)
    xg = x.clone().requires_grad_(True)
    grad_out = torch.randn_like(x)
    (got,) = torch.autograd.grad(fn(module, xg), xg, grad_out)
    (want,) = torch.autograd.grad(module(xg), xg, grad_out)
    assert rel_err(got, want) < 1e-10


def test_training_mode_bypasses_the_cache():
    """Training folds BN from batch statistics per call: a cached eval-mode folding must not
    leak into it (tests/test_native_training.py checks training parity in full)."""
    module, fn = make("scaff")
    check(module, fn, torch.randn(1, 16, 4, 3, dtype=torch.float64))
    module.train()
    twin = copy.deepcopy(module)
    x = torch.randn(2, 16, 4, 3, dtype=torch.float64)
    assert rel_err(fn(module, x), twin(x)) < 1e-10
"""backend='auto' on CUDA avoids the ops of fast.dispatch.CUDA_UNROUTED (their GPU kernels
fail the compiled-kernel bar, benchmarks/kernel_report.py) and the blocks take their other
forms. Those forms are device-independent code, so their parity with the reference is
checked here on the CPU by handing the native block algorithms the avoid set auto uses on
CUDA; the kernel report's waivers are derived from the same table."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from saffnet_fast import has_native
from saffnet_fast.fast import blocks
from saffnet_fast.fast.dispatch import CUDA_UNROUTED, avoided_ops
from saffnet_fast.nn.reference import AFF, SAWF, SCAFF, SplitResplice

from parity_utils import randomize_batchnorm, rel_err

pytestmark = pytest.mark.skipif(not has_native(), reason="saffnet_fast._C not built")

ROOT = Path(__file__).resolve().parents[1]
AVOID = avoided_ops("native", torch.device("cuda"))
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def test_avoid_sets():
    assert avoided_ops("native", torch.device("cpu")) == frozenset()
    assert {"aff_fuse", "aff_pair", "aff_moments", "split_resplice",
            "split_resplice_tiled"} <= AVOID
    # the forms auto takes instead must stay routable
    assert not AVOID & {"aff_input", "aff_combine", "aff_pair_combine", "coord_pool",
                        "coord_scale", "plane_mean", "split_resplice_train"}
    triton = avoided_ops("triton", torch.device("cuda"))
    # Triton's one-pass AFF forwards (tensor-core dots, no spills) are routed, their
    # backward kernels are not
    assert {"aff_fuse.backward", "aff_pair.backward"} <= triton
    assert not triton & {"split_resplice_tiled", "aff_fuse", "aff_pair"}


def test_avoided_backward_keeps_the_forward_without_autograd(monkeypatch):
    """"<op>.backward" in the avoid set: a call that needs autograd takes the other form (the
    GEMM local branch), one without autograd keeps the fused op."""
    module = _block("scaff", 32).eval()
    x = torch.randn(2, 32, 5, 4)
    gemm_calls = []
    original = blocks._gemm_local_logit
    monkeypatch.setattr(blocks, "_gemm_local_logit",
                        lambda *a: gemm_calls.append(1) or original(*a))
    avoid = frozenset({"aff_fuse.backward"})
    with torch.no_grad():
        want = module(x)
        out = blocks.scaff(module, x, backend="native", avoid=avoid)
    assert gemm_calls == [] and rel_err(out, want) < 2e-5
    out = blocks.scaff(module, x.requires_grad_(), backend="native", avoid=avoid)
    assert gemm_calls == [1] and rel_err(out, want) < 2e-5


def _block(kind, c):
    torch.manual_seed(0)
    module = {"scaff": lambda: SCAFF(c), "sawf": lambda: SAWF(c, se_reduction=4),
              "aff": lambda: AFF(c, r=4)}[kind]()
    return randomize_batchnorm(module, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 32, 7, 5), (3, 64, 13, 11), (1, 32, 1, 17)])
@pytest.mark.parametrize("kind", ["scaff", "sawf", "aff"])
def test_inference_local_branch_as_gemms_matches_reference(kind, shape, dtype):
    """Eval mode, forward and every gradient: aff_input, two GEMMs, aff_combine (or
    aff_pair_combine) against the reference module."""
    module = _block(kind, shape[1]).to(dtype).eval()
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    inputs = (x, torch.randn(shape, dtype=dtype, requires_grad=True)) if kind == "aff" else (x,)
    ref = module(*inputs)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, inputs + tuple(module.parameters()), grad)
    out = getattr(blocks, kind)(module, *inputs, backend="native", avoid=AVOID)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    grads = torch.autograd.grad(out, inputs + tuple(module.parameters()), grad)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < TOL[dtype] * 10
    with torch.no_grad():
        assert rel_err(getattr(blocks, kind)(module, *inputs, backend="native", avoid=AVOID),
                       ref) < TOL[dtype]


@pytest.mark.parametrize("kind", ["scaff", "sawf", "aff"])
def test_training_with_the_avoid_set_is_the_stored_branch(kind):
    """Training under the CUDA avoid set runs the stored local branch (no aff_fuse /
    aff_pair / aff_moments): output, gradients and running statistics as the reference."""
    ref_module = _block(kind, 32).double().train()
    module = _block(kind, 32).double().train()
    x = torch.randn(3, 32, 9, 7, dtype=torch.float64)
    inputs = (x, torch.randn_like(x)) if kind == "aff" else (x,)
    ref = ref_module(*inputs)
    out = getattr(blocks, kind)(module, *inputs, backend="native", avoid=AVOID)
    assert rel_err(out, ref) < 1e-10
    ref.square().sum().backward()
    out.square().sum().backward()
    scale = max(q.grad.abs().max().item() for q in ref_module.parameters())
    for (name, p), q in zip(module.named_parameters(), ref_module.parameters()):
        # absolute against the largest gradient: a bias before a batch-statistics BN has a
        # gradient of zero plus rounding, where a relative error means nothing
        assert (p.grad - q.grad).abs().max().item() < 1e-9 * scale, name
    for b, r in zip(module.buffers(), ref_module.buffers()):
        assert torch.allclose(b.double(), r.double(), rtol=1e-9, atol=1e-12)


def test_avoided_op_without_another_form_is_not_implemented():
    """SR inference on the native backend needs split_resplice(_tiled), both avoided: the
    dispatch then moves on (Triton's tensor-core split_resplice_tiled, else the reference)."""
    module = SplitResplice(16, 4).eval()
    with pytest.raises(NotImplementedError, match="split_resplice"):
        blocks.split_resplice(module, torch.randn(2, 16, 5, 6), backend="native", avoid=AVOID)
    train = SplitResplice(16, 4).train()
    out = blocks.split_resplice(train, torch.randn(2, 16, 5, 6), backend="native", avoid=AVOID)
    assert out.shape == (2, 16, 5, 6)


def test_kernel_report_waives_exactly_the_unrouted_kernels():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import kernel_report as kr
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    kernels = {k for ks, _ in CUDA_UNROUTED.values() for k in ks}
    assert set(kr.NOT_ROUTED) == kernels
    assert kernels <= {k for k, (matrix, _) in kr.MATRIX_KERNELS.items() if matrix}
    # the recorded report: every failure it found is a kernel auto no longer routes to
    recorded = sorted((ROOT / "benchmarks" / "results").glob("kernel-report-*.json"))
    if not recorded:
        pytest.skip("no recorded kernel report")
    rows = json.loads(recorded[-1].read_text())["kernels"]
    failures, _ = kr.check_failures(rows)
    assert failures == []


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("kind", ["scaff", "sawf", "aff"])
def test_inference_local_branch_as_gemms_non_contiguous(kind, layout):
    """The GEMM form on channels_last and sliced (non-dense) inputs: output and gradients as
    the reference's."""
    module = _block(kind, 32).double().eval()

    if layout == "sliced":  # channel slices of one tensor: views, not dense
        base = torch.randn(2, 40, 7, 5, dtype=torch.float64, requires_grad=True)
        inputs = (base[:, 3:35],) if kind != "aff" else (base[:, 3:35], base[:, 5:37])
        leaves = (base,)
    else:
        inputs = tuple(torch.randn(2, 32, 7, 5, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last).requires_grad_()
            for _ in range(2 if kind == "aff" else 1))
        leaves = inputs
    assert not inputs[0].is_contiguous()
    ref = module(*inputs)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves + tuple(module.parameters()), grad)
    out = getattr(blocks, kind)(module, *inputs, backend="native", avoid=AVOID)
    assert rel_err(out, ref) < 1e-10
    for g, r in zip(torch.autograd.grad(out, leaves + tuple(module.parameters()), grad),
                    ref_grads):
        assert rel_err(g, r) < 1e-9

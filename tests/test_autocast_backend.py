"""`auto` for every dtype: mixed-precision training and inference with the default backend
(the fused kernels run in the parameters' dtype under autocast), one fallback warning per
distinct reason when no fused kernel takes the input, and a clear error for an explicit
backend that cannot."""
import copy
import warnings

import pytest
import torch
from torch import nn

from saffnet_fast import backend as backend_module
from saffnet_fast import has_native, use_backend
from saffnet_fast.backend import BackendUnavailableError, backend_unavailable_reason
from saffnet_fast.engine.config import load_config
from saffnet_fast.engine.modeling import build_model_from_config
from saffnet_fast.engine.trainer import Trainer
from saffnet_fast.models import build_model
from saffnet_fast.fast import (FastAFF, FastCoordAttention, FastSAWF, FastSCAFF,
                                  FastSplitResplice)
from saffnet_fast.fast import dispatch

from parity_utils import randomize_batchnorm, rel_err

needs_native = pytest.mark.skipif(not has_native(), reason="saffnet_fast._C not built")
AMP_DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _clean_selection(monkeypatch):
    monkeypatch.delenv("SAFFNET_BACKEND", raising=False)
    backend_module._warned.clear()
    yield
    backend_module._warned.clear()


def _fallback_warnings(caught):
    return [str(w.message) for w in caught
            if issubclass(w.category, RuntimeWarning) and "saffnet_fast" in str(w.message)]


def _native_serves(device: str) -> bool:
    return backend_unavailable_reason("native", device) is None


# --------------------------------------------------------------------------- the dtype table
def test_native_reasons_name_the_dtype():
    block = FastSCAFF(16)
    x = torch.randn(2, 16, 4, 3)
    assert dispatch.unsupported_reason("scaff", "native", block, x) is None
    reason = dispatch.unsupported_reason("scaff", "native", block.bfloat16(), x.bfloat16())
    assert "float32 or float64" in reason and "bfloat16" in reason
    # bfloat16 parameters, float32 input
    reason = dispatch.unsupported_reason("scaff", "native", block, x)
    assert "bfloat16" in reason and "float32" in reason


# --------------------------------------------------------------------------- block parity
BLOCKS = {
    "ca": lambda: FastCoordAttention(32),
    "scaff": lambda: FastSCAFF(32),
    "sawf": lambda: FastSAWF(32),
    "aff": lambda: FastAFF(32),
    "sr": lambda: FastSplitResplice(32, splits=4, dropout=0.0),
}


@needs_native
@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_under_cpu_autocast_matches_reference(name, training, dtype):
    """Under CPU autocast the default backend runs the native float32 kernels (no warning)
    and agrees with the reference run under the same autocast within its precision: forward,
    dL/dx, every parameter gradient and the running statistics."""
    torch.manual_seed(0)
    fast = randomize_batchnorm(BLOCKS[name]()).train(training)
    twin = copy.deepcopy(fast)
    x = torch.randn(4, 32, 8, 6)
    inputs = [x, torch.randn_like(x)] if name == "aff" else [x]
    leaves_fast = [t.clone().requires_grad_() for t in inputs]
    leaves_ref = [t.clone().requires_grad_() for t in inputs]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast("cpu", dtype):
            out = fast(*[t.to(dtype) for t in leaves_fast])
    assert _fallback_warnings(caught) == []
    with use_backend("reference"), torch.autocast("cpu", dtype):
        expected = twin(*[t.to(dtype) for t in leaves_ref])
    assert out.dtype == expected.dtype == dtype
    assert rel_err(out, expected) < 2e-2
    grad = torch.randn(out.shape)
    out.float().backward(grad)
    expected.float().backward(grad)
    for a, b in zip(leaves_fast, leaves_ref):
        assert rel_err(a.grad, b.grad) < 8e-2
    # a gradient that is zero in exact arithmetic (a conv bias right before a training BN) is
    # rounding noise on both sides: a floor tied to dL/dx
    floor = 2e-2 * float(leaves_ref[0].grad.norm())
    for (pname, p), (_, q) in zip(fast.named_parameters(), twin.named_parameters()):
        assert float((p.grad - q.grad).norm()) <= 0.15 * float(q.grad.norm()) + floor, pname
    for (bname, b), (_, c) in zip(fast.named_buffers(), twin.named_buffers()):
        if b.is_floating_point():
            assert rel_err(b, c) < 1e-2, bname


# --------------------------------------------------------------------------- SAFFNet
def _saffnet():
    torch.manual_seed(0)
    return build_model("saffnet", input_size=(64, 48), backend="auto")


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=["bf16", "fp16"])
def test_saffnet_trains_under_cpu_autocast_with_auto(dtype):
    model = _saffnet().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    images, targets = torch.randn(2, 3, 64, 48), torch.rand(2, 17, 16, 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with torch.autocast("cpu", dtype):
                heatmaps = model(images)
            loss = (heatmaps.float() - targets).pow(2).mean()
            assert torch.isfinite(loss)
            optimizer.zero_grad()
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters()
                       if p.grad is not None)
            optimizer.step()
    if _native_serves("cpu"):
        assert _fallback_warnings(caught) == []


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=["bf16", "fp16"])
def test_saffnet_inference_under_cpu_autocast_with_auto(dtype):
    # trained-like BN statistics: at initialisation the heatmaps are ~1e-10 (float16 zeros)
    model = randomize_batchnorm(_saffnet()).eval()
    images = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        full = model(images)
        with torch.autocast("cpu", dtype):
            mixed = model(images)
    assert torch.isfinite(mixed).all()
    assert rel_err(mixed, full) < 5e-2


def test_trainer_bfloat16_amp_with_auto_backend(tmp_path):
    cfg = load_config(None, [
        "data.type=synthetic", f"data.cache_dir={tmp_path / 'cache'}",
        "data.synthetic={num_train: 4, num_val: 2, image_height: 96, image_width: 96}",
        "model.name=saffnet", "model.input_size=[64,48]", "model.backend=auto",
        "train.amp=bfloat16", "train.batch_size=2", "train.epochs=1", "train.max_steps=2",
        "data.num_workers=0", "train.progress=false", f"output_dir={tmp_path / 'run'}",
        "seed=5"])
    from saffnet_fast.data import build_dataset

    torch.manual_seed(0)
    model = build_model_from_config(cfg)
    out = Trainer(cfg, model, build_dataset(cfg, "train"), log=lambda s: None).fit()
    assert len(out["losses"]) == 2 and all(torch.isfinite(torch.tensor(out["losses"])))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=["bf16", "fp16"])
def test_saffnet_trains_and_infers_under_cuda_autocast_with_auto(dtype):
    model = randomize_batchnorm(_saffnet()).cuda().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    images = torch.randn(2, 3, 64, 48, device="cuda")
    targets = torch.rand(2, 17, 16, 12, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with torch.autocast("cuda", dtype):
                heatmaps = model(images)
            loss = (heatmaps.float() - targets).pow(2).mean()
            assert torch.isfinite(loss)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        model.eval()
        with torch.no_grad():
            full = model(images)
            with torch.autocast("cuda", dtype):
                mixed = model(images)
    assert torch.isfinite(mixed).all() and rel_err(mixed, full) < 5e-2
    if _native_serves("cuda"):
        assert _fallback_warnings(caught) == []


# --------------------------------------------------------------------------- fallbacks
@needs_native
def test_one_fallback_warning_per_distinct_reason():
    """Low-precision parameters on the CPU (no autocast): no native kernel takes them, every
    block runs the reference, and each distinct reason is told once, whatever the number of
    blocks and calls."""
    torch.manual_seed(0)
    net = nn.Sequential(FastSCAFF(16), FastSAWF(16), FastSplitResplice(16, splits=4)).eval()
    x = torch.randn(2, 16, 6, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype in (torch.bfloat16, torch.float16, torch.bfloat16):
            low = copy.deepcopy(net).to(dtype)
            out = low(x.to(dtype))
            low(x.to(dtype))
            with use_backend("reference"):
                torch.testing.assert_close(out, low(x.to(dtype)), rtol=0, atol=0)
    messages = _fallback_warnings(caught)
    assert len(messages) == 2, messages
    assert "bfloat16" in messages[0] and "float16" in messages[1]
    assert all("reference" in m and "float32 or float64" in m for m in messages)


@needs_native
@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=["bf16", "fp16"])
def test_explicit_native_names_the_dtype_it_cannot_take(dtype):
    block = FastSAWF(16, backend="native").to(dtype).eval()
    with pytest.raises(BackendUnavailableError, match=str(dtype).replace("torch.", "")):
        block(torch.randn(2, 16, 4, 4, dtype=dtype))

"""Backend selection: argument > use_backend context > SAFFNET_BACKEND > auto, the auto
fallback warning, and the errors of an explicitly requested backend that cannot run."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import saffnet_fast
from saffnet_fast import backend as backend_module
from saffnet_fast.backend import BackendUnavailableError, get_backend, resolve_backend, use_backend
from saffnet_fast.fast import (REFERENCE_FROM_FAST, FastCoordAttention, FastSAWF, FastSCAFF,
                               FastSplitResplice, blocks, dispatch, select_implementation)
from saffnet_fast.nn import reference as ref

from parity_utils import rel_err as _rel


@pytest.fixture(autouse=True)
def _clean_selection(monkeypatch):
    monkeypatch.delenv("SAFFNET_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backend_module._warned.clear()
    yield
    backend_module._warned.clear()


@pytest.fixture
def native_missing_op(monkeypatch):
    """The extension 'loaded' but the native backend has no implementation of scaff."""
    monkeypatch.setattr(backend_module, "_native_reason", lambda device: None)
    monkeypatch.delitem(dispatch.SUPPORT, ("scaff", "native"))


@pytest.fixture
def native_unavailable(monkeypatch):
    monkeypatch.setattr(backend_module, "_native_reason",
                        lambda device: "extension not built (test)")


def test_default_is_auto():
    assert get_backend() == "auto"


def test_env_var_sets_default(monkeypatch):
    monkeypatch.setenv("SAFFNET_BACKEND", "Reference")
    assert get_backend() == "reference"
    monkeypatch.setenv("SAFFNET_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="SAFFNET_BACKEND"):
        get_backend()


def test_context_overrides_env_and_nests(monkeypatch):
    monkeypatch.setenv("SAFFNET_BACKEND", "native")
    with use_backend("triton"):
        assert get_backend() == "triton"
        with use_backend("reference"):
            assert get_backend() == "reference"
        assert get_backend() == "triton"
    assert get_backend() == "native"
    with pytest.raises(ValueError, match="backend"):
        with use_backend("fastest"):
            pass


def test_module_argument_overrides_context(native_unavailable):
    torch.manual_seed(0)
    block = FastSCAFF(16, backend="reference").eval()
    x = torch.randn(2, 16, 5, 3)
    with use_backend("native"):  # would raise if the module followed the context
        out = block(x)
    torch.testing.assert_close(out, ref.SCAFF.forward(block, x))
    with use_backend("native"), pytest.raises(BackendUnavailableError, match="native"):
        FastSCAFF(16).eval()(x)


def test_fast_module_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        FastSAWF(16, backend="gpu")


def test_resolve_backend_validates_name():
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("fast", "cpu")
    assert resolve_backend("reference", "cpu") == "reference"


def test_auto_falls_back_with_one_warning(native_unavailable):
    block = FastSCAFF(16).eval()
    x = torch.randn(1, 16, 3, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = block(x)
        out2 = block(x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "reference" in messages[0] and "scaff" in messages[0]
    expected = ref.SCAFF.forward(block, x)
    torch.testing.assert_close(out1, expected)
    torch.testing.assert_close(out2, expected)


def test_missing_native_op_falls_back_under_auto(native_missing_op):
    block = FastSCAFF(16).eval()
    x = torch.randn(2, 16, 3, 3)
    with pytest.warns(RuntimeWarning, match="no native implementation of scaff"):
        name, fn = select_implementation("scaff", None, block, x)
    assert (name, fn) == ("reference", None)
    # a block the native backend does implement is taken
    ca = FastCoordAttention(16).eval()
    name, fn = select_implementation("coordinate_attention", None, ca, x)
    assert name == "native" and fn.func is blocks.coordinate_attention
    assert fn.keywords == {"backend": "native"}


def test_missing_native_op_raises_when_explicit(native_missing_op):
    block = FastSCAFF(16, backend="native").eval()
    with pytest.raises(BackendUnavailableError, match="no native implementation of scaff"):
        block(torch.randn(2, 16, 3, 3))


def test_explicit_triton_on_cpu_without_interpreter_raises():
    block = FastSAWF(16, backend="triton").eval()
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        block(torch.randn(2, 16, 3, 3))
    assert "triton" not in backend_module.available_backends("cpu")


def test_tracing_takes_reference_path():
    block = FastCoordAttention(16, backend="triton").eval()
    x = torch.randn(1, 16, 4, 4)
    traced = torch.jit.trace(block, x, check_trace=False)
    torch.testing.assert_close(traced(x), ref.CoordAttention.forward(block, x))


@pytest.mark.parametrize("make", [
    lambda: FastCoordAttention(32),
    lambda: FastSCAFF(32),
    lambda: FastSAWF(32),
    lambda: FastSplitResplice(32, splits=4, dropout=0.0),
], ids=["ca", "scaff", "sawf", "sr"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_auto_matches_reference_forward_and_grads(make, training):
    """Whatever auto picks on this machine (native when built, else reference) matches the
    reference forward and every gradient. float64: in training, AFF's global-branch BN
    normalises N = 2 pooled values, where float32 gradients are ill-conditioned (see
    tests/test_native_training.py); this test is about dispatch, not rounding."""
    torch.manual_seed(1)
    fast = make().double().train(training)
    twin = _reference_twin(fast).double()
    x = torch.randn(2, 32, 5, 3, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = fast(x)
    expected = twin(x2)
    assert _rel(out, expected) < 1e-5
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert _rel(x.grad, x2.grad) < 1e-5
    # a gradient that is zero in exact arithmetic (a conv bias right before a training BN) is
    # rounding noise on both sides: compare it against a floor tied to dL/dx
    floor = 1e-6 * float(x2.grad.norm())
    for (name, p), (_, q) in zip(fast.named_parameters(), twin.named_parameters()):
        assert p.grad is not None, name
        assert float((p.grad - q.grad).norm()) <= 1e-5 * float(q.grad.norm()) + floor, name
    for (name, b), (_, c) in zip(fast.named_buffers(), twin.named_buffers()):
        assert _rel(b, c) < 1e-5 or c.double().norm() == 0, name  # running stats updated alike


def _reference_twin(fast):
    ref_cls = REFERENCE_FROM_FAST[type(fast)]
    if ref_cls is ref.CoordAttention:
        twin = ref_cls(fast.channels, fast.channels, fast.reduction)
    elif ref_cls is ref.SplitResplice:
        twin = ref_cls(fast.channels, fast.splits, dropout=0.0)
    else:
        twin = ref_cls(fast.channels)
    twin.load_state_dict(fast.state_dict(), strict=True)
    return twin.train(fast.training)


def test_disable_native_env_makes_explicit_native_fail():
    """SAFFNET_DISABLE_NATIVE=1 is read at import, so this runs in a fresh interpreter."""
    script = textwrap.dedent("""
        import torch
        from saffnet_fast.fast import FastSCAFF
        from saffnet_fast.backend import BackendUnavailableError
        try:
            FastSCAFF(16, backend="native").eval()(torch.randn(1, 16, 3, 3))
        except BackendUnavailableError as exc:
            print("RAISED", exc)
        else:
            print("NO ERROR")
    """)
    env = dict(os.environ, SAFFNET_DISABLE_NATIVE="1")
    env.pop("SAFFNET_BACKEND", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(saffnet_fast.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "RAISED" in done.stdout and "SAFFNET_DISABLE_NATIVE" in done.stdout, done.stdout


def test_native_not_implemented_counts_as_unavailable(monkeypatch):
    monkeypatch.setattr(backend_module, "_native_reason", lambda device: None)

    def sawf(module, x, *, backend):
        raise NotImplementedError("sawf: no kernel for this case")

    monkeypatch.setitem(dispatch.BLOCKS, "sawf", sawf)
    x = torch.randn(2, 16, 3, 3)
    block = FastSAWF(16).eval()
    with pytest.warns(RuntimeWarning, match="no kernel for this case"):
        out = block(x)
    torch.testing.assert_close(out, ref.SAWF.forward(block, x))
    block.backend = "native"
    with pytest.raises(BackendUnavailableError, match="no kernel for this case"):
        block(x)


@pytest.mark.skipif(not saffnet_fast.has_native(), reason="saffnet_fast._C not built")
def test_parameter_check_is_cached_and_renewed_by_a_conversion():
    """The dispatch caches its parameter dtype/device check per module; .to() / .double()
    (nn.Module._apply, here or on a parent) renews it, so a converted block is served again
    and a mismatched input still falls back with the reason."""
    model = torch.nn.Sequential(FastSCAFF(16).eval())
    block = model[0]
    x = torch.randn(2, 16, 5, 4)
    assert select_implementation("scaff", None, block, x)[0] == "native"
    model.double()
    x64 = x.double()
    assert select_implementation("scaff", None, block, x64)[0] == "native"
    with pytest.warns(RuntimeWarning, match="parameter .* is torch.float64"):
        assert select_implementation("scaff", None, block, x)[0] == "reference"
    torch.testing.assert_close(block(x64), ref.SCAFF.forward(block, x64))

"""compile_frozen: inductor with freezing really freezes (BN folded, oneDNN convolutions with
prepacked weights, no aten.convolution left), PooledConvToLinear turns the 1x1 convolutions on
pooled maps into linears and nothing else, and the result matches eager."""
import pytest
import torch
from torch import nn
from torch.profiler import profile

from saffnet_fast.fast.inductor import FrozenCompiled, PooledConvToLinear, compile_frozen

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="freezing's convolution packing needs oneDNN")


class PooledAttention(nn.Module):
    """SE / AFF-global shaped: a 3x3 conv, then 1x1 convs on the pooled map (with and without
    bias, BN between), and two convs that must stay convolutions: a grouped 1x1 and a padded
    1x1 on the pooled map (its output is 3x3, not a matrix product)."""

    def __init__(self, c=12, r=5):  # 12 -> 5 -> 12: odd widths, no vector multiple
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(c)
        self.fc1 = nn.Conv2d(c, r, 1)
        self.bn1 = nn.BatchNorm2d(r)
        self.fc2 = nn.Conv2d(r, c, 1, bias=False)
        self.grouped = nn.Conv2d(c, c, 1, groups=3)
        self.padded = nn.Conv2d(c, c, 1, padding=1)

    def forward(self, x):
        y = torch.relu(self.bn0(self.conv(x)))
        p = y.mean((2, 3), keepdim=True)
        gate = torch.sigmoid(self.fc2(torch.relu(self.bn1(self.fc1(p)))) + self.grouped(p))
        return y * gate + self.padded(p).mean((2, 3), keepdim=True)


def _model(seed=0):
    torch.manual_seed(seed)
    model = PooledAttention()
    with torch.no_grad():  # BN statistics away from (0, 1), so folding them changes numbers
        for bn in (model.bn0, model.bn1):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _ops_called(module, x):
    with profile() as prof:
        module(x)
    return {e.key: e.count for e in prof.key_averages()}


@pytest.mark.parametrize("pooled_linear", [True, False])
def test_compile_frozen_freezes_and_matches_eager(pooled_linear):
    model = _model()
    x = torch.randn(3, 12, 11, 7)  # odd batch and sizes
    with torch.no_grad():
        expected = model(x)
    frozen = compile_frozen(model, pooled_linear=pooled_linear)
    assert isinstance(frozen, FrozenCompiled)
    with torch.no_grad():
        out = frozen(x)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        called = _ops_called(frozen, x)
    # Frozen: every convolution is a oneDNN convolution on a prepacked weight.
    assert not any(k in called for k in ("aten::convolution", "aten::mkldnn_convolution",
                                         "aten::_convolution")), called
    convs = called.get("mkldnn::_convolution_pointwise", 0)
    linears = sum(n for k, n in called.items() if "linear" in k or k in ("aten::addmm",
                                                                          "aten::mm"))
    if pooled_linear:  # fc1 and fc2 as prepacked linears; the 3x3 and the padded 1x1 convs
        assert linears == 2 and convs >= 2, called
    else:  # every convolution left to oneDNN (how inductor treats the grouped one varies)
        assert linears == 0 and convs >= 4, called


def test_compile_frozen_runs_without_grad_and_recompiles_frozen():
    """Called with grad enabled it still freezes (it turns autograd off itself), and a new
    batch size compiles frozen too (the setting holds around every call)."""
    model = _model(1)
    frozen = compile_frozen(model)
    x = torch.randn(2, 12, 9, 8, requires_grad=True)
    out = frozen(x)
    assert out.grad_fn is None and not out.requires_grad
    x5 = torch.randn(5, 12, 9, 8)
    frozen(x5)  # compiles batch 5 (static shapes): profile the call after it
    called = _ops_called(frozen, x5)
    assert "aten::convolution" not in called and called.get("mkldnn::_convolution_pointwise")
    with torch.no_grad():
        torch.testing.assert_close(frozen(x5), model(x5), rtol=1e-4, atol=1e-5)
    import torch._inductor.config as inductor_config
    assert inductor_config.joint_custom_pre_pass is None  # process-wide setting untouched


def test_pooled_conv_to_linear_uuid_is_stable():
    """The FX graph cache keys on uuid(): equal across instances, a hex digest."""
    a, b = PooledConvToLinear().uuid(), PooledConvToLinear().uuid()
    assert a == b and len(a) == 64


@pytest.mark.parametrize("kwargs,match", [({"channels_last": 1}, "channels_last"),
                                          ({"pooled_linear": "yes"}, "pooled_linear")])
def test_compile_frozen_rejects_bad_arguments(kwargs, match):
    with pytest.raises(TypeError, match=match):
        compile_frozen(_model(), **kwargs)
    with pytest.raises(TypeError, match="model"):
        compile_frozen(lambda x: x)


def test_compile_frozen_is_exported_at_the_top():
    import saffnet_fast
    assert saffnet_fast.compile_frozen is compile_frozen and "compile_frozen" in saffnet_fast.__all__


def test_compile_frozen_bfloat16_flag_stays_within_its_bound():
    """dtype=torch.bfloat16 (the AMX flag): float32 in, float32 out, within BFLOAT16_RTOL
    relative L2 of float32; it warns where the CPU has no AMX."""
    import warnings

    from saffnet_fast.fast.inductor import BFLOAT16_RTOL, cpu_has_amx

    model = _model(2)
    x = torch.randn(3, 12, 11, 7)
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frozen = compile_frozen(model, dtype=torch.bfloat16)
    assert any("AMX" in str(w.message) for w in caught) == (not cpu_has_amx())
    out = frozen(x)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    rel = ((out - expected).norm() / expected.norm()).item()
    assert 0.0 < rel < BFLOAT16_RTOL  # bfloat16 rounding shows, within the bound
    with pytest.raises(ValueError, match="dtype"):
        compile_frozen(_model(), dtype=torch.float16)

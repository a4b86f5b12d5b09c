"""compile_frozen: inductor with freezing really freezes (BN folded, oneDNN convolutions with
prepacked weights, no aten.convolution left), PointwiseConvToLinear turns the 1x1
convolutions that are matrix products into linears and nothing else, ChannelsLastCat keeps the
values of a channel concatenation, the guard shortcut still picks the right compiled graph,
and every result matches eager."""
import pytest
import torch
from torch import nn
from torch.profiler import profile

from saffnet_fast.fast.inductor import (POINTWISE_LINEAR_MAX_MACS, ChannelsLastCat,
                                        FrozenCompiled, PointwiseConvToLinear, compile_frozen)

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


@pytest.mark.parametrize("pointwise_linear,cpp_wrapper", [(True, False), (False, False),
                                                         (True, True)])
def test_compile_frozen_freezes_and_matches_eager(pointwise_linear, cpp_wrapper):
    model = _model()
    x = torch.randn(3, 12, 11, 7)  # odd batch and sizes
    with torch.no_grad():
        expected = model(x)
    frozen = compile_frozen(model, pointwise_linear=pointwise_linear, cpp_wrapper=cpp_wrapper)
    assert isinstance(frozen, FrozenCompiled)
    with torch.no_grad():
        out = frozen(x)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(frozen(x), expected, rtol=1e-4, atol=1e-5)  # guards skipped
        called = _ops_called(frozen, x)
    # Frozen: every convolution is a oneDNN convolution on a prepacked weight.
    assert not any(k in called for k in ("aten::convolution", "aten::mkldnn_convolution",
                                         "aten::_convolution")), called
    if cpp_wrapper:  # the C++ wrapper calls the kernels without the dispatcher's profiler
        return
    convs = called.get("mkldnn::_convolution_pointwise", 0)
    linears = sum(n for k, n in called.items() if "linear" in k or k in ("aten::addmm",
                                                                          "aten::mm"))
    if pointwise_linear:  # fc1 and fc2 as prepacked linears; the 3x3 and the padded 1x1 convs
        assert linears == 2 and convs >= 2, called
    else:  # every convolution left to oneDNN (how inductor treats the grouped one varies)
        assert linears == 0 and convs >= 4, called


def test_compile_frozen_runs_without_grad_and_recompiles_frozen():
    """Called with grad enabled it still freezes (it turns autograd off itself), and a new
    batch size compiles frozen too (the setting holds around every call)."""
    model = _model(1)
    frozen = compile_frozen(model, cpp_wrapper=False)  # the profiler sees its kernel calls
    x = torch.randn(2, 12, 9, 8, requires_grad=True)
    out = frozen(x)
    assert out.grad_fn is None and not out.requires_grad
    x5 = torch.randn(5, 12, 9, 8)
    frozen(x5)  # compiles batch 5 (static shapes): profile the call after it
    called = _ops_called(frozen, x5)
    assert "aten::convolution" not in called and called.get("mkldnn::_convolution_pointwise")
    # Both signatures compiled: later calls skip all but the guards that tell the two graphs
    # apart, and each batch still gets its own graph, in either order.
    x2 = torch.randn(2, 12, 9, 8)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(frozen(x5), model(x5), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(frozen(x2), model(x2), rtol=1e-4, atol=1e-5)
    import torch._inductor.config as inductor_config
    assert inductor_config.joint_custom_pre_pass is None  # process-wide setting untouched


class SplitAndSplice(nn.Module):
    """SCBottle-shaped: a 1x1 reduction on the full map, channel slices of it through 3x3
    convs, concatenated back (odd widths: 3 + 4 + 6 = 13), then 1x1 convs on the full map: a
    small one (a linear), a strided one and one over the size limit (both convolutions)."""

    def __init__(self, c=16):
        super().__init__()
        self.reduce = nn.Conv2d(c, 13, 1)
        self.step1 = nn.Conv2d(4, 6, 3, padding=1)
        self.step2 = nn.Conv2d(6 + 2, 6, 3, padding=1, bias=False)
        self.small = nn.Conv2d(13, 5, 1)
        self.strided = nn.Conv2d(13, 5, 1, stride=2)
        self.large = nn.Conv2d(13, 300, 1, bias=False)

    def forward(self, x):
        y = torch.relu(self.reduce(x))
        a, b, c = torch.split(y, [3, 4, 6], dim=1)
        s1 = torch.nn.functional.leaky_relu(self.step1(b), 0.1)
        s2 = self.step2(torch.cat([c[:, :2], s1[:, 4:], c[:, 2:]], dim=1))
        z = torch.cat([a, s1[:, :4], s2], dim=1)  # 3 + 4 + 6 = 13 channels
        return (self.small(z).mean((2, 3)), self.strided(z).mean((2, 3)),
                self.large(z).mean((2, 3)))


def test_pointwise_linear_and_channels_last_cat_match_eager():
    torch.manual_seed(3)
    model = SplitAndSplice().eval()
    # 231 rows of 11 x 7 pixels: reduce 231 x 16 x 13 = 48 K multiply-adds, small 15 K,
    # large 901 K (over the 50 K limit set here)
    x = torch.randn(3, 16, 11, 7).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
    frozen = FrozenCompiled(model.to(memory_format=torch.channels_last),
                            graph_passes=[ChannelsLastCat(),
                                          PointwiseConvToLinear(max_macs=50_000)])
    with torch.no_grad():
        out = frozen(x)
        for o, e in zip(out, expected):
            torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-5)
        called = _ops_called(frozen, x)
    linears = sum(n for k, n in called.items() if "linear" in k or k in ("aten::addmm",
                                                                          "aten::mm"))
    # reduce and small: linears; step1, step2 (3x3), strided, large: oneDNN convolutions
    assert linears == 2, called
    assert called.get("mkldnn::_convolution_pointwise", 0) >= 4, called
    assert "aten::cat" not in called  # the concatenations are inductor kernels


def test_compile_frozen_again_after_new_weights_freezes_the_new_weights():
    """Dynamo guards on parameter shapes, not values: each FrozenCompiled must compile its
    own graph, or a rebuild after load_state_dict would run the old frozen weights."""
    model = _model(4)
    x = torch.randn(3, 12, 11, 7)
    first = compile_frozen(model, cpp_wrapper=False)
    with torch.no_grad():
        old = model(x)
        torch.testing.assert_close(first(x), old, rtol=1e-4, atol=1e-5)
        model.load_state_dict(_model(5).state_dict())
        new = model(x)
        assert not torch.allclose(new, old, atol=1e-3)
        torch.testing.assert_close(compile_frozen(model, cpp_wrapper=False)(x), new,
                                   rtol=1e-4, atol=1e-5)


def test_graph_pass_uuids_key_the_fx_graph_cache():
    """The FX graph cache keys on uuid(): equal across equal instances, a hex digest, and a
    different limit is a different pass."""
    assert PointwiseConvToLinear().uuid() == PointwiseConvToLinear().uuid()
    assert PointwiseConvToLinear(0).uuid() != PointwiseConvToLinear().uuid()
    assert PointwiseConvToLinear().uuid().endswith(str(POINTWISE_LINEAR_MAX_MACS))
    a, b = ChannelsLastCat().uuid(), ChannelsLastCat().uuid()
    assert a == b and len(a) == 64
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_macs"):
            PointwiseConvToLinear(bad)


@pytest.mark.parametrize("kwargs,match", [({"channels_last": 1}, "channels_last"),
                                          ({"pointwise_linear": "yes"}, "pointwise_linear"),
                                          ({"channels_last_cat": None}, "channels_last_cat"),
                                          ({"cpp_wrapper": 0}, "cpp_wrapper")])
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


def _traced(fn, *args):
    from torch.fx.experimental.proxy_tensor import make_fx
    return make_fx(fn, tracing_mode="fake")(*args)  # ATen graph with fake values in meta


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_channels_last_cat_rewrites_only_channel_concatenations_of_nhwc_tensors():
    aten = torch.ops.aten
    x = torch.randn(2, 13, 5, 3).to(memory_format=torch.channels_last)
    y = torch.randn(2, 4, 5, 3).to(memory_format=torch.channels_last)

    def fn(x, y):  # a channel slice of x and y, x whole along H (dim 2), y with itself
        return torch.cat([x[:, 2:7], y], 1), torch.cat([x, x], 2), torch.cat([y.contiguous(), y], 1)

    gm = _traced(fn, x, y)
    expected = gm(x, y)
    ChannelsLastCat()(gm.graph)
    gm.recompile()
    cats = [n for n in gm.graph.nodes if n.target is aten.cat.default]
    # the first becomes a cat along dim 3 of NHWC permutations; the H concatenation and the
    # one with a channels-first input stay as they were
    assert sorted(n.args[1] for n in cats) == [1, 2, 3]
    for out, ref in zip(gm(x, y), expected):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert gm(x, y)[0].is_contiguous(memory_format=torch.channels_last)


def test_pointwise_conv_to_linear_rewrites_only_matrix_products():
    aten = torch.ops.aten
    x = torch.randn(2, 7, 5, 3).to(memory_format=torch.channels_last)  # 30 rows of 7 channels
    w1, b1 = torch.randn(11, 7, 1, 1), torch.randn(11)
    w3 = torch.randn(11, 7, 3, 3)

    def fn(x, w1, b1, w3):
        return (torch.conv2d(x, w1, b1),                 # 30 x 7 x 11 = 2310 MACs: a linear
                torch.conv2d(x, w1, None, stride=2),      # strided: stays
                torch.conv2d(x, w3, None, padding=1),     # 3x3: stays
                torch.conv2d(x.contiguous(), w1, b1),     # channels-first input: stays
                torch.conv2d(x.mean((2, 3), keepdim=True), w1))  # pooled: a linear

    args = (x, w1, b1, w3)
    gm = _traced(fn, *args)
    expected = gm(*args)
    PointwiseConvToLinear(max_macs=2310)(gm.graph)
    gm.recompile()
    targets = _targets(gm)
    assert targets.count(aten.convolution.default) == 3
    assert targets.count(aten.addmm.default) == 1 and targets.count(aten.mm.default) == 1
    for out, ref in zip(gm(*args), expected):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert gm(*args)[0].is_contiguous(memory_format=torch.channels_last)
    gm = _traced(fn, *args)
    PointwiseConvToLinear(max_macs=2309)(gm.graph)  # one under: only the pooled one
    assert _targets(gm).count(aten.convolution.default) == 4


def test_pointwise_conv_to_linear_leaves_symbolic_sizes_alone():
    """Under dynamic shapes the sizes are symbolic: the pass must not write them into the
    graph as numbers (the graph would no longer run), so it leaves such convolutions."""
    aten = torch.ops.aten
    x = torch.randn(2, 7, 5, 3).to(memory_format=torch.channels_last)
    w, b = torch.randn(11, 7, 1, 1), torch.randn(11)

    def fn(x, w, b):
        return torch.conv2d(x, w, b), torch.conv2d(x.mean((2, 3), keepdim=True), w)

    from torch.fx.experimental.proxy_tensor import make_fx
    gm = make_fx(fn, tracing_mode="symbolic")(x, w, b)
    expected = gm(x, w, b)
    PointwiseConvToLinear()(gm.graph)
    gm.recompile()
    assert _targets(gm).count(aten.convolution.default) == 2
    for out, ref in zip(gm(x, w, b), expected):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)

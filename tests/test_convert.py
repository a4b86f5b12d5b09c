"""convert / convert back / fold_batchnorm / optimize_for_inference on a small model that is
not SAFFNet."""
import copy
import warnings

import pytest
import torch
from torch import nn

import saffnet_fast
from saffnet_fast.fast.convert import (convert, fold_batchnorm, optimize_for_inference,
                                       register_conv_bn_pairs)
from saffnet_fast import fast
from saffnet_fast.fast import dispatch
from saffnet_fast.nn import reference as ref

from parity_utils import rel_err as _rel


@pytest.fixture(autouse=True)
def _quiet_fallback(monkeypatch):
    monkeypatch.delenv("SAFFNET_BACKEND", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # auto's one-line fallback notice
        yield


class LittleNet(nn.Module):
    """A user CNN with SAFFNet blocks inside a Sequential and as attributes."""

    def __init__(self, c=16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            ref.CoordAttention(c),
            ref.SCAFF(c),
        )
        self.sawf = ref.SAWF(c)
        self.sr = ref.SplitResplice(c, splits=4, dropout=0.0)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        return self.head(self.sr(self.sawf(self.features(x))))


def _randomize_bn(model):
    """Non-trivial running statistics and affine parameters, so folding is really tested."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _types(model):
    return [type(m) for m in model.modules()]


def test_convert_swaps_exact_reference_blocks_in_place():
    torch.manual_seed(0)
    model = _randomize_bn(LittleNet()).eval()
    x = torch.randn(2, 3, 7, 5)
    expected = model(x)
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict().keys())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    assert convert(model) is model
    assert type(model.features[3]) is fast.FastCoordAttention
    assert type(model.features[4]) is fast.FastSCAFF
    assert type(model.sawf) is fast.FastSAWF
    assert type(model.sr) is fast.FastSplitResplice
    # the CoordAttention inside SCAFF stays reference: the fused op covers the whole block
    assert type(model.features[4].ca) is ref.CoordAttention
    assert model.features[4].backend is None  # auto defers to use_backend / env
    # same parameter objects (an optimizer built before still updates them)
    for name, p in model.named_parameters():
        assert p is params_before[name], name
    assert optimizer.param_groups[0]["params"][0] is params_before["features.0.weight"]
    assert list(model.state_dict().keys()) == keys_before
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_convert_back_restores_reference_classes():
    model = LittleNet()
    reference_types = _types(model)
    convert(model, backend="reference")  # nothing to restore yet: a no-op
    assert _types(model) == reference_types
    convert(model, backend="native")
    assert model.sawf.backend == "native"
    convert(model, backend="triton")  # converting again only re-pins the backend
    assert model.sawf.backend == "triton" and type(model.sawf) is fast.FastSAWF
    convert(model, backend="reference")
    assert _types(model) == reference_types
    assert not hasattr(model.sawf, "backend") or "backend" not in model.sawf.__dict__


def test_convert_root_block_and_train_eval_state():
    block = ref.SCAFF(8)
    block.train()
    block.aff.eval()  # a mixed state must survive
    convert(block)
    assert type(block) is fast.FastSCAFF
    assert block.training and not block.aff.training and block.ca.training
    convert(block, "reference")
    assert type(block) is ref.SCAFF
    assert block.training and not block.aff.training


def test_convert_leaves_subclasses_of_reference_blocks_alone():
    class MyCA(ref.CoordAttention):
        pass

    model = nn.Sequential(MyCA(8))
    convert(model)
    assert type(model[0]) is MyCA


def test_convert_validates_arguments():
    with pytest.raises(TypeError, match="model"):
        convert("not a model")
    with pytest.raises(ValueError, match="backend"):
        convert(LittleNet(), backend="cuda")


def test_package_level_convert_is_callable():
    model = nn.Sequential(ref.SAWF(8))
    assert saffnet_fast.convert(model, "auto") is model
    assert type(model[0]) is fast.FastSAWF
    assert saffnet_fast.optimize_for_inference is optimize_for_inference


@pytest.mark.parametrize("ref_cls,fast_cls,args", [
    (ref.CoordAttention, fast.FastCoordAttention, (32,)),
    (ref.SCAFF, fast.FastSCAFF, (32,)),
    (ref.SAWF, fast.FastSAWF, (32,)),
    (ref.SplitResplice, fast.FastSplitResplice, (32, 4)),
])
def test_state_dict_compatible_both_ways(ref_cls, fast_cls, args):
    torch.manual_seed(0)
    reference_block = _randomize_bn(ref_cls(*args))
    fast_block = fast_cls(*args, backend="reference")
    fast_block.load_state_dict(reference_block.state_dict(), strict=True)
    back = ref_cls(*args)
    back.load_state_dict(fast_block.state_dict(), strict=True)
    for key, value in reference_block.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    x = torch.randn(1, 32, 4, 3)
    torch.testing.assert_close(fast_block.eval()(x), reference_block.eval()(x))


def test_fold_batchnorm_folds_only_provable_pairs():
    class PreActivation(nn.Module):  # bn1 runs BEFORE conv1: must not be folded
        def __init__(self):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(4)
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv1(torch.relu(self.bn1(x)))

    class Reordered(nn.Sequential):  # a Sequential with its own forward is not trusted
        def forward(self, x):
            return self[0](self[1](x))

    class Declared(nn.Module):
        conv_bn_pairs = (("conv", "norm"),)

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.norm = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.norm(self.conv(x))

    model = _randomize_bn(nn.Sequential(
        PreActivation(), Reordered(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), Declared(),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 4, 5, 5)
    expected = model(x)
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(model.train())
    model.eval()
    assert fold_batchnorm(model) == 2
    assert isinstance(model[0].bn1, nn.BatchNorm2d)
    assert isinstance(model[1][1], nn.BatchNorm2d)
    assert isinstance(model[2].norm, nn.Identity)
    assert isinstance(model[4], nn.Identity)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_register_conv_bn_pairs_validates():
    with pytest.raises(TypeError, match="cls"):
        register_conv_bn_pairs(int, [("a", "b")])


def test_optimize_for_inference_matches_eval_reference():
    torch.manual_seed(0)
    model = _randomize_bn(LittleNet()).train()
    x = torch.randn(2, 3, 9, 6)
    reference = LittleNet()
    reference.load_state_dict(model.state_dict())
    reference.eval()
    expected = reference(x)

    out_model = optimize_for_inference(model, example_input=x)
    assert out_model is model and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert type(model.sawf) is fast.FastSAWF
    # Every Conv+BN pair folded unless the native kernels serve the block (they fold BN
    # themselves): the stem, CoordAttention's conv1/bn1, AFF's Sequentials, every FC step.
    assert isinstance(model.features[1], nn.Identity)
    remaining = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    natively_served = [n for n, m in model.named_modules()
                       if type(m) in fast.REFERENCE_FROM_FAST and not getattr(m, "_bn_folded", False)]
    assert all(any(r.startswith(s + ".") for s in natively_served) for r in remaining), remaining
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = model(x.contiguous(memory_format=torch.channels_last))
    assert _rel(got, expected) < 1e-5


def test_optimize_for_inference_then_convert_back_still_matches():
    torch.manual_seed(1)
    model = _randomize_bn(LittleNet()).eval()
    x = torch.randn(1, 3, 5, 5)
    expected = model(x)
    optimize_for_inference(model, backend="reference", channels_last=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    convert(model, "reference")
    assert type(model.features[4]) is ref.SCAFF
    with torch.no_grad():
        assert _rel(model(x), expected) < 1e-5


def test_optimize_for_inference_cuda_graph_needs_cuda():
    model = LittleNet()
    with pytest.raises(ValueError, match="example_input"):
        optimize_for_inference(model, cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA"):
        optimize_for_inference(model, cuda_graph=True, example_input=torch.randn(1, 3, 4, 4))
    with pytest.raises(TypeError, match="example_input"):
        optimize_for_inference(model, example_input=[1, 2])


def test_optimize_for_inference_dtype():
    """dtype=: parameters cast after folding (in float32), the check at that dtype's
    tolerance against the float32 model; a dtype that is not a float inference dtype is
    refused by name."""
    torch.manual_seed(5)
    model = _randomize_bn(LittleNet()).eval()
    x = torch.randn(2, 3, 9, 7)
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # CPU kernels: bfloat16 falls back
        optimize_for_inference(model, example_input=x, dtype=torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        with torch.no_grad():
            got = model(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
    assert got.dtype == torch.bfloat16
    assert 0 < _rel(got, expected) < 2e-2
    with pytest.raises(ValueError, match="dtype"):
        optimize_for_inference(LittleNet(), dtype=torch.int8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_optimize_for_inference_cuda_graph_half(dtype):
    """The GPU inference recipe: half-precision weights, channels_last, cudnn.benchmark, a
    CUDA graph; float32 inputs are cast by the graph's input copy; output within the half
    tolerance of the float32 eval model, and replays follow their inputs."""
    torch.manual_seed(6)
    model = _randomize_bn(LittleNet()).eval().cuda()
    x = torch.randn(4, 3, 17, 13, device="cuda")
    expected = model(x)
    graphed = optimize_for_inference(model, example_input=x, dtype=dtype, cuda_graph=True)
    assert torch.backends.cudnn.benchmark
    out = graphed(x)
    assert out.dtype == dtype and _rel(out, expected) < 2e-2
    y = torch.randn_like(x)
    assert _rel(graphed(y), model(y.to(dtype).contiguous(memory_format=torch.channels_last))) < 1e-3


def test_optimize_for_inference_compile_matches_eval_reference():
    """compile=True: torch.compile of the optimized model (the fused ops as opaque custom
    ops inside the compiled graph), same outputs as the eval-mode reference."""
    torch.manual_seed(4)
    reference = _randomize_bn(LittleNet()).eval()
    model = copy.deepcopy(reference)
    x = torch.randn(2, 3, 9, 7)
    compiled = optimize_for_inference(model, example_input=x, compile=True)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled._orig_mod is model
    with torch.no_grad():
        got = compiled(x.contiguous(memory_format=torch.channels_last))
        want = reference(x)
    assert _rel(got, want) < 1e-5
    with pytest.raises(ValueError, match="compile, cuda_graph"):
        optimize_for_inference(LittleNet(), compile=True, cuda_graph=True)
    with pytest.raises(TypeError, match="compile"):
        optimize_for_inference(LittleNet(), compile="yes")


def test_build_model_backend_goes_through_convert():
    models = pytest.importorskip("saffnet_fast.models")
    build_model = getattr(models, "build_model", None)
    if build_model is None:
        pytest.skip("saffnet_fast.models.build_model is not written yet")
    import inspect

    if "backend" not in inspect.signature(build_model).parameters:
        pytest.skip("build_model has no backend= argument yet")
    try:
        model = build_model("saffnet", backend="reference")
    except TypeError as exc:  # the signature is the models helper's; do not guess further
        pytest.skip(f"build_model('saffnet', backend=...) not callable this way: {exc}")
    assert not any(type(m) in fast.REFERENCE_FROM_FAST for m in model.modules())
    model = build_model("saffnet", backend="auto")
    assert any(type(m) in fast.REFERENCE_FROM_FAST for m in model.modules())


def test_import_stays_light_and_compile_marker_matches_torch():
    import subprocess
    import sys

    code = ("import sys, saffnet_fast, saffnet_fast.nn, saffnet_fast.fast.convert; "
            "print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip().endswith("[]"), done.stdout + done.stderr
    # fast.py marks its compile-time selection the way assume_constant_result does
    marked = torch.compiler.assume_constant_result(lambda: 0)
    assert getattr(marked, "_dynamo_marked_constant", False) is True
    assert dispatch._compile_time_choice._dynamo_marked_constant is True


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_compile_fullgraph_of_converted_model(training):
    """The backend choice happens once per compilation (not traced), so a converted model
    compiles with fullgraph=True whatever auto picks here, and matches the reference."""
    torch.manual_seed(2)
    model = nn.Sequential(ref.CoordAttention(16), ref.SAWF(16))
    reference = nn.Sequential(ref.CoordAttention(16), ref.SAWF(16))
    reference.load_state_dict(model.state_dict())
    convert(model)
    model.train(training)
    reference.train(training)
    x = torch.randn(2, 16, 5, 4)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    expected = reference(x)
    assert _rel(out, expected) < 1e-5


def test_compile_time_key_names_each_live_fast_module():
    """Under torch.compile the backend selection gets the module's int key, not the module
    (torch 2.11 refuses a module argument to a constant function): every fast module, made
    directly, by convert(), by deepcopy or by pickling, has its own key that finds it."""
    import copy
    import pickle

    built = fast.FastSAWF(16)
    converted = convert(nn.Sequential(ref.SAWF(16)))[0]
    copied = copy.deepcopy(built)
    unpickled = pickle.loads(pickle.dumps(converted))
    modules = [built, converted, copied, unpickled]
    keys = [m._fast_key for m in modules]
    assert len(set(keys)) == len(keys)
    for key, module in zip(keys, modules):
        assert dispatch._FAST_MODULES[key] is module
    back = convert(nn.Sequential(converted), backend="reference")[0]
    assert type(back) is ref.SAWF and not hasattr(back, "_fast_key")
    del copied, modules, module
    import gc
    gc.collect()
    assert keys[2] not in dispatch._FAST_MODULES  # a weak registry: no module kept alive

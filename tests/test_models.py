"""SA blocks, the model factory, HRNet's official state-dict layout and input validation."""
import importlib.util
import warnings

import pytest
import torch

from saffnet_fast.models import MODEL_NAMES, PAPER_ROWS, build_model
from saffnet_fast.nn.reference import FC, SAWF, SCAFF, SplitResplice
from saffnet_fast.nn.sa_blocks import (SAWF_PLACEMENTS, SADownSample, SAFuseBlock, SAStem,
                                       SATransitionBlock, SAUpSample, SCBottle)

warnings.filterwarnings("ignore", message=".*native extension not loaded.*")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run tiny ops; on a shared 2-core machine intra-op threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Conv biases that feed a BatchNorm directly (AFF's and CoordAttention's official layout).
_BIAS_BEFORE_BN = ("local_att.0.bias", "global_att.1.bias", "ca.conv1.bias")


# Batch 3 in the block tests: with 2 samples, a train-mode BN over AFF's pooled 1×1 global
# branch outputs ±1 whatever its input, so the gradient into that branch is exactly zero.
def _check_grads_reach_every_parameter(module, outputs):
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    g = torch.Generator().manual_seed(0)
    loss = sum((y * torch.randn(y.shape, generator=g)).sum() for y in outputs)
    loss.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        if name.endswith(_BIAS_BEFORE_BN):
            continue  # train-mode BN removes a constant: its gradient is zero up to rounding
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


# --------------------------------------------------------------------------- SA blocks
def test_scbottle_shape_and_grads():
    torch.manual_seed(0)
    block = SCBottle(256, 64)
    assert isinstance(block.conv2, SplitResplice) and block.conv2.channels == 64
    x = torch.randn(3, 256, 16, 12, requires_grad=True)
    y = block(x)
    assert y.shape == (3, 256, 16, 12)
    _check_grads_reach_every_parameter(block, y)
    with pytest.raises(ValueError, match="stride"):
        SCBottle(256, 64, stride=2)
    with pytest.raises(ValueError, match="downsample"):
        SCBottle(64, 64)


def test_sastem_shape_and_grads():
    torch.manual_seed(0)
    stem = SAStem()
    y = stem(torch.randn(3, 3, 64, 48))
    assert y.shape == (3, 64, 16, 12)
    assert isinstance(stem.scaff, SCAFF)
    _check_grads_reach_every_parameter(stem, y)


@pytest.mark.parametrize("cin,cout,stride,layers", [
    (256, 32, 1, 4),   # transition1 branch 0: conv + BN + ReLU + SCAFF
    (256, 64, 2, 4),   # a new branch: stride-2 conv
    (32, 32, 1, 1),    # transition2's existing branch: SCAFF only
])
def test_satransition_shape_and_grads(cin, cout, stride, layers):
    torch.manual_seed(0)
    block = SATransitionBlock(cin, cout, stride)
    assert len(block) == layers and isinstance(block[-1], SCAFF)
    y = block(torch.randn(3, cin, 16, 12))
    assert y.shape == (3, cout, 16 // stride, 12 // stride)
    _check_grads_reach_every_parameter(block, y)


@pytest.mark.parametrize("placement", SAWF_PLACEMENTS)
def test_saupsample_shape_and_grads(placement):
    torch.manual_seed(0)
    block = SAUpSample(128, 32, 4, placement=placement)
    expected_width = 128 if placement == "source" else 32
    assert block.sawf.channels == expected_width
    y = block(torch.randn(3, 128, 4, 3))
    assert y.shape == (3, 32, 16, 12)
    _check_grads_reach_every_parameter(block, y)


@pytest.mark.parametrize("placement", SAWF_PLACEMENTS)
def test_sadownsample_shape_and_grads(placement):
    torch.manual_seed(0)
    block = SADownSample(32, 128, 2, placement=placement)
    y = block(torch.randn(3, 32, 16, 12))
    assert y.shape == (3, 128, 4, 3)
    assert block.sawf.channels == (32 if placement == "source" else 128)
    _check_grads_reach_every_parameter(block, y)


def test_sawf_default_placement_is_at_the_low_resolution_end():
    up = SAUpSample(64, 32, 2)
    seen = []
    up.sawf.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    up(torch.randn(3, 64, 8, 6))
    assert seen == [(3, 32, 8, 6)]   # after the 1×1 conv, before the upsampling
    assert up.sawf.aff.r == 16 and up.sawf.se.reduction == 16


@pytest.mark.parametrize("multi_scale", [True, False])
def test_safuseblock_shapes_and_grads(multi_scale):
    torch.manual_seed(0)
    fuse = SAFuseBlock([32, 64, 128], multi_scale)
    xs = [torch.randn(3, 32, 16, 12), torch.randn(3, 64, 8, 6), torch.randn(3, 128, 4, 3)]
    ys = fuse(xs)
    expected = [(3, 32, 16, 12), (3, 64, 8, 6), (3, 128, 4, 3)]
    assert [tuple(y.shape) for y in ys] == (expected if multi_scale else expected[:1])
    assert fuse[0][0] is None and isinstance(fuse[0][2], SAUpSample)
    if multi_scale:
        assert isinstance(fuse[2][0], SADownSample) and fuse[2][0].steps == 2
    _check_grads_reach_every_parameter(fuse, ys)
    with pytest.raises(ValueError, match="xs"):
        fuse(xs[:2])


# --------------------------------------------------------------------------- paper rows
def _unique_rows():
    seen, rows = set(), []
    for row in PAPER_ROWS:
        key = (row.model, tuple(sorted(row.switches.items())))
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def _dead_parameter(name, model):
    """HRNet-DF builds every fuse target in stage3's last module (the paper's counts need
    them), but only branch 0 feeds the head: targets 1 and 2 of that module get no gradient."""
    return model.num_stages == 2 and (name.startswith("stage3.3.fuse_layers.1.")
                                      or name.startswith("stage3.3.fuse_layers.2."))


@pytest.mark.parametrize("row", _unique_rows(), ids=lambda r: r.name)
def test_paper_row_forward_backward(row):
    torch.manual_seed(0)
    size = (64, 48) if row.model in ("hrnet_df", "saffnet") else (64, 64)
    model = row.build(input_size=size)
    assert model.input_size == size and model.heatmap_size == (size[0] // 4, size[1] // 4)
    for switch, on in row.switches.items():
        assert getattr(model.config, switch) is on
    x = torch.randn(2, 3, *size)
    y = model(x)
    assert y.shape == (2, 17, size[0] // 4, size[1] // 4)
    y.square().mean().backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    dead = {n for n, _ in model.named_parameters() if _dead_parameter(n, model)}
    assert no_grad == dead
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


def test_saffnet_has_all_four_changes_and_names():
    model = build_model("saffnet")
    cfg = model.config
    assert cfg.scbottle and cfg.safuse and cfg.satransition and cfg.sastem
    assert isinstance(model.layer1[0].conv2, torch.nn.Conv2d)          # block 0 stays a Bottleneck
    assert all(isinstance(model.layer1[i], SCBottle) for i in (1, 2, 3))
    assert isinstance(model.stem_scaff, SCAFF)
    assert len(model.transition1) == 2 and len(model.transition2) == 3
    assert isinstance(model.transition1[0], SATransitionBlock)           # 256 -> 32
    assert isinstance(model.transition1[1][0], SATransitionBlock)        # new branch 256 -> 64
    assert isinstance(model.transition2[0], SATransitionBlock)           # existing 32: SCAFF only
    assert isinstance(model.transition2[2][0], SATransitionBlock)       # new branch 64 -> 128
    assert all(isinstance(m.fuse_layers, SAFuseBlock) for m in model.stage3)
    assert not hasattr(model, "stage4") and not hasattr(model, "transition3")
    keys = model.state_dict().keys()
    for key in ("conv1.weight", "transition1.0.0.weight", "transition1.1.0.0.weight",
                "transition2.2.0.0.weight", "stage3.3.fuse_layers.0.2.0.weight",
                "stage3.0.fuse_layers.2.0.1.0.weight", "layer1.1.conv2.steps.6.conv.weight",
                "stem_scaff.ca.conv1.weight", "stage2.0.fuse_layers.0.1.sawf.se.fc_avg.weight",
                "final_layer.weight"):
        assert key in keys, key
    hrnet_df = build_model("hrnet_df")
    off = build_model("saffnet", scbottle=False, safuse=False, satransition=False, sastem=False)
    assert off.state_dict().keys() == hrnet_df.state_dict().keys()


def test_hrnet_df_weights_transfer_into_saffnet_by_name():
    source = build_model("hrnet_df").state_dict()
    target = build_model("saffnet")
    result = target.load_state_dict(source, strict=False)
    assert sorted(result.unexpected_keys) == [f"layer1.{i}.conv2.weight" for i in (1, 2, 3)]
    assert result.missing_keys
    for key in result.missing_keys:
        parts = key.split(".")[:-1]
        owners = [target.get_submodule(".".join(parts[:n])) for n in range(1, len(parts) + 1)]
        assert any(isinstance(m, (SCAFF, SAWF, SplitResplice)) for m in owners), key


def test_sastem_equals_the_models_stem():
    torch.manual_seed(0)
    model = build_model("saffnet").eval()
    stem = SAStem().eval()
    state = {k: v for k, v in model.state_dict().items()
             if k.split(".")[0] in ("conv1", "bn1", "conv2", "bn2")}
    state.update({f"scaff.{k[len('stem_scaff.'):]}": v
                  for k, v in model.state_dict().items() if k.startswith("stem_scaff.")})
    stem.load_state_dict(state, strict=True)
    captured = []
    model.stem_scaff.register_forward_hook(lambda m, i, o: captured.append(o))
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        model(x)
        torch.testing.assert_close(stem(x), captured[0])


def test_switches_dropout_slope_and_joints_reach_the_model():
    model = build_model("hrnet_df", scbottle=True, num_joints=16, dropout=0.0,
                        negative_slope=0.2)
    fcs = [m for m in model.modules() if isinstance(m, FC)]
    assert len(fcs) == 21
    assert all(f.drop.p == 0.0 and f.act.negative_slope == 0.2 for f in fcs)
    assert model.final_layer.out_channels == 16
    assert not any(isinstance(m, (SAWF, SCAFF)) for m in model.modules())
    default = build_model("saffnet")
    assert {m.drop.p for m in default.modules() if isinstance(m, FC)} == {0.1}


def test_eval_mode_is_deterministic():
    model = build_model("saffnet").eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_init_follows_hrnet():
    torch.manual_seed(0)
    model = build_model("hrnet_w32")
    big = torch.cat([m.weight.flatten() for m in model.modules()
                     if isinstance(m, torch.nn.Conv2d)])
    assert abs(big.std().item() - 0.001) < 5e-5
    assert model.final_layer.bias.abs().max() == 0
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


# --------------------------------------------------------------------------- official names
def official_hrnet_w32_state_dict_shapes(num_joints=17):
    """Key -> shape of an official pose_hrnet_w32 checkpoint, generated from the rules of
    lib/models/pose_hrnet.py (written independently of saffnet_fast.models.hrnet)."""
    shapes = {}

    def conv(prefix, cout, cin, k, bias=False):
        shapes[f"{prefix}.weight"] = (cout, cin, k, k)
        if bias:
            shapes[f"{prefix}.bias"] = (cout,)

    def bn(prefix, c):
        for n in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{n}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    conv("conv1", 64, 3, 3), bn("bn1", 64), conv("conv2", 64, 64, 3), bn("bn2", 64)
    inplanes = 64
    for b in range(4):
        p = f"layer1.{b}"
        conv(f"{p}.conv1", 64, inplanes, 1), bn(f"{p}.bn1", 64)
        conv(f"{p}.conv2", 64, 64, 3), bn(f"{p}.bn2", 64)
        conv(f"{p}.conv3", 256, 64, 1), bn(f"{p}.bn3", 256)
        if b == 0:
            conv(f"{p}.downsample.0", 256, 64, 1), bn(f"{p}.downsample.1", 256)
        inplanes = 256
    stages = [(1, [32, 64]), (4, [32, 64, 128]), (3, [32, 64, 128, 256])]
    previous = [256]
    for s, (num_modules, ch) in enumerate(stages):
        t = f"transition{s + 1}"
        for i, c in enumerate(ch):
            if i < len(previous):
                if previous[i] != c:
                    conv(f"{t}.{i}.0", c, previous[i], 3), bn(f"{t}.{i}.1", c)
            else:
                for k in range(i + 1 - len(previous)):
                    cout = c if k == i - len(previous) else previous[-1]
                    conv(f"{t}.{i}.{k}.0", cout, previous[-1], 3), bn(f"{t}.{i}.{k}.1", cout)
        for m in range(num_modules):
            p = f"stage{s + 2}.{m}"
            for b, c in enumerate(ch):
                for n in range(4):
                    q = f"{p}.branches.{b}.{n}"
                    conv(f"{q}.conv1", c, c, 3), bn(f"{q}.bn1", c)
                    conv(f"{q}.conv2", c, c, 3), bn(f"{q}.bn2", c)
            targets = 1 if (s == 2 and m == num_modules - 1) else len(ch)
            for i in range(targets):
                for j in range(len(ch)):
                    q = f"{p}.fuse_layers.{i}.{j}"
                    if j > i:
                        conv(f"{q}.0", ch[i], ch[j], 1), bn(f"{q}.1", ch[i])
                    elif j < i:
                        for k in range(i - j):
                            cout = ch[i] if k == i - j - 1 else ch[j]
                            conv(f"{q}.{k}.0", cout, ch[j], 3), bn(f"{q}.{k}.1", cout)
        previous = ch
    conv("final_layer", num_joints, 32, 1, bias=True)
    return shapes


OFFICIAL_KEYS = {
    "conv1.weight": (64, 3, 3, 3),
    "bn2.running_var": (64,),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer1.0.downsample.1.weight": (256,),
    "layer1.3.conv3.weight": (256, 64, 1, 1),
    "transition1.0.0.weight": (32, 256, 3, 3),
    "transition1.1.0.0.weight": (64, 256, 3, 3),
    "transition2.2.0.0.weight": (128, 64, 3, 3),
    "transition3.3.0.0.weight": (256, 128, 3, 3),
    "stage2.0.branches.1.3.conv2.weight": (64, 64, 3, 3),
    "stage3.0.fuse_layers.0.2.0.weight": (32, 128, 1, 1),
    "stage3.3.fuse_layers.2.0.1.0.weight": (128, 32, 3, 3),
    "stage4.0.fuse_layers.3.0.0.0.weight": (32, 32, 3, 3),
    "stage4.0.fuse_layers.3.0.2.0.weight": (256, 32, 3, 3),
    "stage4.2.fuse_layers.0.3.0.weight": (32, 256, 1, 1),
    "stage4.2.fuse_layers.0.3.1.running_mean": (32,),
    "final_layer.weight": (17, 32, 1, 1),
    "final_layer.bias": (17,),
}


def test_official_key_names_and_shapes():
    ours = {k: tuple(v.shape) for k, v in build_model("hrnet_w32").state_dict().items()}
    for key, shape in OFFICIAL_KEYS.items():
        assert ours.get(key) == shape, key
    # stage4's last module builds target 0 only, as in HRNet-W32
    assert "stage4.2.fuse_layers.1.0.0.0.weight" not in ours
    assert "stage4.1.fuse_layers.1.0.0.0.weight" in ours
    official = official_hrnet_w32_state_dict_shapes()
    assert OFFICIAL_KEYS.items() <= official.items()
    assert ours == official
    n_params = sum(torch.Size(s).numel() for k, s in official.items()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert n_params == 28_536_113


def test_official_style_checkpoint_loads_strict():
    official = official_hrnet_w32_state_dict_shapes()
    g = torch.Generator().manual_seed(0)
    checkpoint = {}
    for key, shape in official.items():    # in the official order, as a checkpoint stores them
        if key.endswith("num_batches_tracked"):
            checkpoint[key] = torch.tensor(7)
        else:
            checkpoint[key] = torch.randn(shape, generator=g)
    model = build_model("hrnet_w32")
    model.load_state_dict(checkpoint, strict=True)
    torch.testing.assert_close(model.stage4[2].fuse_layers[0][3][0].weight,
                               checkpoint["stage4.2.fuse_layers.0.3.0.weight"])
    torch.testing.assert_close(model.transition3[3][0][1].running_var,
                               checkpoint["transition3.3.0.1.running_var"])
    # without num_batches_tracked (older checkpoints) strict loading still works
    model.load_state_dict({k: v for k, v in checkpoint.items()
                           if not k.endswith("num_batches_tracked")}, strict=True)


# --------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors():
    model = build_model("hrnet_df")
    with pytest.raises(ValueError, match=r"x: expected 3 channels"):
        model(torch.randn(1, 4, 64, 48))
    with pytest.raises(ValueError, match=r"x: expected a 4-D"):
        model(torch.randn(3, 64, 48))
    with pytest.raises(ValueError, match=r"x: expected height and width that are multiples of 16"):
        model(torch.randn(1, 3, 60, 48))
    with pytest.raises(ValueError, match="name"):
        build_model("hrnet_w48")
    for bad in [(250, 192), (256,), "256x192", (256, 0), (256.0, 192)]:
        with pytest.raises(ValueError, match="input_size"):
            build_model("saffnet", input_size=bad)
    with pytest.raises(ValueError, match="multiples of 32"):
        build_model("hrnet_w32", input_size=(64, 48))   # stage4 needs 1/32
    with pytest.raises(ValueError, match="scbottle"):
        build_model("saffnet", scbottle=1)
    with pytest.raises(ValueError, match="num_joints"):
        build_model("saffnet", num_joints=0)
    with pytest.raises(ValueError, match="dropout"):
        build_model("saffnet", dropout=1.0)
    with pytest.raises(ValueError, match="backend"):
        build_model("saffnet", backend=3)
    assert set(MODEL_NAMES) == {"hrnet_w32", "hrnet_df", "hrnet_sf", "saffnet"}


def test_backend_conversion():
    if importlib.util.find_spec("saffnet_fast.fast.convert") is None:
        with pytest.raises(ValueError, match="backend"):
            build_model("saffnet", backend="native")
        return
    model = build_model("saffnet", backend="reference")
    assert type(model.stem_scaff) is SCAFF
    torch.manual_seed(0)
    fast = build_model("saffnet", backend="auto").eval()
    model.load_state_dict(fast.state_dict(), strict=True)     # same names after conversion
    model.eval()
    assert type(fast.stem_scaff) is not SCAFF and isinstance(fast.stem_scaff, SCAFF)
    assert isinstance(fast.stage3[0].fuse_layers[0][1].sawf, SAWF)
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "auto" may warn once that it falls back here
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-9)

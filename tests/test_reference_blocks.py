"""The reference blocks against their definitions written out by hand.

CoordAttention, AFF, SE+, SAWF and SCAFF are recomputed here from their formulas with plain
tensor ops (eval mode, random weights and BN statistics, float64); SplitResplice's channel
bookkeeping (widths, pass-through group, which outputs each input group can reach) is
checked directly.
"""
import math

import pytest
import torch

from saffnet_fast.nn.reference import (AFF, SAWF, SCAFF, CoordAttention, SEPlus, SplitResplice,
                                       split_resplice_widths)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run tiny ops; on a shared 2-core machine intra-op threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize(module, seed=0):
    """Random weights and BN running statistics, eval mode, float64."""
    g = torch.Generator().manual_seed(seed)
    module.double().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.3)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) * 1.5 + 0.5)
    return module


def _conv1x1(x, conv):
    y = torch.einsum("nchw,oc->nohw", x, conv.weight[:, :, 0, 0])
    return y + conv.bias.view(1, -1, 1, 1)


def _bn_eval(x, bn):
    shape = (1, -1, 1, 1)
    return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def _hswish(x):
    return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


def coord_attention_by_hand(x, ca):
    n, c, h, w = x.shape
    pooled_h = x.mean(dim=3, keepdim=True)                       # N×C×H×1 (average over W)
    pooled_w = x.mean(dim=2, keepdim=True).transpose(2, 3)       # N×C×W×1 (average over H)
    y = torch.cat([pooled_h, pooled_w], dim=2)
    y = _hswish(_bn_eval(_conv1x1(y, ca.conv1), ca.bn1))
    y_h, y_w = y[:, :, :h], y[:, :, h:].transpose(2, 3)
    a_h = torch.sigmoid(_conv1x1(y_h, ca.conv_h))                # N×C×H×1
    a_w = torch.sigmoid(_conv1x1(y_w, ca.conv_w))                # N×C×1×W
    return x * a_h * a_w


def aff_by_hand(x, residual, aff):
    xa = x + residual
    conv_a, bn_a, _, conv_b, bn_b = aff.local_att
    local = _bn_eval(_conv1x1(torch.relu(_bn_eval(_conv1x1(xa, conv_a), bn_a)), conv_b), bn_b)
    _, gconv_a, gbn_a, _, gconv_b, gbn_b = aff.global_att
    pooled = xa.mean(dim=(2, 3), keepdim=True)
    glob = _bn_eval(_conv1x1(torch.relu(_bn_eval(_conv1x1(pooled, gconv_a), gbn_a)), gconv_b),
                    gbn_b)
    wei = torch.sigmoid(local + glob)
    return 2 * x * wei + 2 * residual * (1 - wei)


def se_plus_by_hand(x, se):
    s = x.mean(dim=(2, 3), keepdim=True)
    gate = torch.sigmoid(_conv1x1(torch.relu(_conv1x1(s, se.fc1)), se.fc2) + _conv1x1(s, se.fc_avg))
    return x * gate


@pytest.mark.parametrize("channels,h,w", [(32, 7, 5), (64, 16, 12), (128, 3, 1)])
def test_coord_attention_matches_formula(channels, h, w):
    ca = _randomize(CoordAttention(channels))
    assert ca.mip == max(8, channels // 32)
    x = torch.randn(2, channels, h, w, dtype=torch.float64)
    torch.testing.assert_close(ca(x), coord_attention_by_hand(x, ca), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("channels,r", [(32, 4), (64, 4), (64, 16)])
def test_aff_matches_formula(channels, r):
    aff = _randomize(AFF(channels, r), seed=1)
    assert aff.local_att[0].out_channels == channels // r
    x = torch.randn(2, channels, 6, 5, dtype=torch.float64)
    residual = torch.randn(2, channels, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(aff(x, residual), aff_by_hand(x, residual, aff),
                               rtol=1e-10, atol=1e-12)


def test_se_plus_sawf_scaff_match_formulas():
    x = torch.randn(2, 64, 8, 6, dtype=torch.float64)
    se = _randomize(SEPlus(64), seed=2)
    torch.testing.assert_close(se(x), se_plus_by_hand(x, se), rtol=1e-10, atol=1e-12)
    sawf = _randomize(SAWF(64, se_reduction=16, aff_r=16), seed=3)
    expected = aff_by_hand(se_plus_by_hand(x, sawf.se), x, sawf.aff)
    torch.testing.assert_close(sawf(x), expected, rtol=1e-10, atol=1e-12)
    scaff = _randomize(SCAFF(64), seed=4)
    expected = aff_by_hand(coord_attention_by_hand(x, scaff.ca), x, scaff.aff)
    torch.testing.assert_close(scaff(x), expected, rtol=1e-10, atol=1e-12)


def test_split_resplice_widths():
    assert split_resplice_widths(64) == [8, 12, 14, 15, 15, 15, 15]
    assert split_resplice_widths(32) == [4, 6, 7, 7, 7, 7, 7]
    sr = SplitResplice(64)
    assert [step.conv.in_channels for step in sr.steps] == [8, 12, 14, 15, 15, 15, 15]
    assert [step.conv.out_channels for step in sr.steps] == [8, 12, 14, 15, 15, 15, 15]
    with pytest.raises(ValueError, match="channels"):
        split_resplice_widths(60)
    with pytest.raises(ValueError, match="splits"):
        split_resplice_widths(64, 1)


# Output layout of SR(64): S1 (8) | out1 (4) | out2 (6) | out3 (7) | out4 (8) | out5 (8) |
# out6 (8) | y7 (15); out_j = first ceil(c_j/2) channels of step j.
_SEGMENTS = [8, 4, 6, 7, 8, 8, 8, 15]


def test_split_resplice_output_layout_segments():
    widths = split_resplice_widths(64)
    assert _SEGMENTS == [8] + [math.ceil(c / 2) for c in widths[:-1]] + [widths[-1]]
    assert sum(_SEGMENTS) == 64


def test_split_resplice_matches_equations():
    """Eqs. 1–6 spelled out step by step for C = 64 with the module's own FC steps."""
    sr = _randomize(SplitResplice(64), seed=5)
    x = torch.randn(2, 64, 5, 4, dtype=torch.float64)
    s = [x[:, 8 * k:8 * (k + 1)] for k in range(8)]           # S1..S8
    outputs, carry = [s[0]], None
    for j in range(7):
        inp = s[1] if j == 0 else torch.cat([s[j + 1], carry], dim=1)
        y = sr.steps[j](inp)
        if j == 6:
            outputs.append(y)
        else:
            keep = (y.shape[1] + 1) // 2
            outputs.append(y[:, :keep])
            carry = y[:, keep:]
    torch.testing.assert_close(sr(x), torch.cat(outputs, dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("group", range(2, 9))
def test_split_resplice_channel_bookkeeping(group):
    """Perturbing input group S_group reaches step group-1 onwards only."""
    sr = _randomize(SplitResplice(64), seed=6)
    x = torch.randn(1, 64, 6, 5, dtype=torch.float64)
    y = sr(x)
    torch.testing.assert_close(y[:, :8], x[:, :8], rtol=0, atol=0)
    x2 = x.clone()
    x2[:, 8 * (group - 1):8 * group] += torch.randn(1, 8, 6, 5, dtype=torch.float64)
    y2 = sr(x2)
    bounds = [0]
    for width in _SEGMENTS:
        bounds.append(bounds[-1] + width)
    first_reached = group - 1      # segment index of step (group - 1)
    unchanged = bounds[first_reached]
    torch.testing.assert_close(y2[:, :unchanged], y[:, :unchanged], rtol=0, atol=0)
    segment = slice(bounds[first_reached], bounds[first_reached + 1])
    assert (y2[:, segment] - y[:, segment]).abs().max() > 1e-6


def test_reference_blocks_reject_bad_input():
    with pytest.raises(ValueError, match="x"):
        SplitResplice(64)(torch.randn(1, 32, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        CoordAttention(32)(torch.randn(32, 4, 4))
    with pytest.raises(ValueError, match="residual"):
        AFF(32)(torch.randn(1, 32, 4, 4), torch.randn(1, 32, 4, 5))

"""The BN arithmetic the fast paths share (saffnet_fast.fast.bn) against nn.BatchNorm2d
itself: the running-statistics update (momentum or cumulative average, with and without
num_batches_tracked), and the eval-mode fold into the convolution before it."""
import copy

import pytest
import torch
from torch import nn

from saffnet_fast import has_native
from saffnet_fast.fast.bn import fold_bn, update_running_stats


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("tracked", [True, False], ids=["tracked", "untracked"])
def test_update_running_stats_is_batchnorm2d(momentum, tracked):
    """momentum None without num_batches_tracked is factor 0 in nn.BatchNorm2d (the running
    statistics stay), with it the cumulative average."""
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(5, momentum=momentum).double().train()
    with torch.no_grad():
        reference.running_mean.normal_()
        reference.running_var.uniform_(0.5, 1.5)
    if not tracked:
        reference.num_batches_tracked = None
    mine = copy.deepcopy(reference)
    for _ in range(3):
        x = torch.randn(4, 5, 3, 2, dtype=torch.float64)
        reference(x)
        update_running_stats(mine, x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False), 24)
    torch.testing.assert_close(mine.running_mean, reference.running_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(mine.running_var, reference.running_var, rtol=1e-12, atol=0)
    if tracked:
        assert int(mine.num_batches_tracked) == int(reference.num_batches_tracked) == 3
    else:
        assert mine.num_batches_tracked is None


def test_update_running_stats_leaves_eval_and_untracked_bns_alone():
    for bn in (nn.BatchNorm2d(3).eval(), nn.BatchNorm2d(3, track_running_stats=False)):
        before = copy.deepcopy(bn.state_dict())
        update_running_stats(bn, torch.ones(3), torch.ones(3), 8)
        for key, value in bn.state_dict().items():
            assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("kernel,bias", [(1, True), (3, False)], ids=["1x1-bias", "3x3"])
def test_fold_bn_matches_conv_then_bn(kernel, bias):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, kernel, padding=kernel // 2, bias=bias).double()
    bn = nn.BatchNorm2d(6).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.normal_()
        bn.bias.normal_()
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    weight, b = fold_bn(conv, bn)
    assert weight.shape == conv.weight.shape
    got = nn.functional.conv2d(x, weight, b, padding=kernel // 2)
    torch.testing.assert_close(got, bn(conv(x)), rtol=1e-12, atol=1e-12)
    weight, b = fold_bn(conv, nn.Identity())
    assert weight is conv.weight and (b is conv.bias if bias else not b.any())
    with pytest.raises(NotImplementedError, match="running statistics"):
        fold_bn(conv, nn.BatchNorm2d(6, track_running_stats=False).double().eval())


@pytest.mark.skipif(not has_native(), reason="saffnet_fast._C not built")
@pytest.mark.parametrize("tracked", [True, False], ids=["tracked", "untracked"])
def test_native_block_running_statistics_with_momentum_none(tracked):
    """A fast block in training updates its BNs' running statistics as the reference does
    when momentum is None, with and without num_batches_tracked."""
    from saffnet_fast.fast import FastSplitResplice
    from saffnet_fast.nn.reference import SplitResplice

    torch.manual_seed(2)
    reference = SplitResplice(16, 4, dropout=0.0).double().train()
    fast = FastSplitResplice(16, 4, dropout=0.0, backend="native").double().train()
    fast.load_state_dict(reference.state_dict())
    for block in (reference, fast):
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                if not tracked:
                    m.num_batches_tracked = None
    for _ in range(2):
        x = torch.randn(2, 16, 4, 3, dtype=torch.float64)
        fast(x)
        reference(x)
    for (name, a), (_, b) in zip(fast.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)

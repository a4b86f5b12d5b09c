"""Every public constructor of the reference, fast and SA blocks checks its arguments where
they enter: a ValueError / TypeError that names the argument and the value given."""
import pytest

from saffnet_fast.nn import reference as ref
from saffnet_fast.nn import sa_blocks as sa
from saffnet_fast.fast import (FastAFF, FastCoordAttention, FastSAWF, FastSCAFF,
                                  FastSplitResplice)

NAN, INF = float("nan"), float("inf")

# (id, constructor call, error type, argument named first in the message, text of the value)
BAD = [
    ("fc-channels-0", lambda: ref.FC(0), ValueError, "channels", "0"),
    ("fc-channels-float", lambda: ref.FC(8.0), TypeError, "channels", "8.0"),
    ("fc-channels-bool", lambda: ref.FC(True), TypeError, "channels", "True"),
    ("fc-dropout-1", lambda: ref.FC(8, dropout=1.0), ValueError, "dropout", "1.0"),
    ("fc-dropout-nan", lambda: ref.FC(8, dropout=NAN), ValueError, "dropout", "nan"),
    ("fc-dropout-str", lambda: ref.FC(8, dropout="0.1"), TypeError, "dropout", "'0.1'"),
    ("fc-slope-inf", lambda: ref.FC(8, negative_slope=INF), ValueError, "negative_slope", "inf"),
    ("fc-slope-nan", lambda: ref.FC(8, negative_slope=NAN), ValueError, "negative_slope", "nan"),
    ("fc-slope-none", lambda: ref.FC(8, negative_slope=None), TypeError, "negative_slope",
     "None"),
    ("widths-channels-neg", lambda: ref.split_resplice_widths(-8, 2), ValueError, "channels",
     "-8"),
    ("widths-splits-float", lambda: ref.split_resplice_widths(8, 2.0), TypeError, "splits",
     "2.0"),
    ("sr-channels-0", lambda: ref.SplitResplice(0), ValueError, "channels", "0"),
    ("sr-channels-str", lambda: ref.SplitResplice("64"), TypeError, "channels", "'64'"),
    ("sr-splits-1", lambda: ref.SplitResplice(64, 1), ValueError, "splits", "1"),
    ("sr-splits-not-dividing", lambda: ref.SplitResplice(64, 6), ValueError, "channels", "64"),
    ("sr-dropout-neg", lambda: ref.SplitResplice(32, 4, dropout=-0.1), ValueError, "dropout",
     "-0.1"),
    ("sr-slope-nan", lambda: ref.SplitResplice(32, 4, negative_slope=NAN), ValueError,
     "negative_slope", "nan"),
    ("ca-inp-0", lambda: ref.CoordAttention(0), ValueError, "inp", "0"),
    ("ca-inp-float", lambda: ref.CoordAttention(16.0), TypeError, "inp", "16.0"),
    ("ca-oup-differs", lambda: ref.CoordAttention(16, 8), ValueError, "oup", "8"),
    ("ca-reduction-0", lambda: ref.CoordAttention(16, reduction=0), ValueError, "reduction",
     "0"),
    ("ca-reduction-float", lambda: ref.CoordAttention(16, reduction=2.5), TypeError,
     "reduction", "2.5"),
    ("aff-channels-0", lambda: ref.AFF(0), ValueError, "channels", "0"),
    ("aff-r-0", lambda: ref.AFF(64, 0), ValueError, "r", "0"),
    ("aff-r-neg", lambda: ref.AFF(64, -4), ValueError, "r", "-4"),
    ("aff-r-over-channels", lambda: ref.AFF(16, 32), ValueError, "r", "32"),
    ("aff-r-float", lambda: ref.AFF(64, 2.5), TypeError, "r", "2.5"),
    ("se-channels-0", lambda: ref.SEPlus(0), ValueError, "channels", "0"),
    ("se-reduction-0", lambda: ref.SEPlus(16, 0), ValueError, "reduction", "0"),
    ("sawf-channels-neg", lambda: ref.SAWF(-16), ValueError, "channels", "-16"),
    ("sawf-se-reduction-0", lambda: ref.SAWF(16, se_reduction=0), ValueError, "se_reduction",
     "0"),
    ("sawf-aff-r-over", lambda: ref.SAWF(16, aff_r=32), ValueError, "aff_r", "32"),
    ("scaff-channels-0", lambda: ref.SCAFF(0), ValueError, "channels", "0"),
    ("scaff-ca-reduction-neg", lambda: ref.SCAFF(16, ca_reduction=-1), ValueError,
     "ca_reduction", "-1"),
    ("scaff-aff-r-0", lambda: ref.SCAFF(16, aff_r=0), ValueError, "aff_r", "0"),
    # the fast modules: the same checks, and the backend name
    ("fast-ca-reduction-0", lambda: FastCoordAttention(16, reduction=0), ValueError,
     "reduction", "0"),
    ("fast-scaff-aff-r-over", lambda: FastSCAFF(16, aff_r=17), ValueError, "aff_r", "17"),
    ("fast-sawf-channels-0", lambda: FastSAWF(0), ValueError, "channels", "0"),
    ("fast-aff-r-0", lambda: FastAFF(64, 0), ValueError, "r", "0"),
    ("fast-sr-dropout-1", lambda: FastSplitResplice(32, 4, dropout=1.0), ValueError, "dropout",
     "1.0"),
    ("fast-backend-name", lambda: FastSCAFF(16, backend="gpu"), ValueError, "backend", "'gpu'"),
    ("fast-backend-type", lambda: FastSAWF(16, backend=3), TypeError, "backend", "3"),
    # SAFFNet's blocks
    ("scbottle-planes-0", lambda: sa.SCBottle(256, 0), ValueError, "planes", "0"),
    ("scbottle-stride-float", lambda: sa.SCBottle(256, 64, 1.0), TypeError, "stride", "1.0"),
    ("scbottle-stride-2", lambda: sa.SCBottle(256, 64, 2), ValueError, "stride", "2"),
    ("scbottle-downsample", lambda: sa.SCBottle(64, 64, downsample="conv"), TypeError,
     "downsample", "str"),
    ("scbottle-dropout", lambda: sa.SCBottle(256, 64, dropout=1.5), ValueError, "dropout",
     "1.5"),
    ("scbottle-slope", lambda: sa.SCBottle(256, 64, negative_slope=INF), ValueError,
     "negative_slope", "inf"),
    ("stem-in-channels-float", lambda: sa.SAStem(3.0), TypeError, "in_channels", "3.0"),
    ("stem-aff-r-0", lambda: sa.SAStem(3, 64, aff_r=0), ValueError, "aff_r", "0"),
    ("transition-stride-3", lambda: sa.SATransitionBlock(32, 64, 3), ValueError, "stride", "3"),
    ("transition-stride-bool", lambda: sa.SATransitionBlock(32, 64, True), TypeError, "stride",
     "True"),
    ("transition-ca-reduction-0", lambda: sa.SATransitionBlock(32, 64, ca_reduction=0),
     ValueError, "ca_reduction", "0"),
    ("up-scale-1", lambda: sa.SAUpSample(64, 32, 1), ValueError, "scale_factor", "1"),
    ("up-placement", lambda: sa.SAUpSample(64, 32, 2, placement="middle"), ValueError,
     "placement", "'middle'"),
    ("up-se-reduction-0", lambda: sa.SAUpSample(64, 32, 2, se_reduction=0), ValueError,
     "se_reduction", "0"),
    ("up-aff-r-over", lambda: sa.SAUpSample(64, 32, 2, aff_r=64), ValueError, "aff_r", "64"),
    ("down-steps-0", lambda: sa.SADownSample(32, 64, 0), ValueError, "steps", "0"),
    ("down-placement-type", lambda: sa.SADownSample(32, 64, 1, placement=["source"]),
     ValueError, "placement", "['source']"),
    ("fuse-channels-int", lambda: sa.SAFuseBlock(32), TypeError, "channels", "32"),
    ("fuse-channels-one", lambda: sa.SAFuseBlock([32]), ValueError, "channels", "[32]"),
    ("fuse-channels-0", lambda: sa.SAFuseBlock([32, 0]), ValueError, "channels", "0"),
    ("fuse-multi-scale", lambda: sa.SAFuseBlock([32, 64], "yes"), TypeError,
     "multi_scale_output", "'yes'"),
]


@pytest.mark.parametrize("make, error, argument, given",
                         [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_constructor_argument_is_named(make, error, argument, given):
    with pytest.raises(error) as info:
        make()
    message = str(info.value)
    assert message.startswith(f"{argument}: expected "), message
    assert given in message.split("got", 1)[-1], message


"""Building blocks of SAFFNet.

``saffnet_fast.nn.reference`` holds the plain PyTorch definitions and
``saffnet_fast.nn.sa_blocks`` the paper's four changes built from them. The drop-in fast
modules (same constructor arguments plus ``backend=``, same state_dict) live in
:mod:`saffnet_fast.fast`; ``saffnet_fast.nn.FastSCAFF`` etc. name them too, loaded on first
use so that importing the reference blocks never imports the fast path.
"""
from .reference import (AFF, FC, SAWF, SCAFF, CoordAttention, HSwish, SEPlus,  # noqa: F401
                        SplitResplice, split_resplice_widths)
from .sa_blocks import (SADownSample, SAFuseBlock, SAStem, SATransitionBlock,  # noqa: F401
                        SAUpSample, SCBottle)

_FAST = ("FastAFF", "FastCoordAttention", "FastSAWF", "FastSCAFF", "FastSplitResplice")


def __getattr__(name):
    if name in _FAST:
        from .. import fast
        return getattr(fast, name)
    raise AttributeError(f"module 'saffnet_fast.nn' has no attribute {name!r}")

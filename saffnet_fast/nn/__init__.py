"""Building blocks of SAFFNet.

``saffnet_fast.nn.reference`` holds the plain PyTorch definitions; ``saffnet_fast.nn.fast``
the drop-in fast modules (same constructor arguments plus ``backend=``, same state_dict),
which dispatch to the native extension or Triton kernels when available.
"""
from .reference import (AFF, FC, SAWF, SCAFF, CoordAttention, HSwish, SEPlus,  # noqa: F401
                        SplitResplice, split_resplice_widths)
from .fast import (FastAFF, FastCoordAttention, FastSAWF, FastSCAFF,  # noqa: F401
                   FastSplitResplice)
from .sa_blocks import (SADownSample, SAFuseBlock, SAStem, SATransitionBlock,  # noqa: F401
                        SAUpSample, SCBottle)

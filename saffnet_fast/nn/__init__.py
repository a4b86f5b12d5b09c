"""Building blocks of SAFFNet.

``saffnet_fast.nn.reference`` holds the plain PyTorch definitions; the names exported here
are those definitions until the fast modules (native/Triton backends) land, which keep the
same constructor arguments and state_dict.
"""
from .reference import (AFF, FC, SAWF, SCAFF, CoordAttention, HSwish, SEPlus,  # noqa: F401
                        SplitResplice, split_resplice_widths)

"""The fast modules and what they run on.

* :mod:`.modules`: ``FastCoordAttention``, ``FastSCAFF``, ``FastSAWF``, ``FastAFF``,
  ``FastSplitResplice`` (drop-in subclasses of the reference blocks, plus ``backend=``);
* :mod:`.dispatch`: which backend serves a call (explicit tables), autocast, torch.compile;
* :mod:`.blocks`: each block's algorithm, written once against the op table
  (:data:`saffnet_fast.ops.OPS`);
* :mod:`.bn`: BN folding, batch statistics, the running-statistics update, the
  folded-parameter cache;
* :mod:`.convert`: ``convert``, ``fold_batchnorm``, ``optimize_for_inference`` (the first
  and last also as ``saffnet_fast.convert`` / ``saffnet_fast.optimize_for_inference``).
"""
from . import modules
from .dispatch import run_op, select_implementation
from .modules import (FAST_FROM_REFERENCE, REFERENCE_FROM_FAST, FastAFF, FastCoordAttention,
                      FastSAWF, FastSCAFF, FastSplitResplice)

__all__ = [*modules.__all__, "select_implementation", "run_op"]

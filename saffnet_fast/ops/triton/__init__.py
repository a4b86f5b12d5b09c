"""Triton kernels of SAFFNet's ops, registered under ``torch.ops.saffnet_fast_triton`` with
the same names and schemas as the native ops (CUDA tensors, or any tensor under
``TRITON_INTERPRET=1``). Importing this package imports triton; ``import saffnet_fast``
never does: :func:`saffnet_fast.ops.kernel` imports it on first use.

One module per op family, as in :mod:`saffnet_fast.ops`:

* ``coord``: coord_pool, coord_scale, weighted_mean, plane_mean; backward one fused pass per
  plane (coord_scale, weighted_mean) or a broadcast (coord_pool, plane_mean);
* ``aff``: aff_fuse, aff_pair, aff_moments; backward fused, the tile's forward recomputed;
* ``split_resplice``: split_resplice (backward: ATen convolution gradients, shared with the
  native op), split_resplice_train (backward: fused kernels per step);
* ``split_resplice_tc``: split_resplice_tiled, the inference form in one launch on tensor
  cores (registered with custom_op: the native schema has int arguments; backward as
  split_resplice's).

The native rows this backend lacks (aff_input, aff_combine, aff_pair_combine, pooled_linear,
pooled_conv1x1) are absent from its rows of the op table: the blocks take their other forms.
Dtypes: float32, float16, bfloat16 (float32 arithmetic), float64.
Registered with ``torch.library.triton_op`` (every launch through ``wrap_triton``), so
``torch.compile`` sees into them; their fake kernels are the ops themselves, traced on
fake tensors (the launches skipped).
"""
from . import aff, coord, split_resplice, split_resplice_tc  # noqa: F401  (registers the ops)

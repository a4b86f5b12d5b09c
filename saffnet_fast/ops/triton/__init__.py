"""Triton kernels of SAFFNet's fused ops (CUDA tensors, or any tensor under
``TRITON_INTERPRET=1``).

One module per op: ``coordinate_attention``, ``aff`` (the official AFF(x, residual)),
``scaff``, ``sawf``, ``split_resplice`` (+
``split_resplice_train`` for its autograd path); the passes they share live in
``coord_pool`` (per-plane reductions) and ``aff_fuse`` (the per-pixel AFF bottleneck and
weighting, and the batch statistics of its BNs in training).

| op | training | eval | backward |
|---|---|---|---|
| coordinate_attention | yes | yes | fused (coord_apply_backward) + pooling broadcast (see coord_pool) |
| scaff, sawf | yes (BN batch stats, running stats) | yes | fused (aff_fuse_backward, local_stats_backward, weighted_mean_backward) |
| aff | yes (local_stats on x + residual) | yes | fused (aff_pair_backward, local_stats_backward) |
| split_resplice | yes (batch stats, counter-RNG dropout) | yes (1 launch/step) | fused kernels per step (split_resplice_train_backward op), also for BN-folded blocks |

Dtypes: float32, float16, bfloat16 (float32 arithmetic), float64. Each op module defines ``triton_<op>(module, x)``
and ``unsupported_reason(module, x)``: the fast modules ask the latter first, so ``auto``
skips Triton (and an explicit ``backend='triton'`` raises) for a case the kernels do not
cover. Kernels are registered with ``torch.library.triton_op`` in the ``saffnet_triton``
namespace so ``torch.compile`` sees into them.

Importing this package imports triton; ``import saffnet_fast`` never does.
"""

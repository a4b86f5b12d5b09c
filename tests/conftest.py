"""Test-wide settings.

Parity is measured in full float32: cuDNN convolutions default to TF32 on Ampere and later
GPUs (torch.backends.cudnn.allow_tf32 is True), which puts ~1e-4 relative error into the
*reference* modules' float32 convolutions (2e-5 seen on an H100 in the 1e-5 parity tests).
TF32 is a speed setting for users to choose; the kernels' parity is checked without it.
"""
import pytest
import torch

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(params=["stored", "recompute"])
def local_branch(request, monkeypatch):
    """Runs a training test with both ways the native SCAFF / SAWF / AFF run AFF's local
    branch (saffnet_fast.fast.blocks.TRAINING_LOCAL_BRANCH)."""
    from saffnet_fast import has_native
    if not has_native():
        pytest.skip("saffnet_fast._C not built")
    from saffnet_fast.fast import blocks
    monkeypatch.setattr(blocks, "TRAINING_LOCAL_BRANCH", request.param)
    return request.param

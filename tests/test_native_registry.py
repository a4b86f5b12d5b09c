"""Every op of the extension is listed in NATIVE_OPS, has a CPU kernel, a fake kernel (it
traces under FakeTensorMode), and, in a CUDA build, a CUDA kernel."""
from __future__ import annotations

import pytest
import torch

from saffnet_fast import has_native, native_build_info

pytestmark = pytest.mark.skipif(not has_native(),
                                reason="saffnet_fast._C not built (pip install -e .)")


def registered_ops():
    return sorted(n for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("saffnet_fast::"))


def test_native_ops_list_matches_registrations():
    from saffnet_fast.ops import NATIVE_OPS
    assert sorted(NATIVE_OPS) == registered_ops()


@pytest.mark.parametrize("key", ["CPU", "CUDA"])
def test_every_op_has_a_kernel(key):
    if key == "CUDA" and not native_build_info().get("with_cuda"):
        pytest.skip("extension built without CUDA kernels")
    missing = [n for n in registered_ops()
               if not torch._C._dispatch_has_kernel_for_dispatch_key(n, key)]
    assert not missing, f"no {key} kernel: {missing}"


def test_ops_trace_under_fake_tensors():
    """The fake kernels (opcheck exercises each one in the per-op test files)."""
    import saffnet_fast.ops  # noqa: F401  (registers the fake kernels)
    from torch._subclasses.fake_tensor import FakeTensorMode
    ops = torch.ops.saffnet_fast
    with FakeTensorMode():
        x = torch.empty(2, 16, 5, 4)
        h, w = ops.coord_pool(x)
        assert h.shape == (2, 16, 5) and w.shape == (2, 16, 4)
        assert ops.coord_scale(x, h, w).shape == x.shape
        args = (x, h, w, torch.empty(2, 16), torch.empty(4, 16), torch.empty(4),
                torch.empty(16, 4), torch.empty(16))
        assert ops.aff_fuse(*args).shape == x.shape
        widths = [2, 3, 3, 3, 3, 3, 3]
        out, carries = ops.split_resplice(x, [torch.empty(c, c, 3, 3) for c in widths],
                                          [torch.empty(c) for c in widths], 0.1)
        assert out.shape == x.shape and carries.shape == (2, 6, 5, 4)

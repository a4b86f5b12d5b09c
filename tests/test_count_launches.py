"""benchmarks/count_launches.py: kernel launches of a CUDA forward counted on a CPU machine.
It registers fake CUDA hooks before torch is imported, so it runs in its own process here;
CI runs the full count with --check against benchmarks/launch_budget.json."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from saffnet_fast import has_native

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "count_launches.py"

pytestmark = pytest.mark.skipif(not has_native(), reason="saffnet_fast._C not built")


def _run(*args, code: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, str(SCRIPT), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    if "fake-CUDA shim unavailable" in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    return proc


def test_counting_rules_and_launcher_mirrors():
    """A conv + ReLU is two launches (three with a bias: cuDNN's convolution, then PyTorch's
    bias add), an op missing from the tables is an error naming it,
    and every native launcher's source still matches the mirror the counts are read from."""
    code = f"""
import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r})
import count_launches as cl
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
with cl.fake_cuda_build(), FakeTensorMode():
    x = torch.empty(2, 3, 9, 7, device="cuda")
    for bias in (False, True):
        conv = cl.to_fake_cuda(torch.nn.Conv2d(3, 8, 3, padding=1, bias=bias))
        counter = cl.LaunchCounter()
        with torch.no_grad(), counter:
            torch.relu(conv(x))
        print(f"conv_relu_bias_{{bias}}", counter.total())
    try:
        cl.launches_of("aten.not_an_op.default", (), {{}}, None)
    except cl.UnknownOpError as exc:
        print("unknown", "not_an_op" in str(exc))
print("stale", cl.stale_launchers())
"""
    proc = _run(code=code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["conv_relu_bias_False"] == "2"
    assert lines["conv_relu_bias_True"] == "3"
    assert lines["unknown"] == "True"
    assert lines["stale"] == "[]", "a csrc launcher changed: update count_launches' mirror"


def test_optimized_model_on_cuda_takes_the_routed_ops(tmp_path):
    """On a (fake) CUDA build, auto runs SCAFF / SAWF inference on Triton's one-pass aff_fuse
    (tensor-core dots; fast.dispatch.CUDA_TRITON_FIRST_INFERENCE), never the native
    aff_fuse / aff_pair / aff_moments (scalar CUDA kernels, fast.dispatch.CUDA_UNROUTED), and
    SR on the tensor-core split_resplice_tiled; the count is below eager's. The explicit
    native model still runs its own kernels."""
    out = tmp_path / "count.json"
    proc = _run("--input", "64x48", "--batch", "2", "--providers", "eager,optimized",
                "--no-training", "--json", "--out", str(out), "--budget", str(tmp_path / "none"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    optimized = result["inference"]["optimized"]
    calls = optimized["fused_op_calls"]
    assert calls.get("saffnet_fast_triton::aff_fuse", 0) > 0
    assert not any(op.startswith("saffnet_fast::aff_") for op in calls), calls
    assert not any(op.endswith("::aff_moments") for op in calls)
    assert any(op.endswith("::split_resplice_tiled") for op in calls)
    assert 0 < optimized["launches"] < result["inference"]["eager"]["launches"]


def test_check_fails_over_budget(tmp_path):
    budget = tmp_path / "budget.json"
    proc = _run("--batch", "2", "--providers", "hrnet_w32", "--no-training", "--input", "64x64",
                "--budget", str(budget), "--update-budget")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(budget.read_text())
    data["inference"]["hrnet_w32"] = 10
    budget.write_text(json.dumps(data))
    proc = _run("--batch", "2", "--providers", "hrnet_w32", "--no-training", "--input", "64x64",
                "--budget", str(budget), "--check")
    assert proc.returncode == 1
    assert "over the budget of 10" in proc.stderr

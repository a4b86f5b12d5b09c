"""Without the extension (SAFFNET_DISABLE_NATIVE=1 stands in for a missing or broken build):
`import saffnet_fast` works, has_native() is False, one warning line says why, and asking for
backend='native' raises an error that names the torch version the build must match."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CODE = (
    "import torch, saffnet_fast, saffnet_fast.ops\n"
    "print('HAS_NATIVE:', saffnet_fast.has_native())\n"
    "try:\n"
    "    saffnet_fast.resolve_backend('native', 'cpu')\n"
    "except saffnet_fast.BackendUnavailableError as exc:\n"
    "    print('ERROR:', exc)\n"
    "try:\n"
    "    saffnet_fast.ops.kernel('coord_pool', 'native')(torch.zeros(1, 1, 1, 1))\n"
    "except Exception as exc:\n"
    "    print('OPS_ERROR:', type(exc).__name__, exc)\n"
)


@pytest.fixture(scope="module")
def disabled_run():
    env = dict(os.environ, SAFFNET_DISABLE_NATIVE="1", PYTHONWARNINGS="default")
    env.pop("SAFFNET_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def _line(proc, prefix):
    lines = [line for line in proc.stdout.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, proc.stdout
    return lines[0]


def test_import_works_without_extension(disabled_run):
    assert _line(disabled_run, "HAS_NATIVE:") == "HAS_NATIVE: False"
    assert "saffnet_fast._C" in _line(disabled_run, "ERROR:")


def test_native_entry_point_raises_clear_error(disabled_run):
    line = _line(disabled_run, "OPS_ERROR:")
    assert "NativeUnavailableError" in line and torch.__version__ in line


def test_resolve_backend_error_names_torch_version(disabled_run):
    assert torch.__version__ in _line(disabled_run, "ERROR:")


def test_exactly_one_warning_line(disabled_run):
    warning_lines = [line for line in disabled_run.stderr.splitlines() if "Warning" in line]
    assert len(warning_lines) == 1, disabled_run.stderr


AMP_CODE = (
    "import torch\n"
    "from saffnet_fast.fast import FastSAWF, FastSCAFF, FastSplitResplice\n"
    "net = torch.nn.Sequential(FastSCAFF(16), FastSAWF(16), FastSplitResplice(16, splits=4))\n"
    "x = torch.randn(2, 16, 6, 5)\n"
    "for _ in range(2):\n"
    "    with torch.autocast('cpu', torch.bfloat16):\n"
    "        y = net(x)\n"
    "    y.float().sum().backward()\n"
    "print('FINITE:', bool(torch.isfinite(y).all()))\n"
)


def test_amp_without_extension_falls_back_with_one_warning_for_all_blocks():
    """Three kinds of block, two steps under autocast: the reference runs them all and the
    one reason (no extension) is told once."""
    env = dict(os.environ, SAFFNET_DISABLE_NATIVE="1", PYTHONWARNINGS="default")
    env.pop("SAFFNET_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", AMP_CODE], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _line(proc, "FINITE:") == "FINITE: True"
    fallbacks = [line for line in proc.stderr.splitlines()
                 if "RuntimeWarning: saffnet_fast: backend='auto'" in line]
    assert len(fallbacks) == 1, proc.stderr
    assert "reference" in fallbacks[0] and "saffnet_fast._C" in fallbacks[0]

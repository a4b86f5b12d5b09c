#!/usr/bin/env bash
# Wheel check: the package installs as a package, not only as an editable checkout.
#
#   .ci/wheel_check.sh BUILD_PYTHON
#
# Builds a wheel with BUILD_PYTHON (a venv holding torch, ninja, setuptools and wheel:
# `pip wheel --no-build-isolation --no-deps .`), installs it with its core dependencies and
# no extras into a fresh virtual environment, and from a folder outside the checkout (so the
# source tree cannot stand in for the installed package) runs `saffnet info`, one native op,
# every command's --help, a smoke run of the main job, and the optional-extra message of
# `saffnet export --onnx` (onnx is an extra, absent here).
set -euo pipefail

BUILD_PY="$1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$(date +%s)
WHEEL_DIR="$ROOT/dist"
VENV="$ROOT/.ci-wheel-venv"
RUN_DIR="$(mktemp -d /tmp/saffnet_wheel_check.XXXXXX)"
trap 'rm -rf "$RUN_DIR"' EXIT

rm -rf "$WHEEL_DIR" "$VENV"
(cd "$ROOT" && "$BUILD_PY" -m pip wheel -q --no-build-isolation --no-deps . -w "$WHEEL_DIR")
WHEEL=$(ls "$WHEEL_DIR"/saffnet_fast-*.whl)
echo "wheel_check: built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1)) after $(( $(date +%s) - START )) s"
python3 - "$WHEEL" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for needed in ("saffnet_fast/_C", "saffnet_fast/configs/synthetic_quick.yaml"):
    if not any(n.startswith(needed) for n in names):
        sys.exit(f"wheel_check: FAILED: {needed} is not in the wheel")
PYEOF

python3 -m venv "$VENV"
# torch first, pinned to the build's version (the extension is built against it); then the
# wheel alone, which brings its core dependencies and no extras.
TORCH_VERSION=$("$BUILD_PY" -c 'import torch; print(torch.__version__.split("+")[0])')
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
"$VENV/bin/pip" install -q "$WHEEL"

cd "$RUN_DIR"
export PATH="$VENV/bin:$PATH"
python - <<'PYEOF'
import importlib, os, sys
import saffnet_fast
assert "site-packages" in saffnet_fast.__file__, f"imported from {saffnet_fast.__file__}"
assert saffnet_fast.has_native(), saffnet_fast.native_load_error()
for extra in ("onnx", "onnxruntime", "triton", "pytest"):
    assert importlib.util.find_spec(extra) is None, f"{extra} is installed: the check needs a bare install"
import torch
from saffnet_fast.cli.main import SUBCOMMANDS
for name, (module, _help) in SUBCOMMANDS.items():
    importlib.import_module(module)
x = torch.randn(2, 8, 5, 7)
pool_h, pool_w = torch.ops.saffnet_fast.coord_pool(x)
torch.testing.assert_close(pool_h, x.mean(3))
torch.testing.assert_close(pool_w, x.mean(2))
print(f"wheel_check: imported every command's module; coord_pool matches ATen; from {saffnet_fast.__file__}")
PYEOF
saffnet info
for command in $(python -c 'from saffnet_fast.cli.main import SUBCOMMANDS; print(*SUBCOMMANDS)'); do
    saffnet "$command" --help > /dev/null
done
echo "wheel_check: every command's --help runs"
saffnet demo --smoke --out "$RUN_DIR/demo" > "$RUN_DIR/demo.log" 2>&1 || {
    cat "$RUN_DIR/demo.log"; echo "wheel_check: FAILED: saffnet demo --smoke"; exit 1; }
tail -n 8 "$RUN_DIR/demo.log"
saffnet export --checkpoint "$RUN_DIR/demo/checkpoint.pth" --safetensors "$RUN_DIR/out/w.safetensors"
test -s "$RUN_DIR/out/w.safetensors"
set +e
saffnet export --checkpoint "$RUN_DIR/demo/checkpoint.pth" --onnx "$RUN_DIR/out/m.onnx" 2> "$RUN_DIR/onnx.err"
rc=$?
set -e
if [[ $rc -ne 2 ]] || [[ $(wc -l < "$RUN_DIR/onnx.err") -ne 1 ]] || ! grep -q 'pip install "saffnet_fast\[export\]"' "$RUN_DIR/onnx.err"; then
    cat "$RUN_DIR/onnx.err"
    echo "wheel_check: FAILED: export --onnx without the export extra should exit 2 with one line naming the pip command (rc $rc)"
    exit 1
fi
echo "wheel_check: export --onnx without onnx: $(cat "$RUN_DIR/onnx.err")"
echo "wheel_check: OK after $(( $(date +%s) - START )) s"

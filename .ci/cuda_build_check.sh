#!/usr/bin/env bash
# CUDA build check: compile and link saffnet_fast._C with its CUDA kernels against a CUDA
# build of torch (no GPU needed), then fail unless every op in torch.ops.saffnet_fast has a
# CUDA kernel registered, and every op listed in saffnet_fast.ops.NATIVE_OPS exists.
#
#   .ci/cuda_build_check.sh [PYTHON]        (default: $PYTHON, else python3)
#
# PYTHON must have a CUDA build of torch plus ninja, setuptools, wheel, pybind11; nvcc from
# CUDA_HOME (default /usr/local/cuda). The tree (tracked + untracked-not-ignored files) is
# copied to a temporary directory and built there, so an in-place CPU build is untouched.
# Environment: TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 2), KEEP_BUILD=1 keeps
# the temporary directory.
set -euo pipefail

PY="${1:-${PYTHON:-python3}}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$(date +%s)

"$PY" - <<'PYEOF'
import sys, torch
if torch.version.cuda is None:
    sys.exit(f"cuda_build_check: {sys.executable} has torch {torch.__version__}, a CPU build; "
             "a CUDA build of torch is needed")
print(f"cuda_build_check: torch {torch.__version__} (CUDA {torch.version.cuda})")
PYEOF

WORK="$(mktemp -d /tmp/saffnet_cuda_check.XXXXXX)"
if [[ "${KEEP_BUILD:-0}" != "1" ]]; then trap 'rm -rf "$WORK"' EXIT; fi
(cd "$ROOT" && git ls-files --cached --others --exclude-standard -z |
    tar --null --files-from=- -cf - 2>/dev/null) | tar -xf - -C "$WORK"
# drop an in-place build that may have been copied as an untracked file
find "$WORK/saffnet_fast" -name '_C*.so' -delete

# CUDA 13 torch wheels ship the CUDA headers and libraries under site-packages/nvidia/cu13;
# torch's extension build needs them on the compiler's search paths.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
for N in "$SITE"/nvidia/cu1*; do
    if [[ -d "$N/include" ]]; then
        export CPATH="$N/include${CPATH:+:$CPATH}"
        export LIBRARY_PATH="$N/lib:$CUDA_HOME/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}"
    fi
done
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-2}"

echo "cuda_build_check: building in $WORK (arch ${TORCH_CUDA_ARCH_LIST}, MAX_JOBS ${MAX_JOBS})"
(cd "$WORK" && "$PY" setup.py build_ext --inplace) > "$WORK/build.log" 2>&1 || {
    tail -n 60 "$WORK/build.log"; echo "cuda_build_check: FAILED (build)"; exit 1; }
grep -A8 "saffnet_fast build configuration" "$WORK/build.log" || true

(cd "$WORK" && "$PY" - <<'PYEOF'
import sys
sys.path.insert(0, ".")
import torch
import saffnet_fast._C as C
import saffnet_fast
from saffnet_fast.ops import NATIVE_OPS

info = C.build_info()
print("cuda_build_check: build_info", info)
problems = []
if not info.get("with_cuda"):
    problems.append("build_info()['with_cuda'] is False")
if not saffnet_fast.has_native():
    problems.append(f"saffnet_fast.has_native() is False ({saffnet_fast.native_load_error()})")
registered = sorted(n for n in torch._C._dispatch_get_all_op_names()
                    if n.startswith("saffnet_fast::"))
for name in registered:
    cpu = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    print(f"  {name:45s} CPU={'yes' if cpu else 'NO '} CUDA={'yes' if cuda else 'NO'}")
    if not cuda:
        problems.append(f"{name}: no CUDA kernel registered")
    if not cpu:
        problems.append(f"{name}: no CPU kernel registered")
for name in NATIVE_OPS:
    if name not in registered:
        problems.append(f"{name}: listed in NATIVE_OPS but not defined by the extension")
if not registered:
    problems.append("no ops registered under torch.ops.saffnet_fast")
if problems:
    print("cuda_build_check: FAILED\n  " + "\n  ".join(problems))
    sys.exit(1)
print(f"cuda_build_check: OK, {len(registered)} ops, every one with CPU and CUDA kernels")
PYEOF
)
echo "cuda_build_check: took $(( $(date +%s) - START )) s"

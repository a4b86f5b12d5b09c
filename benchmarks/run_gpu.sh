#!/usr/bin/env bash
# One command on a lent GPU machine (Python 3.12, CUDA torch, no network):
#   build the extension with CUDA kernels, run the CUDA/Triton parity tests, every GPU
#   fused-op benchmark and the whole-model `saffnet bench`, writing everything under $OUT
#   (set by the device runner; default benchmarks/results/gpu-<date>) and copying the
#   result JSONs to benchmarks/results/.
#
# usage: benchmarks/run_gpu.sh [PHASE...]       (default: all = build test sr-tiles ops model)
#   first     THE FIRST CALL on a lent H100 (spec/gpu.md §5), under 7 minutes with the
#             build: build, benchmarks/gpu_first_phase.py (ceilings; SAFFNet batch 64 fp16
#             at 256x192 per provider, each checked against float32 before it is timed;
#             kernels per forward and the top-25 kernel profiles; per-block timings),
#             benchmarks/bench_split_resplice_tc.py --quick, the CUDA/Triton parity tests
#             in the time left; the summary table printed last. Run it with
#             DEADLINE_S=420 PACK_OUT=1 (at most 8 files come back from $OUT).
#             Dry run on a CPU: BENCH_DEVICE=cpu benchmarks/run_gpu.sh first
#   build     pip install --no-build-isolation --no-deps -e . with FORCE_CUDA=1
#   test      pytest tests -k "cuda or triton" (parity on the GPU)
#   ops       fused-op benchmarks, spec matrix (forward batch 64, training batch 32,
#             float32 + float16), one pytest run per op so a time limit loses one op at most
#   ops-split_resplice, ops-scaff, ops-sawf   one op of the ops phase (for short calls)
#   ops-full  the full matrix (batch 1/8/32/64, float32/float16/bfloat16): long, its own call
#   sr-tiles  benchmarks/tune_split_resplice_tiles.py: the single-launch SR per tile size
#             (SR(64), batch 64, 64×48, float32 + float16) against eager
#   model     saffnet bench --device cuda (float32 with training, then float16);
#             model-float32 and model-float16 run one half each (for short calls)
# The device runner limits one call to 10 minutes: there, call the phases one or two at a
# time: `run_gpu.sh build test`, `run_gpu.sh ops-split_resplice ops-sawf`,
# `run_gpu.sh ops-scaff`, `run_gpu.sh model-float32`, `run_gpu.sh model-float16` (build
# outputs stay on the machine between calls while it is warm; torch.compile of each shape is
# most of the benchmark phases' time).
#
# On the workplace's device tool (10-minute calls, 30 minutes of device time, at most 8
# files back from $OUT, a machine that goes back 30 s after a call): set DEADLINE_S (the
# seconds this call may use, e.g. 560) and PACK_OUT=1, and use the two lease phases:
#   lease-1   build, exception check, parity (-n 14, -v), the SR tile sizes, op benchmarks
#             without the compile provider (spec matrix, forward and forward + backward), the
#             model at batch 64 in float32 and float16 without compile and without training
#   lease-2   build, the compile provider of the op benchmarks, the model's compile
#             providers and the training step
# Steps run under `timeout` of the time left; a step that would start with under 30 s left
# is skipped and logged. PACK_OUT=1 leaves in $OUT only logs.tgz (every log) and the result
# JSONs, which the op and model benchmarks rewrite after each measurement (a step stopped
# by its time limit keeps what it measured).
#
# Environment: OUT, PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0),
#   BENCH_MAX_TIME (pytest-benchmark seconds per test, default 0.25), OPS_MATRIX (matrix of
#   the ops phase, default spec), BENCH_DEVICE (default cuda; cpu only for a dry run),
#   SAFFNET_BENCH_PROVIDERS (e.g. reference,native,triton to leave compile out),
#   PYTEST_ARGS (extra arguments of the test phase, e.g. "-n 8"), DEADLINE_S, PACK_OUT.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STAMP="$(date -u +%Y%m%dT%H%M%S)"
OUT="${OUT:-$ROOT/benchmarks/results/gpu-$STAMP}"
RESULTS="$ROOT/benchmarks/results"
PY="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
BENCH_MAX_TIME="${BENCH_MAX_TIME:-0.25}"
BENCH_DEVICE="${BENCH_DEVICE:-cuda}"  # cpu only to dry-run this script without a GPU
mkdir -p "$OUT" "$RESULTS"
LOG="$OUT/run_gpu.log"
FAILED=()

log() { echo "[$(date -u +%T)] $*" | tee -a "$LOG"; }

left() { echo $(( ${DEADLINE_S:-100000} - SECONDS )); }

step() {  # step NAME COMMAND...: run, log its output to $OUT/NAME.log, remember failures
    local name="$1"; shift
    local budget
    budget=$(left)
    [ "$budget" -gt "${STEP_MAX_S:-100000}" ] && budget=${STEP_MAX_S}  # a per-step cap
    if [ "$budget" -lt 30 ]; then
        log "skip $name: ${budget} s left of DEADLINE_S"
        FAILED+=("$name(skipped)")
        return 0
    fi
    log "start $name: $*"
    local t0=$SECONDS
    timeout "$budget" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    log "end $name: rc=$rc in $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || FAILED+=("$name(rc=$rc)")
    return 0
}

keep() {  # copy result files to benchmarks/results (committed by the lead)
    for f in "$@"; do [ -s "$f" ] && cp "$f" "$RESULTS/" && log "kept $(basename "$f")"; done
}

phase_build() {
    log "nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
    # The lent machine's default compiler (CC/CXX = /opt/gcc/bin/gcc, a wrapper around gcc
    # 13.3) built an extension with no dynamic libstdc++ dependency, and every C++ exception
    # it threw (the argument checks) killed the interpreter with SIGSEGV (2026-11-24, H100).
    # Build with the system gcc 12 where it is there; exception_check below verifies.
    if [ -z "${SAFFNET_KEEP_CXX:-}" ] && [ -x /usr/bin/g++-12 ] && [ -x /usr/bin/gcc-12 ]; then
        export CC=/usr/bin/gcc-12 CXX=/usr/bin/g++-12
    fi
    log "compiler: CC=${CC:-default} CXX=${CXX:-default}"
    # --no-deps: the machine has no network, and pycocotools is not installed there.
    step build env FORCE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
    log "libraries: $(ldd saffnet_fast/_C*.so | grep -oE 'lib(stdc\+\+|gcc_s|gomp)[^ ]*' | tr '\n' ' ')"
    step exception_check "$PY" -c "
import torch, saffnet_fast.ops
try:
    torch.ops.saffnet_fast.coord_pool(torch.randn(2, 3))
except ValueError as exc:
    print('a C++ argument error reaches Python:', str(exc).splitlines()[0][:100])
else:
    raise SystemExit('coord_pool accepted a 2-D tensor')"
    step info "$PY" -m saffnet_fast.cli.main info --json
    cp "$OUT/info.log" "$OUT/info.json" 2>/dev/null
}

phase_test() {
    # PYTEST_ARGS: e.g. "-n 8" (pytest-xdist is on the lent machine) to use its 16 cores
    # shellcheck disable=SC2086
    # -v: each test's name and outcome is in the log as it finishes (a run stopped by the
    # call's time limit prints no summary)
    step parity "$PY" -m pytest tests -k "cuda or triton" -v -rs -p no:cacheprovider \
        --junitxml="$OUT/parity-junit.xml" ${PYTEST_ARGS:-}
}

ops_run() {  # ops_run MATRIX OP
    local matrix="$1" op="$2"
    local base="ops-$matrix-$op-$STAMP"
    step "$base" "$PY" -m pytest benchmarks/test_ops_speed.py --benchmark-only -q -rs \
        -p no:cacheprovider --bench-device "$BENCH_DEVICE" --bench-matrix "$matrix" --bench-ops "$op" \
        --benchmark-max-time="$BENCH_MAX_TIME" --benchmark-min-rounds=10 \
        --benchmark-json="$OUT/$base.json" --bench-summary-json="$OUT/$base-summary.json"
    keep "$OUT/$base-summary.json"  # the raw pytest-benchmark JSON (every timing) stays in $OUT
}

phase_sr_tiles() {
    step "sr-tiles-$STAMP" "$PY" benchmarks/tune_split_resplice_tiles.py --device "$BENCH_DEVICE" \
        --out "$OUT/sr-tiles-$STAMP.json"
    keep "$OUT/sr-tiles-$STAMP.json"
}

phase_ops() { for op in split_resplice scaff sawf; do ops_run "${OPS_MATRIX:-spec}" "$op"; done; }
phase_ops_full() { for op in split_resplice scaff sawf; do ops_run full "$op"; done; }

phase_model_float32() {  # inference in float32 and the fp16-autocast training step
    step "model-float32-$STAMP" "$PY" -m saffnet_fast.cli.main bench --device cuda \
        --dtypes float32 --json --out "$OUT/model-cuda-float32-$STAMP.json"
    keep "$OUT/model-cuda-float32-$STAMP.json"
}
phase_model_float16() {
    step "model-float16-$STAMP" "$PY" -m saffnet_fast.cli.main bench --device cuda \
        --dtypes float16 --no-train --json --out "$OUT/model-cuda-float16-$STAMP.json"
    keep "$OUT/model-cuda-float16-$STAMP.json"
}
phase_model() { phase_model_float32; phase_model_float16; }

OPS_SELECTION="forward-float or forward_backward-float"
ops_providers() {  # ops_providers PROVIDERS OP: spec matrix, forward and forward + backward
    local providers="$1" op="$2"
    local base="ops-cuda-spec-$op-${providers//,/-}-$STAMP"
    step "$base" "$PY" -m pytest benchmarks/test_ops_speed.py --benchmark-only -q -rs \
        -p no:cacheprovider --bench-device "$BENCH_DEVICE" --bench-matrix spec --bench-ops "$op" \
        --bench-providers "$providers" -k "$OPS_SELECTION" \
        --benchmark-max-time="$BENCH_MAX_TIME" --benchmark-min-rounds=10 \
        --bench-summary-json="$OUT/$base-summary.json"
    keep "$OUT/$base-summary.json"
}
phase_lease_1() {
    phase_build
    STEP_MAX_S=200 PYTEST_ARGS="${PYTEST_ARGS:--n 14}" phase_test
    STEP_MAX_S=60 phase_sr_tiles
    for op in scaff sawf split_resplice; do
        STEP_MAX_S=100 ops_providers reference,native,triton "$op"
    done
    step "model-cuda-b64-$STAMP" "$PY" -m saffnet_fast.cli.main bench --device cuda \
        --batch 64 --dtypes float32,float16 --no-train --min-time 0.3 \
        --providers eager,fast,fast_optimized,fast_optimized_cudagraphs,hrnet_w32 \
        --out "$OUT/model-cuda-b64-$STAMP.json"
    keep "$OUT/model-cuda-b64-$STAMP.json"
}
phase_first() {
    if [ "$BENCH_DEVICE" = cpu ]; then
        # dry run: no CUDA build; the script's steps at a toy size in float32
        step first-phase "$PY" benchmarks/gpu_first_phase.py --device cpu --dtype float32 \
            --batch 2 --size 64 48 --compile-mode none --min-time 0.1 --out "$OUT"
        step sr-tc env TRITON_INTERPRET=1 "$PY" benchmarks/bench_split_resplice_tc.py \
            --device cpu --batch 1 --size 5 7 --quick --out "$OUT/sr-tc.json"
        STEP_MAX_S=60 step parity "$PY" -m pytest tests/test_cuda_routing.py -q -p no:cacheprovider
    else
        phase_build
        STEP_MAX_S=200 step first-phase "$PY" benchmarks/gpu_first_phase.py --out "$OUT"
        STEP_MAX_S=60 step sr-tc "$PY" benchmarks/bench_split_resplice_tc.py --quick \
            --out "$OUT/sr-tc.json"
        # parity in whatever is left, leaving 15 s for the summary and packing
        DEADLINE_S=$(( ${DEADLINE_S:-100000} - 15 )) PYTEST_ARGS="${PYTEST_ARGS:--n 14 -x}" \
            phase_test
    fi
    SUMMARY_FILE="$OUT/first-phase-summary.txt"  # printed last, after packing
}
phase_lease_2() {
    phase_build
    step "model-cuda-b64-compile-$STAMP" "$PY" -m saffnet_fast.cli.main bench --device cuda \
        --batch 64 --train-batch 32 --dtypes float16,float32 --min-time 0.3 \
        --providers eager,compile,fast,fast_optimized_compile \
        --out "$OUT/model-cuda-b64-compile-$STAMP.json"
    keep "$OUT/model-cuda-b64-compile-$STAMP.json"
    for op in scaff sawf split_resplice; do STEP_MAX_S=150 ops_providers reference,compile "$op"; done
}

PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(all)
for phase in "${PHASES[@]}"; do
    case "$phase" in
        all) phase_build; phase_test; phase_sr_tiles; phase_ops; phase_model ;;
        first) phase_first ;;
        build) phase_build ;;
        test) phase_test ;;
        ops) phase_ops ;;
        ops-full) phase_ops_full ;;
        sr-tiles) phase_sr_tiles ;;
        ops-split_resplice|ops-scaff|ops-sawf) ops_run "${OPS_MATRIX:-spec}" "${phase#ops-}" ;;
        model) phase_model ;;
        model-float32) phase_model_float32 ;;
        model-float16) phase_model_float16 ;;
        lease-1) phase_lease_1 ;;
        lease-2) phase_lease_2 ;;
        *) echo "run_gpu.sh: unknown phase '$phase' (expected all, first, build, test, sr-tiles, ops, ops-<op>, ops-full, model, model-float32, model-float16, lease-1, lease-2)" >&2
           exit 2 ;;
    esac
done

if [ -f "$ROOT/benchmarks/plot_results.py" ]; then
    "$PY" "$ROOT/benchmarks/plot_results.py" --out-dir "$OUT" "$OUT"/*.json >> "$LOG" 2>&1 || true
fi
pack() {  # PACK_OUT=1: every log in logs.tgz, the result JSONs beside it (≤ 8 files back)
    [ "${PACK_OUT:-0}" = 1 ] || return 0
    local tmp
    tmp="$(mktemp)"
    (cd "$OUT" && tar czf "$tmp" . \
        && find . -mindepth 1 ! -name '*summary.json' ! -name 'model-*.json' ! -name 'info.json' \
               ! -name 'first-phase*' ! -name 'profile-top25.txt' ! -name 'sr-tc.json' \
               -delete && mv "$tmp" logs.tgz)
}
print_summary() {  # the first phase's table, the last thing printed
    if [ -n "${SUMMARY_FILE:-}" ] && [ -s "$SUMMARY_FILE" ]; then
        echo; echo "== summary (benchmarks/gpu_first_phase.py; steps failed: ${FAILED[*]:-none}) =="
        cat "$SUMMARY_FILE"
    fi
}
if [ ${#FAILED[@]} -gt 0 ]; then
    log "FAILED steps: ${FAILED[*]}"
    pack
    print_summary
    exit 1
fi
log "all steps passed; results in $OUT"
pack
print_summary

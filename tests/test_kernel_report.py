"""benchmarks/kernel_report.py: its parsers and --check rules, and one small Triton kernel
compiled for sm_90 on this CPU machine (two compiles: a tensor-core dot and a scalar one).

The compiles and the launch recording run in a subprocess: triton must be imported there
without TRITON_INTERPRET (tests/test_triton_ops.py imports it under the interpreter, and a
module imports it only once per process)."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_report as kr  # noqa: E402  (imports neither torch nor triton at import time)

HAS_TRITON = importlib.util.find_spec("triton") is not None

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k_small' for 'sm_90a'
ptxas info    : Function properties for k_small
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'k_big' for 'sm_90a'
ptxas info    : Function properties for k_big
    9304 bytes stack frame, 20268 bytes spill stores, 30884 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 9304 bytes cumulative stack size
"""


def test_parse_ptxas_log():
    stats = kr.parse_ptxas_log(PTXAS_LOG)
    assert stats["k_small"] == {"registers": 40, "stack_bytes": 0, "spill_store_bytes": 0,
                                "spill_load_bytes": 0, "static_smem_bytes": 16}
    assert stats["k_big"]["registers"] == 32
    assert stats["k_big"]["spill_store_bytes"] == 20268
    assert stats["k_big"]["spill_load_bytes"] == 30884
    assert stats["k_big"]["stack_bytes"] == 9304


def test_tensor_core_instructions_and_dots():
    ptx = textwrap.dedent("""\
        .visible .entry a(
        \twgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%f1}, %rd1, %rd2, p, 1, 1, 0, 0;
        \tmma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1}, {%r1}, {%r2}, {%f1};
        .visible .entry b(
        \tfma.rn.f32 %f1, %f2, %f3, %f1;
        """)
    entries = kr.ptx_entries(ptx)
    assert set(entries) == {"a", "b"}
    assert kr.ptx_tensor_core_ops(entries["a"]) == {"wgmma": 1, "mma": 1,
                                                   "operand_types": ["f16", "tf32"]}
    assert kr.ptx_tensor_core_ops(entries["b"]) == {"wgmma": 0, "mma": 0, "operand_types": []}
    ttir = ("%1 = tt.dot %a, %b, %c : tensor<16x64xf32> * tensor<64x16xf32> -> tensor<16x16xf32>\n"
            "%2 = tt.dot %a, %b, %c, inputPrecision = tf32 : tensor<16x64xf32> * tensor<64x16xf32>"
            " -> tensor<16x16xf32>\n"
            "%3 = tt.dot %a, %b, %c : tensor<64x64xf16> * tensor<64x64xf16> -> tensor<64x64xf32>\n")
    assert kr.ttir_dots(ttir) == ["f32 ieee", "f32 tf32", "f16"]


def test_cuda_kernel_names():
    name = ("void saffnet_fast::(anonymous namespace)::aff_fuse_forward_kernel"
            "<c10::BFloat16, float>(c10::BFloat16 const*, long)")
    assert kr.cuda_kernel_name(name) == ("aff_fuse_forward_kernel", "bfloat16",
                                         "<c10::BFloat16, float>")


def _row(kernel, dtype="float16", **fields):
    row = {"backend": "triton", "kernel": kernel, "dtype": dtype, "config": "warps=4",
           "registers": 64, "spill_store_bytes": 0, "spill_load_bytes": 0, "wgmma": 0,
           "mma": 0, "dots": []}
    row.update(fields)
    return row


def test_check_rules():
    matrix = {"mat": (True, "a channel contraction"), "ew": (False, "elementwise")}
    rows = [
        _row("mat", wgmma=4),                                   # fine
        _row("ew"),                                             # fine
        _row("ew", spill_store_bytes=16, spill_load_bytes=16),  # spills
        _row("mat", dots=["f32 ieee"]),                         # scalar matrix kernel
        _row("mat", dtype="float64", spill_load_bytes=8),       # fp64: reported, not gated
        _row("new_kernel"),                                     # not classified
        _row("mat", error="CompilationError: boom"),            # did not compile
        _row("mat", wgmma=4, shared_bytes=235520),              # beyond 227 KB: no launch
    ]
    failures, waived = kr.check_failures(rows, matrix, not_routed={})
    assert len(failures) == 5
    assert len(waived) == 2 and all("float64 is not gated" in w for w in waived)
    assert "spills (16 B stored, 16 B loaded" in failures[0]
    assert "without tensor-core instructions" in failures[1] and "f32 ieee" in failures[1]
    assert "not classified" in failures[2]
    assert "did not compile" in failures[3]
    assert "235520 B of shared memory" in failures[4]
    # a kernel auto does not route to is reported, not failed
    failures, waived = kr.check_failures(rows[3:4], matrix, not_routed={"mat": "test"})
    assert not failures and len(waived) == 1 and "waived" in waived[0]


def test_every_matrix_entry_has_a_reason():
    for name, (matrix, why) in kr.MATRIX_KERNELS.items():
        assert isinstance(matrix, bool) and why, name
    assert set(kr.NOT_ROUTED) <= set(kr.MATRIX_KERNELS)


DOT_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def dot_kernel(a_ptr, b_ptr, c_ptr, PRECISION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tile = offs[:, None] * BLOCK + offs[None, :]
    c = tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile), input_precision=PRECISION)
    tl.store(c_ptr + tile, c)
'''

SUBPROCESS = '''
import json, sys
sys.path[:0] = [{benchmarks!r}, {tmp!r}, {root!r}]
import kernel_report as kr
from dot_kernel import dot_kernel

rows = []
for dtype, pointer, precision in (("float16", "*fp16", "tf32"), ("float32", "*fp32", "ieee")):
    signature = {{"a_ptr": pointer, "b_ptr": pointer, "c_ptr": "*fp32",
                 "PRECISION": "constexpr", "BLOCK": "constexpr"}}
    result = kr.compile_jit(dot_kernel, signature, {{"PRECISION": precision, "BLOCK": 64}},
                            options={{"num_warps": 4}})
    rows.append({{"backend": "triton", "kernel": "dot_kernel", "dtype": dtype,
                  "config": "warps=4", **result}})

# the launch recorder on one op of the workload table, at a small shape
import torch
from saffnet_fast.nn import reference
module = getattr(reference, kr.WORKLOADS["sawf"].reference)(32).eval()
recorder = kr.LaunchRecorder()
recorder.context = ("sawf", "inference", "float32", "32x16x12")
with recorder.active(), torch.no_grad():
    kr.run_block("sawf", module, torch.zeros(2, 32, 16, 12))
launches = [dict(kernel=l.fn.fn.__name__, signature=l.signature, config=l.config,
                 constexprs=l.named_constexprs(), attrs=[l.fn.arg_names[k[0]]
                                                         for k, v in l.attrs.items() if v])
            for l in recorder.launches.values()]
print(json.dumps({{"rows": rows, "launches": launches}}))
'''


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    tmp = tmp_path_factory.mktemp("kernel_report")
    (tmp / "dot_kernel.py").write_text(DOT_KERNEL)
    script = SUBPROCESS.format(benchmarks=str(ROOT / "benchmarks"), tmp=str(tmp),
                               root=str(ROOT))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")  # a real compile, ptxas log included
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_compiled_kernel_fields(compiled):
    half, single = compiled["rows"]
    for row in (half, single):
        assert row["registers"] > 0 and row["stats_from"] == "triton's ptxas -v"
        assert row["num_warps"] == 4 and row["shared_bytes"] >= 0
        assert row["spill_store_bytes"] >= 0 and row["spill_load_bytes"] >= 0
    assert half["spill_store_bytes"] == half["spill_load_bytes"] == 0
    # fp16 operands: tensor cores (wgmma on sm_90a for a 64×64 tile and 4 warps)
    assert half["dots"] == ["f16"]
    assert half["wgmma"] + half["mma"] > 0 and "f16" in half["mma_operand_types"]
    # fp32 with input_precision="ieee": scalar FMA, no tensor cores
    assert single["dots"] == ["f32 ieee"]
    assert single["wgmma"] == single["mma"] == 0


def test_check_fails_on_the_scalar_matrix_kernel(compiled):
    matrix = {"dot_kernel": (True, "a 64×64 tile product")}
    failures, _ = kr.check_failures(compiled["rows"], matrix, not_routed={})
    # only the fp32 "ieee" kernel fails; its 64×64 FMA tile may spill too (triton 3.6's
    # ptxas 12.8: 255 registers, ~500 B of spills), a second failure of the same row
    assert failures and all(f.startswith("triton dot_kernel [float32; warps=4]: ")
                            for f in failures)
    assert any("without tensor-core instructions (no mma/wgmma in its PTX; dots: f32 ieee)"
               in f for f in failures)


def test_launches_are_recorded_as_an_h100_would_compile_them(compiled):
    launches = compiled["launches"]
    assert len({l["kernel"] for l in launches}) >= 2
    for launch in launches:
        pointers = [v for v in launch["signature"].values() if v.startswith("*")]
        assert pointers and all(p == "*fp32" for p in pointers), launch
        # integers as triton specialises them: H·W = 192 a multiple of 16, W = 12 not
        if launch["signature"].get("HW") == "i32":
            assert "HW" in launch["attrs"], launch
        if launch["signature"].get("W") == "i32":
            assert "W" not in launch["attrs"], launch
    # an autotuned kernel is recorded once per config
    configs = {}
    for launch in launches:
        configs.setdefault(launch["kernel"], set()).add(launch["config"])
    assert max(len(c) for c in configs.values()) > 1

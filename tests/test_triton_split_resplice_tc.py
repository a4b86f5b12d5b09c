"""The one-launch tensor-core SR kernel (saffnet_fast/ops/triton/split_resplice_tc.py) against
the reference SplitResplice in eval (random weights, BN with random running statistics,
folded): output and carried channels, every dtype, odd shapes, both layouts, tiles that do
and do not divide H and W, NaN-poisoned outputs.

Without a GPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1 while triton
is first imported, as in test_triton_ops.py), where float16 dots are numpy float32 matmuls
of the float16 operands (what an f16 mma with fp32 accumulation computes, up to summation
order) and bfloat16 operands are upcast exactly before the dot (numpy has no bfloat16; the
kernel's DOT_F32 switch, interpreter only). What only a GPU run checks: the compiled
kernel's wgmma / mma path, float32's tf32x3 precision (the interpreter computes the dot in
full float32), the scratch region's visibility across tl.debug_barrier(), and speed.
"""
import os
import subprocess
import sys

import pytest
import torch

from parity_utils import nan_filled_empty, randomize_batchnorm, rel_err

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

if not ON_GPU:
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    if ON_GPU:
        KERNELS_USABLE = True
    else:
        from triton.runtime.interpreter import InterpretedFunction
        KERNELS_USABLE = isinstance(triton.language.standard.sum, InterpretedFunction)
    if KERNELS_USABLE:
        from saffnet_fast.ops.triton import _common
        from saffnet_fast.ops.triton import split_resplice_tc as tc
        KERNELS_USABLE = ON_GPU or _common.INTERPRET
finally:
    if not ON_GPU:
        if _previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _previous

from saffnet_fast.fast.bn import fold_bn  # noqa: E402
from saffnet_fast.nn.reference import SplitResplice  # noqa: E402


@pytest.mark.skipif(KERNELS_USABLE, reason="the kernels run in this process")
def test_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           __file__], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


@pytest.fixture(autouse=True)
def _kernels(request, monkeypatch):
    if not KERNELS_USABLE and request.node.originalname != "test_in_fresh_process":
        pytest.skip("triton was imported earlier without TRITON_INTERPRET=1; "
                    "test_in_fresh_process runs these tests")
    if not ON_GPU:
        # triton reads it again at launch (its knobs), not only at import
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    yield


def _module(channels, seed=0):
    """SR(channels) in eval with random weights and BN statistics / affine, float64."""
    torch.manual_seed(seed)
    module = randomize_batchnorm(SplitResplice(channels), seed=seed)
    return module.eval().double().to(DEVICE)


def _reference(module, x):
    """(out, carries) of the reference in float64: carries are every step's channels after
    the first ceil(c/2), stacked in step order (what split_resplice returns)."""
    outputs = []
    hooks = [step.register_forward_hook(lambda m, i, o: outputs.append(o))
             for step in module.steps]
    with torch.no_grad():
        out = module(x.double())
    for h in hooks:
        h.remove()
    carries = [y[:, (y.shape[1] + 1) // 2:] for y in outputs[:-1]]
    return out, torch.cat(carries, dim=1)


def _folded(module, dtype):
    folded = [fold_bn(step.conv, step.bn) for step in module.steps]
    return ([w.detach().to(dtype) for w, _ in folded],
            [b.detach().to(dtype) for _, b in folded])


def _functional_sr(x, weights, biases, slope):
    """SplitResplice.forward with each FC step's BN folded into (weights[j], biases[j])."""
    w0 = x.shape[1] // (len(weights) + 1)
    parts = torch.split(x, w0, dim=1)
    outputs, carry = [parts[0]], None
    for j, (wt, b) in enumerate(zip(weights, biases)):
        inp = parts[1] if j == 0 else torch.cat([parts[j + 1], carry], dim=1)
        y = torch.nn.functional.leaky_relu(torch.nn.functional.conv2d(inp, wt, b, padding=1),
                                           slope)
        keep = y.shape[1] if j == len(weights) - 1 else (y.shape[1] + 1) // 2
        outputs.append(y[:, :keep])
        carry = y[:, keep:]
    return torch.cat(outputs, dim=1)


def _run(module, x, tile=(0, 0), write_carries=True, **kwargs):
    weights, biases = _folded(module, x.dtype)
    with nan_filled_empty(x.device):
        # every allocation (out, carries, the scratch) starts as NaN: a missed element shows
        return tc.launch_split_resplice_tc(x, weights, biases, 0.1, *tile, write_carries,
                                           **kwargs)


# (N, C, H, W, tile): odd sizes, H or W of 1, 3, 17, batch 1, C = 16, 32, 64, 128; tiles that
# divide H and W (8×8 in 4×4) and that do not (9×11 in 4×4, 3×17 in 2×5), and the automatic
# tile (one tile per image at these sizes).
SHAPES = [
    (1, 64, 5, 7, (0, 0)),
    (2, 64, 9, 11, (4, 4)),
    (1, 16, 3, 17, (2, 5)),
    (1, 32, 1, 17, (0, 0)),
    (1, 32, 17, 1, (4, 1)),
    (1, 16, 8, 8, (4, 4)),
    (1, 128, 3, 3, (0, 0)),
]


@pytest.mark.parametrize("n,c,h,w,tile", SHAPES,
                         ids=[f"{n}x{c}x{h}x{w}-tile{t[0]}x{t[1]}" for n, c, h, w, t in SHAPES])
def test_float64_parity(n, c, h, w, tile):
    module = _module(c)
    x = torch.randn(n, c, h, w, dtype=torch.float64, device=DEVICE)
    out, carries = _run(module, x, tile)
    ref_out, ref_carries = _reference(module, x)
    assert rel_err(out, ref_out) < 1e-10
    assert rel_err(carries, ref_carries) < 1e-10


@pytest.mark.parametrize("layout", ["channels_last", "nchw", "sliced"])
def test_layouts(layout):
    """NHWC, NCHW and a non-contiguous view all read through their strides; out and carries
    come back in x's layout (channels_last when x is, else contiguous)."""
    module = _module(32, seed=1)
    base = torch.randn(2, 40, 5, 6, dtype=torch.float64, device=DEVICE)
    x = {"channels_last": base[:, :32].contiguous(memory_format=torch.channels_last),
         "nchw": base[:, :32].contiguous(),
         "sliced": base[:, 4:36]}[layout]
    out, carries = _run(module, x, (3, 4))
    ref_out, ref_carries = _reference(module, x)
    assert rel_err(out, ref_out) < 1e-10 and rel_err(carries, ref_carries) < 1e-10
    channels_last = layout == "channels_last"
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert out.is_contiguous() == (not channels_last)


# spec/kernels.md's bounds: float32 < 1e-5 (tf32x3 on a GPU, full float32 under the
# interpreter), half precision < 1e-2 (carries rounded to the input dtype between steps, as
# the reference run in that dtype does).
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.float16, 1e-2),
                                         (torch.bfloat16, 1e-2)],
                         ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_dtype_parity(dtype, bound, layout):
    module = _module(64, seed=2)
    x64 = torch.randn(2, 64, 7, 5, dtype=torch.float64, device=DEVICE)
    x = x64.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out, carries = _run(module, x, (4, 3))
    assert out.dtype == dtype and carries.dtype == dtype
    # the reference on the same (rounded) input, in float64
    ref_out, ref_carries = _reference(module, x.double())
    assert rel_err(out, ref_out) < bound
    assert rel_err(carries, ref_carries) < bound


@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_float32_precisions(precision):
    """Both float32 settings that keep the 1e-5 bound (ieee: FMA; tf32x3: tensor cores)."""
    module = _module(16, seed=3)
    x = torch.randn(1, 16, 6, 5, device=DEVICE)
    out, _ = _run(module, x, (3, 3), float32_precision=precision)
    assert rel_err(out, _reference(module, x)[0]) < 1e-5


def test_without_carries():
    """write_carries=False (inference without autograd): carries N×0×H×W, same output."""
    module = _module(64, seed=4)
    x = torch.randn(1, 64, 6, 4, dtype=torch.float64, device=DEVICE)
    out, carries = _run(module, x, (3, 4), write_carries=False)
    assert carries.shape == (1, 0, 6, 4)
    assert rel_err(out, _reference(module, x)[0]) < 1e-10


def test_chunks_smaller_than_a_region():
    """BLOCK_M below a step's region: several chunks per step, the last one partial."""
    module = _module(16, seed=5)
    x = torch.randn(1, 16, 9, 7, dtype=torch.float64, device=DEVICE)
    out, carries = _run(module, x, (5, 7), block_m=16)
    ref_out, ref_carries = _reference(module, x)
    assert rel_err(out, ref_out) < 1e-10 and rel_err(carries, ref_carries) < 1e-10


def test_registered_op():
    """saffnet_fast_triton::split_resplice_tiled: the native schema, and the same result."""
    op = torch.ops.saffnet_fast_triton.split_resplice_tiled
    assert str(op.default._schema).split("::", 1)[1] == (
        "split_resplice_tiled(Tensor x, Tensor[] weights, Tensor[] biases, float "
        "negative_slope, int tile_h=0, int tile_w=0, bool write_carries=True) -> "
        "(Tensor, Tensor)")
    module = _module(16, seed=6)
    x = torch.randn(1, 16, 3, 4, dtype=torch.float64, device=DEVICE)
    weights, biases = _folded(module, x.dtype)
    out, carries = op(x, weights, biases, 0.1)
    ref_out, ref_carries = _reference(module, x)
    assert rel_err(out, ref_out) < 1e-10 and rel_err(carries, ref_carries) < 1e-10
    out, carries = op(x, weights, biases, 0.1, 2, 3, False)
    assert carries.shape == (1, 0, 3, 4) and rel_err(out, ref_out) < 1e-10


# ------------------------------------------------------------------ packing and the plan


def test_pack_layout():
    """Kept channels in columns [0, keep), carried ones from column w, the last step as is;
    zero elsewhere; biases in the arithmetic dtype."""
    c = 64
    widths = tc.sr_widths(c, 7)
    assert widths == [8, 12, 14, 15, 15, 15, 15]
    weights = [torch.randn(cj, cj, 3, 3) for cj in widths]
    biases = [torch.randn(cj) for cj in widths]
    packed, bias = tc.pack_split_resplice(weights, biases, torch.float16)
    assert packed.shape == (7, 9, 16, 16) and packed.dtype == torch.float16
    assert bias.shape == (7, 16) and bias.dtype == torch.float32
    j, cj = 2, 14  # keep 7, carry 7
    assert torch.equal(packed[j, 3 * 1 + 2, :cj, :7], weights[j][:7, :, 1, 2].t().half())
    assert torch.equal(packed[j, 3 * 1 + 2, :cj, 8:15], weights[j][7:, :, 1, 2].t().half())
    assert not packed[j, :, :, 7].any() and not packed[j, :, :, 15].any()
    assert not packed[j, :, cj:, :].any()
    assert torch.equal(bias[j, :7], biases[j][:7]) and torch.equal(bias[j, 8:15], biases[j][7:])
    assert torch.equal(packed[6, 0, :15, :15], weights[6][:, :, 0, 0].t().half())
    assert tc.channel_pad(16) == 32 and tc.channel_pad(2) == 16


def test_packed_once_per_weights():
    """The packed weights are cached per set of source tensors and rebuilt after an in-place
    change."""
    weights = [torch.randn(cj, cj, 3, 3) for cj in tc.sr_widths(16, 7)]
    biases = [torch.randn(cj) for cj in tc.sr_widths(16, 7)]
    first = tc.packed_params(weights, biases, torch.float32)
    assert tc.packed_params(weights, biases, torch.float32) is first
    assert tc.packed_params(weights, biases, torch.float16) is not first
    with torch.no_grad():
        weights[3].mul_(2)
    again = tc.packed_params(weights, biases, torch.float32)
    assert again is not first
    assert torch.equal(again[0], tc.pack_split_resplice(weights, biases, torch.float32)[0])


def test_choose_tile():
    # SAFFNet's SR(64) at 64×48, batch 64, on 132 SMs: two 32-row tiles per image
    assert tc.choose_tile(64, 64, 48, 7, 132) == (32, 48)
    # a batch that alone fills the machine: whole images, no halo recompute
    assert tc.choose_tile(256, 64, 48, 7, 132) == (64, 48)
    assert tc.choose_tile(1, 3, 17, 7, 132) == (3, 17)


@pytest.mark.parametrize("bad,message", [
    (lambda x, w, b: (x[0], w, b), "4-D"),
    (lambda x, w, b: (x[:, :12], w, b), "divisible by splits"),
    (lambda x, w, b: (x, w[:3] + [w[3][:, :2]] + w[4:], b), r"weights\[3\]: expected shape"),
    (lambda x, w, b: (x, w, b[:-1]), "biases: expected 7"),
    (lambda x, w, b: (x, w, b[:2] + [b[2][:-1]] + b[3:]), r"biases\[2\]: expected shape"),
    (lambda x, w, b: (x.int(), w, b), "expected float16"),
    (lambda x, w, b: (x, w, b, 0.1, 0, 4), r"tile_h, tile_w: expected both 0 \(automatic\)"),
    (lambda x, w, b: (x, w, b, 0.1, -1, -1), r"tile_h, tile_w: .* got -1, -1"),
])
def test_argument_errors(bad, message):
    x = torch.randn(1, 16, 3, 3)
    w = [torch.randn(cj, cj, 3, 3) for cj in tc.sr_widths(16, 7)]
    b = [torch.randn(cj) for cj in tc.sr_widths(16, 7)]
    args = bad(x, w, b)
    with pytest.raises((ValueError, TypeError), match=message):
        tc.launch_split_resplice_tc(*args, *(() if len(args) > 3 else (0.1,)))


def test_opcheck_and_gradient():
    """Schema, fake kernel and autograd registration (opcheck); the gradient (split_resplice's
    ATen backward, fed by out and the carries) against the reference's, float64."""
    op = torch.ops.saffnet_fast_triton.split_resplice_tiled
    module = _module(16, seed=7)
    x = torch.randn(2, 16, 3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    weights, biases = _folded(module, x.dtype)
    weights = [w.requires_grad_(True) for w in weights]
    biases = [b.requires_grad_(True) for b in biases]
    torch.library.opcheck(op, (x, weights, biases, 0.1, 2, 3, True),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    out, _ = op(x, weights, biases, 0.1, 2, 3, True)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *weights, *biases], grad)
    # the reference with BN folded (what eval computes), differentiable in x, W_j, b_j
    ref_out = _functional_sr(x, weights, biases, 0.1)
    assert rel_err(out, ref_out) < 1e-10
    expected = torch.autograd.grad(ref_out, [x, *weights, *biases], grad)
    for g, e in zip(got, expected):
        assert rel_err(g, e) < 1e-10
    with pytest.raises(RuntimeError, match="write_carries=True"):
        out, _ = op(x, weights, biases, 0.1, 2, 3, False)
        out.sum().backward()


@pytest.mark.skipif(not ON_GPU, reason="the block algorithm routes to split_resplice_tiled on "
                                       "CUDA tensors only")
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.float16, 1e-2),
                                         (torch.bfloat16, 1e-2)])
def test_fast_module_routes_here_on_cuda(dtype, bound, monkeypatch):
    """FastSplitResplice(backend="triton") in eval without autograd is one launch of this
    kernel (SAFFNet's SR(64) at 64×48, channels_last), within the dtype's bound."""
    from saffnet_fast import fast, ops

    calls = []
    original = ops.kernel("split_resplice_tiled", "triton")
    monkeypatch.setitem(ops.OPS, ("split_resplice_tiled", "triton"),
                        lambda *args: calls.append(1) or original(*args))
    reference = _module(64, seed=8)
    block = fast.FastSplitResplice(64, backend="triton")
    block.load_state_dict(reference.state_dict())
    block = block.to(device=DEVICE, dtype=dtype).eval()
    x = torch.randn(4, 64, 64, 48, device=DEVICE).to(dtype).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        got = block(x)
        expected = reference(x.double())
    assert calls == [1]
    assert rel_err(got, expected) < bound


def test_op_packs_once():
    """Through the registered op, the same weight tensors are packed once (the fast path's
    cached folded weights: no per-call casts or packing launches)."""
    op = torch.ops.saffnet_fast_triton.split_resplice_tiled
    module = _module(16, seed=9)
    x = torch.randn(1, 16, 2, 3, dtype=torch.float64, device=DEVICE)
    weights, biases = _folded(module, x.dtype)
    tc._PACKED.clear()
    first, _ = op(x, weights, biases, 0.1)
    second, _ = op(x, weights, biases, 0.1)
    assert len(tc._PACKED) == 1 and torch.equal(first, second)


def test_benchmark_dry_run(tmp_path):
    """benchmarks/bench_split_resplice_tc.py runs (on the CPU: the interpreter, a tiny shape)
    and writes its JSON; on a GPU it is the timing run."""
    if ON_GPU:
        pytest.skip("the GPU run is the benchmark itself")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                          "bench_split_resplice_tc.py")
    out = tmp_path / "sr_tc.json"
    done = subprocess.run([sys.executable, script, "--device", "cpu", "--batch", "1", "--size",
                           "3", "4", "--channels", "16", "--dtypes", "float32", "--quick",
                           "--reps", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = __import__("json").loads(out.read_text())["rows"]
    assert {r["provider"] for r in rows} >= {"eager", "triton tc"}
    assert all(r["rel_err"] < 1e-5 for r in rows)

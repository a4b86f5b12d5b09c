"""Native split_resplice (SR(C, s), inference form) against the reference SplitResplice."""
from __future__ import annotations

import pytest
import torch

from saffnet_fast import has_native
from saffnet_fast.nn.reference import SplitResplice

from parity_utils import native_block, randomize_batchnorm, rel_err

pytestmark = pytest.mark.skipif(not has_native(),
                                reason="saffnet_fast._C not built (pip install -e .)")

if has_native():
    from saffnet_fast.fast.bn import fold_bn as _fold_bn

    native_split_resplice = native_block("split_resplice")

    OPS = torch.ops.saffnet_fast

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def randomized(module, dtype, seed=0):
    return randomize_batchnorm(module, seed).to(dtype).eval()


def folded(module):
    pairs = [_fold_bn(step.conv, step.bn) for step in module.steps]
    return ([w.reshape(step.conv.weight.shape).detach() for (w, _), step in
             zip(pairs, module.steps)], [b.detach() for _, b in pairs])


SHAPES = [((1, 32, 17, 3), 8), ((2, 64, 3, 17), 8), ((1, 64, 1, 1), 8), ((1, 128, 6, 5), 8),
          ((1, 256, 3, 3), 8), ((3, 12, 5, 7), 4), ((2, 6, 4, 4), 2), ((1, 24, 9, 1), 3),
          # W = 53: the CPU kernel's row groups of 3 and 2 vector chunks with a partial last
          # chunk (float: 4 chunks as 2 + 2; double: 7 as 3 + 3 + 1)
          ((1, 64, 2, 53), 8)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, splits", SHAPES)
def test_forward_parity(shape, splits, dtype):
    module = randomized(SplitResplice(shape[1], splits), dtype)
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        ref = module(x)
        assert rel_err(native_split_resplice(module, x), ref) < TOL[dtype]
        xcl = x.to(memory_format=torch.channels_last)
        assert rel_err(native_split_resplice(module, xcl), ref) < TOL[dtype]
        wide = torch.randn(shape[0], shape[1] + 3, shape[2], shape[3] * 2, dtype=dtype)
        xs = wide[:, 1:-2, :, ::2]
        assert rel_err(native_split_resplice(module, xs), module(xs)) < TOL[dtype]


def test_out_variant_poisoned():
    module = randomized(SplitResplice(64, 8), torch.float64)
    x = torch.randn(2, 64, 5, 7, dtype=torch.float64)
    weights, biases = folded(module)
    _, carries_shape_ref = OPS.split_resplice(x, weights, biases, 0.1)
    out = torch.full_like(x, float("nan"))
    carries = torch.full_like(carries_shape_ref, float("nan"))
    OPS.split_resplice_out(x, weights, biases, 0.1, out, carries)
    assert not torch.isnan(out).any() and not torch.isnan(carries).any()
    with torch.no_grad():
        assert rel_err(out, module(x)) < 1e-10


@pytest.mark.parametrize("splits, channels", [(8, 8), (4, 8), (2, 4)])
def test_gradcheck(splits, channels):
    module = randomized(SplitResplice(channels, splits), torch.float64, seed=1)
    weights, biases = folded(module)
    weights = [w.requires_grad_() for w in weights]
    biases = [b.requires_grad_() for b in biases]
    x = torch.randn(1, channels, 4, 3, dtype=torch.float64, requires_grad=True)
    n = len(weights)

    def fn(x, *params):
        return OPS.split_resplice(x, list(params[:n]), list(params[n:]), 0.1)[0]

    assert torch.autograd.gradcheck(fn, (x, *weights, *biases))


def test_module_gradients_reach_parameters():
    module = randomized(SplitResplice(32, 8), torch.float64, seed=2)
    x = torch.randn(2, 32, 5, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 32, 5, 4, dtype=torch.float64)
    params = list(module.parameters())
    got = torch.autograd.grad(native_split_resplice(module, x), [x] + params, grad)
    want = torch.autograd.grad(module(x), [x] + params, grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10


def test_opcheck():
    module = randomized(SplitResplice(16, 8), torch.float64)
    weights, biases = folded(module)
    x = torch.randn(2, 16, 3, 4, dtype=torch.float64)
    torch.library.opcheck(OPS.split_resplice.default, (x, weights, biases, 0.1))
    _, carries = OPS.split_resplice(x, weights, biases, 0.1)
    torch.library.opcheck(OPS.split_resplice_out.default,
                          (x, weights, biases, 0.1, torch.empty_like(x), torch.empty_like(carries)))


def test_torch_compile_fullgraph():
    module = randomized(SplitResplice(16, 8), torch.float32)
    x = torch.randn(2, 16, 5, 4)
    compiled = torch.compile(lambda t: native_split_resplice(module, t), fullgraph=True,
                             backend="aot_eager")
    with torch.no_grad():
        assert rel_err(compiled(x), module(x)) < 1e-5


def test_bad_input():
    module = randomized(SplitResplice(16, 8), torch.float64)
    weights, biases = folded(module)
    x = torch.randn(1, 16, 3, 3, dtype=torch.float64)
    # widths for C = 16, s = 8: [2, 3, 3, 3, 3, 3, 3]
    with pytest.raises(ValueError, match=r"weights\[2\]: expected shape \[3, 3, 3, 3\]"):
        OPS.split_resplice(x, weights[:2] + [weights[0]] + weights[3:], biases, 0.1)
    with pytest.raises(ValueError, match="divisible by splits"):
        OPS.split_resplice(torch.randn(1, 17, 3, 3, dtype=torch.float64), weights, biases, 0.1)
    with pytest.raises(TypeError, match=r"weights\[0\]: expected dtype"):
        OPS.split_resplice(x, [weights[0].float()] + weights[1:], biases, 0.1)
    with pytest.raises(ValueError, match="biases: expected 7"):
        OPS.split_resplice(x, weights, biases[:6], 0.1)
    with pytest.raises(ValueError, match="16 channels"):
        native_split_resplice(module, torch.randn(1, 8, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty batch"):
        native_split_resplice(module, torch.randn(0, 16, 3, 3, dtype=torch.float64))


# ------------------------------------------------------- the single-launch tiled program
# split_resplice_tiled runs csrc/common/split_resplice_tile.h: one CUDA launch on a GPU, a
# serial emulation of the same phases on the CPU (NaN-filled shared memory), so these CPU
# tests check the tile and halo indexing the GPU kernel uses.
TILES = [(0, 0), (1, 1), (3, 5), (16, 16), (7, 2), (20, 9)]
EMULATED_SHARED_BYTES = 227 * 1024  # the CPU emulation accepts what an H100 block holds


def tile_shared_bytes(channels, widths, tile_h, tile_w, acc_size):
    """Two ping-pong buffers of the largest carry: step j carries c_j - ceil(c_j/2) channels
    on the tile plus a halo of (steps - 1 - j) pixels."""
    if tile_h == 0:
        return 0
    steps = len(widths)
    largest = max([(c - (c + 1) // 2) * (tile_h + 2 * (steps - 1 - j)) *
                   (tile_w + 2 * (steps - 1 - j)) for j, c in enumerate(widths[:-1])] or [0])
    return 2 * largest * acc_size


TILED_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2,
             torch.bfloat16: 1e-2}


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape, splits", SHAPES[:8] + [((2, 64, 19, 23), 8)])
def test_tiled_parity(shape, splits, tile):
    module = randomized(SplitResplice(shape[1], splits), torch.float64)
    weights, biases = folded(module)
    x = torch.randn(shape, dtype=torch.float64)
    needed = tile_shared_bytes(shape[1], [int(w.shape[0]) for w in weights], *tile, 8)
    if needed > EMULATED_SHARED_BYTES:  # e.g. SR(256) in float64 on 16×16: a clear error
        with pytest.raises(ValueError, match=f"needs {needed} bytes of shared memory"):
            OPS.split_resplice_tiled(x, weights, biases, 0.1, *tile)
        return
    out, carries = OPS.split_resplice_tiled(x, weights, biases, 0.1, *tile)
    want_out, want_carries = OPS.split_resplice(x, weights, biases, 0.1)
    with torch.no_grad():
        assert rel_err(out, module(x)) < 1e-10
    assert carries.shape == want_carries.shape
    if carries.numel():
        assert rel_err(carries, want_carries) < 1e-10
    # without the carries: the same output, an N×0×H×W second result
    out2, none = OPS.split_resplice_tiled(x, weights, biases, 0.1, *tile, False)
    assert none.shape == (shape[0], 0, *shape[2:])
    assert torch.equal(out2, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tile", [(0, 0), (5, 3)])
def test_tiled_dtypes(dtype, tile):
    # the 16-bit types are stored in 16 bits and accumulated in float32, as on the GPU
    module = randomized(SplitResplice(64, 8), torch.float64, seed=3)
    weights, biases = folded(module)
    x = torch.randn(2, 64, 11, 13, dtype=torch.float64)
    with torch.no_grad():
        ref = module(x)
    out, carries = OPS.split_resplice_tiled(x.to(dtype), [w.to(dtype) for w in weights],
                                            [b.to(dtype) for b in biases], 0.1, *tile)
    assert out.dtype == dtype and carries.dtype == dtype
    assert rel_err(out.double(), ref) < TILED_TOL[dtype]


def test_tiled_layouts_and_untiled_fallback():
    module = randomized(SplitResplice(32, 8), torch.float64)
    weights, biases = folded(module)
    wide = torch.randn(2, 35, 9, 22, dtype=torch.float64)
    xs = wide[:, 1:-2, :, ::2]  # sliced, strided
    with torch.no_grad():
        assert rel_err(OPS.split_resplice_tiled(xs, weights, biases, 0.1, 4, 4)[0],
                       module(xs)) < 1e-10
        xcl = xs.contiguous(memory_format=torch.channels_last)
        assert rel_err(OPS.split_resplice_tiled(xcl, weights, biases, 0.1)[0],
                       module(xcl)) < 1e-10
    # SR(512): no automatic tile fits the 64 KB budget, so the per-step kernels answer
    wide_module = randomized(SplitResplice(512, 8), torch.float32)
    weights, biases = folded(wide_module)
    x = torch.randn(1, 512, 3, 4)
    out, carries = OPS.split_resplice_tiled(x, weights, biases, 0.1)
    want_out, want_carries = OPS.split_resplice(x, weights, biases, 0.1)
    assert torch.equal(out, want_out) and torch.equal(carries, want_carries)
    # an explicit tile still runs the tiled program
    out, _ = OPS.split_resplice_tiled(x, weights, biases, 0.1, 2, 2)
    assert rel_err(out, want_out) < 1e-5


def test_tiled_gradcheck_and_opcheck():
    module = randomized(SplitResplice(8, 8), torch.float64, seed=1)
    weights, biases = folded(module)
    weights = [w.requires_grad_() for w in weights]
    biases = [b.requires_grad_() for b in biases]
    x = torch.randn(1, 8, 4, 3, dtype=torch.float64, requires_grad=True)
    n = len(weights)

    def fn(x, *params):
        return OPS.split_resplice_tiled(x, list(params[:n]), list(params[n:]), 0.1, 2, 3)[0]

    assert torch.autograd.gradcheck(fn, (x, *weights, *biases))
    detached = ([w.detach() for w in weights], [b.detach() for b in biases])
    for args in [(0, 0, True), (2, 3, False)]:
        torch.library.opcheck(OPS.split_resplice_tiled.default,
                              (x.detach(), *detached, 0.1, *args))
    out, no_carries = OPS.split_resplice_tiled(x, weights, biases, 0.1, 2, 3, False)
    assert no_carries.shape == (1, 0, 4, 3)
    with pytest.raises(RuntimeError, match="write_carries=True"):
        out.sum().backward()


def test_tiled_bad_input():
    module = randomized(SplitResplice(16, 8), torch.float64)
    weights, biases = folded(module)
    x = torch.randn(1, 16, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"tile_h, tile_w: expected both 0 \(automatic\)"):
        OPS.split_resplice_tiled(x, weights, biases, 0.1, 0, 4)
    with pytest.raises(ValueError, match=r"tile_h, tile_w: .* got 65, 1"):
        OPS.split_resplice_tiled(x, weights, biases, 0.1, 65, 1)
    with pytest.raises(ValueError, match=r"split_resplice_tiled: weights\[2\]: expected shape"):
        OPS.split_resplice_tiled(x, weights[:2] + [weights[0]] + weights[3:], biases, 0.1)
    with pytest.raises(TypeError, match="split_resplice_tiled: x: expected a floating-point"):
        OPS.split_resplice_tiled(x.long(), weights, biases, 0.1)
    wide_module = randomized(SplitResplice(1024, 8), torch.float64)
    wide_weights, wide_biases = folded(wide_module)
    with pytest.raises(ValueError, match=r"tile_h × tile_w = 64×64 needs \d+ bytes of shared"):
        OPS.split_resplice_tiled(torch.randn(1, 1024, 2, 2, dtype=torch.float64),
                                 wide_weights, wide_biases, 0.1, 64, 64)


# ------------------------------------------------------------------------------- CUDA
needs_cuda_build = pytest.mark.skipif(
    not torch.cuda.is_available() or not (has_native() and __import__("saffnet_fast")
                                          .native_build_info().get("with_cuda")),
    reason="no CUDA device or saffnet_fast._C built without CUDA kernels")


@needs_cuda_build
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape, splits", SHAPES)
def test_cuda_forward_parity(shape, splits, dtype):
    module = randomized(SplitResplice(shape[1], splits), torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        ref = module(x)
        cuda_module = module.to(device="cuda", dtype=dtype)
        out = native_split_resplice(cuda_module, x.to(device="cuda", dtype=dtype))
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
    assert rel_err(out.cpu(), ref) < tol


@needs_cuda_build
@pytest.mark.cuda
def test_cuda_out_poisoned_and_grad():
    module = randomized(SplitResplice(64, 8), torch.float64).cuda()
    x = torch.randn(2, 64, 9, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    weights, biases = folded(module)
    _, carries_ref = OPS.split_resplice(x.detach(), weights, biases, 0.1)
    out = torch.full_like(x, float("nan"), requires_grad=False)
    carries = torch.full_like(carries_ref, float("nan"))
    OPS.split_resplice_out(x.detach(), weights, biases, 0.1, out, carries)
    assert not torch.isnan(out).any() and not torch.isnan(carries).any()
    grad = torch.randn_like(out)
    params = list(module.parameters())
    got = torch.autograd.grad(native_split_resplice(module, x), [x] + params, grad)
    want = torch.autograd.grad(module(x), [x] + params, grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10


@needs_cuda_build
@pytest.mark.cuda
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape, splits", SHAPES[:8] + [((2, 64, 19, 23), 8)])
def test_cuda_tiled_matches_cpu_emulation(shape, splits, tile):
    module = randomized(SplitResplice(shape[1], splits), torch.float64)
    weights, biases = folded(module)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        ref = module(x)
    for dtype in [torch.float32, torch.float16, torch.bfloat16, torch.float64]:
        args = (x.to(dtype), [w.to(dtype) for w in weights], [b.to(dtype) for b in biases], 0.1)
        acc_size = 8 if dtype == torch.float64 else 4
        if tile_shared_bytes(shape[1], [int(w.shape[0]) for w in weights], *tile,
                             acc_size) > EMULATED_SHARED_BYTES:
            continue  # over an H100 block's shared memory: test_tiled_parity checks the error
        emulated = OPS.split_resplice_tiled(*args, *tile)
        cuda = OPS.split_resplice_tiled(*[_to_cuda(a) for a in args], *tile)
        assert rel_err(cuda[0].cpu().double(), ref) < TILED_TOL[dtype], dtype
        for got, want in zip(cuda, emulated):
            assert got.shape == want.shape
            if want.numel():
                assert rel_err(got.cpu().double(), want.double()) < TILED_TOL[dtype], dtype


def _to_cuda(value):
    if isinstance(value, list):
        return [v.cuda() for v in value]
    return value.cuda() if isinstance(value, torch.Tensor) else value


@needs_cuda_build
@pytest.mark.cuda
def test_cuda_per_step_fallback():
    # SR(512): no automatic tile fits, split_resplice runs the per-step kernels
    module = randomized(SplitResplice(512, 8), torch.float64).cuda()
    x = torch.randn(2, 512, 5, 6, dtype=torch.float64, device="cuda")
    with torch.no_grad():
        assert rel_err(native_split_resplice(module, x), module(x)) < 1e-10



def test_tile_tuning_script_dry_run(tmp_path):
    # benchmarks/tune_split_resplice_tiles.py is what a GPU run uses to choose the automatic
    # tile; on the CPU emulation it must run, measure every tile and write its JSON.
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "tune_split_resplice_tiles.py"
    spec = importlib.util.spec_from_file_location("tune_split_resplice_tiles", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "tiles.json"
    assert script.main(["--device", "cpu", "--batch", "1", "--size", "5", "4", "--reps", "1",
                        "--dtypes", "float32", "--out", str(out)]) == 0
    record = __import__("json").loads(out.read_text())
    assert record["shape"] == [1, 64, 5, 4]
    assert [r["tile"] for r in record["results"]] == [list(t) for t in script.TILES]
    assert all(r["rel_err"] < 1e-5 for r in record["results"])

"""Native training mode against the reference modules (spec/kernels.md, "Training").

The SR steps' BNs use batch statistics from a fused statistics pass inside
split_resplice_train; AFF's local branch in SCAFF / SAWF runs either stored (aff_input,
GEMMs and the module's own BN layers, aff_combine: the default) or recomputed (aff_moments
and aff_fuse), and the attention tests below run both (the ``local_branch`` fixture). They
check the forward, every gradient (input, weights, BN affine) and the running
statistics after a step against the reference in train mode, the ops themselves
(gradcheck, opcheck, bad input), and the counter-based dropout of split_resplice_train.
"""
from __future__ import annotations

import copy

import pytest
import torch

from saffnet_fast import has_native
from saffnet_fast.nn.reference import SAWF, SCAFF, SplitResplice

from parity_utils import native_block, randomize_batchnorm, rel_err

pytestmark = pytest.mark.skipif(not has_native(),
                                reason="saffnet_fast._C not built (pip install -e .)")

if has_native():
    native_scaff = native_block("scaff")
    native_sawf = native_block("sawf")
    native_split_resplice = native_block("split_resplice")

    OPS = torch.ops.saffnet_fast

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def randomized(module: torch.nn.Module, dtype, seed=0) -> torch.nn.Module:
    return randomize_batchnorm(module, seed).to(dtype).train()


def _scaled_err(got, want, total) -> float:
    """rel_err, except that a gradient which is exactly zero in exact arithmetic (the bias of
    a convolution feeding a training-mode BN: the batch mean cancels it) is rounding noise
    and is measured against the overall gradient scale `total`."""
    want_norm = want.detach().double().norm()
    if want_norm <= 1e-5 * total:
        return float((got.detach().double() - want.detach().double()).norm() / total)
    return rel_err(got, want)


def assert_running_stats_match(module, twin, tol):
    for (name, got), (_, want) in zip(module.named_buffers(), twin.named_buffers()):
        if name.endswith("num_batches_tracked"):
            assert int(got) == int(want), name
        elif name.endswith("running_mean"):
            # a batch mean can be ~0 by construction (the input of a BN is another BN's
            # output): compare on the scale of the channel's spread
            var = twin.get_buffer(name[:-len("running_mean")] + "running_var")
            assert ((got.double() - want.double()).abs() / var.double().sqrt()).max() < tol, name
        else:
            assert rel_err(got, want) < tol, name


def _forward_backward(module, fn, x, grad):
    x = x.clone().requires_grad_(True)
    out = fn(module, x)
    params = list(module.parameters())
    grads = torch.autograd.grad(out, [x] + params, grad.to(out.dtype), allow_unused=True)
    return [out, *grads]


def with_layout(fn, layout):
    """fn(m, x) called on x in `layout`, built inside the graph: _forward_backward's leaf is
    a clone, and clone() of a sliced (non-dense) tensor is contiguous."""
    def call(module, x):
        if layout == "channels_last":
            return fn(module, x.contiguous(memory_format=torch.channels_last))
        n, c, h, w = x.shape
        big = x.new_zeros(n, c + 4, h, 2 * w)
        big[:, 2:-2, :, ::2] = x
        sliced = big[:, 2:-2, :, ::2]
        assert not sliced.is_contiguous() and not sliced.is_contiguous(memory_format=torch.channels_last)
        return fn(module, sliced)
    return call


def train_step_parity(module, fn, x, dtype):
    """One training forward + backward of native fn(module, ·) against the reference twin:
    the output, the gradient of x and of every parameter, and the running statistics.

    float64: native vs reference < 1e-10. float32: both are compared with a float64 run of
    the reference (the truth), and native must be within 1e-5 or within 4× the float32
    reference's own error, whichever is larger: gradients through a training BN over few
    values (AFF's global branch normalises N pooled values) are ill-conditioned, and the
    float32 reference itself is off by up to ~2e-5 at N = 3.
    """
    twin = copy.deepcopy(module)
    exact = copy.deepcopy(module).double()
    names = ["out", "x"] + [n for n, _ in module.named_parameters()]
    grad = torch.randn(x.shape, dtype=torch.float64)  # every module here keeps x's shape
    got = _forward_backward(module, fn, x, grad)
    want = _forward_backward(twin, lambda m, t: m(t), x, grad)
    if dtype == torch.float64:
        truth = want
    else:
        truth = _forward_backward(exact, lambda m, t: m(t), x.double(), grad)
    total = torch.sqrt(sum(t.detach().double().norm() ** 2 for t in truth[2:] if t is not None))
    for g, w, t, name in zip(got, want, truth, names):
        assert (g is None) == (w is None), name
        if g is None:
            continue
        if dtype == torch.float64:
            err, bound = _scaled_err(g, w, total), TOL[dtype]
        else:
            err = _scaled_err(g, t, total)
            bound = max(TOL[dtype], 4 * _scaled_err(w, t, total))
        assert err < bound, f"{name}: {err:.3g} ≥ {bound:.3g}"
    assert_running_stats_match(module, twin, TOL[dtype])


# ------------------------------------------------------------------------------ modules
ATTENTION = {"scaff": (SCAFF, lambda: native_scaff), "sawf": (SAWF, lambda: native_sawf)}
# AFF's global branch has a BN over the N pooled maps: training needs N ≥ 2, as in the
# reference. With N = 2 that BN (and a local BN over N·H·W = 2 values) is ill-conditioned:
# its gradients amplify rounding by orders of magnitude, so the float32 reference itself is
# off by up to 1e-3 there (measured against float64) and float32 parity says nothing.
# float32 therefore runs with N ≥ 3, where native's error measured at most 1.9× the float32
# reference's own over 40 random cases; N = 2 is covered in float64.
ATTENTION_CASES = (
    [(shape, torch.float64) for shape in [(2, 32, 7, 5), (2, 12, 17, 3), (2, 16, 1, 3),
                                          (3, 64, 4, 9), (4, 128, 2, 3)]]
    + [(shape, torch.float32) for shape in [(3, 32, 7, 5), (3, 12, 17, 3), (4, 16, 1, 3),
                                            (3, 64, 4, 9), (4, 128, 2, 3)]])


@pytest.mark.parametrize("shape, dtype", ATTENTION_CASES)
@pytest.mark.parametrize("kind", list(ATTENTION))
def test_attention_training_parity(kind, shape, dtype, local_branch):
    cls, fn = ATTENTION[kind]
    torch.manual_seed(1)
    module = randomized(cls(shape[1]), dtype)
    train_step_parity(module, fn(), torch.randn(shape, dtype=dtype), dtype)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("kind", list(ATTENTION))
def test_attention_training_layouts(kind, layout, local_branch):
    cls, fn = ATTENTION[kind]
    module = randomized(cls(16), torch.float64)
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    train_step_parity(module, with_layout(fn(), layout), x, torch.float64)


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_attention_training_momentum_none_and_repeated_steps(kind, local_branch):
    """Cumulative-average running statistics (momentum=None) over three steps."""
    cls, fn = ATTENTION[kind]
    module = randomized(cls(16), torch.float64)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    twin = copy.deepcopy(module)
    for _ in range(3):
        x = torch.randn(2, 16, 4, 5, dtype=torch.float64)
        assert rel_err(fn()(module, x), twin(x)) < 1e-10
    assert_running_stats_match(module, twin, 1e-10)


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_attention_training_frozen_and_plain_bns(kind, local_branch):
    """BNs the pooled_linear op does not take (frozen in eval mode inside a training module,
    or without affine parameters and running statistics) run as the module's own layers,
    and the step still matches the reference; with the official layers (every other test
    here) the pooled layers run as pooled_linear."""
    cls, fn = ATTENTION[kind]
    module = randomized(cls(16), torch.float64)
    glob = module.aff.global_att
    glob[2].eval()  # frozen: normalises with its running statistics, which stay put
    glob[5] = torch.nn.BatchNorm2d(16, affine=False, track_running_stats=False).double()
    if kind == "scaff":
        module.ca.bn1.eval()
    train_step_parity(module, fn(), torch.randn(3, 16, 5, 4, dtype=torch.float64),
                      torch.float64)


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_attention_training_gradcheck(kind, local_branch):
    cls, fn = ATTENTION[kind]
    module = randomized(cls(8), torch.float64, seed=3)
    for m in module.modules():  # gradcheck calls forward many times: keep statistics fixed
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.0
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fn()(module, t), (x,))


SR_SHAPES = [((2, 32, 6, 5), 8), ((1, 64, 3, 17), 8), ((3, 12, 5, 7), 4), ((2, 6, 1, 3), 2),
             ((1, 24, 9, 1), 3), ((2, 128, 4, 4), 8)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, splits", SR_SHAPES)
def test_split_resplice_training_parity(shape, splits, dtype):
    torch.manual_seed(2)
    module = randomized(SplitResplice(shape[1], splits, dropout=0.0), dtype)
    train_step_parity(module, native_split_resplice, torch.randn(shape, dtype=dtype), dtype)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_split_resplice_training_layouts(layout):
    module = randomized(SplitResplice(16, 4, dropout=0.0), torch.float64)
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    train_step_parity(module, with_layout(native_split_resplice, layout), x, torch.float64)


def test_split_resplice_training_needs_more_than_one_value_per_channel():
    module = SplitResplice(16, 4, dropout=0.0).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        native_split_resplice(module, torch.randn(1, 16, 1, 1))


# ------------------------------------------------------------------------------ dropout
def sr_args(n=2, c=16, h=5, w=7, splits=4, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    module = SplitResplice(c, splits)
    widths = module.widths
    x = torch.randn(n, c, h, w, dtype=dtype, generator=gen)
    weights = [torch.randn(cj, cj, 3, 3, dtype=dtype, generator=gen) * 0.3 for cj in widths]
    gammas = [torch.rand(cj, dtype=dtype, generator=gen) + 0.5 for cj in widths]
    betas = [torch.rand(cj, dtype=dtype, generator=gen) - 0.5 for cj in widths]
    return x, weights, gammas, betas


def test_dropout_mask_is_a_function_of_the_seed():
    x, weights, gammas, betas = sr_args(n=4, h=16, w=16)
    seed = torch.tensor(1234)
    a = OPS.split_resplice_train(x, weights, gammas, betas, 1e-5, 0.1, 0.3, seed)[0]
    b = OPS.split_resplice_train(x, weights, gammas, betas, 1e-5, 0.1, 0.3, seed)[0]
    c = OPS.split_resplice_train(x, weights, gammas, betas, 1e-5, 0.1, 0.3, torch.tensor(99))[0]
    full = OPS.split_resplice_train(x, weights, gammas, betas, 1e-5, 0.1, 0.0, seed)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    w0 = 4
    # the first step writes out channels 4..7 from full-precision y / (1 − p) or 0
    step0 = a[:, w0:w0 + 2]
    kept = step0 != 0
    ref0 = full[:, w0:w0 + 2]
    assert torch.allclose(step0[kept], ref0[kept] / 0.7, rtol=1e-12, atol=0)
    dropped = 1 - kept.double().mean().item()
    assert 0.2 < dropped < 0.4  # 2·4·16·16 = 2048 draws at p = 0.3


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_split_resplice_train_gradcheck(p):
    """The op as a function of every input for a fixed seed: the backward regenerates the
    forward's dropout mask (a different mask would fail here)."""
    x, weights, gammas, betas = sr_args(n=2, c=8, h=3, w=4, splits=4)
    seed = torch.tensor(7)
    inputs = [x, *weights, *gammas, *betas]
    for t in inputs:
        t.requires_grad_(True)
    s = len(weights)

    def fn(x, *rest):
        return OPS.split_resplice_train(x, list(rest[:s]), list(rest[s:2 * s]),
                                        list(rest[2 * s:]), 1e-5, 0.1, p, seed)[0]

    assert torch.autograd.gradcheck(fn, tuple(inputs))


def test_split_resplice_module_dropout_trains_and_is_repeatable():
    module = SplitResplice(16, 4, dropout=0.2).train().double()
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    torch.manual_seed(5)
    a = native_split_resplice(copy.deepcopy(module), x)
    torch.manual_seed(5)
    b = native_split_resplice(copy.deepcopy(module), x)
    c = native_split_resplice(copy.deepcopy(module), x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 4:] == 0).any() and (a[:, :4] == x[:, :4]).all()


# ------------------------------------------------------------------------------ ops
def aff_moments_args(n=2, c=6, h=3, w=4, ci=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, dtype=dtype, generator=gen)
    a_h = torch.rand(n, c, h, dtype=dtype, generator=gen)
    a_w = torch.rand(n, c, w, dtype=dtype, generator=gen)
    w1 = torch.randn(ci, c, dtype=dtype, generator=gen)
    b1 = torch.randn(ci, dtype=dtype, generator=gen)
    w2 = torch.randn(c, ci, dtype=dtype, generator=gen)
    b2 = torch.randn(c, dtype=dtype, generator=gen)
    return x, a_h, a_w, w1, b1, w2, b2


def aff_moments_reference(x, a_h, a_w, w1, b1, w2, b2):
    t = x * (1 + a_h[..., None] * a_w[:, :, None, :])
    y = torch.einsum("jc,nchw->njhw", w1, t) + b1[:, None, None]
    if w2 is not None:
        y = torch.einsum("cj,njhw->nchw", w2, y.relu()) + b2[:, None, None]
    return y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("shape", [(2, 6, 3, 4, 2), (1, 64, 17, 3, 16), (3, 32, 1, 5, 8),
                                   (2, 12, 40, 40, 3)])
def test_aff_moments_parity(shape, stage, dtype):
    args = list(aff_moments_args(*shape, dtype=dtype))
    if stage == 1:
        args[5] = args[6] = None
    for got, want in zip(OPS.aff_moments(*args), aff_moments_reference(*args)):
        assert rel_err(got, want) < TOL[dtype]


def test_aff_moments_nearly_constant_channel_float32():
    """Variance of a channel with a large mean and a tiny spread (where Σy² − (Σy)²/n in
    float32 loses everything): the kernel's merged centred sums keep it."""
    x, a_h, a_w, w1, b1, _, _ = aff_moments_args(n=4, c=8, h=32, w=32, ci=2, dtype=torch.float64)
    x = 1000 + 1e-2 * x
    mean, var = aff_moments_reference(x, a_h, a_w, w1, b1, None, None)
    got_mean, got_var = OPS.aff_moments(*(t.float() for t in (x, a_h, a_w, w1, b1)), None, None)
    assert rel_err(got_mean, mean) < 1e-6
    assert rel_err(got_var, var) < 1e-3


@pytest.mark.parametrize("stage", [1, 2])
def test_aff_moments_gradcheck_and_layouts(stage):
    x, a_h, a_w, w1, b1, w2, b2 = aff_moments_args()
    if stage == 1:
        w2 = b2 = None
    inputs = [t.requires_grad_(True) for t in (x, a_h, a_w, w1, b1) + ((w2, b2) if w2 is not None else ())]

    def fn(*ts):
        extra = ts[5:] if stage == 2 else (None, None)
        mean, var = OPS.aff_moments(*ts[:5], *extra)
        return mean, var

    assert torch.autograd.gradcheck(fn, tuple(inputs))
    # channels_last x, expanded factors: same statistics
    xcl = x.detach().to(memory_format=torch.channels_last)
    ah_exp = a_h.detach()[:, :, :1].expand_as(a_h)
    want = aff_moments_reference(xcl, ah_exp, a_w.detach(), w1.detach(), b1.detach(),
                                 None if w2 is None else w2.detach(),
                                 None if b2 is None else b2.detach())
    got = OPS.aff_moments(xcl, ah_exp, a_w.detach(), w1.detach(), b1.detach(),
                          None if w2 is None else w2.detach(), None if b2 is None else b2.detach())
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10


def test_opcheck_training_ops():
    x, a_h, a_w, w1, b1, w2, b2 = aff_moments_args()
    for args in [(x, a_h, a_w, w1, b1, w2, b2), (x, a_h, a_w, w1, b1, None, None)]:
        args = tuple(t.requires_grad_(True) if t is not None else None for t in args)
        torch.library.opcheck(OPS.aff_moments.default, args)
    x, weights, gammas, betas = sr_args(n=2, c=8, h=3, w=4, splits=4)
    for t in [x, *weights, *gammas, *betas]:
        t.requires_grad_(True)
    torch.library.opcheck(OPS.split_resplice_train.default,
                          (x, weights, gammas, betas, 1e-5, 0.1, 0.2, torch.tensor(3)))


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda a: a.__setitem__(3, a[3][:, :5]), ValueError, "w1"),
    (lambda a: a.__setitem__(5, None), ValueError, "both"),
    (lambda a: a.__setitem__(1, a[1][:, :, :2]), ValueError, "a_h"),
    (lambda a: a.__setitem__(0, a[0].float()), TypeError, "dtype"),
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, "4-D"),
])
def test_aff_moments_bad_input(mutate, exc, words):
    args = list(aff_moments_args())
    mutate(args)
    with pytest.raises(exc, match=words):
        OPS.aff_moments(*args)


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda a: a.__setitem__(2, a[2][:-1]), ValueError, "gammas"),
    (lambda a: a.__setitem__(3, [b[:-1] for b in a[3]]), ValueError, "betas"),
    (lambda a: a.__setitem__(4, -1.0), ValueError, "eps"),
    (lambda a: a.__setitem__(6, 1.0), ValueError, "dropout"),
    (lambda a: a.__setitem__(7, torch.tensor(1.5)), ValueError, "seed"),
    (lambda a: a.__setitem__(7, torch.tensor([1, 2])), ValueError, "seed"),
    (lambda a: a.__setitem__(0, a[0][:, :15]), ValueError, "divisible"),
])
def test_split_resplice_train_bad_input(mutate, exc, words):
    x, weights, gammas, betas = sr_args()
    args = [x, weights, gammas, betas, 1e-5, 0.1, 0.1, torch.tensor(0)]
    mutate(args)
    with pytest.raises(exc, match=words):
        OPS.split_resplice_train(*args)


# ------------------------------------------------------------------------------ compile
@pytest.mark.parametrize("kind", ["scaff", "sawf", "sr"])
def test_torch_compile_fullgraph_training(kind, local_branch):
    # x.grad is judged against a float64 run: AFF's global BN normalises N = 2 pooled values,
    # an ill-conditioned case where the float32 reference itself is off by more than 1e-5
    # for some inputs. Over seeds 0–29 the float32 errors against float64 reached: SCAFF
    # native 2.0e-4, reference 2.6e-4 (ratio ≤ 1.7 where native > 1e-5); SAWF native 9.0e-5,
    # reference 5.2e-5 (ratio ≤ 4.4); SR both < 2e-7. Native must be within 1e-5 of float64
    # or within 8× the float32 reference's own error. Seeded so the inputs do not depend on
    # test order.
    torch.manual_seed(0)
    if kind == "sr":
        module, fn = randomized(SplitResplice(16, 4, dropout=0.0), torch.float32), native_split_resplice
    else:
        cls, get = ATTENTION[kind]
        module, fn = randomized(cls(16), torch.float32), get()
    twin = copy.deepcopy(module)
    truth = copy.deepcopy(module).double()
    compiled = torch.compile(lambda t: fn(module, t), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 16, 5, 4)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    out, ref, want = compiled(x1), twin(x2), truth(x64)
    assert rel_err(out, ref) < 1e-5
    for y in (out, ref, want):
        y.sum().backward()
    reference_error = rel_err(x2.grad.double(), x64.grad)
    assert rel_err(x1.grad.double(), x64.grad) <= max(1e-5, 8 * reference_error)
    assert_running_stats_match(module, twin, 1e-5)


# ------------------------------------------------------------------------------ model
@pytest.fixture(scope="module")
def saffnet_pair():
    from saffnet_fast.fast.convert import convert
    from saffnet_fast.models import build_model

    torch.manual_seed(0)
    reference = build_model("saffnet", num_joints=17, input_size=(64, 48),
                            backend="reference", dropout=0.0).train()
    native = convert(copy.deepcopy(reference), backend="native").train()
    return reference, native


def _model_step(model, x, grad):
    out = model(x)
    out.backward(grad.to(out.dtype))
    return [out] + [p.grad for p in model.parameters()]


def test_whole_saffnet_training_step_matches_reference(saffnet_pair, local_branch):
    """Issue #3's acceptance check: the whole SAFFNet forward and backward with the native
    backend in training mode (CPU, dropout off) against the reference, on the output, every
    parameter gradient (500+) and every BN's running statistics after the step.

    float64, the decisive check: every gradient of native within 1e-9 of the reference.
    float32: the output within 1e-4 of the float32 reference, and the gradients, all
    parameters together and pooled over three inputs, within 4× the float32 reference's own
    error against float64. Why not per tensor, nor one input: at initialisation, with every
    BN on batch statistics, float32 rounding is amplified by orders of magnitude (the
    float32 reference is off by 2e-3 to 4e-2 of the gradient norm), and which tensors and
    which inputs it lands on changes with any change of summation order. Measured over 12
    inputs (torch.manual_seed(0..11), stored local branch, pooled_linear for the pooled
    layers): the all-parameter ratio of native's error to the reference's own ranged
    0.06–4.45, median 0.9 (4.45 at seed 2, this test's single input before it pooled
    three); with the earlier graph of ATen calls, over 20 seeds, 0.29–3.5, median 1.0.
    """
    reference, native = saffnet_pair
    names = ["out"] + [n for n, _ in reference.named_parameters()]
    native_sq, reference_sq, total_sq = 0.0, 0.0, 0.0
    for seed in (0, 1, 2):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(8, 3, 64, 48, dtype=torch.float64, generator=gen)
        grad = torch.randn(8, 17, 16, 12, dtype=torch.float64, generator=gen)
        ref32, nat32 = copy.deepcopy(reference), copy.deepcopy(native)
        want32, got32 = _model_step(ref32, x.float(), grad), _model_step(nat32, x.float(), grad)
        ref64 = copy.deepcopy(reference).double()
        truth = _model_step(ref64, x, grad)
        assert rel_err(got32[0], want32[0]) < 1e-4
        if seed == 2:  # the float64 check, on one input
            nat64 = copy.deepcopy(native).double()
            got64 = _model_step(nat64, x, grad)
            total = torch.sqrt(sum(t.norm() ** 2 for t in truth[1:] if t is not None))
            checked = 0
            for name, t, g64 in zip(names, truth, got64):
                assert (t is None) == (g64 is None), name
                if t is not None:
                    assert _scaled_err(g64, t, total) < 1e-9, name
                    checked += 1
            assert checked > 500  # every parameter of the model, not a subset
            assert_running_stats_match(nat64, ref64, 1e-9)
        for name, t, g32, w32 in zip(names[1:], truth[1:], got32[1:], want32[1:]):
            assert (t is None) == (g32 is None), name
            if t is not None:
                native_sq += float((g32.detach().double() - t).norm() ** 2)
                reference_sq += float((w32.detach().double() - t).norm() ** 2)
                total_sq += float(t.norm() ** 2)
        assert_running_stats_match(nat32, ref32, 1e-4)
    native_err, reference_err = (native_sq / total_sq) ** 0.5, (reference_sq / total_sq) ** 0.5
    assert native_err < max(1e-4, 4 * reference_err), (native_err, reference_err)


def test_whole_saffnet_compiled_fullgraph_training_matches_reference(saffnet_pair):
    reference, native = (copy.deepcopy(m) for m in saffnet_pair)
    x = torch.randn(3, 3, 64, 48, dtype=torch.float64)
    reference, native = reference.double(), native.double()
    compiled = torch.compile(native, fullgraph=True, backend="aot_eager")
    out, ref = compiled(x), reference(x)
    assert rel_err(out, ref) < 1e-9
    out.sum().backward()
    ref.sum().backward()
    w_got = native.get_parameter("stem_scaff.aff.local_att.0.weight").grad
    w_ref = reference.get_parameter("stem_scaff.aff.local_att.0.weight").grad
    assert rel_err(w_got, w_ref) < 1e-9
    assert_running_stats_match(native, reference, 1e-9)


# ------------------------------------------------------------------------------- CUDA
needs_cuda_build = pytest.mark.skipif(
    not torch.cuda.is_available() or not (has_native() and __import__("saffnet_fast")
                                          .native_build_info().get("with_cuda")),
    reason="no CUDA device or saffnet_fast._C built without CUDA kernels")
# Bound on each tensor's relative error against the float64 truth: max(floor, k × the error
# of the reference module run on CUDA in the same dtype), k = 4 for float32 and 8 for half.
# Half-precision gradients through a training BN are single noisy draws: on an H100 one
# bf16 BN-bias gradient of an SR step measured 0.094 where the bf16 reference's was 0.0125,
# and a float16 conv-weight gradient 0.025 against 0.0057; the floors follow the dtypes'
# epsilons (bf16's is 8× float16's).
CUDA_FLOOR = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2,
              torch.bfloat16: 1e-1}
CUDA_REF_FACTOR = {torch.float64: 0, torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}
CUDA_DTYPES = list(CUDA_FLOOR)


def cuda_train_step_parity(module64, fn, x64, dtype, floor_scale=1.0):
    """Native on CUDA in `dtype` against the float64 CPU reference (the truth), with the bound
    max(floor, k × the error of the reference module run on CUDA in the same dtype): the
    output, the gradient of x and of every parameter, and the running statistics (against the
    same-dtype CUDA reference)."""
    names = ["out", "x"] + [n for n, _ in module64.named_parameters()]
    # truth from the parameters and input as rounded to dtype: the bound then measures the
    # kernels' arithmetic, not the input quantisation that both sides share
    module64 = copy.deepcopy(module64).to(dtype).double()
    x64 = x64.to(dtype).double()
    grad = torch.randn(x64.shape, dtype=torch.float64).to(dtype).double()
    truth = _forward_backward(copy.deepcopy(module64), lambda m, t: m(t), x64, grad)
    native = copy.deepcopy(module64).to(device="cuda", dtype=dtype)
    twin = copy.deepcopy(module64).to(device="cuda", dtype=dtype)
    xc = x64.to(device="cuda", dtype=dtype)
    got = _forward_backward(native, fn, xc, grad.cuda())
    want = _forward_backward(twin, lambda m, t: m(t), xc, grad.cuda())
    total = torch.sqrt(sum(t.detach().double().norm() ** 2 for t in truth[2:] if t is not None))
    floor = CUDA_FLOOR[dtype] * floor_scale
    for g, w, t, name in zip(got, want, truth, names):
        assert (g is None) == (w is None), name
        if g is None:
            continue
        assert g.dtype == dtype and g.device.type == "cuda", name
        err = _scaled_err(g.cpu(), t, total)
        bound = max(floor, CUDA_REF_FACTOR[dtype] * _scaled_err(w.cpu(), t, total))
        assert err < bound, f"{name}: {err:.3g} ≥ {bound:.3g}"
    assert_running_stats_match(native, twin, max(CUDA_FLOOR[dtype], 1e-5))


@needs_cuda_build
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("shape", [(3, 32, 7, 5), (4, 64, 16, 12), (8, 128, 8, 6)])
@pytest.mark.parametrize("kind", list(ATTENTION))
def test_cuda_attention_training_parity(kind, shape, dtype):
    cls, fn = ATTENTION[kind]
    torch.manual_seed(1)
    module = randomized(cls(shape[1]), torch.float64)
    cuda_train_step_parity(module, fn(), torch.randn(shape, dtype=torch.float64), dtype)


@needs_cuda_build
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("shape, splits", [((2, 32, 6, 5), 8), ((3, 12, 5, 7), 4),
                                           ((4, 64, 16, 12), 8), ((2, 128, 4, 4), 8)])
def test_cuda_split_resplice_training_parity(shape, splits, dtype):
    torch.manual_seed(2)
    module = randomized(SplitResplice(shape[1], splits, dropout=0.0), torch.float64)
    cuda_train_step_parity(module, native_split_resplice,
                           torch.randn(shape, dtype=torch.float64), dtype)


@needs_cuda_build
@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("kind", ["scaff", "sawf", "sr"])
def test_cuda_training_layouts(kind, layout):
    if kind == "sr":
        module, fn = randomized(SplitResplice(16, 4, dropout=0.0), torch.float64), native_split_resplice
    else:
        cls, get = ATTENTION[kind]
        module, fn = randomized(cls(16), torch.float64), get()
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    cuda_train_step_parity(module, with_layout(fn, layout), x, torch.float64)


@needs_cuda_build
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_dropout_mask_matches_cpu(dtype):
    """Philox keyed by (seed, step, element): the CUDA kernels draw the same mask as the CPU
    ones, so a run is reproducible across devices, and backward regenerates it on either."""
    x, weights, gammas, betas = sr_args(n=4, c=32, h=16, w=11, splits=8, dtype=dtype)
    seed = torch.tensor(4321)
    cpu = OPS.split_resplice_train(x, weights, gammas, betas, 1e-5, 0.1, 0.3, seed)
    gpu = OPS.split_resplice_train(x.cuda(), [w.cuda() for w in weights],
                                   [g.cuda() for g in gammas], [b.cuda() for b in betas],
                                   1e-5, 0.1, 0.3, seed)
    assert torch.equal(cpu[0] == 0, gpu[0].cpu() == 0)  # the same elements dropped
    assert rel_err(gpu[0].cpu(), cpu[0]) < TOL[dtype] * 10
    dropped = (cpu[0][:, 4:] == 0).double().mean().item()
    assert 0.25 < dropped < 0.35


@needs_cuda_build
@pytest.mark.cuda
def test_cuda_seed_on_device_matches_cpu_seed_and_graph_replays_draw_new_masks():
    """A seed on x's device is read by the kernels (no host sync): the same mask as the
    same seed on the CPU; under a CUDA graph the captured randint writes a new seed each
    replay, so two replays drop different elements, and each replay's backward regenerates
    its own forward's mask."""
    x, weights, gammas, betas = sr_args(n=4, c=32, h=16, w=11, splits=8, dtype=torch.float32)
    x, weights = x.cuda(), [w.cuda() for w in weights]
    gammas, betas = [g.cuda() for g in gammas], [b.cuda() for b in betas]
    on_cpu = OPS.split_resplice_train(x, weights, gammas, betas, 1e-5, 0.1, 0.3,
                                      torch.tensor(99))[0]
    on_gpu = OPS.split_resplice_train(x, weights, gammas, betas, 1e-5, 0.1, 0.3,
                                      torch.tensor(99, device="cuda"))[0]
    assert torch.equal(on_cpu, on_gpu)

    torch.manual_seed(0)
    module = randomized(SplitResplice(32, 8, dropout=0.3), torch.float32).cuda()
    xin = torch.randn(4, 32, 16, 11, device="cuda", requires_grad=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph, as capture requires
        native_split_resplice(module, xin).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    xin.grad = None
    with torch.cuda.graph(graph):
        out = native_split_resplice(module, xin)
        out.sum().backward()
    masks, grads = [], []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        masks.append((out[:, 4:] == 0).clone())
        grads.append(xin.grad.clone())
    assert not torch.equal(masks[0], masks[1])
    assert not torch.equal(grads[0], grads[1])
    for mask in masks:
        assert 0.2 < mask.double().mean().item() < 0.4


@needs_cuda_build
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("shape", [(2, 6, 3, 4, 2), (3, 32, 1, 5, 8), (8, 64, 32, 24, 16)])
def test_cuda_aff_moments_parity(shape, stage, dtype):
    args64 = list(aff_moments_args(*shape))
    if stage == 1:
        args64[5] = args64[6] = None
    args = [None if a is None else a.to(device="cuda", dtype=dtype) for a in args64]
    # the truth from the inputs as rounded to dtype: the kernel accumulates in float32/64
    truth = aff_moments_reference(*[None if a is None else a.double().cpu() for a in args])
    for got, want in zip(OPS.aff_moments(*args), truth):
        assert got.dtype == dtype
        assert rel_err(got.cpu(), want) < (TOL[dtype] if dtype in TOL else 1e-2)


@needs_cuda_build
@pytest.mark.cuda
def test_cuda_training_ops_gradcheck_and_opcheck():
    x, a_h, a_w, w1, b1, w2, b2 = (t.cuda() for t in aff_moments_args())
    for args in [(x, a_h, a_w, w1, b1, w2, b2), (x, a_h, a_w, w1, b1)]:
        args = tuple(t.detach().requires_grad_(True) for t in args)
        extra = () if len(args) == 7 else (None, None)
        assert torch.autograd.gradcheck(lambda *ts: OPS.aff_moments(*ts, *extra), args)
        torch.library.opcheck(OPS.aff_moments.default, args + extra)
    x, weights, gammas, betas = sr_args(n=2, c=8, h=3, w=4, splits=4)
    inputs = [t.cuda().requires_grad_(True) for t in [x, *weights, *gammas, *betas]]
    s, seed = len(weights), torch.tensor(7)

    def fn(x, *rest):
        return OPS.split_resplice_train(x, list(rest[:s]), list(rest[s:2 * s]),
                                        list(rest[2 * s:]), 1e-5, 0.1, 0.25, seed)[0]

    # double atomics in the statistics passes and cuDNN's weight gradient sum in a
    # run-dependent order: backward is deterministic only to rounding
    assert torch.autograd.gradcheck(fn, tuple(inputs), nondet_tol=1e-10)
    x, *rest = inputs
    torch.library.opcheck(OPS.split_resplice_train.default,
                          (x, rest[:s], rest[s:2 * s], rest[2 * s:], 1e-5, 0.1, 0.2, seed))


@needs_cuda_build
@pytest.mark.cuda
def test_cuda_whole_saffnet_training_step_matches_reference(saffnet_pair):
    """The whole native SAFFNet training step on CUDA: float64 against the CPU float64
    reference (< 1e-9), float32 within 1e-4 of it or 2× the CUDA float32 reference's own
    error, and the inductor-compiled (fullgraph) native model against eager native."""
    reference, native = saffnet_pair
    names = ["out"] + [n for n, _ in reference.named_parameters()]
    x = torch.randn(8, 3, 64, 48, dtype=torch.float64)
    grad = torch.randn(8, 17, 16, 12, dtype=torch.float64)
    truth = _model_step(copy.deepcopy(reference).double(), x, grad)
    total = torch.sqrt(sum(t.norm() ** 2 for t in truth[1:] if t is not None))
    nat64 = copy.deepcopy(native).to(device="cuda", dtype=torch.float64)
    got64 = _model_step(nat64, x.cuda(), grad.cuda())
    ref32 = copy.deepcopy(reference).cuda()
    nat32 = copy.deepcopy(native).cuda()
    want32 = _model_step(ref32, x.float().cuda(), grad.cuda())
    got32 = _model_step(nat32, x.float().cuda(), grad.cuda())
    for name, t, g64, g32, w32 in zip(names, truth, got64, got32, want32):
        if t is None:
            continue
        assert _scaled_err(g64.cpu(), t, total) < 1e-9, name
        bound = max(1e-4, 2 * _scaled_err(w32.cpu(), t, total))
        assert _scaled_err(g32.cpu(), t, total) < bound, name
    assert_running_stats_match(nat32, ref32, 1e-4)

    compiled_model = copy.deepcopy(native).cuda()
    eager_model = copy.deepcopy(native).cuda()
    compiled = torch.compile(compiled_model, fullgraph=True)
    xc = x.float().cuda()
    out, ref = compiled(xc), eager_model(xc)
    assert rel_err(out, ref) < 1e-4
    out.backward(grad.float().cuda())
    ref.backward(grad.float().cuda())
    name = "stem_scaff.aff.local_att.0.weight"
    assert rel_err(compiled_model.get_parameter(name).grad,
                   eager_model.get_parameter(name).grad) < 1e-3


def philox4x32_10(seed: int, step: int, groups):
    """NumPy port of ATen's at::Philox4_32(seed, subsequence=group, offset=step) block:
    the four 32-bit outputs of each group (a numpy integer array), as in
    ATen/core/PhiloxRNGEngine.h."""
    import numpy as np
    mask = np.uint64(0xFFFFFFFF)
    groups = groups.astype(np.uint64)
    c0 = np.full(groups.shape, step & 0xFFFFFFFF, np.uint64)
    c1 = np.full(groups.shape, step >> 32, np.uint64)
    c2, c3 = groups & mask, groups >> np.uint64(32)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for _ in range(10):
        p0, p1 = c0 * np.uint64(0xD2511F53), c2 * np.uint64(0xCD9E8D57)
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & mask,
                          (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & mask)
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


@pytest.mark.parametrize("seed, hw", [(1234, (16, 16)), (2**40 + 7, (5, 7))])
def test_cpu_dropout_mask_is_atens_philox(seed, hw):
    """The CPU kernels' dropout bits are ATen's Philox-4×32-10 keyed by (seed, step,
    element): element i of step j keeps iff (bits >> 8)/2²⁴ ≥ p, bits = output i mod 4 of
    block (seed, subsequence i // 4, offset j). The CUDA kernels draw through at::Philox4_32
    itself, so this is what makes CPU and GPU masks equal (checked on a GPU by
    test_cuda_dropout_mask_matches_cpu). Odd plane sizes start planes mid-block."""
    import numpy as np
    h, w = hw
    x, weights, gammas, betas = sr_args(n=3, h=h, w=w, dtype=torch.float32)
    p = 0.3
    out = OPS.split_resplice_train(x, weights, gammas, betas, 1e-5, 0.1, p,
                                   torch.tensor(seed))[0]
    # step j's cout output channels are planes (n·cout + c) of its pre-BN map; the first
    # `keep` of them (ceil(cout/2), all for the last step) go to out[:, out_c0:out_c0+keep]
    n, hwn, out_c0 = x.shape[0], h * w, x.shape[1] // (len(weights) + 1)  # S1 first
    checked = 0
    for step, weight in enumerate(weights):
        cout = weight.shape[0]
        keep_n = cout if step == len(weights) - 1 else -(-cout // 2)
        index = (np.arange(n)[:, None, None] * cout + np.arange(keep_n)[None, :, None]) * hwn \
            + np.arange(hwn)[None, None, :]
        outputs = philox4x32_10(seed, step, index // 4)
        bits = np.choose((index % 4).astype(np.int64), outputs).astype(np.uint64)
        keep = (bits >> np.uint64(8)).astype(np.float32) * np.float32(1.0 / 16777216.0) \
            >= np.float32(p)
        got = (out[:, out_c0:out_c0 + keep_n].reshape(n, keep_n, hwn) != 0).numpy()
        assert (~keep).any()
        assert (got == keep).all(), f"step {step}: {(got != keep).sum()} of {keep.size} differ"
        out_c0 += keep_n
        checked += keep.size
    assert out_c0 == x.shape[1] and checked > 0

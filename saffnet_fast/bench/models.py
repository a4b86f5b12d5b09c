"""Whole-model speed, ``saffnet bench``: inference throughput and a mixed-precision
training step of SAFFNet, reference eager vs ``torch.compile`` vs the fast model (and after
``optimize_for_inference``) vs the runtimes it is deployed with (ONNX Runtime, OpenVINO),
with HRNet-W32 for context; :func:`run_model_bench` returns the records with their speedup
ratios. Every inference provider's output is checked against eager's on the same input
before it is timed: a provider that computes something else is recorded as an error.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from typing import Callable

import torch
from torch import nn

from ..backend import resolve_backend
from ..fast.convert import optimize_for_inference
from ..fast.inductor import compile_frozen
from ..engine.runtime import RuntimeUnavailable, export_onnx_file, load_runtime, require
from ..models import build_model
from .machine import machine_info
from .results import RESULT_SCHEMA, ProviderUnavailable, error_text, parse_dtype
from .timing import measure_peak_memory, raise_compile_limits, time_callable

__all__ = ["MODEL_PROVIDERS", "ModelBenchConfig", "run_model_bench", "calibrate_batchnorm_"]

# eager: reference modules, eager; compile: the same under torch.compile; compile_freezing:
# saffnet_fast.compile_frozen of the reference: channels_last, torch.compile with inductor's
# freezing (weights become constants: BN folded into the convolutions, oneDNN weights
# prepacked once, the small 1x1 convolutions as prepacked linears, channel concatenations
# written channels_last, a C++ wrapper; inference only);
# fast: backend 'auto' (native / triton where they run); fast_optimized: fast after
# optimize_for_inference; fast_optimized_cudagraphs: the same with CUDA graphs (GPU only);
# fast_optimized_compile: fast_optimized under torch.compile (the fused ops stay opaque
# custom ops, inductor compiles the HRNet convolutions and everything between them);
# onnxruntime / openvino: the reference exported to ONNX (opset 17, once per model and input
# size) in ONNX Runtime's CPU provider / OpenVINO's CPU plugin with an f32 hint (CPU,
# float32; optional extras, skipped with the pip command when missing);
# hrnet_w32: the baseline HRNet-W32, eager, for context.
MODEL_PROVIDERS = ("eager", "compile", "compile_freezing", "fast", "fast_optimized",
                   "fast_optimized_cudagraphs", "fast_optimized_compile", "onnxruntime",
                   "openvino", "hrnet_w32")
_COMPILED_PROVIDERS = ("compile", "compile_freezing", "fast_optimized_compile")
_RUNTIME_PROVIDERS = ("onnxruntime", "openvino")
# Inputs fed channels_last: the layout these providers convert the model to.
_CHANNELS_LAST_PROVIDERS = ("compile_freezing", "fast_optimized", "fast_optimized_cudagraphs",
                            "fast_optimized_compile")
ONNX_OPSET = 17
_TRAIN_PROVIDERS = ("eager", "compile", "fast", "hrnet_w32")


@dataclasses.dataclass
class ModelBenchConfig:
    device: str = "cpu"
    input_size: tuple[int, int] = (256, 192)
    batches: tuple[int, ...] = (1, 32, 64)
    dtypes: tuple[str, ...] = ("float32", "float16")
    providers: tuple[str, ...] = MODEL_PROVIDERS
    train: bool = True
    train_batch: int = 32
    min_run_time: float = 1.0
    warmup: int = 3
    max_warmup: int = 30
    model: str = "saffnet"
    num_joints: int = 17
    threads: int | None = None
    preset: str = "full"

    @classmethod
    def preset_config(cls, preset: str, device: str) -> "ModelBenchConfig":
        """``full`` (256×192, batch 1/32/64, training at 32), ``quick`` (128×96, batch 1 and
        8, training at 8) and ``tiny`` (64×64, batch 1 and 2: for the tests)."""
        cuda = torch.device(device).type == "cuda"
        dtypes = ("float32", "float16") if cuda else ("float32",)
        if preset == "full":
            return cls(device=device, dtypes=dtypes, preset=preset)
        if preset == "quick":
            return cls(device=device, input_size=(128, 96), batches=(1, 8), dtypes=dtypes,
                       train_batch=8, min_run_time=0.5, warmup=2, preset=preset)
        if preset == "tiny":
            return cls(device=device, input_size=(64, 64), batches=(1, 2), dtypes=dtypes,
                       train_batch=2, min_run_time=0.05, warmup=1, max_warmup=3,
                       preset=preset)
        raise ValueError(f"preset: expected full, quick or tiny, got {preset!r}")


def _build(name: str, backend: str | None, cfg: ModelBenchConfig) -> nn.Module:
    return build_model(name, backend=backend, input_size=tuple(cfg.input_size),
                              num_joints=cfg.num_joints)


def calibrate_batchnorm_(model: nn.Module, input_size: tuple[int, int], batch: int = 4,
                         seed: int = 0) -> nn.Module:
    """Set every BN's running statistics to those of one random batch (in place).

    Why: freshly built models use the paper's init (conv weights with std 0.001) and BN
    running statistics (0, 1), so in eval mode each conv shrinks activations ~1000×: within
    a few layers they are subnormal floats, which x86 CPUs process 10-100× slower, and the
    timings would measure that artefact instead of the model. A trained model's BN statistics
    match its activations; calibrating them on one batch restores activations of order 1.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: exactly this batch's statistics
    was_training = model.training
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *input_size, generator=gen).to(device)
    model.train()
    with torch.no_grad():
        model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return model


def _calibrated_weights(name: str, cfg: ModelBenchConfig) -> dict:
    """State dict of the reference ``name`` with calibrated BN (shared by all providers)."""
    model = _build(name, "reference", cfg)
    return calibrate_batchnorm_(model, tuple(cfg.input_size)).state_dict()


def _model_factory(provider: str, cfg: ModelBenchConfig, dev: torch.device,
                   dtype: torch.dtype, example: torch.Tensor, training: bool,
                   weights: dict, exports: dict | None = None):
    """(model, resolved backend) for one provider; raises ProviderUnavailable.

    ``weights`` maps a model name to its calibrated state dict: every provider of one model
    runs the same weights. ``exports`` (the runtimes' providers) holds ``"dir"``, a folder for
    the ONNX files, and each exported file by (model, input size): one export per run.
    """
    def build(name, backend):
        if name not in weights:
            weights[name] = _calibrated_weights(name, cfg)
        model = _build(name, backend, cfg)
        model.load_state_dict(weights[name])
        return model.to(dev, dtype)

    if provider == "hrnet_w32":
        return build("hrnet_w32", "reference"), "reference"
    if provider in ("eager", "compile"):
        model = build(cfg.model, "reference")
        if provider == "compile":
            raise_compile_limits()
            model = torch.compile(model)
        return model, "reference"
    if provider == "compile_freezing":
        if training:
            raise ProviderUnavailable(f"{provider}: inference only (freezing turns the weights "
                                      "into constants)")
        raise_compile_limits()
        # compile_frozen sets inductor's freezing around each call: torch.compile's
        # options={"freezing": True} compiled unfrozen graphs on torch 2.13 (see its module).
        return compile_frozen(build(cfg.model, "reference")), "reference"
    if provider in _RUNTIME_PROVIDERS:
        return _runtime_provider(provider, cfg, dev, dtype, training, build, exports), "onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # auto's fallback note: recorded below
        resolved = resolve_backend("auto", dev)
    model = build(cfg.model, "auto")
    if provider == "fast":
        return model, resolved
    if training:
        raise ProviderUnavailable(f"{provider}: inference only")
    if provider == "fast_optimized_cudagraphs" and dev.type != "cuda":
        raise ProviderUnavailable("CUDA graphs need a CUDA device")
    model.eval()
    model = optimize_for_inference(model, example_input=example,
                                   cuda_graph=provider == "fast_optimized_cudagraphs")
    if provider == "fast_optimized_compile":  # what optimize_for_inference(compile=True) does
        raise_compile_limits()
        model = torch.compile(model)
    return model, resolved


def _runtime_provider(provider, cfg, dev, dtype, training, build, exports):
    """ONNX Runtime or OpenVINO on the reference's ONNX export (made once per model and
    input size, from the same calibrated weights as every other provider)."""
    if training:
        raise ProviderUnavailable(f"{provider}: inference only")
    if dev.type != "cpu":
        raise ProviderUnavailable(f"{provider}: benchmarked on the CPU only")
    if dtype != torch.float32:
        raise ProviderUnavailable(f"{provider}: float32 only")
    try:
        require(provider)
        require("onnx", "needed to export the model to ONNX")
    except RuntimeUnavailable as exc:
        raise ProviderUnavailable(str(exc)) from None
    if exports is None or "dir" not in exports:
        raise ValueError("exports: the runtimes' providers need a folder for the ONNX file")
    key = (cfg.model, tuple(cfg.input_size))
    if key not in exports:
        model = build(cfg.model, "reference").to("cpu", torch.float32).eval()
        path = os.path.join(exports["dir"], f"{cfg.model}-{key[1][0]}x{key[1][1]}.onnx")
        exports[key] = export_onnx_file(model, cfg.input_size, path, opset=ONNX_OPSET)
    # The same intra-op thread count as torch (set by --threads before this runs).
    return load_runtime(provider, exports[key], input_size=cfg.input_size,
                        threads=torch.get_num_threads())


def _record(section, provider, backend, dtype_name, batch, cfg, timing=None, memory=None,
            status="ok", reason=None) -> dict:
    rec = {
        "section": section,
        "model": "hrnet_w32" if provider == "hrnet_w32" else cfg.model,
        "provider": provider,
        "backend": backend,
        "dtype": dtype_name,
        "batch": batch,
        "input_size": list(cfg.input_size),
        "status": status,
        "reason": reason,
        "median_s": None,
        "iqr_s": None,
        "samples": None,
        "images_per_s": None,
        "max_abs_diff_vs_eager": None,
    }
    if timing is not None:
        rec.update(timing)
        rec["images_per_s"] = batch / timing["median_s"]
    if memory is not None:
        rec["peak_bytes"] = memory.get("peak_bytes")
    return rec


def _measure(section, provider, precision, batch, cfg, dev, log, label, prepare) -> dict:
    """Time the callable that ``prepare(found)`` builds (it may set ``found["backend"]`` and
    ``found["max_abs_diff_vs_eager"]``) and return its record; a provider that cannot run is
    recorded as skipped, any other failure as an error. Compiled graphs are freed afterwards
    so the next provider starts clean."""
    found = {"backend": None, "max_abs_diff_vs_eager": None}
    try:
        call = prepare(found)
        timing = time_callable(call, dev, warmup=cfg.warmup, min_run_time=cfg.min_run_time,
                               max_warmup=cfg.max_warmup)
        memory = measure_peak_memory(call, dev)
    except ProviderUnavailable as exc:
        log(f"  skip {section} {label}: {exc}")
        return _record(section, provider, found["backend"], precision, batch, cfg,
                       status="skipped", reason=str(exc))
    except Exception as exc:
        log(f"  error {section} {label}: {error_text(exc)}")
        return _record(section, provider, found["backend"], precision, batch, cfg,
                       status="error", reason=error_text(exc))
    finally:
        if provider in _COMPILED_PROVIDERS:  # free the compiled graphs before the next one
            torch._dynamo.reset()
    log(f"  {section:9s} {provider:26s} {precision:8s} b{batch:<3d} "
        f"{timing['median_s'] * 1e3:10.2f} ms  {batch / timing['median_s']:9.1f} img/s")
    rec = _record(section, provider, found["backend"], precision, batch, cfg, timing, memory)
    rec["max_abs_diff_vs_eager"] = found["max_abs_diff_vs_eager"]
    return rec


def _parity_bound(dtype: torch.dtype, dev: torch.device) -> float:
    """Largest |provider - eager| accepted, as a fraction of eager's largest |output|.

    float32 on the CPU: summation order and BN folding differ between providers (~1e-5 of
    the peak seen); a wrong or missing operator is off by the order of the peak itself.
    float32 on CUDA: cuDNN runs convolutions in TF32 by default (~1e-3). Half precision:
    ~1e-2 from rounding each layer's output."""
    if dtype in (torch.float16, torch.bfloat16):
        return 5e-2
    return 1e-3 if dev.type == "cpu" else 1e-2


def _check_against_eager(output, expected: torch.Tensor, bound: float) -> float:
    """max |output - expected|; raises RuntimeError when above ``bound`` × peak or not
    finite, so the provider is recorded as an error instead of timed."""
    if isinstance(output, (list, tuple)):
        output = output[-1]
    if tuple(output.shape) != tuple(expected.shape):
        raise RuntimeError(f"output shape {tuple(output.shape)}, eager's "
                           f"{tuple(expected.shape)}")
    diff = float((output.float() - expected.float()).abs().max())
    peak = float(expected.float().abs().max())
    if not diff <= bound * max(peak, 1e-6):  # also catches NaN
        raise RuntimeError(f"output differs from eager's by {diff:.3g} (max |eager| "
                           f"{peak:.3g}, bound {bound:g} of it)")
    return diff


def _bench_inference(cfg, dev, dtype_name, batch, provider, log, weights,
                     exports: dict | None = None, expected: dict | None = None) -> dict:
    """``expected`` caches, per (dtype, batch), the input and eager's output on it, which
    every other provider of the model is checked against before it is timed."""
    dtype = parse_dtype(dtype_name)
    h, w = cfg.input_size
    expected = {} if expected is None else expected

    def reference():
        key = (dtype_name, batch)
        if key not in expected:
            gen = torch.Generator().manual_seed(batch)
            x = torch.randn(batch, 3, h, w, generator=gen).to(dev, dtype)
            eager, _ = _model_factory("eager", cfg, dev, dtype, x, training=False,
                                      weights=weights)
            with torch.inference_mode():
                expected[key] = (x, eager.eval()(x))
        return expected[key]

    def prepare(found):
        x, want = reference()
        if provider in _CHANNELS_LAST_PROVIDERS:
            # These providers switch the model to channels_last: feed it that way.
            x = x.contiguous(memory_format=torch.channels_last)
        model, found["backend"] = _model_factory(provider, cfg, dev, dtype, x,
                                                 training=False, weights=weights,
                                                 exports=exports)
        if isinstance(model, nn.Module):
            model.eval()

        def call():
            with torch.inference_mode():
                return model(x)

        # eager is the reference itself; hrnet_w32 is another network.
        if provider not in ("eager", "hrnet_w32"):
            # The first call also compiles (compiled providers) inside the same
            # inference_mode as the timed calls, so no second graph is made.
            found["max_abs_diff_vs_eager"] = _check_against_eager(
                call(), want, _parity_bound(dtype, dev))
        return call

    return _measure("inference", provider, dtype_name, batch, cfg, dev, log,
                    f"{provider} {dtype_name} b{batch}", prepare)


def _bench_training(cfg, dev, provider, log, weights) -> dict:
    """One optimiser step (Adam) on MSE to random heatmaps, mixed precision.

    CUDA: float16 autocast + GradScaler ("amp_float16"). CPU: float32 (bfloat16 autocast
    on CPU is optional in the spec and not timed here).
    """
    import torch.nn.functional as F

    batch = cfg.train_batch
    h, w = cfg.input_size
    cuda = dev.type == "cuda"
    precision = "amp_float16" if cuda else "float32"
    x = torch.randn(batch, 3, h, w, device=dev)

    def prepare(found):
        model, found["backend"] = _model_factory(provider, cfg, dev, torch.float32,
                                                 x, training=True, weights=weights)
        model.train()
        with torch.no_grad():
            target = torch.rand_like(model(x).float())
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cuda") if cuda else None

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=cuda):
                out = model(x)
            loss = F.mse_loss(out.float(), target)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            return loss
        return step

    return _measure("training", provider, precision, batch, cfg, dev, log, provider, prepare)


def _add_speedups(records: list[dict]) -> None:
    """speedup_vs_eager / speedup_vs_compile within each (section, dtype, batch) group."""
    groups: dict[tuple, dict[str, dict]] = {}
    for rec in records:
        groups.setdefault((rec["section"], rec["dtype"], rec["batch"]), {})[rec["provider"]] = rec
    for group in groups.values():
        for rec in group.values():
            for base, key in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
                ref = group.get(base)
                ok = rec["status"] == "ok" and ref is not None and ref["status"] == "ok"
                rec[key] = ref["median_s"] / rec["median_s"] if ok else None


def _runtime_versions() -> dict:
    """Installed ONNX Runtime / OpenVINO versions (None when absent), for the record."""
    versions = {}
    for name in _RUNTIME_PROVIDERS:
        try:
            versions[name] = getattr(require(name), "__version__", "unknown")
        except RuntimeUnavailable:
            versions[name] = None
    return versions


def run_model_bench(cfg: ModelBenchConfig, log: Callable[[str], None] | None = None,
                    on_partial: Callable[[dict], None] | None = None) -> dict:
    """Time every requested provider; return ``{"schema", "meta", "config", "results"}``.

    ``on_partial`` gets the result so far (``"partial": True``) after each measurement, so a
    caller can keep what finished when a time limit stops the run."""
    # cfg.threads sets process-wide torch state: give the caller back its own thread count.
    threads_before = torch.get_num_threads()
    try:
        return _run_model_bench(cfg, log, on_partial)
    finally:
        torch.set_num_threads(threads_before)


def _run_model_bench(cfg: ModelBenchConfig, log: Callable[[str], None] | None = None,
                     on_partial: Callable[[dict], None] | None = None) -> dict:
    log = log or (lambda line: None)
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' requested but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu or cuda, got {cfg.device!r}")
    unknown = [p for p in cfg.providers if p not in MODEL_PROVIDERS]
    if unknown:
        raise ValueError(f"providers: unknown {unknown}; expected some of {MODEL_PROVIDERS}")
    for name in cfg.dtypes:
        parse_dtype(name)
        if name == "float16" and dev.type != "cuda":
            raise ValueError("dtypes: float16 inference is benchmarked on CUDA only")
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise ValueError(f"threads: expected a positive int, got {cfg.threads}")
        torch.set_num_threads(cfg.threads)
    meta = machine_info(dev)
    log(f"saffnet bench on {meta['device_name']} (torch {meta['torch']}, "
        f"saffnet_fast {meta['saffnet_fast']}, backends {meta['available_backends']})")
    records = []
    weights: dict = {}
    config = dataclasses.asdict(cfg)

    def record(rec: dict) -> None:
        records.append(rec)
        if on_partial is not None:
            rows = [dict(r) for r in records]
            _add_speedups(rows)
            on_partial({"schema": RESULT_SCHEMA, "kind": "model", "partial": True,
                        "meta": meta, "config": config, "results": rows})

    torch.manual_seed(0)
    exports: dict = {}
    expected: dict = {}
    if any(p in _RUNTIME_PROVIDERS for p in cfg.providers):
        meta["runtimes"] = _runtime_versions()
    # The fast modules warn (once per process) when a block falls back to the reference
    # path; keep those lines in the record: they say what "fast" actually ran.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        with tempfile.TemporaryDirectory(prefix="saffnet-bench-onnx-") as folder:
            exports["dir"] = folder
            for dtype_name in cfg.dtypes:
                for batch in cfg.batches:
                    for provider in cfg.providers:
                        record(_bench_inference(cfg, dev, dtype_name, batch, provider,
                                                log, weights, exports, expected))
                    expected.pop((dtype_name, batch), None)  # free this batch's outputs
        if cfg.train:
            for provider in cfg.providers:
                if provider in _TRAIN_PROVIDERS:
                    record(_bench_training(cfg, dev, provider, log, weights))
    # With machine_info's load_average_1m at the start: what else ran during the timings.
    meta["load_average_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    notes = []
    for w in caught:
        text = str(w.message).splitlines()[0][:400]
        if issubclass(w.category, RuntimeWarning) and text not in notes:
            notes.append(text)
    meta["fallback_warnings"] = notes
    for text in notes:
        log(f"  note: {text}")
    _add_speedups(records)
    return {"schema": RESULT_SCHEMA, "kind": "model", "meta": meta, "config": config,
            "results": records}

"""``saffnet bench``: the JSON record's shape on a tiny configuration (never its speed)."""
from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stdout

import pytest
import torch

from saffnet_fast.cli.main import main

pytest.importorskip("saffnet_fast.models", reason="saffnet bench times models.build_model")

EXPECTED_META = {"device", "device_name", "cpu_model", "cpu_cores", "torch", "saffnet_fast",
                 "date", "git_commit", "available_backends"}
EXPECTED_RECORD = {"section", "model", "provider", "backend", "dtype", "batch", "input_size",
                   "status", "reason", "median_s", "images_per_s", "speedup_vs_eager",
                   "speedup_vs_compile", "max_abs_diff_vs_eager"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run (64×64, batch 1 and 2, training at 2) shared by the assertions."""
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    buffer = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with redirect_stdout(buffer):
            # One thread: on a shared 2-core machine OpenMP barriers stall many-small-op
            # models badly; the test checks the record, not the speed.
            code = main(["bench", "--tiny", "--device", "cpu", "--json", "--threads", "1",
                         "--providers", "eager,fast,fast_optimized_cudagraphs",
                         "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return code, buffer.getvalue(), out


def test_bench_json_has_expected_keys_and_positive_throughputs(tiny_run):
    code, stdout, out = tiny_run
    assert code == 0, stdout
    result = json.loads(stdout)  # stdout is the JSON alone (progress went to stderr)
    assert result["schema"] == "saffnet_fast.bench/1"
    assert EXPECTED_META <= set(result["meta"]), set(result["meta"])
    assert result["meta"]["device"] == "cpu"
    assert result["config"]["input_size"] == [64, 64]
    assert result["meta"]["torch_threads"] == 1

    records = result["results"]
    for rec in records:
        assert EXPECTED_RECORD <= set(rec), set(rec)
    ok = [r for r in records if r["status"] == "ok"]
    inference = {(r["provider"], r["batch"]) for r in ok if r["section"] == "inference"}
    assert inference == {("eager", 1), ("eager", 2), ("fast", 1), ("fast", 2)}
    assert {r["provider"] for r in ok if r["section"] == "training"} == {"eager", "fast"}
    for rec in ok:
        assert rec["median_s"] > 0 and rec["images_per_s"] > 0
        assert rec["images_per_s"] == pytest.approx(rec["batch"] / rec["median_s"])
        if rec["provider"] == "eager":
            assert rec["speedup_vs_eager"] == pytest.approx(1.0)
        assert rec["speedup_vs_compile"] is None  # compile was not requested
        if rec["section"] == "inference" and rec["provider"] == "fast":
            assert 0.0 <= rec["max_abs_diff_vs_eager"] < 1e-3  # checked before timing

    # CUDA graphs cannot run on the CPU: recorded as skipped with the reason, not dropped.
    skipped = [r for r in records if r["provider"] == "fast_optimized_cudagraphs"]
    assert skipped and all(r["status"] == "skipped" and "CUDA" in r["reason"]
                           for r in skipped)

    assert json.loads(out.read_text()) == result


@pytest.mark.parametrize("argv, needle", [
    (["--input", "65x48"], "--input"),
    (["--providers", "eager,warp_drive"], "--providers"),
    (["--batch", "0"], "--batch"),
    (["--dtypes", "float16", "--device", "cpu"], "--dtypes"),
])
def test_bench_rejects_bad_arguments(argv, needle, capsys):
    assert main(["bench", "--tiny", "--no-save", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_op_workload_runs_reference_forward_and_counts_minimum_bytes():
    from saffnet_fast import bench

    case = bench.OpCase("scaff", 32, 8, 6, "test")
    work = bench.make_op_workload(case, "reference", "forward", 2, "float32", "cpu")
    y = work.step()
    assert y.shape == (2, 32, 8, 6) and bool(torch.isfinite(y).all())
    activation = 2 * 32 * 8 * 6 * 4
    params = sum(p.numel() * 4 for p in bench.make_reference_op("scaff", 32).parameters())
    assert work.min_bytes == 2 * activation + params
    assert work.info["shape"] == [2, 32, 8, 6] and work.info["dtype"] == "float32"


def test_op_workload_backward_gives_input_and_parameter_gradients():
    from saffnet_fast import bench

    case = bench.OpCase("sawf", 32, 4, 4, "test")
    work = bench.make_op_workload(case, "reference", "backward", 2, "float32", "cpu")
    grads = work.step()
    n_params = sum(1 for _ in bench.make_reference_op("sawf", 32).parameters())
    assert len(grads) == 1 + n_params
    assert grads[0].shape == (2, 32, 4, 4)
    again = work.step()  # the retained graph can be replayed: nothing accumulates
    assert torch.equal(grads[0], again[0])


@pytest.mark.parametrize("kwargs, needle", [
    (dict(mode="sideways"), "mode"),
    (dict(mode="backward", batch=1), "batch"),
    (dict(dtype="float8"), "dtype"),
])
def test_op_workload_rejects_bad_arguments(kwargs, needle):
    from saffnet_fast import bench

    args = dict(case=bench.OP_CASES[1], provider="reference", mode="forward", batch=1,
                dtype="float32", device="cpu")
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        bench.make_op_workload(**args)


def test_unavailable_provider_is_reported_with_a_reason():
    from saffnet_fast import bench

    with pytest.raises(bench.ProviderUnavailable, match="triton"):
        bench.make_op_workload(bench.OP_CASES[1], "triton", "forward", 1, "float32", "cpu")


def test_partial_results_are_saved_after_each_measurement(tmp_path, monkeypatch, capsys):
    """With --out, every finished measurement is on disk at once (a run cut off by a time
    limit keeps it), and the final file is the complete result, no longer marked partial."""
    from saffnet_fast import bench

    saved = []
    save = bench.save_result

    def recording_save(result, path):
        saved.append(json.loads(json.dumps(result)))
        return save(result, path)

    monkeypatch.setattr(bench, "save_result", recording_save)
    out = tmp_path / "result.json"
    code = main(["bench", "--tiny", "--device", "cpu", "--threads", "1", "--providers",
                 "eager,fast", "--no-train", "--out", str(out)])
    assert code == 0, capsys.readouterr()
    partial = [s for s in saved if s.get("partial")]
    assert [len(s["results"]) for s in partial] == list(range(1, len(partial) + 1))
    assert len(partial) == 4  # 2 providers × batch 1 and 2
    final = json.loads(out.read_text())
    assert "partial" not in final and final["results"] == saved[-1]["results"]
    assert not list(tmp_path.glob("*.tmp"))


def test_fast_optimized_compile_provider_wraps_the_optimized_model():
    """fast_optimized_compile = optimize_for_inference, then torch.compile (built here, not
    run: compiling takes tens of seconds on a small CPU)."""
    from saffnet_fast import bench
    from saffnet_fast.bench.models import _model_factory

    cfg = bench.ModelBenchConfig.preset_config("tiny", "cpu")
    example = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    model, backend = _model_factory("fast_optimized_compile", cfg, torch.device("cpu"),
                                    torch.float32, example, training=False, weights={})
    assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    inner = model._orig_mod
    assert not inner.training and not any(p.requires_grad for p in inner.parameters())
    assert backend in ("native", "reference")
    with pytest.raises(bench.ProviderUnavailable, match="inference only"):
        _model_factory("fast_optimized_compile", cfg, torch.device("cpu"), torch.float32,
                       example, training=True, weights={})


def _bench_json(argv, capsys) -> dict:
    threads = torch.get_num_threads()
    try:
        code = main(["bench", "--tiny", "--device", "cpu", "--threads", "1", "--no-train",
                     "--batch", "1", "--no-save", "--json", *argv])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code in (0, 1), out
    return json.loads(out)


def test_runtime_and_freezing_providers_are_accepted():
    import argparse

    from saffnet_fast.cli import bench as bench_cli

    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    cfg = bench_cli._config(parser.parse_args(
        ["--tiny", "--device", "cpu", "--providers", "eager, onnxruntime,openvino,"
         "compile_freezing"]))
    assert cfg.providers == ("eager", "onnxruntime", "openvino", "compile_freezing")
    assert cfg.preset == "tiny-custom"


@pytest.mark.parametrize("package, extra", [("onnxruntime", "export"),
                                            ("openvino", "openvino")])
def test_missing_runtime_is_skipped_with_the_pip_command(package, extra, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, package, None)  # import now raises ImportError
    result = _bench_json(["--providers", f"eager,{package}"], capsys)
    (rec,) = [r for r in result["results"] if r["provider"] == package]
    assert rec["status"] == "skipped"
    assert f'pip install "saffnet_fast[{extra}]"' in rec["reason"]
    assert result["meta"]["runtimes"][package] is None


def test_a_provider_whose_output_differs_from_eager_is_an_error_not_a_time(monkeypatch,
                                                                          capsys):
    from saffnet_fast.bench import models

    factory = models._model_factory

    def off_by_one(provider, *args, **kwargs):
        model, backend = factory(provider, *args, **kwargs)
        if provider != "fast":
            return model, backend
        model.eval()  # the bench calls eval() on modules only
        return (lambda x: model(x) + 1.0), backend

    monkeypatch.setattr(models, "_model_factory", off_by_one)
    result = _bench_json(["--providers", "eager,fast"], capsys)
    (rec,) = [r for r in result["results"] if r["provider"] == "fast"]
    assert rec["status"] == "error" and rec["median_s"] is None
    assert "differs from eager's" in rec["reason"]


@pytest.mark.slow
def test_runtime_providers_run_one_export_checked_against_eager(monkeypatch, capsys):
    pytest.importorskip("onnx", reason='onnx not installed: pip install "saffnet_fast[export]"')
    pytest.importorskip("onnxruntime",
                        reason='onnxruntime not installed: pip install "saffnet_fast[export]"')
    pytest.importorskip("openvino",
                        reason='openvino not installed: pip install "saffnet_fast[openvino]"')
    from saffnet_fast.bench import models

    exported = []
    export = models.export_onnx_file

    def counting_export(model, input_size, path, opset=17):
        exported.append((tuple(input_size), opset))
        return export(model, input_size, path, opset)

    monkeypatch.setattr(models, "export_onnx_file", counting_export)
    result = _bench_json(["--providers", "onnxruntime,openvino", "--batch", "1,2"], capsys)
    assert exported == [((64, 64), 17)]  # one file for both runtimes and both batches
    records = result["results"]
    assert [(r["provider"], r["batch"], r["status"]) for r in records] == [
        ("onnxruntime", 1, "ok"), ("openvino", 1, "ok"),
        ("onnxruntime", 2, "ok"), ("openvino", 2, "ok")]
    for rec in records:
        assert 0.0 <= rec["max_abs_diff_vs_eager"] < 1e-4 and rec["backend"] == "onnx"
    assert result["meta"]["runtimes"]["openvino"] and result["meta"]["runtimes"]["onnxruntime"]


def test_compile_freezing_provider_compiles_the_channels_last_reference():
    """compile_freezing = compile_frozen of the reference: eval, channels_last, under
    torch.compile with inductor's freezing (built, not run: compiling takes minutes on a
    small CPU; tests/test_inductor_freezing.py runs compile_frozen)."""
    from saffnet_fast import bench
    from saffnet_fast.bench.models import _model_factory
    from saffnet_fast.fast.inductor import FrozenCompiled

    cfg = bench.ModelBenchConfig.preset_config("tiny", "cpu")
    example = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    model, backend = _model_factory("compile_freezing", cfg, torch.device("cpu"),
                                    torch.float32, example, training=False, weights={})
    assert isinstance(model, FrozenCompiled)
    assert hasattr(model._compiled, "_torchdynamo_orig_callable")  # under torch.compile
    assert backend == "reference" and not model.model.training
    assert model._patches["freezing"] is True and "joint_custom_pre_pass" in model._patches
    assert model._patches["cpp_wrapper"] is True
    conv = next(m for m in model.model.modules() if isinstance(m, torch.nn.Conv2d)
                and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(bench.ProviderUnavailable, match="inference only"):
        _model_factory("compile_freezing", cfg, torch.device("cpu"), torch.float32, example,
                       training=True, weights={})

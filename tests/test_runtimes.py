"""The runtimes a model is served with: every factory model's ONNX export runs in ONNX Runtime
and OpenVINO with PyTorch's outputs, and ``saffnet predict --runtime`` gives the torch
predictor's keypoints on a real COCO image.

Each runtime's tests skip, saying which package to install, when it is absent.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from saffnet_fast.bench import calibrate_batchnorm_
from saffnet_fast.cli.main import main
from saffnet_fast.data.sample_data import sample_dir
from saffnet_fast.engine.runtime import RuntimeUnavailable, export_onnx_file, load_runtime
from saffnet_fast.models import MODEL_NAMES, build_model

COCO = sample_dir("coco-sample")
needs_coco = pytest.mark.skipif(COCO is None, reason="COCO sample data not found "
                                "(set SAFFNET_SHARED_DATA or place it at ../shared/data)")

# Small and not square (a transposed H/W shows), a multiple of 32 for every model.
SIZE = (96, 64)
# Bound on max |runtime - eager| as a fraction of eager's largest |output|: float32 summation
# order and BN folding differ between the runtimes (4.1e-5 of the peak seen, hrnet_w32 in
# OpenVINO); a wrong or missing operator is off by the order of the peak itself.
BOUND = 2e-4


def _needs(package: str, extra: str):
    return pytest.importorskip(package, reason=f"{package} not installed: "
                               f'pip install "saffnet_fast[{extra}]"')


def _calibrated(name: str, size=SIZE) -> torch.nn.Module:
    """Random weights, BN affine parameters drawn away from (1, 0) and running statistics
    of one random batch (eval-mode activations of order 1, not subnormal), then eval."""
    torch.manual_seed(0)
    model = build_model(name, input_size=size)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return calibrate_batchnorm_(model, size).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (ONNX path, input batch of 2, eager output): each model exported once and
    shared by the runtimes' tests."""
    folder = tmp_path_factory.mktemp("onnx")
    cache = {}

    def get(name):
        if name not in cache:
            _needs("onnx", "export")
            model = _calibrated(name)
            path = export_onnx_file(model, SIZE, str(folder / f"{name}.onnx"))
            x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                cache[name] = (path, x.numpy(), model(x).numpy())
        return cache[name]
    return get


def _assert_matches(got, want):
    peak = float(np.abs(want).max())
    assert got.shape == want.shape == (2, 17, SIZE[0] // 4, SIZE[1] // 4)
    assert peak > 1e-2  # calibrated BN: outputs of order 0.1, not vanishing
    diff = float(np.abs(got - want).max())
    assert diff <= BOUND * peak, f"max |diff| {diff:.3g} > {BOUND:g} x peak {peak:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_onnx_export_runs_in_onnxruntime(name, exported):
    _needs("onnxruntime", "export")
    path, x, want = exported(name)
    run = load_runtime("onnxruntime", path, input_size=SIZE)
    _assert_matches(run(x), want)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_onnx_export_runs_in_openvino(name, exported):
    _needs("openvino", "openvino")
    path, x, want = exported(name)
    run = load_runtime("openvino", path, input_size=SIZE)
    _assert_matches(run(x), want)
    # A tensor in gives a tensor out, as the predictor and the bench call it.
    out = run(torch.from_numpy(x))
    assert isinstance(out, torch.Tensor) and torch.equal(out, torch.from_numpy(run(x)))


def test_onnx_file_for_another_input_size_is_refused(exported):
    _needs("onnxruntime", "export")
    path, _, _ = exported("hrnet_df")
    with pytest.raises(ValueError, match=r"takes 3x96x64 images, expected 3x128x96"):
        load_runtime("onnxruntime", path, input_size=(128, 96))


@pytest.mark.parametrize("package, extra", [("onnxruntime", "export"),
                                            ("openvino", "openvino")])
def test_missing_runtime_names_the_pip_command(package, extra, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, package, None)  # import now raises ImportError
    with pytest.raises(RuntimeUnavailable) as info:
        load_runtime(package, str(tmp_path / "absent.onnx"))
    message = str(info.value)
    assert "\n" not in message and f'pip install "saffnet_fast[{extra}]"' in message


def test_load_runtime_rejects_bad_arguments(tmp_path):
    model = torch.nn.Conv2d(3, 17, 1)
    with pytest.raises(ValueError, match="runtime: expected one of torch, onnxruntime, "
                                         "openvino, got 'tensorrt'"):
        load_runtime("tensorrt", model)
    with pytest.raises(ValueError, match="runtime torch: expected a model"):
        load_runtime("torch", str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match="threads"):
        load_runtime("torch", model, threads=0)
    with pytest.raises(TypeError, match="source"):
        load_runtime("torch", 3)


def test_torch_runtime_gives_back_what_it_was_given():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 17, 1)
    run = load_runtime("torch", model)
    x = torch.randn(2, 3, 8, 6)
    with torch.no_grad():
        want = model(x)
    assert torch.equal(run(x), want)
    out = run(x.numpy())
    assert isinstance(out, np.ndarray) and np.array_equal(out, want.numpy())


# ---- saffnet predict --runtime on a real COCO image ----------------------------------------

@pytest.fixture(scope="module")
def coco_checkpoint(tmp_path_factory):
    """SAFFNet at 128×96 with calibrated random weights, its final layer's bias raised so
    that every joint's heatmap peak is positive (the decoder zeroes keypoints whose peak is
    not: they would agree between runtimes trivially), saved as a training checkpoint with
    its config."""
    from saffnet_fast.engine.config import load_config

    config = load_config("coco_256x192", ["model.input_size=[128,96]",
                                          "model.backend=reference"])
    model = _calibrated("saffnet", (128, 96))
    with torch.no_grad():
        model.final_layer.bias += 1.0
    path = tmp_path_factory.mktemp("coco-ckpt") / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "config": config}, path)
    return path


def _predict(checkpoint, out, *extra):
    image = COCO / "images" / "000000000785.jpg"
    # COCO detection results keyed by image_id (785: the file's digits); 2 boxes score ≥ 0.3.
    argv = ["predict", str(image), "--checkpoint", str(checkpoint), "--boxes",
            str(COCO / "person_detection_results_sample.json"), "--decode", "dark",
            "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "000000000785.keypoints.json").read_text())["people"]


def _assert_same_people(got, want):
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):
        assert a["box"] == b["box"] and a["valid"] and b["valid"]
        ka, kb = np.asarray(a["keypoints"]), np.asarray(b["keypoints"])
        assert (kb[:, 2] > 0).all()  # every joint decoded, none zeroed
        # The JSON rounds x, y to 0.01 px and scores to 1e-4: a rounding step apart at most.
        # The heatmaps differ by ~1e-6, far below their smallest top-two gap here (9e-4),
        # so argmax, DARK and the inverse affine see the same peaks.
        np.testing.assert_allclose(ka[:, :2], kb[:, :2], atol=0.011, rtol=0)
        np.testing.assert_allclose(ka[:, 2], kb[:, 2], atol=1.1e-4, rtol=0)
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


@pytest.fixture(scope="module")
def torch_people(coco_checkpoint, tmp_path_factory):
    return _predict(coco_checkpoint, tmp_path_factory.mktemp("torch"))


@needs_coco
@pytest.mark.slow
def test_predict_with_onnxruntime_matches_torch(coco_checkpoint, torch_people, tmp_path):
    _needs("onnx", "export")
    _needs("onnxruntime", "export")
    # The checkpoint's model exported to a temporary ONNX file.
    people = _predict(coco_checkpoint, tmp_path, "--runtime", "onnxruntime")
    _assert_same_people(people, torch_people)


@needs_coco
@pytest.mark.slow
def test_predict_with_openvino_on_an_exported_file_matches_torch(coco_checkpoint,
                                                                  torch_people, tmp_path):
    _needs("onnx", "export")
    _needs("openvino", "openvino")
    onnx = tmp_path / "saffnet.onnx"
    assert main(["export", "--checkpoint", str(coco_checkpoint), "--onnx", str(onnx),
                 "--no-check"]) == 0
    people = _predict(coco_checkpoint, tmp_path / "out", "--runtime", "openvino",
                      "--onnx", str(onnx))
    _assert_same_people(people, torch_people)


@needs_coco
def test_predict_runtime_arguments_are_checked(coco_checkpoint, tmp_path, capsys,
                                               monkeypatch):
    image = str(COCO / "images" / "000000000785.jpg")
    base = ["predict", image, "--checkpoint", str(coco_checkpoint), "--whole-image",
            "--out", str(tmp_path / "out")]
    assert main([*base, "--onnx", str(coco_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--onnx: only used with --runtime" in err
    monkeypatch.setitem(sys.modules, "openvino", None)  # find_spec now says: not installed
    assert main([*base, "--runtime", "openvino"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "saffnet_fast[openvino]"' in err
    assert not (tmp_path / "out").exists()

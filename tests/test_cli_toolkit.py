"""The toolkit's subcommands end to end on a tiny synthetic run."""
import json
import os

import pytest

from saffnet_fast.cli.main import main
from saffnet_fast.data.synthetic import split_paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    out = root / "run"
    overrides = [
        "data.type=synthetic", f"data.cache_dir={root / 'cache'}",
        "data.synthetic={num_train: 6, num_val: 2, image_height: 96, image_width: 96}",
        "model.name=tiny", "model.input_size=[32,24]", "train.epochs=1", "train.batch_size=4",
        "data.num_workers=0", "train.progress=false", f"output_dir={out}",
        "train.tensorboard=false"]
    assert main(["train", "synthetic_quick", *overrides]) == 0
    return root, out, overrides


def test_train_writes_checkpoint_weights_and_logs(trained):
    _root, out, _ = trained
    for name in ("checkpoint.pth", "model.safetensors", "train_log.csv", "config.yaml",
                 "keypoint_results.json"):
        assert (out / name).is_file(), name


def test_test_command_reports_coco_stats(trained, capsys):
    _root, out, overrides = trained
    assert main(["test", "synthetic_quick", *overrides, "--checkpoint",
                 str(out / "checkpoint.pth"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["metric"] == "AP" and 0.0 <= metrics["AP"] <= 1.0
    assert set(metrics["stats"]) >= {"AP", "AP .5", "AR"}
    assert (out / "keypoint_results.json").is_file()


def test_predict_writes_json_and_overlay(trained, tmp_path, capsys):
    root, out, _ = trained
    (dataset_dir,) = [p for p in (root / "cache").iterdir() if p.name.startswith("synthetic-")]
    _ann, image_dir = split_paths(str(dataset_dir), "val")
    image = os.path.join(image_dir, sorted(os.listdir(image_dir))[0])
    assert main(["predict", image, "--checkpoint", str(out / "checkpoint.pth"),
                 "--whole-image", "--out", str(tmp_path / "p1")]) == 0
    stem = os.path.splitext(os.path.basename(image))[0]
    result = json.load(open(tmp_path / "p1" / f"{stem}.keypoints.json"))
    assert len(result["people"]) == 1 and len(result["people"][0]["keypoints"]) == 17
    assert result["valid"] and result["people"][0]["valid"]
    assert (tmp_path / "p1" / f"{stem}.overlay.png").is_file()
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({os.path.basename(image): [[5, 5, 40, 80, 0.9], [50, 5, 40, 80]]}))
    assert main(["predict", image, "--checkpoint", str(out / "checkpoint.pth"),
                 "--boxes", str(boxes), "--out", str(tmp_path / "p2")]) == 0
    assert len(json.load(open(tmp_path / "p2" / f"{stem}.keypoints.json"))["people"]) == 2
    capsys.readouterr()
    boxes.write_text(json.dumps({"other.jpg": [[5, 5, 40, 80]]}))
    assert main(["predict", image, "--checkpoint", str(out / "checkpoint.pth"),
                 "--boxes", str(boxes), "--out", str(tmp_path / "p3")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"saffnet predict: --boxes {boxes}: no boxes for image "
                          f"{os.path.basename(image)!r}")
    assert not (tmp_path / "p3").exists()


def test_export_onnx_and_safetensors(trained, tmp_path, capsys):
    _root, out, _ = trained
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    # Both outputs go to folders that do not exist yet.
    onnx, weights = tmp_path / "onnx" / "m.onnx", tmp_path / "weights" / "m.safetensors"
    assert main(["export", "--checkpoint", str(out / "checkpoint.pth"), "--onnx", str(onnx),
                 "--safetensors", str(weights)]) == 0
    text = capsys.readouterr().out
    assert onnx.is_file() and weights.is_file()
    assert "max |diff|" in text  # export refuses to run without onnxruntime unless --no-check
    from safetensors.torch import load_file

    assert any(k.endswith("head.weight") for k in load_file(str(weights)))


def test_demo_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAFFNET_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--smoke", "--out", str(tmp_path / "demo"), "--json"]) == 0
    text = capsys.readouterr().out
    summary = json.loads(text[text.index("{"):])
    assert 0.0 <= summary["ap_after"] <= 1.0 and summary["steps"] == 1
    for key in ("checkpoint", "weights", "results", "prediction_json", "prediction_overlay"):
        assert os.path.isfile(summary[key]), key

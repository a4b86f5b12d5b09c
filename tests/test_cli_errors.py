"""The CLI's user errors (one line, exit code 2, --debug for the traceback), predict's outputs
(never over an input or each other), its COCO detection boxes, non-finite models and export's
missing packages."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from saffnet_fast.cli.main import main
from saffnet_fast.data.sample_data import sample_dir
from saffnet_fast.engine.config import load_config
from saffnet_fast.engine.modeling import build_model_from_config

COCO = sample_dir("coco-sample")
needs_coco = pytest.mark.skipif(COCO is None, reason="COCO sample data not found "
                                "(set SAFFNET_SHARED_DATA or place it at ../shared/data)")


def strict_json(text):
    """json.loads that refuses NaN and Infinity (not JSON, though Python writes them)."""
    def refuse(constant):
        raise AssertionError(f"invalid JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Overrides of a tiny synthetic run, its checkpoint, a NaN-weight one, and a val image."""
    root = tmp_path_factory.mktemp("errors")
    overrides = [
        f"data.cache_dir={root / 'cache'}", "model.name=tiny", "model.input_size=[32,24]",
        "data.synthetic={num_train: 1, num_val: 2, image_height: 64, image_width: 64}",
        "test.flip_test=false", f"output_dir={root / 'out'}"]
    config = load_config("synthetic_quick", overrides)
    torch.manual_seed(0)
    model = build_model_from_config(config)
    checkpoint = root / "tiny.pth"
    torch.save({"model": model.state_dict(), "config": config}, checkpoint)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    nan_checkpoint = root / "nan.pth"
    torch.save({"model": model.state_dict(), "config": config}, nan_checkpoint)
    from saffnet_fast.data import build_dataset

    image = build_dataset(config, "val").records[0].image_path
    return {"root": root, "overrides": overrides, "checkpoint": str(checkpoint),
            "nan_checkpoint": str(nan_checkpoint), "image": image}


def _one_line_error(capsys, command):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert err.startswith(f"saffnet {command}: "), err
    return err


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.mark.parametrize("argv, needle", [
    pytest.param(["predict", "{image}", "--checkpoint", "{checkpoint}", "--whole-image",
                  "--out", "{tmp}/p", "--device", "cuda"], "argument --device", marks=no_cuda),
    pytest.param(["test", "synthetic_quick", "--checkpoint", "{checkpoint}", "--device",
                  "cuda:0"], "argument --device", marks=no_cuda),
    (["predict", "{tmp}/missing.jpg", "--checkpoint", "{checkpoint}", "--whole-image",
      "--out", "{tmp}/p"], "missing.jpg"),
    (["predict", "{image}", "--checkpoint", "{checkpoint}", "--whole-image", "--out", "{tmp}/p",
      "--box-score-threshold", "1.5"], "--box-score-threshold: expected a number in [0, 1], "
                                       "got '1.5'"),
    (["predict", "{image}", "--checkpoint", "{tmp}/none.pth", "--whole-image", "--out",
      "{tmp}/p"], "argument --checkpoint: expected an existing file"),
    (["eval-keypoints", "--gt", "{tmp}/gt.json", "--results", "{tmp}/res.json"], "--gt"),
    (["eval-keypoints", "--gt", "{checkpoint}", "--results", "{checkpoint}", "--sigmas", "0.1",
      "-0.2"], "argument --sigmas: expected a positive number, got '-0.2'"),
    (["export", "--checkpoint", "{checkpoint}"], "expected --onnx"),
    (["export", "--checkpoint", "{checkpoint}", "--onnx", "{tmp}/m.onnx", "--opset", "0"],
     "argument --opset: expected a positive integer, got '0'"),
    (["complexity", "--input", "65x48"], "argument --input"),
    (["predict", "{image}", "--checkpoint", "{checkpoint}", "--whole-image"],
     "the following arguments are required: --out"),
])
def test_user_errors_are_one_line_with_exit_code_2(run, tmp_path, capsys, argv, needle):
    argv = [a.format(tmp=tmp_path, **run) for a in argv]
    assert main(argv) == 2
    assert needle in _one_line_error(capsys, argv[0])


def test_test_refuses_a_checkpoint_of_another_model(run, capsys):
    overrides = [o for o in run["overrides"] if not o.startswith("model.")]  # saffnet 64x48
    assert main(["test", "synthetic_quick", *overrides, "--checkpoint", run["checkpoint"]]) == 2
    err = _one_line_error(capsys, "test")
    assert "--checkpoint" in err and "expected weights of the config's model 'saffnet'" in err


def test_unknown_command_is_one_line(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saffnet: unknown command 'trian'; expected one of") and \
        err.count("\n") == 1


def test_debug_flag_or_env_shows_the_traceback_and_bugs_keep_theirs(run, tmp_path,
                                                                     monkeypatch, capsys):
    from saffnet_fast.cli.checks import UsageError

    argv = ["predict", str(tmp_path / "missing.jpg"), "--checkpoint", run["checkpoint"],
            "--whole-image", "--out", str(tmp_path / "p")]
    with pytest.raises(UsageError, match="missing.jpg"):
        main(["--debug", *argv])
    with pytest.raises(UsageError, match="missing.jpg"):
        main([*argv, "--debug"])
    monkeypatch.setenv("SAFFNET_DEBUG", "1")
    with pytest.raises(UsageError, match="missing.jpg"):
        main(argv)
    monkeypatch.delenv("SAFFNET_DEBUG")
    # A programming error is not a user error: it keeps its traceback without --debug.
    from saffnet_fast.engine import predictor

    def broken(*args, **kwargs):
        raise KeyError("people")

    monkeypatch.setattr(predictor.Predictor, "predict_files", broken)
    with pytest.raises(KeyError):
        main(["predict", run["image"], "--checkpoint", run["checkpoint"], "--whole-image",
              "--out", str(tmp_path / "p"), "--debug"])
    with pytest.raises(KeyError):
        main(["predict", run["image"], "--checkpoint", run["checkpoint"], "--whole-image",
              "--out", str(tmp_path / "p")])


def test_ctrl_c_is_one_line_with_exit_code_130(monkeypatch, capsys):
    # The trainer saves its checkpoint on SIGINT and raises KeyboardInterrupt; the command
    # then ends in one line, not a traceback (--debug still shows it).
    from saffnet_fast.cli import info

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err == "saffnet info: interrupted\n"
    with pytest.raises(KeyboardInterrupt):
        main(["info", "--debug"])


def test_test_takes_options_after_positional_overrides(run, capsys):
    first, *rest = run["overrides"]
    assert main(["test", "synthetic_quick", first, "--checkpoint", run["checkpoint"], *rest,
                 "--json"]) == 0
    metrics = strict_json(capsys.readouterr().out)
    assert metrics["valid"] is True and 0.0 <= metrics["AP"] <= 1.0


def test_predict_never_overwrites_an_input(run, tmp_path, capsys):
    folder = tmp_path / "ow"
    folder.mkdir()
    photo = folder / "photo.png"
    shutil.copy(run["image"], photo)
    before = photo.read_bytes()
    assert main(["predict", str(photo), "--checkpoint", run["checkpoint"], "--whole-image",
                 "--out", str(folder)]) == 0
    assert photo.read_bytes() == before
    assert sorted(os.listdir(folder)) == ["photo.keypoints.json", "photo.overlay.png",
                                          "photo.png"]
    assert f"-> {folder / 'photo.keypoints.json'}, {folder / 'photo.overlay.png'}" in \
        capsys.readouterr().out
    # An input named like another input's output is refused before anything is written.
    (folder / "photo.keypoints.json").unlink()
    (folder / "photo.overlay.png").rename(folder / "photo.overlay.png.tmp")
    shutil.copy(run["image"], folder / "photo.overlay.png")
    clash = (folder / "photo.overlay.png").read_bytes()
    assert main(["predict", str(photo), str(folder / "photo.overlay.png"), "--checkpoint",
                 run["checkpoint"], "--whole-image", "--out", str(folder)]) == 2
    err = _one_line_error(capsys, "predict")
    assert "would overwrite the input image" in err and "photo.overlay.png" in err
    assert (folder / "photo.overlay.png").read_bytes() == clash
    assert not (folder / "photo.keypoints.json").exists()


def test_predict_keeps_the_inputs_folders_so_outputs_never_collide(run, tmp_path, capsys):
    for sub in ("a", "b"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        shutil.copy(run["image"], tmp_path / "in" / sub / "x.jpg")
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "in" / "a" / "x.jpg"),
                 str(tmp_path / "in" / "b" / "x.jpg"), "--checkpoint", run["checkpoint"],
                 "--whole-image", "--out", str(out)]) == 0
    for sub in ("a", "b"):
        result = strict_json((out / sub / "x.keypoints.json").read_text())
        assert result["image"] == str(tmp_path / "in" / sub / "x.jpg")
        assert (out / sub / "x.overlay.png").is_file()
    # Same folder and stem, different extensions: refused, naming both inputs.
    shutil.copy(run["image"], tmp_path / "in" / "a" / "x.png")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "in" / "a" / "x.jpg"),
                 str(tmp_path / "in" / "a" / "x.png"), "--checkpoint", run["checkpoint"],
                 "--whole-image", "--out", str(tmp_path / "out2")]) == 2
    err = _one_line_error(capsys, "predict")
    assert "x.jpg and" in err and "x.png would both write" in err


def _detections():
    return json.loads((COCO / "person_detection_results_sample.json").read_text())


@needs_coco
def test_predict_takes_coco_detection_results_with_a_score_threshold(run, tmp_path, capsys):
    images = sorted(str(p) for p in (COCO / "images").glob("*.jpg"))
    detections = _detections()
    boxes = str(COCO / "person_detection_results_sample.json")
    out = tmp_path / "out"
    assert main(["predict", *images, "--checkpoint", run["checkpoint"], "--boxes", boxes,
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    kept_total = 0
    for image in images:
        image_id = int(os.path.splitext(os.path.basename(image))[0])
        want = [d["bbox"] for d in detections if d["image_id"] == image_id and d["score"] >= 0.3]
        stem = os.path.splitext(os.path.basename(image))[0]
        got = strict_json((out / f"{stem}.keypoints.json").read_text())["people"]
        assert np.allclose(np.reshape([p["box"] for p in got], (-1, 4)),
                           np.reshape(want, (-1, 4)))
        kept_total += len(want)
    dropped = len(detections) - kept_total
    assert 0 < kept_total < len(detections)
    assert f"{dropped} below --box-score-threshold 0.3 dropped, {kept_total} kept" in text


@needs_coco
def test_predict_matches_image_ids_through_annotations(run, tmp_path, capsys):
    shutil.copy(COCO / "images" / "000000000785.jpg", tmp_path / "beach.jpg")
    annotations = tmp_path / "ann.json"
    annotations.write_text(json.dumps({"images": [{"id": 785, "file_name": "beach.jpg"}],
                                       "categories": [{"id": 1, "keypoints": ["nose"]}]}))
    assert main(["predict", str(tmp_path / "beach.jpg"), "--checkpoint", run["checkpoint"],
                 "--boxes", str(COCO / "person_detection_results_sample.json"),
                 "--annotations", str(annotations), "--box-score-threshold", "0",
                 "--out", str(tmp_path / "out")]) == 0
    people = strict_json((tmp_path / "out" / "beach.keypoints.json").read_text())["people"]
    assert len(people) == sum(d["image_id"] == 785 for d in _detections())


@needs_coco
@pytest.mark.parametrize("bbox, needle", [
    ([10.0, 10.0, float("nan"), 50.0], "expected finite numbers"),
    ([10.0, 10.0, 0.0, 50.0], "expected a positive width and height, got w=0, h=50"),
    ([10.0, 10.0, 50.0], "expected a bbox of 4 numbers"),
])
def test_predict_refuses_bad_boxes_naming_them(run, tmp_path, capsys, bbox, needle):
    detections = _detections()
    detections[5]["bbox"] = bbox
    boxes = tmp_path / "det.json"
    boxes.write_text(json.dumps(detections))
    assert main(["predict", str(COCO / "images" / "000000000785.jpg"), "--checkpoint",
                 run["checkpoint"], "--boxes", str(boxes), "--out", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys, "predict")
    assert f"entry 5 (image_id {detections[5]['image_id']})" in err and needle in err
    assert not (tmp_path / "out").exists()


def test_test_refuses_a_detection_file_in_the_wrong_shape(run, tmp_path, capsys):
    detections = tmp_path / "det.json"
    detections.write_text(json.dumps([{"image_id": 1, "bbox": [1, 2, 3, 4]}]))
    assert main(["test", "synthetic_quick", *run["overrides"], "--checkpoint",
                 run["checkpoint"], f"data.detection_file={detections}"]) == 2
    err = _one_line_error(capsys, "test")
    assert "entry 0: expected {image_id, category_id, bbox, score}" in err


def test_test_marks_a_non_finite_model_invalid(run, capsys):
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        rc = main(["test", "synthetic_quick", *run["overrides"], "--checkpoint",
                   run["nan_checkpoint"], "--json"])
    captured = capsys.readouterr()
    assert rc == 1
    metrics = strict_json(captured.out)
    assert metrics["valid"] is False and metrics["AP"] is None and "NaN" in metrics["reason"]
    assert "no valid score" in captured.err
    results = strict_json((run["root"] / "out" / "keypoint_results.json").read_text())
    assert results and all(r["valid"] is False for r in results)


def test_predict_marks_a_non_finite_model_invalid(run, tmp_path, capsys):
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        rc = main(["predict", run["image"], "--checkpoint", run["nan_checkpoint"],
                   "--whole-image", "--out", str(tmp_path)])
    assert rc == 1
    stem = os.path.splitext(os.path.basename(run["image"]))[0]
    result = strict_json((tmp_path / f"{stem}.keypoints.json").read_text())
    (person,) = result["people"]
    assert result["valid"] is False and person["valid"] is False and person["score"] is None
    assert np.isnan(np.array(person["keypoints"], dtype=float)[:, 2]).all()


def test_export_names_missing_packages_and_the_pip_command(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", "--checkpoint", run["checkpoint"], "--onnx",
                 str(tmp_path / "m.onnx")]) == 2
    err = _one_line_error(capsys, "export")
    assert "onnxruntime not installed" in err and 'pip install "saffnet_fast[export]"' in err
    assert not (tmp_path / "m.onnx").exists()

"""COCO keypoint evaluation, OKS-NMS and the flip test."""
import json

import numpy as np
import pytest
import torch

from saffnet_fast.cli.main import main
from saffnet_fast.data.dataset_info import COCO_SIGMAS
from saffnet_fast.data.sample_data import sample_dir
from saffnet_fast.engine.decode import decode_heatmaps, predict_heatmaps
from saffnet_fast.engine.evaluate import coco_keypoint_eval, rescore_and_nms
from saffnet_fast.engine.nms import oks_iou, oks_nms, soft_oks_nms

COCO = sample_dir("coco-sample")
needs_coco = pytest.mark.skipif(COCO is None, reason="COCO sample data not found "
                                "(set SAFFNET_SHARED_DATA or place it at ../shared/data)")


def _gt_as_results(path):
    anns = json.load(open(path))["annotations"]
    return [{"image_id": a["image_id"], "category_id": a["category_id"],
             "keypoints": a["keypoints"], "score": 1.0}
            for a in anns if a["num_keypoints"] > 0 and not a["iscrowd"]]


@needs_coco
def test_ground_truth_as_results_gives_ap_one_through_the_cli(tmp_path, capsys):
    gt = COCO / "person_keypoints_sample.json"
    results = tmp_path / "res.json"
    results.write_text(json.dumps(_gt_as_results(gt)))
    assert main(["eval-keypoints", "--gt", str(gt), "--results", str(results), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert len(stats) == 10
    assert stats["AP"] == pytest.approx(1.0) and stats["AR"] == pytest.approx(1.0)


@needs_coco
def test_perturbed_results_score_lower():
    gt = str(COCO / "person_keypoints_sample.json")
    results = _gt_as_results(gt)
    rng = np.random.default_rng(0)
    for r in results:
        k = np.array(r["keypoints"], float).reshape(-1, 3)
        k[:, :2] += rng.normal(0, 8, size=(k.shape[0], 2))
        r["keypoints"] = k.reshape(-1).tolist()
    ap = coco_keypoint_eval(gt, results)["AP"]
    assert 0.0 < ap < 0.99


def test_eval_keypoints_errors_name_the_file(tmp_path):
    from saffnet_fast.data import MissingFileError

    with pytest.raises(MissingFileError, match="missing.json"):
        coco_keypoint_eval(str(tmp_path / "missing.json"), [])


def _person(x0, score, area=400.0):
    kpts = np.zeros((17, 3))
    kpts[:, 0] = x0 + np.arange(17)
    kpts[:, 1] = 10 + np.arange(17)
    kpts[:, 2] = 1.0
    return {"score": score, "keypoints": kpts.reshape(-1), "area": area}


def test_oks_nms_suppresses_duplicates_only():
    people = [_person(0, 0.9), _person(0.5, 0.8), _person(200, 0.7)]
    assert oks_iou(people[0]["keypoints"], np.stack([p["keypoints"] for p in people]), 400.0,
                   np.array([400.0] * 3), COCO_SIGMAS)[0] == pytest.approx(1.0)
    assert oks_nms(people, 0.9, COCO_SIGMAS) == [0, 2]
    assert oks_nms(people, 1.0, COCO_SIGMAS) == [0, 1, 2]


def test_soft_oks_nms_rescores_instead_of_dropping():
    people = [_person(0, 0.9), _person(0.5, 0.8), _person(200, 0.7)]
    keep = soft_oks_nms(people, 0.3, COCO_SIGMAS)
    assert sorted(keep) == [0, 1, 2] and keep[0] == 0
    assert people[1]["score"] < 0.1 and people[2]["score"] == pytest.approx(0.7)


def test_rescoring_uses_confident_joints_and_box_score():
    kpts = np.zeros((17, 3))
    kpts[:, 2] = 0.1
    kpts[:4, 2] = 0.8
    out = rescore_and_nms([{"image_id": 1, "keypoints": kpts, "area": 100.0, "box_score": 0.5}],
                          COCO_SIGMAS, in_vis_thre=0.2, oks_thre=0.9)
    assert out[0]["score"] == pytest.approx(0.4)


class _StridedOracle(torch.nn.Module):
    """Heatmap pixel j = input pixel 4j of channel 0 (the target convention), for K=1."""

    def forward(self, x):
        return x[:, :1, ::4, ::4]


def test_flip_test_with_shift_is_symmetric_and_accurate():
    h, w = 64, 48
    ys, xs = np.mgrid[0:h, 0:w]
    model = _StridedOracle()
    errs_shift, errs_plain = [], []
    for x0, y0 in [(20.0, 30.0), (17.0, 41.0), (28.0, 12.0)]:
        blob = np.exp(-((xs - x0) ** 2 + (ys - y0) ** 2) / (2 * 8.0 ** 2))
        image = torch.tensor(blob, dtype=torch.float32)[None, None].repeat(1, 3, 1, 1)
        center, scale = np.array([[w / 2, h / 2]]), np.array([[w / 200, h / 200]])
        for shift, errs in ((True, errs_shift), (False, errs_plain)):
            heat = predict_heatmaps(model, image, [], flip_test=True, shift_heatmap=shift)
            coords, _ = decode_heatmaps(heat, center, scale, "dark", dark_kernel=5)
            errs.append(abs(coords[0, 0, 0] - x0))
        # the flip-averaged map of a mirrored image is the mirror of the original's map
        mirrored = predict_heatmaps(model, image.flip(3), [], True, shift_heatmap=False)
        plain = predict_heatmaps(model, image, [], True, shift_heatmap=False)
        assert torch.allclose(mirrored, plain.flip(3), atol=1e-6)
    assert max(errs_shift) < 1.0  # input pixels
    assert np.mean(errs_shift) < np.mean(errs_plain)


@needs_coco
@pytest.mark.parametrize("field, value", [("keypoints", float("nan")),
                                          ("keypoints", float("inf")),
                                          ("score", float("nan"))])
def test_eval_keypoints_refuses_non_finite_results_naming_the_index(tmp_path, capsys, field,
                                                                     value):
    gt = COCO / "person_keypoints_sample.json"
    results = _gt_as_results(gt)
    if field == "keypoints":
        results[3]["keypoints"] = [value] * len(results[3]["keypoints"])
    else:
        results[3]["score"] = value
    path = tmp_path / "res.json"
    path.write_text(json.dumps(results))  # Python writes NaN / Infinity; json.load reads them
    assert main(["eval-keypoints", "--gt", str(gt), "--results", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"saffnet eval-keypoints: results[3] (image_id "
                          f"{results[3]['image_id']}): expected finite keypoints and score")
    assert err.count("\n") == 1


@needs_coco
def test_all_nan_results_never_score_perfect():
    results = _gt_as_results(COCO / "person_keypoints_sample.json")
    for r in results:
        r["keypoints"] = [float("nan")] * len(r["keypoints"])
    with pytest.raises(ValueError, match=r"results\[0\]"):
        coco_keypoint_eval(str(COCO / "person_keypoints_sample.json"), results)


@needs_coco
@pytest.mark.parametrize("change, needle", [
    (lambda gt: gt.pop("annotations"), "expected the COCO key 'annotations'"),
    (lambda gt: [a.update(num_keypoints=0) for a in gt["annotations"]],
     "expected at least one non-crowd annotation with labelled keypoints"),
    (lambda gt: [a.update(category_id=2) for a in gt["annotations"]],
     "expected at least one non-crowd annotation with labelled keypoints in category [1]"),
])
def test_eval_keypoints_refuses_ground_truth_without_annotations(tmp_path, capsys, change,
                                                                 needle):
    gt = json.loads((COCO / "person_keypoints_sample.json").read_text())
    results = _gt_as_results(COCO / "person_keypoints_sample.json")
    change(gt)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    assert main(["eval-keypoints", "--gt", str(tmp_path / "gt.json"), "--results",
                 str(tmp_path / "res.json")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


@needs_coco
@pytest.mark.parametrize("bad", [0.0, -0.05, float("nan"), float("inf")])
def test_sigmas_must_be_positive_and_finite(bad):
    sigmas = list(COCO_SIGMAS)
    sigmas[4] = bad
    gt = str(COCO / "person_keypoints_sample.json")
    with pytest.raises(ValueError, match="sigmas: expected positive finite values, got .* at "
                                         "index 4"):
        coco_keypoint_eval(gt, _gt_as_results(gt), sigmas=sigmas)


@needs_coco
def test_results_for_images_outside_the_ground_truth_are_named(tmp_path, capsys):
    gt = COCO / "person_keypoints_sample.json"
    results = _gt_as_results(gt)
    results[2]["image_id"] = 999999
    (tmp_path / "res.json").write_text(json.dumps(results))
    assert main(["eval-keypoints", "--gt", str(gt), "--results", str(tmp_path / "res.json")]) == 2
    assert "results[2]: image_id 999999 is not an image of the ground truth" in \
        capsys.readouterr().err

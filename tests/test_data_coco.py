"""COCO-format loading on the real COCO sample: GT boxes, detections, augmentation, one
training step; dataset-info handling; errors that name the missing file."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from saffnet_fast.data import CocoKeypoints, MissingFileError, build_dataset_info
from saffnet_fast.data.sample_data import sample_dir
from saffnet_fast.engine.loss import JointsMSELoss
from saffnet_fast.engine.tiny import TinyPoseNet

COCO = sample_dir("coco-sample")
needs_coco = pytest.mark.skipif(COCO is None, reason="COCO sample data not found "
                                "(set SAFFNET_SHARED_DATA or place it at ../shared/data)")


def _dataset(**kwargs):
    return CocoKeypoints(str(COCO / "person_keypoints_sample.json"), str(COCO / "images"),
                         input_size=(64, 48), **kwargs)


@needs_coco
def test_gt_boxes_load_and_match_annotations():
    ds = _dataset(is_train=False)
    anns = json.load(open(COCO / "person_keypoints_sample.json"))["annotations"]
    expected = sum(1 for a in anns if a["num_keypoints"] > 0 and not a["iscrowd"])
    assert len(ds) == expected
    assert ds.info.num_joints == 17 and (1, 2) in ds.info.flip_pairs
    image, target, weight, meta = ds[0]
    assert image.shape == (3, 64, 48) and target.shape == (17, 16, 12)
    # visible joints of the first record get weight 1 and a peak of 1
    vis = ds.records[0].joints_vis
    assert weight[:, 0].tolist() == (vis > 0).astype(np.float32).tolist()
    assert torch.allclose(target.amax(dim=(1, 2))[weight[:, 0] > 0], torch.tensor(1.0))


@needs_coco
def test_augmentation_is_seeded_and_trains_one_step():
    ds = _dataset(is_train=True, augment={"half_body_prob": 1.0, "half_body_min_joints": 2})
    a = ds[(0, 123)]
    b = ds[(0, 123)]
    c = ds[(0, 124)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    batch = [ds[(i, 7 + i)] for i in range(len(ds))]
    images = torch.stack([s[0] for s in batch])
    targets = torch.stack([s[1] for s in batch])
    weights = torch.stack([s[2] for s in batch])
    torch.manual_seed(0)
    model = TinyPoseNet(17)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loss = JointsMSELoss()(model(images), targets, weights)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and loss.item() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@needs_coco
def test_detection_results_with_score_threshold():
    dets = json.load(open(COCO / "person_detection_results_sample.json"))
    all_boxes = _dataset(is_train=False,
                         detection_file=str(COCO / "person_detection_results_sample.json"))
    assert len(all_boxes) == len(dets)
    threshold = 0.5
    kept = _dataset(is_train=False, detection_score_threshold=threshold,
                    detection_file=str(COCO / "person_detection_results_sample.json"))
    assert len(kept) == sum(1 for d in dets if d["score"] >= threshold) < len(dets)
    assert all(r.score >= threshold for r in kept.records)


@needs_coco
def test_missing_image_names_the_file(tmp_path):
    images = tmp_path / "images"
    shutil.copytree(COCO / "images", images)
    first = json.load(open(COCO / "person_keypoints_sample.json"))["images"][0]["file_name"]
    os.remove(images / first)
    ds = CocoKeypoints(str(COCO / "person_keypoints_sample.json"), str(images), (64, 48), False)
    index = next(i for i, r in enumerate(ds.records) if r.image_path.endswith(first))
    with pytest.raises(MissingFileError, match=first):
        ds[index]
    (images / first).write_bytes(b"not a jpeg")
    with pytest.raises(MissingFileError, match="unreadable.*" + first):
        ds[index]


def test_missing_and_malformed_annotation_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(MissingFileError, match="nope.json"):
        CocoKeypoints(str(missing), str(tmp_path), (64, 48), False)
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(MissingFileError, match="bad.json"):
        CocoKeypoints(str(bad), str(tmp_path), (64, 48), False)
    with pytest.raises(MissingFileError, match="image directory"):
        CocoKeypoints(str(bad), str(tmp_path / "no-images"), (64, 48), False)


def test_dataset_info_for_a_custom_keypoint_set():
    category = {"keypoints": ["head", "left_hand", "right_hand", "left_foot", "right_foot"],
                "skeleton": [[1, 2], [1, 3]]}
    info = build_dataset_info({"sigmas": [0.05] * 5}, category)
    assert info.flip_pairs == [(1, 2), (3, 4)]
    assert info.upper_body_ids == [0, 1, 2]
    assert info.skeleton == [(1, 2), (1, 3)]
    no_sigmas = build_dataset_info({}, category)
    with pytest.raises(ValueError, match="sigmas"):
        no_sigmas.require_sigmas()
    with pytest.raises(ValueError, match="flip_pairs"):
        build_dataset_info({"flip_pairs": [[0, 9]]}, category)
    with pytest.raises(ValueError, match="expected 5"):
        build_dataset_info({"sigmas": [0.1] * 3}, category)

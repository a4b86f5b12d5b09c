"""The embedded synthetic COCO-format dataset."""
import hashlib
import json
import os

import numpy as np
import pytest

from saffnet_fast.data import CocoKeypoints
from saffnet_fast.data.synthetic import (SyntheticParams, ensure_synthetic_dataset, split_paths,
                                         synthetic_dir)

SMALL = dict(num_train=6, num_val=3, image_height=96, image_width=96)


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _dirs, files in sorted(os.walk(root)):
        for name in sorted(files):
            h.update(name.encode())
            h.update(open(os.path.join(dirpath, name), "rb").read())
    return h.hexdigest()


def test_deterministic_per_seed(tmp_path):
    a = ensure_synthetic_dataset(SyntheticParams(**SMALL, seed=3), str(tmp_path / "a"))
    b = ensure_synthetic_dataset(SyntheticParams(**SMALL, seed=3), str(tmp_path / "b"))
    c = ensure_synthetic_dataset(SyntheticParams(**SMALL, seed=4), str(tmp_path / "c"))
    assert os.path.basename(a) == os.path.basename(b) != os.path.basename(c)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    # a second call reuses the cache
    assert ensure_synthetic_dataset(SyntheticParams(**SMALL, seed=3), str(tmp_path / "a")) == a


def test_annotations_are_valid_coco_keypoints(tmp_path):
    params = SyntheticParams(num_train=12, num_val=4, image_height=128, image_width=128)
    root = ensure_synthetic_dataset(params, str(tmp_path))
    assert root == synthetic_dir(params, str(tmp_path))
    ann_file, image_dir = split_paths(root, "train")
    data = json.load(open(ann_file))
    assert len(data["images"]) == 12 and len(data["categories"][0]["keypoints"]) == 17
    assert len(data["annotations"]) >= 12  # at least one person per image
    flags = set()
    for ann in data["annotations"]:
        k = np.array(ann["keypoints"]).reshape(17, 3)
        flags |= set(k[:, 2].astype(int).tolist())
        assert ann["iscrowd"] == 0 and ann["num_keypoints"] == int((k[:, 2] > 0).sum())
        assert ann["area"] > 0 and len(ann["bbox"]) == 4
        assert np.all(k[k[:, 2] == 0, :2] == 0)  # v=0: outside, x = y = 0
        inside = k[k[:, 2] > 0]
        assert np.all((inside[:, :2] >= 0) & (inside[:, :2] <= 127))
    assert {1, 2} <= flags  # occluded and visible joints both occur
    ds = CocoKeypoints(ann_file, image_dir, (64, 48), is_train=True)
    image, target, weight, _ = ds[(0, 5)]
    assert image.shape == (3, 64, 48) and target.shape == (17, 16, 12)


def test_cache_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFFNET_CACHE", str(tmp_path / "env-cache"))
    root = ensure_synthetic_dataset(SyntheticParams(**SMALL))
    assert root.startswith(str(tmp_path / "env-cache"))


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="image_height"):
        SyntheticParams(image_height=10).validate()
    with pytest.raises(ValueError, match="num_train"):
        SyntheticParams(num_train=0).validate()

"""MPII loading and PCKh@0.5 on the real MPII sample."""
import json

import numpy as np
import pytest

from saffnet_fast.data.mpii import MPIIKeypoints
from saffnet_fast.data.sample_data import sample_dir
from saffnet_fast.engine.decode import decode_heatmaps
from saffnet_fast.engine.evaluate import (MPII_TABLE_COLUMNS, format_pckh_table,
                                          head_sizes_from_boxes, mpii_pckh)

MPII = sample_dir("mpii-sample")
needs_mpii = pytest.mark.skipif(MPII is None, reason="MPII sample data not found "
                                "(set SAFFNET_SHARED_DATA or place it at ../shared/data)")


def _entries():
    return json.load(open(MPII / "mpii_sample.json"))


def _head_sizes(entries):
    # The sample has no gt_valid.mat: the test supplies head sizes, here 0.6 × a head box
    # spanning the head top and upper neck with the usual width.
    boxes = []
    for e in entries:
        top, neck = np.array(e["joints"][9]), np.array(e["joints"][8])
        half = np.linalg.norm(top - neck) / 2
        mid = (top + neck) / 2
        boxes.append([mid - half, mid + half])
    return head_sizes_from_boxes(np.array(boxes))


@needs_mpii
def test_ground_truth_gives_pckh_100():
    entries = _entries()
    gt = np.array([e["joints"] for e in entries], float)
    vis = np.array([e["joints_vis"] for e in entries], float)
    table = mpii_pckh(gt, gt, vis, _head_sizes(entries))
    assert list(table) == list(MPII_TABLE_COLUMNS)
    assert all(v == pytest.approx(100.0) for v in table.values())
    assert "Head" in format_pckh_table(table)


@needs_mpii
def test_encoded_targets_decode_back_to_pckh_100():
    """Dataset crop -> σ=2 targets -> quarter-offset decode -> inverse affine: every joint
    stays within half a head size; a large shift does not."""
    entries = _entries()
    ds = MPIIKeypoints(str(MPII / "mpii_sample.json"), str(MPII / "images"), (256, 256),
                       is_train=False)
    assert len(ds) == len(entries) and ds.info.num_joints == 16
    preds = []
    for i in range(len(ds)):
        _image, target, _weight, meta = ds[i]
        coords, _ = decode_heatmaps(target[None].numpy(), meta["center"][None].numpy(),
                                    meta["scale"][None].numpy())
        preds.append(coords[0] + 1.0)  # back to the JSON's 1-based convention
    preds = np.stack(preds)
    gt = np.array([e["joints"] for e in entries], float)
    vis = np.array([e["joints_vis"] for e in entries], float)
    sizes = _head_sizes(entries)
    assert mpii_pckh(preds, gt, vis, sizes)["Mean"] == pytest.approx(100.0)
    shifted = mpii_pckh(preds + sizes[:, None, None], gt, vis, sizes)
    assert shifted["Mean"] < 1.0


def test_pckh_checks_shapes():
    with pytest.raises(ValueError, match="head_sizes"):
        mpii_pckh(np.zeros((2, 16, 2)), np.zeros((2, 16, 2)), np.ones((2, 16)), np.ones(3))
    with pytest.raises(ValueError, match=r"\(N, 16, 2\)"):
        mpii_pckh(np.zeros((2, 17, 2)), np.zeros((2, 17, 2)), np.ones((2, 17)), np.ones(2))

"""Affine geometry, heatmap targets and their decoding."""
import numpy as np
import pytest
import torch

from saffnet_fast.data.transforms import (affine_points, box_to_center_scale, flip_back,
                                          flip_joints, gaussian_targets, get_affine_transform,
                                          half_body_box)
from saffnet_fast.engine.decode import decode_heatmaps, heatmap_coords


def test_box_to_center_scale_fixes_aspect_ratio_and_pads():
    center, scale = box_to_center_scale([10, 20, 30, 120], aspect_ratio=0.75)
    np.testing.assert_allclose(center, [25, 80])
    # width widened to 0.75 × 120 = 90, then × 1.25 padding, in units of 200 px
    np.testing.assert_allclose(scale, [90 * 1.25 / 200, 120 * 1.25 / 200], rtol=1e-6)


@pytest.mark.parametrize("rot", [0.0, 30.0, -45.0])
def test_affine_round_trip(rot):
    center, scale = np.array([150.0, 90.0]), np.array([1.1, 1.4])
    forward = get_affine_transform(center, scale, rot, (48, 64))
    inverse = get_affine_transform(center, scale, rot, (48, 64), inv=True)
    points = np.random.default_rng(0).uniform(0, 300, size=(20, 2))
    back = affine_points(affine_points(points, forward), inverse)
    np.testing.assert_allclose(back, points, atol=1e-3)
    # the box centre lands in the middle of the output
    np.testing.assert_allclose(affine_points(center[None], forward)[0], [24, 32], atol=1e-4)


def test_affine_rotation_turns_the_crop():
    center, scale = np.array([100.0, 100.0]), np.array([1.0, 1.0])
    matrix = get_affine_transform(center, scale, 90.0, (200, 200))
    # a point above the centre (toward -y) moves to a side after a 90° rotation
    moved = affine_points(np.array([[100.0, 50.0]]), matrix)[0]
    assert abs(moved[1] - 100.0) < 1e-3 and abs(abs(moved[0] - 100.0) - 50.0) < 1e-3


@pytest.mark.parametrize("unbiased,method,tol", [(False, "quarter", 1.0), (True, "dark", 0.1)])
def test_heatmap_encode_decode_round_trip(unbiased, method, tol):
    """Image keypoints -> crop -> Gaussian targets -> decode -> image: within a heatmap
    pixel for HRNet's rounded encoding (quarter offset), far closer for DARK."""
    rng = np.random.default_rng(1)
    input_w, input_h = 96, 128
    center, scale = np.array([200.0, 150.0]), np.array([0.9, 1.2])
    heat_px = scale[0] * 200 / (input_w / 4)  # image pixels per heatmap pixel
    for _ in range(3):
        joints = center + rng.uniform(-60, 60, size=(5, 2))
        matrix = get_affine_transform(center, scale, 0.0, (input_w, input_h))
        joints_in = affine_points(joints, matrix)
        target, weight = gaussian_targets(joints_in, np.ones((5, 1)), (input_w // 4, input_h // 4),
                                          (4.0, 4.0), 2.0, unbiased=unbiased)
        assert weight.sum() == 5
        coords, scores = decode_heatmaps(target[None], center[None], scale[None], method)
        err = np.linalg.norm(coords[0] - joints, axis=1) / heat_px
        assert err.max() < tol, err
        assert np.all(scores > 0.5)


def test_targets_zero_weight_outside_and_invisible():
    joints = np.array([[10.0, 10.0], [500.0, 10.0], [20.0, 20.0]])
    vis = np.array([[1.0], [1.0], [0.0]])
    target, weight = gaussian_targets(joints, vis, (24, 32), (4.0, 4.0), 2.0)
    assert weight[:, 0].tolist() == [1.0, 0.0, 0.0]
    assert target[0].max() == pytest.approx(1.0) and target[1].max() == 0 and target[2].max() == 0


def test_flip_back_is_an_involution_and_swaps_pairs():
    heat = torch.rand(2, 4, 8, 6)
    pairs = [(0, 1), (2, 3)]
    assert torch.equal(flip_back(flip_back(heat, pairs), pairs), heat)
    assert torch.equal(flip_back(heat, pairs)[:, 0], heat[:, 1].flip(-1))
    np.testing.assert_array_equal(flip_back(heat.numpy(), pairs), flip_back(heat, pairs).numpy())


def test_flip_joints_mirrors_and_swaps():
    joints = np.array([[10.0, 5.0], [30.0, 6.0], [50.0, 7.0]])
    vis = np.ones((3, 2))
    flipped, fvis = flip_joints(joints, vis, 100, [(0, 1)])
    np.testing.assert_allclose(flipped, [[69, 6], [89, 5], [49, 7]])


def test_half_body_box_covers_selected_joints():
    joints = np.array([[x, y] for x, y in zip(range(0, 170, 10), range(0, 340, 20))], float)
    vis = np.ones((17, 2))
    box = half_body_box(joints, vis, list(range(11)), 0.75, np.random.default_rng(0))
    assert box is not None
    center, scale = box
    assert scale[0] / scale[1] == pytest.approx(0.75, rel=1e-5)


def test_decode_method_is_checked():
    with pytest.raises(ValueError, match="decode method"):
        heatmap_coords(np.zeros((1, 1, 4, 4)), "median")

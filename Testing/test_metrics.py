"""Dice, HD95 (mm), volume difference (ml) and evaluate()."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from proxyprompt.errors import InputError
from proxyprompt.metrics import dice, evaluate, hausdorff95_mm, surface_distances_mm, volume_difference_ml
from proxyprompt.volume import LabelInfo, Volume

SPACING = (0.8, 1.0, 2.5)  # x, y, z = i, j, k: deliberately anisotropic


def _sphere(shape_kji, spacing_xyz, centre_xyz_mm, radius_mm):
    k, j, i = np.indices(shape_kji)
    x, y, z = i * spacing_xyz[0], j * spacing_xyz[1], k * spacing_xyz[2]
    cx, cy, cz = centre_xyz_mm
    return (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= radius_mm**2


def _brute_force_surface_distances(a, b, spacing_xyz):
    """Independent reference: face-connected surfaces, all pairwise distances in mm."""

    def surface_points(mask):
        padded = np.pad(mask, 1)
        inner = padded[1:-1, 1:-1, 1:-1]
        neighbours_all_in = np.ones_like(inner)
        for axis in range(3):
            for step in (-1, 1):
                neighbours_all_in &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        k, j, i = np.nonzero(inner & ~neighbours_all_in)
        return np.stack([i, j, k], axis=1) * np.asarray(spacing_xyz)

    pa, pb = surface_points(a), surface_points(b)

    def nearest(p, q):
        return np.concatenate([np.sqrt(((c[:, None, :] - q[None]) ** 2).sum(-1)).min(1) for c in np.array_split(p, 8)])

    return nearest(pa, pb), nearest(pb, pa)


def test_dice_known_overlaps():
    a = np.zeros((1, 4, 10), bool)
    b = np.zeros_like(a)
    a[0, 0, :] = True  # 10 voxels
    b[0, 0, 5:] = True  # 5 voxels, all inside a
    assert dice(a, b) == pytest.approx(2 * 5 / 15)
    b[0, 1, :5] = True  # 10 voxels, 5 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    with pytest.raises(InputError):
        dice(a, a[:, :2])


@pytest.mark.parametrize("axis, voxels", [(0, 5), (2, 2)])  # 4 mm along x, 5 mm along z
def test_hd95_of_offset_spheres_is_the_offset_in_mm(axis, voxels):
    shape = (24, 44, 56)  # k, j, i -> 60 x 44 x 44.8 mm
    centre = (22.0, 22.0, 28.0)
    offset_mm = voxels * SPACING[axis]
    moved = list(centre)
    moved[axis] += offset_mm
    a = _sphere(shape, SPACING, centre, 12.0)
    b = _sphere(shape, SPACING, moved, 12.0)
    hd95 = hausdorff95_mm(a, b, SPACING)
    # Every surface point has its translate at exactly offset_mm; the 95th percentile is a bit less.
    assert offset_mm - max(SPACING) <= hd95 <= offset_mm + 1e-4
    assert hausdorff95_mm(b, a, SPACING) == pytest.approx(hd95)
    # Spacing read in the wrong order would give a very different number.
    assert abs(hausdorff95_mm(a, b, SPACING[::-1]) - hd95) > 1.0


def test_hd95_matches_a_brute_force_reference():
    shape = (14, 30, 34)
    a = _sphere(shape, SPACING, (13.0, 15.0, 16.0), 9.0)
    b = _sphere(shape, SPACING, (15.5, 13.0, 18.5), 7.0)
    forward, backward = surface_distances_mm(a, b, SPACING)
    ref_forward, ref_backward = _brute_force_surface_distances(a, b, SPACING)
    np.testing.assert_allclose(np.sort(forward), np.sort(ref_forward), atol=1e-4)
    np.testing.assert_allclose(np.sort(backward), np.sort(ref_backward), atol=1e-4)
    expected = max(np.percentile(ref_forward, 95), np.percentile(ref_backward, 95))
    assert hausdorff95_mm(a, b, SPACING) == pytest.approx(expected, abs=1e-4)


def test_hd95_empty_cases_and_identical_masks():
    a = _sphere((10, 20, 20), SPACING, (8.0, 10.0, 12.0), 5.0)
    empty = np.zeros_like(a)
    assert hausdorff95_mm(a, a, SPACING) == 0.0
    assert hausdorff95_mm(empty, empty, SPACING) == 0.0
    assert math.isinf(hausdorff95_mm(a, empty, SPACING))
    assert math.isinf(hausdorff95_mm(empty, a, SPACING))
    full = np.ones((4, 5, 6), bool)  # touches every border: its surface is the image border
    shorter = full.copy()
    shorter[:, :, -1] = False
    assert hausdorff95_mm(full, shorter, (2.0, 1.0, 1.0)) == pytest.approx(2.0)


def test_volume_difference_in_millilitres():
    spacing = (0.5, 0.5, 2.0)  # 0.5 mm^3 per voxel
    prediction = np.zeros((10, 20, 30), bool)
    truth = np.zeros_like(prediction)
    prediction.flat[:3000] = True
    truth.flat[:1000] = True
    assert volume_difference_ml(prediction, truth, spacing) == pytest.approx(1.0)  # 2000 * 0.5 mm^3
    assert volume_difference_ml(truth, prediction, spacing) == pytest.approx(-1.0)
    assert volume_difference_ml(truth, truth, spacing) == 0.0


def _pair():
    shape = (12, 30, 40)
    truth = np.zeros(shape, np.uint8)
    truth[_sphere(shape, SPACING, (16.0, 15.0, 15.0), 6.0)] = 1
    truth[2:5, 3:8, 30:36] = 2
    prediction = np.zeros(shape, np.uint8)
    prediction[_sphere(shape, SPACING, (16.8, 15.0, 15.0), 6.0)] = 1  # shifted by one voxel in x
    prediction[8:10, 20:25, 2:6] = 3  # a label the truth does not have: not scored
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    make = lambda array: Volume.from_geometry(array, SPACING, (-10.0, 5.0, 30.0), direction)  # noqa: E731
    return make(prediction), make(truth)


def test_evaluate_output_shape_and_values():
    prediction, truth = _pair()
    table = {1: LabelInfo("left ventricle"), 2: "myocardium"}
    result = evaluate(prediction, truth, label_table=table)
    assert set(result) == {"labels", "mean_dice"}
    assert set(result["labels"]) == {"1", "2"}
    for entry in result["labels"].values():
        assert set(entry) == {"name", "dice", "hd95_mm", "volume_difference_ml"}
    one, two = result["labels"]["1"], result["labels"]["2"]
    assert one["name"] == "left ventricle" and two["name"] == "myocardium"
    assert 0.7 < one["dice"] < 1.0
    assert one["dice"] == pytest.approx(dice(prediction.array == 1, truth.array == 1))
    assert 0.0 < one["hd95_mm"] <= 0.8 + 1e-4  # one-voxel shift along x = 0.8 mm
    assert two["dice"] == 0.0 and two["hd95_mm"] is None  # missed entirely
    assert two["volume_difference_ml"] == pytest.approx(-3 * 5 * 6 * 0.8 * 1.0 * 2.5 / 1000)
    assert result["mean_dice"] == pytest.approx((one["dice"] + 0.0) / 2)
    json.dumps(result, allow_nan=False)  # valid JSON, no NaN / Infinity

    only = evaluate(prediction, truth, labels=[2])
    assert list(only["labels"]) == ["2"] and only["labels"]["2"]["name"] == "label 2"
    assert only["mean_dice"] == 0.0
    empty = evaluate(prediction, truth.with_array(np.zeros_like(truth.array)))
    assert empty == {"labels": {}, "mean_dice": None}


def test_evaluate_refuses_different_grids():
    prediction, truth = _pair()
    shifted_matrix = np.array(prediction.ijk_to_lps)
    shifted_matrix[0, 3] += 1.5
    moved = Volume(prediction.array, shifted_matrix)
    with pytest.raises(InputError) as caught:
        evaluate(moved, truth)
    message = str(caught.value)
    assert "prediction" in message and "truth" in message
    assert "-8.5" in message and "-10.0" in message  # both origins are described
    cropped = Volume.from_geometry(prediction.array[:, :, :-1], SPACING, truth.origin, truth.direction)
    with pytest.raises(InputError, match="same grid"):
        evaluate(cropped, truth)

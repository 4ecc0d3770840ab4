"""Registration (classic atlas) path: geometry, known-transform recovery, real data, fusion, cancel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from proxyprompt.errors import Cancelled, InputError
from proxyprompt.registration import (
    fuse_labels,
    keep_largest_component,
    labels_from_probabilities,
    register_case,
    segment_by_registration,
)
from proxyprompt.volume import Volume, read_image, read_label

ACDC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "acdc"


# ---------------------------------------------------------------------------------------------
# a synthetic "heart in a chest": analytic, so any grid can sample it exactly
# ---------------------------------------------------------------------------------------------
def _inside(points, centre, axes):
    return np.sum(((points - np.asarray(centre)) / np.asarray(axes)) ** 2, axis=1) <= 1.0


def phantom(points: np.ndarray):
    """Intensity and label (1 = RV, 2 = MYO, 3 = LV) at physical points (N x 3, mm, object frame)."""
    intensity = np.zeros(len(points))
    label = np.zeros(len(points), dtype=np.int32)
    body = _inside(points, (0, 0, 0), (80, 65, 70))
    intensity[body] = 0.25
    intensity[_inside(points, (40, -35, 8), (12, 12, 20))] = 0.8     # asymmetric landmarks
    intensity[_inside(points, (-38, 32, -6), (14, 10, 25))] = 0.05
    intensity[_inside(points, (-45, -30, 0), (8, 20, 30))] = 0.6
    myo = _inside(points, (8, 4, 0), (23, 21, 32))
    lv = _inside(points, (8, 4, 0), (14, 13, 27))
    rv = _inside(points, (-17, 0, 0), (15, 22, 26)) & ~myo
    intensity[rv] = 0.85
    label[rv] = 1
    intensity[myo] = 0.45
    label[myo] = 2
    intensity[lv] = 1.0
    label[lv] = 3
    return intensity, label


def _grid_points(size, spacing, origin, direction):
    i, j, k = np.meshgrid(*[np.arange(n) for n in size], indexing="ij")
    index = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float)
    return index @ (np.asarray(direction) * np.asarray(spacing)[None, :]).T + np.asarray(origin)


def sample(size, spacing, origin, direction, to_object=lambda p: p, smooth=1.0):
    """(image Volume, label Volume) of the phantom seen through `to_object` (grid point -> object point)."""
    points = _grid_points(size, spacing, origin, direction)
    intensity, label = phantom(to_object(points))
    shape = tuple(reversed(size))
    # points were generated i-fastest-last; reorder to [k, j, i]
    intensity = intensity.reshape(size).transpose(2, 1, 0)
    label = label.reshape(size).transpose(2, 1, 0)
    image = Volume.from_geometry(np.ascontiguousarray(intensity, dtype=np.float32), spacing, origin, direction)
    if smooth:
        image = Volume.from_sitk(sitk.SmoothingRecursiveGaussian(image.to_sitk(), smooth))
    rng = np.random.default_rng(0)
    noisy = (image.array * 1000 + rng.normal(0, 10, shape)).astype(np.int16)
    labels = Volume.from_geometry(np.ascontiguousarray(label, dtype=np.uint8), spacing, origin, direction)
    return image.with_array(noisy), labels


def rotation_z(degrees):
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def oblique(angle=25.0, tilt=8.0):
    t = np.radians(tilt)
    rx = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    return rotation_z(angle) @ rx


# The target object is the phantom rotated by 20 degrees about z and translated: target point x shows
# the object point G(x) = R^T (x - t). The true target -> reference map is G (reference = object frame).
MOTION_R = rotation_z(20.0)
MOTION_T = np.array([14.0, -9.0, 6.0])


def true_map(points):
    return (points - MOTION_T) @ MOTION_R  # R^T (x - t) for row vectors


def _centred_origin(size, spacing, direction, centre):
    half = (np.asarray(size) - 1) / 2 * np.asarray(spacing)
    return np.asarray(centre) - np.asarray(direction) @ half


@pytest.fixture(scope="module")
def synthetic():
    ref_size, ref_spacing = (90, 80, 24), (2.0, 2.0, 6.0)
    reference = sample(ref_size, ref_spacing, _centred_origin(ref_size, ref_spacing, np.eye(3), (0, 0, 0)), np.eye(3))
    tgt_size, tgt_spacing, tgt_direction = (84, 78, 28), (2.2, 1.8, 5.0), oblique()
    tgt_origin = _centred_origin(tgt_size, tgt_spacing, tgt_direction, MOTION_T + np.array([4.0, -3.0, 2.0]))
    target = sample(tgt_size, tgt_spacing, tgt_origin, tgt_direction, to_object=true_map)
    # the same object without motion, on the target's oblique grid (for the copy test)
    still = sample(tgt_size, tgt_spacing, tgt_origin, tgt_direction)
    return reference, target, still


def dice(a, b, value):
    from proxyprompt.metrics import dice as metric

    return metric(np.asarray(a) == value, np.asarray(b) == value)


def centroid_mm(label: Volume, value) -> np.ndarray:
    k, j, i = np.nonzero(label.array == value)
    index = np.stack([i, j, k, np.ones_like(i)], axis=1).astype(float)
    return (index @ label.ijk_to_lps.T)[:, :3].mean(axis=0)


def assert_on_grid(label: Volume, target: Volume):
    assert label.array.shape == target.array.shape
    assert np.array_equal(label.ijk_to_lps, target.ijk_to_lps)  # exact, not approximately
    assert label.size == target.size and label.spacing == target.spacing and label.origin == target.origin
    assert np.array_equal(label.direction, target.direction)
    assert np.issubdtype(label.array.dtype, np.integer)


# ---------------------------------------------------------------------------------------------
# (a) geometry and a known transform
# ---------------------------------------------------------------------------------------------
def test_copy_is_identity_in_physical_space(synthetic):
    (ref_image, ref_label), _, (still_image, still_label) = synthetic
    result = register_case(ref_image, ref_label, still_image, method="copy")
    assert_on_grid(result.label, still_image)
    for value in (1, 2, 3):
        assert dice(result.label.array, still_label.array, value) > 0.85
        assert np.linalg.norm(centroid_mm(result.label, value) - centroid_mm(still_label, value)) < 1.8


def test_affine_recovers_known_motion_across_grids(synthetic):
    (ref_image, ref_label), (tgt_image, tgt_label), _ = synthetic
    assert not ref_image.same_grid(tgt_image)
    copy = register_case(ref_image, ref_label, tgt_image, method="copy")
    result = register_case(ref_image, ref_label, tgt_image, method="affine")
    assert_on_grid(result.label, tgt_image)
    voxel = min(tgt_image.spacing)
    for value in (1, 2, 3):
        assert dice(result.label.array, tgt_label.array, value) > 0.85
        error = np.linalg.norm(centroid_mm(result.label, value) - centroid_mm(tgt_label, value))
        assert error < voxel, f"label {value}: centroid off by {error:.2f} mm"
        assert dice(copy.label.array, tgt_label.array, value) < 0.7  # the motion is not trivial
    # the transform itself: target points of the heart map where the true motion maps them
    k, j, i = np.nonzero(tgt_label.array > 0)
    index = np.stack([i, j, k, np.ones_like(i)], axis=1)[::50].astype(float)
    points = (index @ tgt_image.ijk_to_lps.T)[:, :3]
    mapped = np.array([result.transform.TransformPoint(tuple(p)) for p in points])
    assert np.mean(np.linalg.norm(mapped - true_map(points), axis=1)) < voxel
    # soft maps on the target grid, in [0, 1], and their argmax is the label
    assert set(result.probabilities) == {1, 2, 3}
    for probability in result.probabilities.values():
        assert probability.shape == tgt_image.array.shape and probability.dtype == np.float32
        assert probability.min() >= 0.0 and probability.max() <= 1.0
    assert np.array_equal(labels_from_probabilities(result.probabilities), result.label.array)


def test_deformable_on_synthetic_keeps_the_affine_accuracy(synthetic):
    (ref_image, ref_label), (tgt_image, tgt_label), _ = synthetic
    result = register_case(ref_image, ref_label, tgt_image, method="deformable")
    assert_on_grid(result.label, tgt_image)
    assert np.mean([dice(result.label.array, tgt_label.array, v) for v in (1, 2, 3)]) > 0.85


def test_bad_inputs_are_refused(synthetic):
    (ref_image, ref_label), (tgt_image, _), _ = synthetic
    with pytest.raises(InputError):
        register_case(ref_image, ref_label, tgt_image, method="bspline")
    with pytest.raises(InputError):
        register_case(ref_image, ref_label.with_array(np.zeros_like(ref_label.array)), tgt_image, method="copy")
    with pytest.raises(InputError):  # label not on the reference image's grid
        register_case(ref_image, tgt_image.with_array(np.ones(tgt_image.array.shape, np.uint8)), tgt_image)


# ---------------------------------------------------------------------------------------------
# (b) real ACDC pair: registration beats copying the label
# ---------------------------------------------------------------------------------------------
def test_acdc_deformable_beats_copy_and_intensity_beats_deformable():
    if not (ACDC / "patient001_ED_image.nii.gz").is_file():
        pytest.skip(f"ACDC data not found at {ACDC}")
    ref_image = read_image(ACDC / "patient001_ED_image.nii.gz")
    ref_label, _ = read_label(ACDC / "patient001_ED_label.nii.gz")
    tgt_image = read_image(ACDC / "patient002_ED_image.nii.gz")
    truth, _ = read_label(ACDC / "patient002_ED_label.nii.gz")
    copy = register_case(ref_image, ref_label, tgt_image, method="copy")
    refined = register_case(ref_image, ref_label, tgt_image, method="intensity", keep_stages=True)
    deformable = refined.stages["deformable"][0]
    assert_on_grid(deformable, tgt_image)
    assert_on_grid(refined.label, tgt_image)
    copy_dice = np.mean([dice(copy.label.array, truth.array, v) for v in (1, 2, 3)])
    deformable_dice = np.mean([dice(deformable.array, truth.array, v) for v in (1, 2, 3)])
    assert deformable_dice > copy_dice + 0.15, (copy_dice, deformable_dice)
    assert deformable_dice > 0.6
    assert dice(deformable.array, truth.array, 3) > 0.75
    assert refined.similarity > copy.similarity
    # the intensity stage moves borders to where the target's contrast puts them
    refined_dice = np.mean([dice(refined.label.array, truth.array, v) for v in (1, 2, 3)])
    assert refined_dice > deformable_dice + 0.01, (deformable_dice, refined_dice)
    assert set(np.unique(refined.label.array)) <= {0, 1, 2, 3}


# ---------------------------------------------------------------------------------------------
# (c) fusion
# ---------------------------------------------------------------------------------------------
def _maps():
    grid = Volume.from_geometry(np.zeros((2, 3, 4), np.int32), (1.5, 1.5, 4.0), (3, -2, 1), oblique())
    a = np.zeros((2, 3, 4), np.int32)
    b = a.copy()
    c = a.copy()
    a[0, 0, :] = [1, 1, 2, 3]
    b[0, 0, :] = [1, 2, 2, 0]
    c[0, 0, :] = [2, 2, 3, 1]  # voxel 3 is a three-way tie (3, 0, 1)
    return grid, [grid.with_array(x) for x in (a, b, c)]


def test_vote_is_the_majority_and_ties_go_to_the_first():
    grid, maps = _maps()
    fused = fuse_labels(maps, "vote")
    assert fused.same_grid(grid)
    assert list(fused.array[0, 0]) == [1, 2, 2, 3]
    assert not fused.array[1].any()
    # order matters only for ties
    assert list(fuse_labels(maps[::-1], "vote").array[0, 0]) == [1, 2, 2, 1]


def test_staple_agrees_with_a_clear_majority():
    grid, maps = _maps()
    fused = fuse_labels(maps, "staple")
    assert fused.same_grid(grid)
    assert list(fused.array[0, 0, :3]) == [1, 2, 2]
    assert not fused.array[1].any()
    # voxel 3 is a three-way tie STAPLE leaves undecided: the wrapper gives it the first map's label, never the
    # "undecided" value (here 4, a label no map has)
    assert fused.array[0, 0, 3] == 3
    assert fuse_labels(maps[::-1], "staple").array[0, 0, 3] == 1


def test_mean_fusion_sums_probabilities():
    grid, maps = _maps()
    shape = grid.array.shape
    p1 = {1: np.full(shape, 0.6, np.float32), 2: np.full(shape, 0.3, np.float32)}
    p2 = {1: np.full(shape, 0.1, np.float32), 2: np.full(shape, 0.5, np.float32)}
    p3 = {1: np.full(shape, 0.2, np.float32), 2: np.full(shape, 0.4, np.float32)}
    fused = fuse_labels(maps, "mean", probabilities=[p1, p2, p3])
    assert np.all(fused.array == 2)  # mean 0.3 vs 0.4 vs background 0.3
    with pytest.raises(InputError):
        fuse_labels(maps, "mean")


def test_segment_by_registration_picks_the_similar_references(synthetic):
    (ref_image, ref_label), (tgt_image, tgt_label), _ = synthetic
    rng = np.random.default_rng(1)
    unrelated = ref_image.with_array(rng.integers(0, 1000, ref_image.array.shape).astype(np.int16))
    references = [(unrelated, ref_label), (ref_image, ref_label), (ref_image, ref_label)]
    messages = []
    label, info = segment_by_registration(
        references, tgt_image, method="affine", top_k=2, progress=messages.append
    )
    assert_on_grid(label, tgt_image)
    assert sorted(info["chosen"]) == [1, 2]
    assert info["similarity"][0] < min(info["similarity"][1:])
    assert np.mean([dice(label.array, tgt_label.array, v) for v in (1, 2, 3)]) > 0.85
    fractions = [event.fraction for event in messages]
    assert {event.phase for event in messages} == {"register"}
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and messages[-1].message == "done"
    # ranking by image similarity alone also leaves the unrelated reference out
    _, info = segment_by_registration(references, tgt_image, method="located", top_k=2, select="similarity")
    assert sorted(info["chosen"]) == [1, 2]


def test_keep_largest_component():
    array = np.zeros((4, 10, 10), np.int32)
    array[1:3, 1:5, 1:5] = 1      # 32 voxels
    array[1, 8, 8] = 1            # a speck
    array[2:4, 6:9, 1:3] = 2
    array[0, 0, 9] = 2
    volume = Volume.from_geometry(array, (1, 1, 3), (0, 0, 0), oblique())
    cleaned = keep_largest_component(volume)
    assert cleaned.same_grid(volume)
    assert (cleaned.array == 1).sum() == 32 and cleaned.array[1, 8, 8] == 0
    assert (cleaned.array == 2).sum() == 12 and cleaned.array[0, 0, 9] == 0
    assert keep_largest_component(volume, values=[2]).array[1, 8, 8] == 1


# ---------------------------------------------------------------------------------------------
# (d) cancel, (e) inputs unchanged
# ---------------------------------------------------------------------------------------------
class CancelAfter:
    def __init__(self, calls):
        self.calls = calls

    def is_set(self):
        self.calls -= 1
        return self.calls < 0


def test_cancel_raises(synthetic):
    (ref_image, ref_label), (tgt_image, _), _ = synthetic
    with pytest.raises(Cancelled):
        register_case(ref_image, ref_label, tgt_image, method="deformable", cancel=CancelAfter(0))
    with pytest.raises(Cancelled):  # between stages, after the search
        register_case(ref_image, ref_label, tgt_image, method="deformable", cancel=CancelAfter(1))
    with pytest.raises(Cancelled):
        segment_by_registration([(ref_image, ref_label)] * 2, tgt_image, method="copy", cancel=CancelAfter(3))


def test_inputs_are_unchanged(synthetic):
    (ref_image, ref_label), (tgt_image, _), _ = synthetic
    before = [(v.array.copy(), v.ijk_to_lps.copy()) for v in (ref_image, ref_label, tgt_image)]
    register_case(ref_image, ref_label, tgt_image, method="deformable")
    fuse_labels([ref_label, ref_label, ref_label], "staple")
    keep_largest_component(ref_label)
    for (array, matrix), volume in zip(before, (ref_image, ref_label, tgt_image)):
        assert np.array_equal(array, volume.array) and array.dtype == volume.array.dtype
        assert np.array_equal(matrix, volume.ijk_to_lps)

"""Atlas-prior intensity refinement: borders move to the target's contrast; geometry and inputs untouched."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from proxyprompt.filters import largest_component
from proxyprompt.intensity import DEFAULT_INTENSITY_SETTINGS, refine_by_intensity
from proxyprompt.volume import Volume


def _oblique():
    angle = np.deg2rad(25.0)
    rotation_z = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    rotation_x = np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
    return rotation_z @ rotation_x


def _disc_phantom(centre_ji, cavity_radius, wall_radius, shape=(8, 72, 72)):
    """Label stack: 3 = bright cavity disc, 2 = darker ring around it, on every slice except the first/last."""
    j, i = np.mgrid[: shape[1], : shape[2]]
    radius = np.hypot(j - centre_ji[0], i - centre_ji[1])
    label = np.zeros(shape, dtype=np.int32)
    label[1:-1][:, radius <= wall_radius] = 2
    label[1:-1][:, radius <= cavity_radius] = 3
    return label


def _image_of(label, rng):
    intensity = np.choose(label, [0.15, 0.0, 0.45, 0.9]).astype(np.float32)
    return intensity + rng.normal(0, 0.05, label.shape).astype(np.float32)


def _dice(a, b):
    from proxyprompt.metrics import dice

    return dice(a, b)


def test_refinement_moves_a_misregistered_prior_onto_the_target_structures():
    rng = np.random.default_rng(0)
    truth = _disc_phantom((36, 36), cavity_radius=14, wall_radius=19)
    # the "registered" prior: 2 voxels (2.8 mm) off and too small, as a one-reference registration often is
    prior = _disc_phantom((38, 35), cavity_radius=12, wall_radius=16)
    target = Volume.from_geometry(_image_of(truth, rng) * 400 + 50, (1.4, 1.4, 8.0), (-20.0, 31.0, 7.5), _oblique())
    probabilities = {v: (prior == v).astype(np.float32) for v in (2, 3)}
    before = {v: p.copy() for v, p in probabilities.items()}
    image_before = target.array.copy()

    label, posteriors = refine_by_intensity(target, probabilities)

    assert label.shape == target.array.shape and label.dtype == np.int32
    assert set(np.unique(label)) <= {0, 2, 3}
    for value in (2, 3):
        prior_dice = _dice(prior == value, truth == value)
        refined_dice = _dice(label == value, truth == value)
        assert refined_dice > prior_dice + 0.1, (value, prior_dice, refined_dice)
        assert refined_dice > 0.9, (value, refined_dice)
        assert posteriors[value].shape == label.shape
        assert posteriors[value].min() >= 0 and posteriors[value].max() <= 1
    assert np.all(posteriors[2] + posteriors[3] <= 1 + 1e-5)
    # inputs are never modified
    np.testing.assert_array_equal(target.array, image_before)
    for value in (2, 3):
        np.testing.assert_array_equal(probabilities[value], before[value])


def test_refinement_is_independent_of_the_intensity_scale():
    rng = np.random.default_rng(1)
    truth = _disc_phantom((30, 40), cavity_radius=12, wall_radius=17)
    prior = _disc_phantom((32, 38), cavity_radius=10, wall_radius=14)
    image = _image_of(truth, rng)
    probabilities = {v: (prior == v).astype(np.float32) for v in (2, 3)}
    grid = dict(spacing=(1.25, 1.25, 10.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    a, _ = refine_by_intensity(Volume.from_geometry(image, **grid), probabilities)
    b, _ = refine_by_intensity(Volume.from_geometry(image * 1000.0 - 300.0, **grid), probabilities)
    np.testing.assert_array_equal(a, b)


def test_empty_prior_gives_background_and_wrong_grid_is_refused():
    target = Volume.from_geometry(np.zeros((4, 8, 8), np.float32), (1.0, 1.0, 5.0), (0, 0, 0), np.eye(3))
    label, posteriors = refine_by_intensity(target, {1: np.zeros((4, 8, 8), np.float32)})
    assert not label.any() and not posteriors[1].any()
    label, posteriors = refine_by_intensity(target, {})
    assert label.shape == (4, 8, 8) and not label.any() and posteriors == {}
    with pytest.raises(ValueError, match="not on the target grid"):
        refine_by_intensity(target, {1: np.zeros((4, 8, 9), np.float32)})


def test_largest_component_keeps_the_biggest_piece():
    mask = np.zeros((3, 6, 6), bool)
    mask[0, :2, :2] = True
    mask[2, 3:, 3:] = True
    kept = largest_component(mask)
    assert kept.sum() == 9 and kept[2, 3:, 3:].all()


def test_registration_generator_uses_the_intensity_stage_without_a_model_and_for_a_memory_less_one():
    from types import SimpleNamespace

    from proxyprompt.contract import ModelCapabilities
    from proxyprompt.generators.registration import default_registration_method

    assert default_registration_method(None) == "intensity"
    # a memory-less model (LiteMedSAM) is prompted from the intensity stage's labels, a model with memory (SAM 2) from
    # the deformable ones (docs/benchmarks.md, session 8)
    assert default_registration_method(SimpleNamespace(capabilities=ModelCapabilities(memory=False))) == "intensity"
    assert default_registration_method(SimpleNamespace(capabilities=ModelCapabilities(memory=True))) == "deformable"
    assert default_registration_method(object()) == "deformable"  # unknown capabilities: as before


def test_refit_recovers_slices_the_registration_left_out_along_the_thick_axis():
    """Prior 3 slices long where the structures span 8: the re-fit stretches it along the slice axis.

    The thick axis is the array's j axis (not k) and the grid is oblique, so a rule that assumed the
    slowest axis, or index = physical, would stretch the wrong way."""
    rng = np.random.default_rng(2)
    k, i = np.mgrid[:40, :40]
    radius = np.hypot(k - 20, i - 20)

    def stack(first, last):
        label = np.zeros((40, 12, 40), np.int32)  # (k, j, i), slices along j
        for j in range(first, last + 1):
            label[:, j][radius <= 12] = 2
            label[:, j][radius <= 8] = 3
        return label

    truth, prior = stack(2, 9), stack(5, 7)
    target = Volume.from_geometry(_image_of(truth, rng) * 300, (1.5, 8.0, 1.5), (4.0, -9.0, 2.0), _oblique())
    probabilities = {v: (prior == v).astype(np.float32) for v in (2, 3)}

    without, _ = refine_by_intensity(target, probabilities, replace(DEFAULT_INTENSITY_SETTINGS, refit_rounds=0))
    refitted, _ = refine_by_intensity(target, probabilities)

    for value in (2, 3):
        dice_without = _dice(without == value, truth == value)
        dice_refitted = _dice(refitted == value, truth == value)
        assert dice_refitted > dice_without + 0.05, (value, dice_without, dice_refitted)
        assert dice_refitted > 0.9, (value, dice_refitted)
    assert not refitted[:, [0, 1, 10, 11]].any()  # stretched to the structures, not beyond them


def test_refit_never_moves_a_soft_one_slice_prior_into_nothing():
    """Two labels at 0.3 each on one slice (union 0.6); the EM's structures span that slice and the next: a
    half-slice move with linear interpolation would leave 0.4 everywhere, below the 0.5 that defines the
    structures, and the final EM would have no region. The priors stay as they were instead."""
    from proxyprompt.intensity import _refit_along_slices

    j, i = np.mgrid[:20, :20]
    disc = np.hypot(j - 10, i - 10) <= 5
    priors = np.zeros((2, 6, 20, 20), np.float32)
    priors[:, 2][:, disc] = 0.3
    found = np.zeros((6, 20, 20), bool)
    found[2:4][:, disc] = True
    moved = _refit_along_slices(priors, found, (1.5, 1.5, 9.0), 0, DEFAULT_INTENSITY_SETTINGS)
    np.testing.assert_array_equal(moved, priors)
    # with a firm prior the same move happens (the guard is not a blanket no-op)
    firm = priors * 3.0
    moved = _refit_along_slices(firm, found, (1.5, 1.5, 9.0), 0, DEFAULT_INTENSITY_SETTINGS)
    assert (moved.sum(axis=0) >= 0.5)[3].any() and not np.array_equal(moved, firm)

"""Sparse references (issue 16, item 3): unannotated slices are unknown, never background."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from proxyprompt.generators.base import ReferenceCase
from proxyprompt.pipeline import Engine
from proxyprompt.registration import RegisteredCase, fuse_registered
from proxyprompt.sparse import annotated_slices, densify, is_sparse, prepare_reference
from proxyprompt.volume import Volume, read_image, read_label

ACDC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "acdc"


def _disc_stack(radii, spacing=(1.0, 1.0, 4.0)):
    """A label stack along k: slice n holds a disc of radius radii[n] (0 = empty) labelled 1."""
    j, i = np.mgrid[:32, :32]
    array = np.zeros((len(radii), 32, 32), dtype=np.uint8)
    for n, radius in enumerate(radii):
        if radius:
            array[n][(i - 16) ** 2 + (j - 16) ** 2 <= radius ** 2] = 1
    return Volume.from_geometry(array, spacing, (0.0, 0.0, 0.0))


def test_densify_interpolates_between_annotated_slices_and_marks_the_rest_unknown():
    full = _disc_stack([0, 4, 6, 8, 10, 8, 6, 0])
    sparse = full.with_array(np.where(np.isin(np.arange(8), [1, 4, 6])[:, None, None], full.array, 0).astype(np.uint8))
    axis, found = annotated_slices(sparse)
    assert axis == 0 and found == [1, 4, 6] and is_sparse(sparse, found, axis)
    dense, known = densify(sparse, found, axis)
    for n in (1, 4, 6):
        assert np.array_equal(dense.array[n], sparse.array[n])  # annotated slices are kept exactly
    areas = dense.array.reshape(8, -1).sum(axis=1)
    assert areas[1] < areas[2] < areas[3] < areas[4] and areas[4] > areas[5] > areas[6]  # shape-interpolated
    assert known.array[:, 0, 0].tolist() == [1, 1, 1, 1, 1, 1, 1, 1]  # annotated range + half a gap (1.5 -> 1)
    assert 0 < dense.array[0].sum() < sparse.array[1].sum() and 0 < dense.array[7].sum() < sparse.array[6].sum()
    assert np.array_equal(sparse.array, full.with_array(sparse.array).array)  # input untouched
    # a dense reference passes through unchanged
    label, mask, note = prepare_reference(full)
    assert label is full and mask is None and note == ""


def _case(label_array, known=None):
    volume = Volume.from_geometry(label_array.astype(np.uint8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    case = RegisteredCase(volume, {1: (label_array == 1).astype(np.float32)}, 0.5, 0.0)
    if known is not None:
        case.info["known"] = known.astype(np.float32)
    return case


def test_unknown_voxels_cast_no_vote_in_the_fusion():
    shape = (4, 8, 8)
    says_one = np.ones(shape, dtype=np.uint8)
    says_nothing = np.zeros(shape, dtype=np.uint8)
    unknown_in_top = np.ones(shape)
    unknown_in_top[2:] = 0  # slices 2-3 unknown to the sparse references
    results = [_case(says_one), _case(says_nothing, unknown_in_top), _case(says_nothing, unknown_in_top)]
    fused, _ = fuse_registered(results, top_k=None, cleanup=False)
    assert (fused.array[2:] == 1).all()  # only the dense reference knows there: its label stands
    assert (fused.array[:2] == 0).all()  # where all three know, the majority (background) wins
    # without the known masks, the two empty maps would out-vote it everywhere
    plain, _ = fuse_registered([_case(says_one), _case(says_nothing), _case(says_nothing)], top_k=None, cleanup=False)
    assert (plain.array == 0).all()


def test_a_sparse_reference_segments_the_slices_between_its_annotations():
    if not (ACDC / "labels.json").is_file():
        pytest.skip("shared ACDC data not found")
    image = read_image(ACDC / "patient002_ED_image.nii.gz")
    label, table = read_label(ACDC / "patient002_ED_label.nii.gz")
    target = read_image(ACDC / "patient001_ED_image.nii.gz")
    axis, found = annotated_slices(label)
    keep = [found[1], found[len(found) // 2], found[-2]]
    sparse = label.with_array(np.where(np.isin(np.arange(label.array.shape[0]), keep)[:, None, None],
                                       label.array, 0).astype(label.array.dtype))
    result = Engine("none").segment([ReferenceCase(image, sparse, table)], target, generator="registration")
    assert any("sparse reference: 3 annotated slice(s)" in note for note in result.info["notes"])
    assert result.label.same_grid(target)
    present = np.flatnonzero(result.label.array.reshape(result.label.array.shape[0], -1).any(axis=1))
    assert len(present) > 3  # the slices between the annotations were segmented too


def test_the_command_line_passes_the_annotated_slices_to_the_engine():
    from proxyprompt.cli import build_parser, request_from_args

    args = build_parser().parse_args(["segment", "--reference-image", "r.nii.gz", "--reference-label", "l.nii.gz",
                                      "--target", "t.nii.gz", "--output", "o.nii.gz", "--annotated-slices", "2,5,8"])
    assert request_from_args(args).annotated_slices == [2, 5, 8]

"""Geometry-true I/O: every format round-trips array and geometry; LPS/RAS conversion; label tables."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import oblique_direction
from proxyprompt.cases import label_on_image_grid, load_reference_case
from proxyprompt.errors import InputError
from proxyprompt.frames import from_slices, make_slice_stack, to_slices
from proxyprompt.volume import (
    LabelInfo,
    Volume,
    lps_ras_flip,
    read_image,
    read_label,
    read_label_table,
    write_image,
    write_label,
)


def _label_volume(direction=None, spacing=(0.8, 1.1, 4.0), origin=(12.5, -40.0, 7.25)):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 4, size=(5, 7, 9)).astype(np.uint8)
    return Volume.from_geometry(array, spacing, origin, oblique_direction() if direction is None else direction)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha"])
def test_label_round_trip_keeps_array_and_oblique_geometry(tmp_path, suffix):
    volume = _label_volume()
    table = {1: LabelInfo("right ventricle", (1.0, 0.0, 0.0)), 2: LabelInfo("myocardium", (0.0, 1.0, 0.0)),
             3: LabelInfo("left ventricle", (0.0, 0.0, 1.0))}
    path = tmp_path / f"label{suffix}"
    write_label(volume, table, path)
    again, again_table = read_label(path)
    assert np.array_equal(again.array, volume.array)
    assert np.allclose(again.ijk_to_lps, volume.ijk_to_lps, atol=1e-5)
    if suffix == ".seg.nrrd":  # names and colours travel with .seg.nrrd
        assert again_table == table
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary file may be left behind"


def test_image_round_trip_keeps_intensities(tmp_path):
    array = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7) - 50
    volume = Volume.from_geometry(array, (0.7, 0.7, 3.0), (1, 2, 3), oblique_direction(40, -20))
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        again = read_image(write_image(volume, tmp_path / f"image{suffix}"))
        assert again.array.dtype == np.int16 and np.array_equal(again.array, array)
        assert again.same_grid(volume)


def test_volume_arrays_are_read_only():
    volume = _label_volume()
    with pytest.raises(ValueError):
        volume.array[0, 0, 0] = 9


def test_sitk_bridge_maps_index_to_the_same_physical_point():
    volume = _label_volume()
    image = volume.to_sitk()
    for ijk in [(0, 0, 0), (8, 6, 4), (3, 2, 1)]:
        expected = volume.ijk_to_lps @ np.array([*ijk, 1.0])
        assert np.allclose(image.TransformIndexToPhysicalPoint(ijk), expected[:3])


@settings(max_examples=40, deadline=None)
@given(
    angles=st.tuples(st.floats(-180, 180), st.floats(-89, 89)),
    spacing=st.tuples(*[st.floats(0.1, 10.0)] * 3),
    origin=st.tuples(*[st.floats(-500, 500)] * 3),
)
def test_ras_and_lps_matrices_agree_for_any_geometry(angles, spacing, origin):
    volume = Volume.from_geometry(np.zeros((2, 3, 4)), spacing, origin, oblique_direction(*angles))
    assert np.allclose(lps_ras_flip(volume.ijk_to_ras), volume.ijk_to_lps)  # the flip is its own inverse
    from_slicer = Volume.from_ijk_to_ras(volume.array, volume.ijk_to_ras)
    assert from_slicer.same_grid(volume)
    assert np.allclose(from_slicer.spacing, spacing, rtol=1e-9)
    point = volume.ijk_to_ras @ np.array([1.0, 2.0, 1.0, 1.0])
    lps = volume.ijk_to_lps @ np.array([1.0, 2.0, 1.0, 1.0])
    assert np.allclose(point[:3], [-lps[0], -lps[1], lps[2]])


@settings(max_examples=25, deadline=None)
@given(axis=st.integers(0, 2), shape=st.tuples(*[st.integers(1, 6)] * 3))
def test_slices_round_trip_along_any_axis(axis, shape):
    array = np.arange(np.prod(shape)).reshape(shape)
    assert np.array_equal(from_slices(to_slices(array, axis), axis), array)


def test_slice_axis_is_the_largest_spacing_and_windowing_leaves_input_alone():
    array = np.random.default_rng(1).normal(100, 30, size=(6, 5, 4)).astype(np.float32)
    volume = Volume.from_geometry(array, (1.0, 6.0, 1.0), (0, 0, 0))  # j (array axis 1) is the thick axis
    before = volume.array.copy()
    stack = make_slice_stack(volume)
    assert stack.axis == 1 and stack.images.shape == (5, 6, 4)
    assert 0.0 <= stack.images.min() and stack.images.max() <= 1.0
    assert np.array_equal(volume.array, before)
    assert stack.to_volume(np.zeros(stack.images.shape)).same_grid(volume)


def test_label_tables_from_json_and_colour_table(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"1": "liver", "2": {"name": "spleen", "color": [255, 0, 0]}}))
    table = read_label_table(tmp_path / "t.json")
    assert table[1].name == "liver" and table[2] == LabelInfo("spleen", (1.0, 0.0, 0.0))
    (tmp_path / "t.ctbl").write_text("# Slicer colour table\n0 Background 0 0 0 0\n5 kidney 0 128 255 255\n")
    assert read_label_table(tmp_path / "t.ctbl") == {5: LabelInfo("kidney", (0.0, 128 / 255, 1.0))}
    (tmp_path / "bad.json").write_text("{\"x\": 1}")
    with pytest.raises(InputError):
        read_label_table(tmp_path / "bad.json")


def test_cropped_seg_nrrd_is_padded_back_onto_the_image_grid(tmp_path):
    image = Volume.from_geometry(np.zeros((6, 8, 10), np.int16), (0.9, 0.9, 5.0), (3, 4, 5), oblique_direction())
    full = np.zeros((6, 8, 10), np.uint8)
    full[2:4, 3:6, 4:8] = 2
    # Slicer writes segmentations cropped to their extent: a sub-grid with a shifted origin.
    crop = full[2:4, 3:6, 4:8]
    crop_origin = image.ijk_to_lps @ np.array([4, 3, 2, 1.0])
    cropped = Volume.from_geometry(crop, image.spacing, crop_origin[:3], image.direction)
    padded = label_on_image_grid(cropped, image)
    assert padded.same_grid(image) and np.array_equal(padded.array, full)
    shifted = Volume.from_geometry(crop, image.spacing, crop_origin[:3] + 0.37, image.direction)
    with pytest.raises(InputError, match="does not match"):
        label_on_image_grid(shifted, image)


def test_reference_case_loading_rejects_mismatch_and_empty(tmp_path):
    image = Volume.from_geometry(np.arange(120, dtype=np.int16).reshape(4, 5, 6), (1, 1, 3), (0, 0, 0))
    write_image(image, tmp_path / "image.nii.gz")
    write_label(Volume.from_geometry(np.ones((4, 5, 7), np.uint8), (1, 1, 3), (0, 0, 0)), {}, tmp_path / "wide.nii.gz")
    write_label(image.with_array(np.zeros((4, 5, 6), np.uint8)), {}, tmp_path / "empty.nii.gz")
    with pytest.raises(InputError, match="does not match"):
        load_reference_case(tmp_path / "image.nii.gz", tmp_path / "wide.nii.gz")
    with pytest.raises(InputError, match="empty"):
        load_reference_case(tmp_path / "image.nii.gz", tmp_path / "empty.nii.gz")


def test_2d_4d_and_broken_files_are_refused(tmp_path):
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(tmp_path / "flat.nii.gz"))
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkInt16), str(tmp_path / "cine.nii.gz"))
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="2D"):
        read_image(tmp_path / "flat.nii.gz")
    with pytest.raises(InputError, match="4D"):
        read_image(tmp_path / "cine.nii.gz")
    with pytest.raises(InputError, match="cannot read"):
        read_image(tmp_path / "broken.nii.gz")
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "missing.nii.gz")


def test_oversized_volume_is_refused_from_its_header(tmp_path):
    header = tmp_path / "huge.mhd"  # a MetaImage header; its data file is never opened
    header.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4096 4096 2048\nElementSpacing = 1 1 1\n"
        "ElementType = MET_SHORT\nElementDataFile = huge.raw\n"
    )
    with pytest.raises(InputError, match="more than the limit"):
        read_image(header)


def test_dicom_series_folder_is_read_with_its_geometry(tmp_path):
    array = (np.arange(4 * 6 * 5).reshape(4, 6, 5) % 300).astype(np.int16)
    volume = Volume.from_geometry(array, (0.8, 0.8, 2.5), (10.0, 20.0, 30.0))
    image = volume.to_sitk()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in [("0008|0060", "MR"), ("0020|000d", "1.2.3"), ("0020|000e", "1.2.3.4"),
                           ("0020|0032", "\\".join(map(str, position))), ("0020|0013", str(k + 1)),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "0.8\\0.8"), ("0018|0050", "2.5")]:
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(slice_image)
    again = read_image(tmp_path)
    assert np.array_equal(again.array, array)
    assert np.allclose(again.spacing, (0.8, 0.8, 2.5)) and np.allclose(again.origin, (10, 20, 30))


def test_real_acdc_volume_and_its_label_table(acdc):
    image = read_image(acdc / "patient001_ED_image.nii.gz")
    label, table = read_label(acdc / "patient001_ED_label.nii.gz")
    assert label.same_grid(image)
    assert {v: info.name for v, info in table.items()} == {1: "right ventricle", 2: "myocardium", 3: "left ventricle"}


def test_one_slice_axis_rule_and_one_windowing_rule_for_frames_and_registration():
    from proxyprompt import registration
    from proxyprompt.frames import choose_slice_axis, slice_axis_of_spacing, window_intensities

    assert slice_axis_of_spacing((1.0, 1.0, 1.0)) == 2  # ties go to k
    assert slice_axis_of_spacing((5.0, 1.0, 4.999)) == 2  # within 0.1 %: a tie
    assert slice_axis_of_spacing((5.0, 1.0, 4.9)) == 0
    volume = Volume.from_geometry(np.zeros((3, 4, 5), np.float32), (5.0, 1.0, 4.999), (0, 0, 0))
    assert choose_slice_axis(volume) == 0  # array axis of k
    assert registration._slice_axis(volume.to_sitk()) == 2  # index axis of k: the same choice
    # a volume whose robust range is empty (a few outliers on a constant background) windows to 0 in both places
    array = np.full((4, 10, 10), 7.0, np.float32)
    array[0, 0, 0] = 1000.0
    constant = Volume.from_geometry(array, (1.0, 1.0, 1.0), (0, 0, 0))
    assert not window_intensities(array).any()
    import SimpleITK as sitk

    assert not sitk.GetArrayFromImage(registration._normalised(constant)).any()

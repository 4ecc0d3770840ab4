"""Loading a reference case: image + label map on the image's grid + label table."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .errors import InputError
from .generators.base import ReferenceCase
from .integrity import check_intensities
from .volume import GRID_TOLERANCE, Volume, read_image, read_label


def label_on_image_grid(label: Volume, image: Volume, label_name: str = "label") -> Volume:
    """The label map on the image's grid.

    Identical grids pass through. Slicer writes ``.seg.nrrd`` files cropped to the segments' extent:
    a label on a sub-grid of the image (same spacing and direction, integer voxel offset) is padded
    back losslessly. Anything else is a mismatch, reported with both grids.
    """
    if label.same_grid(image):
        return label
    same_axes = np.allclose(label.ijk_to_lps[:3, :3], image.ijk_to_lps[:3, :3], atol=GRID_TOLERANCE)
    if same_axes:
        offset = np.linalg.solve(image.ijk_to_lps[:3, :3], label.ijk_to_lps[:3, 3] - image.ijk_to_lps[:3, 3])
        offset_ijk = np.round(offset).astype(int)
        if np.allclose(offset, offset_ijk, atol=1e-3):
            start_kji = offset_ijk[::-1]
            stop_kji = start_kji + np.asarray(label.array.shape)
            if np.all(start_kji >= 0) and np.all(stop_kji <= np.asarray(image.array.shape)):
                padded = np.zeros(image.array.shape, dtype=label.array.dtype)
                padded[start_kji[0]:stop_kji[0], start_kji[1]:stop_kji[1], start_kji[2]:stop_kji[2]] = label.array
                return image.with_array(padded)
    raise InputError(
        f"{label_name} does not match its image: label {label.describe_grid()}, image {image.describe_grid()}"
    )


def load_reference_case(image_path, label_path, label_table_path: Optional[str] = None,
                        annotated_slices: Optional[Sequence[int]] = None) -> ReferenceCase:
    """The reference case from files; `annotated_slices` marks a sparse reference (the other slices are unknown)."""
    image = read_image(image_path)
    check_intensities(image.array, f"reference image {image_path}")
    label, table = read_label(label_path, label_table_path)
    label = label_on_image_grid(label, image, f"reference label {label_path}")
    if not np.any(label.array):
        raise InputError(f"reference label {label_path} is empty: nothing to segment")
    annotated = None if annotated_slices is None else tuple(sorted({int(n) for n in annotated_slices}))
    return ReferenceCase(image=image, label=label, table=table, annotated_slices=annotated)

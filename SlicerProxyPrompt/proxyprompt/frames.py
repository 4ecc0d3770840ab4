"""Frames: a volume seen as a stack of 2D slices, the way the models read it.

The slicing axis defaults to the acquisition axis (the array axis with the largest spacing). Intensities
are windowed on a copy with one rule per volume (robust percentiles), the same rule for reference and
target, so that slices keep their relative brightness (no per-slice min-max). Frames keep the native
in-plane resolution; each model resizes them to its own input size and gives results back at this size,
so mapping a result back to the volume is a transpose and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np

from .errors import InputError
from .volume import Volume

WINDOW_PERCENTILES = (0.5, 99.5)


def slice_axis_of_spacing(spacing_xyz, candidates=(0, 1, 2)) -> int:
    """Index axis (0 = i, 1 = j, 2 = k), among `candidates`, with the largest spacing; spacings within 0.1 % of the
    largest tie, and ties go to the slowest axis (k). The one slice-axis rule (frames and registration)."""
    spacing = np.asarray(spacing_xyz, dtype=float)
    candidates = list(candidates)
    largest = max(spacing[axis] for axis in candidates)
    return int(max(axis for axis in candidates if spacing[axis] >= largest * 0.999))


# A slice narrower than this (pixels) is not an image a model can read: a one-slice target cut across is
# a stack of one-pixel lines. (Small on purpose: small crops such as MSD hippocampus stay sliceable.)
MIN_SLICE_SIDE = 4


def _slice_shape(volume: Volume, axis: int) -> Tuple[int, int]:
    shape = volume.array.shape
    return tuple(int(shape[a]) for a in range(3) if a != axis)


def choose_slice_axis(volume: Volume) -> int:
    """Array axis (0 = k, 1 = j, 2 = i) chosen by `slice_axis_of_spacing`'s rule (largest spacing, 0.1 % ties to k)
    among the axes whose slices are at least MIN_SLICE_SIDE pixels on each side."""
    usable = [axis for axis in range(3) if min(_slice_shape(volume, axis)) >= MIN_SLICE_SIDE]
    if not usable:
        raise InputError(
            f"the volume ({' x '.join(map(str, volume.size))} voxels) is too small to slice: every slicing axis "
            f"gives slices under {MIN_SLICE_SIDE} pixels on a side"
        )
    return 2 - slice_axis_of_spacing(volume.spacing, [2 - axis for axis in usable])  # array axis <-> index axis


def check_slice_axis(volume: Volume, axis: int) -> None:
    """InputError when slicing along `axis` gives slices too small to segment."""
    if axis not in (0, 1, 2):
        raise InputError(f"slice axis must be 0, 1 or 2 (array axes k, j, i), got {axis}")
    if min(_slice_shape(volume, axis)) < MIN_SLICE_SIDE:
        raise InputError(
            f"slicing axis {axis} of a {' x '.join(map(str, volume.size))}-voxel volume gives "
            f"{' x '.join(map(str, _slice_shape(volume, axis)))}-pixel slices (at least {MIN_SLICE_SIDE} needed); "
            f"choose another --slice-axis"
        )


def window_intensities(array: np.ndarray, percentiles: Tuple[float, float] = WINDOW_PERCENTILES) -> np.ndarray:
    """float32 copy scaled to [0, 1] between two volume-wide percentiles (clipped outside); all 0 when the two
    percentiles are equal (no contrast to window). The one windowing rule (frames and registration)."""
    values = np.asarray(array, dtype=np.float32)
    low, high = np.percentile(values, percentiles)
    if not np.isfinite(low) or not np.isfinite(high):
        raise InputError("the image holds non-finite intensities")
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


def to_slices(array_kji: np.ndarray, axis: int) -> np.ndarray:
    """[k, j, i] array -> [N, H, W] with the slicing axis first (a view when possible)."""
    return np.moveaxis(np.asarray(array_kji), axis, 0)


def from_slices(stack_nhw: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of `to_slices`: [N, H, W] -> [k, j, i] (contiguous copy)."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(stack_nhw), 0, axis))


@dataclass(frozen=True, eq=False)
class SliceStack:
    """A volume's windowed slices along one axis.

    images: [N, H, W] float32 in [0, 1]; slice n is index n along `axis` of the volume's [k, j, i] array.
    pixel_spacing: (row, column) spacing in mm of a slice; slice_spacing: mm between slices.
    """

    images: np.ndarray
    axis: int
    pixel_spacing: Tuple[float, float]
    slice_spacing: float
    volume: Volume = field(repr=False)

    @property
    def num_slices(self) -> int:
        return int(self.images.shape[0])

    @property
    def height(self) -> int:
        return int(self.images.shape[1])

    @property
    def width(self) -> int:
        return int(self.images.shape[2])

    def fingerprint(self) -> str:
        """Identifies the stack's content and geometry: cache key for image features (hashed once per stack)."""
        import hashlib

        cached = self.__dict__.get("_fingerprint")
        if cached is not None:
            return cached
        digest = hashlib.sha1()
        digest.update(np.ascontiguousarray(self.images).tobytes())
        digest.update(np.asarray(self.volume.ijk_to_lps).tobytes())
        digest.update(str(self.axis).encode())
        self.__dict__["_fingerprint"] = digest.hexdigest()  # frozen dataclass: store beside the fields
        return self.__dict__["_fingerprint"]

    def labels(self, label_volume: Volume) -> np.ndarray:
        """A label volume on the same grid, sliced the same way: [N, H, W]."""
        if not label_volume.same_grid(self.volume):
            raise InputError("label volume is not on the image's grid")
        return to_slices(label_volume.array, self.axis)

    def to_volume(self, stack_nhw: np.ndarray) -> Volume:
        """[N, H, W] result -> a Volume on the exact grid of the sliced volume."""
        if stack_nhw.shape != self.images.shape:
            raise ValueError(f"stack shape {stack_nhw.shape} != frames shape {self.images.shape}")
        return self.volume.with_array(from_slices(stack_nhw, self.axis))


def make_slice_stack(
    volume: Volume,
    axis: Optional[int] = None,
    percentiles: Tuple[float, float] = WINDOW_PERCENTILES,
) -> SliceStack:
    axis = choose_slice_axis(volume) if axis is None else int(axis)
    check_slice_axis(volume, axis)
    windowed = window_intensities(volume.array, percentiles)
    images = np.ascontiguousarray(to_slices(windowed, axis))
    spacing_kji = volume.spacing[::-1]
    in_plane = [spacing_kji[a] for a in range(3) if a != axis]
    return SliceStack(images, axis, (float(in_plane[0]), float(in_plane[1])), float(spacing_kji[axis]), volume)


def relative_positions(mask_stack: np.ndarray) -> np.ndarray:
    """Per slice, its position within the structure's slice extent: 0 at the first slice holding the
    structure, 1 at the last (NaN where the stack holds no structure). Used to match slices between
    cases of different lengths."""
    present = np.flatnonzero(np.asarray(mask_stack).reshape(mask_stack.shape[0], -1).any(axis=1))
    positions = np.full(mask_stack.shape[0], np.nan)
    if present.size == 0:
        return positions
    first, last = present[0], present[-1]
    span = max(last - first, 1)
    positions[:] = (np.arange(mask_stack.shape[0]) - first) / span
    return positions


def bounding_box(mask_hw: np.ndarray, margin: int = 0) -> Optional[np.ndarray]:
    """[x0, y0, x1, y1] pixel box of a 2D mask (inclusive corners), clipped to the image; None if empty."""
    rows = np.flatnonzero(mask_hw.any(axis=1))
    cols = np.flatnonzero(mask_hw.any(axis=0))
    if rows.size == 0:
        return None
    height, width = mask_hw.shape
    return np.array(
        [
            max(cols[0] - margin, 0),
            max(rows[0] - margin, 0),
            min(cols[-1] + margin, width - 1),
            min(rows[-1] + margin, height - 1),
        ],
        dtype=np.float32,
    )

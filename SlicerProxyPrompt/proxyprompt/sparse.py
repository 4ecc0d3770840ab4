"""Sparse references: a reference label where only some slices are annotated; the others are unknown, not background.

By default the annotated slices are the slices (along the reference's acquisition axis, `frames.choose_slice_axis`)
that hold any label; the user may name them (``annotated_slices``), e.g. to say that an empty slice was checked and
really is background. A reference whose annotated slices are contiguous and cover its labels is dense: nothing
changes for it.

`densify` fills the unannotated slices between two annotated ones by shape-based interpolation (each label's
in-plane signed distance, linear along the slice axis; Raya & Udupa 1990), carries the end shapes on for half a
gap, and returns the *known* mask: that slab. Beyond it nothing is known. The registration warps the known mask
with the labels, and wherever the warped mask is under 0.5 the reference casts no vote (`registration.fuse_registered`
weighs every reference's soft labels by its known mask), so an unknown slice never counts as background.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .frames import choose_slice_axis
from .volume import Volume


def annotated_slices(label: Volume, axis: Optional[int] = None) -> Tuple[int, List[int]]:
    """(array axis, the indices along it of the slices that hold any label)."""
    axis = choose_slice_axis(label) if axis is None else int(axis)
    array = np.moveaxis(np.asarray(label.array), axis, 0)
    return axis, [int(n) for n in np.flatnonzero(array.reshape(array.shape[0], -1).any(axis=1))]


def is_sparse(label: Volume, annotated: Sequence[int], axis: int) -> bool:
    """True when some slice between the first and last annotated one is not annotated."""
    annotated = sorted(set(int(n) for n in annotated))
    return bool(annotated) and len(annotated) < annotated[-1] - annotated[0] + 1


def _signed_distance_2d(mask: np.ndarray, spacing_rc) -> np.ndarray:
    """In-plane signed distance (mm, negative inside) of a 2D mask; +large when the mask is empty."""
    if not mask.any():
        return np.full(mask.shape, 1e6, dtype=np.float32)
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing((float(spacing_rc[1]), float(spacing_rc[0])))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return sitk.GetArrayFromImage(distance).astype(np.float32)


def _ending_distance(distance: np.ndarray) -> np.ndarray:
    """The signed distance that a label absent from a slice gets when its neighbour has it: a constant equal to
    the neighbour's deepest inside depth, so that the linear interpolation shrinks the shape to nothing halfway."""
    return np.full(distance.shape, max(float(-distance.min()), 0.0), dtype=np.float32)


def densify(label: Volume, annotated: Sequence[int], axis: int) -> Tuple[Volume, Volume]:
    """(label with the unannotated slices filled, known mask as uint8 0/1).

    Annotated slices keep their labels exactly (also their background). Between two annotated slices each label is
    shape-interpolated; a label present on one side only shrinks to nothing halfway. Beyond the first and last
    annotated slice the shapes are carried on for half the mean gap between annotated slices, shrinking the same way
    (a structure rarely ends exactly at an annotated slice). Known = the annotated range plus that extension."""
    array = np.moveaxis(np.asarray(label.array), axis, 0)
    count = array.shape[0]
    annotated = sorted(set(int(n) for n in annotated))
    if not annotated:
        raise InputError("the reference has no annotated slice")
    if annotated[0] < 0 or annotated[-1] >= count:
        raise InputError(f"annotated slices must lie in 0..{count - 1}, got {annotated[0]}..{annotated[-1]}")
    spacing_kji = np.asarray(label.spacing[::-1])
    spacing_rc = np.delete(spacing_kji, axis)
    values = [int(v) for v in np.unique(array[annotated]) if v != 0]
    dense = np.zeros_like(array)
    dense[annotated] = array[annotated]
    distances = {v: {n: _signed_distance_2d(array[n] == v, spacing_rc) for n in annotated} for v in values}
    gap = (annotated[-1] - annotated[0]) / max(len(annotated) - 1, 1) if len(annotated) > 1 else 2.0
    reach = int(np.floor(gap / 2))
    first, last = max(annotated[0] - reach, 0), min(annotated[-1] + reach, count - 1)
    # (lower, upper, virtual position of upper) for every run of unannotated slices to fill
    spans = list(zip(annotated[:-1], annotated[1:], annotated[1:]))
    # the end shapes shrink toward a virtual empty slice 2 * reach + 2 away: to nothing just past the reach
    if first < annotated[0]:
        spans.append((annotated[0], None, annotated[0] - 2 * reach - 2))
    if last > annotated[-1]:
        spans.append((annotated[-1], None, annotated[-1] + 2 * reach + 2))
    for lower, upper, position in spans:
        step = 1 if position > lower else -1
        for n in range(lower + step, position, step):
            if not first <= n <= last or n in annotated:
                continue
            weight = (n - lower) / (position - lower)
            best = np.full(array.shape[1:], 0.0, dtype=np.float32)  # a label wins where its distance is < 0
            for v in values:
                near = distances[v][lower]
                far = distances[v][upper] if upper is not None else _ending_distance(near)
                if not (array[lower] == v).any():  # present on the far side only
                    if upper is None or not (array[upper] == v).any():
                        continue
                    near = _ending_distance(far)
                elif upper is not None and not (array[upper] == v).any():
                    far = _ending_distance(near)
                interpolated = (1 - weight) * near + weight * far
                inside = interpolated < best
                dense[n][inside] = v
                best = np.where(inside, interpolated, best)
    known = np.zeros(array.shape, dtype=np.uint8)
    known[first: last + 1] = 1
    return (label.with_array(np.ascontiguousarray(np.moveaxis(dense, 0, axis))),
            label.with_array(np.ascontiguousarray(np.moveaxis(known, 0, axis))))


def prepare_reference(label: Volume, annotated: Optional[Sequence[int]] = None, axis: Optional[int] = None
                      ) -> Tuple[Volume, Optional[Volume], str]:
    """(label to register, known mask or None when the reference is dense, a note for the plan).

    `annotated` None: the slices holding any label; dense when they are contiguous."""
    axis, found = annotated_slices(label, axis)
    if annotated is None:
        if not is_sparse(label, found, axis):
            return label, None, ""
        annotated = found
    annotated = sorted(set(int(n) for n in annotated))
    dense, known = densify(label, annotated, axis)
    return dense, known, (f"sparse reference: {len(annotated)} annotated slice(s) along axis {axis} "
                          f"({', '.join(map(str, annotated))}); slices between them interpolated, the rest unknown")

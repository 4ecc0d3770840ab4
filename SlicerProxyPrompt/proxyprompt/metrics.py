"""Segmentation accuracy: Dice, 95th-percentile Hausdorff distance (mm), volume difference (ml).

Conventions (state them with every number reported):

* Dice: both masks empty -> 1.0 (nothing to find, nothing found); one empty -> 0.0.
* HD95: surfaces are the mask voxels with a face-neighbour outside the mask (SimpleITK
  ``LabelContour``, not fully connected; outside the image counts as outside the mask). For each surface voxel the distance to the nearest surface
  voxel of the other mask is read from a Maurer distance map computed in millimetres with the voxel
  spacing; HD95 = max(95th percentile of prediction->truth, 95th percentile of truth->prediction)
  (the MONAI / DeepMind ``surface-distance`` convention; linear interpolation between ranks). Both
  masks empty -> 0.0; exactly one empty -> ``inf`` (the distance to a missing surface is unbounded).
  `evaluate` writes non-finite values as None so that its output is valid JSON.
* Volume difference: prediction minus truth, in millilitres (1 ml = 1000 mm^3), from the voxel volume.

Arrays are indexed ``[k, j, i]`` like `Volume.array`; spacing is given as ``(x, y, z)`` = ``(i, j, k)``
(as `Volume.spacing` and SimpleITK's ``GetSpacing()``).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .volume import LabelInfo, Volume, default_label_info


def _masks(prediction_mask, truth_mask):
    prediction = np.asarray(prediction_mask).astype(bool, copy=False)
    truth = np.asarray(truth_mask).astype(bool, copy=False)
    if prediction.shape != truth.shape:
        raise InputError(f"prediction and truth masks differ in shape: {prediction.shape} vs {truth.shape}")
    return prediction, truth


def _spacing(spacing_xyz, ndim: int) -> tuple:
    spacing = tuple(float(s) for s in spacing_xyz)
    if len(spacing) != ndim:
        raise InputError(f"spacing {spacing} has {len(spacing)} values for a {ndim}D mask")
    if not all(s > 0 and math.isfinite(s) for s in spacing):
        raise InputError(f"spacing must be positive, got {spacing}")
    return spacing


def dice(prediction_mask, truth_mask) -> float:
    """2|P∩T| / (|P| + |T|); 1.0 when both masks are empty."""
    prediction, truth = _masks(prediction_mask, truth_mask)
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def _surface_and_distance(mask: np.ndarray, spacing: tuple):
    """(surface voxels as a bool array, distance map in mm to the nearest surface voxel).

    Both are computed on the mask padded with one background voxel on every side, so that a mask
    touching the image border has a surface there too (the caller pads both masks alike).
    """
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(spacing)
    contour = sitk.LabelContour(image, fullyConnected=False, backgroundValue=0)
    distance = sitk.Abs(
        sitk.SignedMaurerDistanceMap(contour, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    )
    distance = sitk.GetArrayFromImage(distance).astype(np.float64)
    distance[distance < 1e-5] = 0.0  # float32 round-off on the surface itself (|d| ~ 1e-6 mm)
    return sitk.GetArrayViewFromImage(contour).astype(bool), distance


def surface_distances_mm(prediction_mask, truth_mask, spacing_xyz):
    """(prediction surface -> truth surface, truth surface -> prediction surface) distances in mm.

    Both masks must be non-empty.
    """
    prediction, truth = _masks(prediction_mask, truth_mask)
    spacing = _spacing(spacing_xyz, prediction.ndim)
    if not prediction.any() or not truth.any():
        raise InputError("surface distances need two non-empty masks")
    prediction_surface, prediction_distance = _surface_and_distance(np.pad(prediction, 1), spacing)
    truth_surface, truth_distance = _surface_and_distance(np.pad(truth, 1), spacing)
    return truth_distance[prediction_surface], prediction_distance[truth_surface]


def hausdorff95_mm(prediction_mask, truth_mask, spacing_xyz) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (conventions in the module docstring).

    Both empty -> 0.0; exactly one empty -> ``inf``.
    """
    prediction, truth = _masks(prediction_mask, truth_mask)
    _spacing(spacing_xyz, prediction.ndim)
    has_prediction, has_truth = bool(prediction.any()), bool(truth.any())
    if not has_prediction and not has_truth:
        return 0.0
    if not has_prediction or not has_truth:
        return math.inf
    forward, backward = surface_distances_mm(prediction, truth, spacing_xyz)
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


def volume_difference_ml(prediction_mask, truth_mask, spacing_xyz) -> float:
    """(volume of prediction - volume of truth) in millilitres."""
    prediction, truth = _masks(prediction_mask, truth_mask)
    voxel_mm3 = float(np.prod(_spacing(spacing_xyz, prediction.ndim)))
    return (int(prediction.sum()) - int(truth.sum())) * voxel_mm3 / 1000.0


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


def _label_name(label_table, value: int) -> str:
    entry = (label_table or {}).get(value, (label_table or {}).get(str(value)))
    if isinstance(entry, LabelInfo):
        return entry.name
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping) and "name" in entry:
        return str(entry["name"])
    return default_label_info(value).name


def evaluate(
    prediction: Volume,
    truth: Volume,
    label_table: Optional[Mapping[int, Union[LabelInfo, str]]] = None,
    labels: Optional[Iterable[int]] = None,
) -> Dict[str, object]:
    """Per-label accuracy of a label map against the truth, on the same grid.

    Returns ``{"labels": {"<value>": {"name", "dice", "hd95_mm", "volume_difference_ml"}, ...},
    "mean_dice": float or None}`` over `labels` (default: the non-zero values present in the truth;
    labels only in the prediction are not scored). Undefined values (HD95 with one side empty, the
    mean over no labels) are None, so ``json.dumps(result, allow_nan=False)`` works.
    Raises `InputError` when the two volumes are not on the same grid.
    """
    if not prediction.same_grid(truth):
        raise InputError(
            "prediction and truth are not on the same grid: "
            f"prediction {prediction.describe_grid()}; truth {truth.describe_grid()}"
        )
    if labels is None:
        values: Sequence[int] = [int(v) for v in np.unique(truth.array) if v != 0]
    else:
        values = sorted({int(v) for v in labels})
        if any(v == 0 for v in values):
            raise InputError("label 0 is the background and cannot be evaluated")
    spacing = truth.spacing
    results: Dict[str, dict] = {}
    for value in values:
        predicted = prediction.array == value
        expected = truth.array == value
        results[str(value)] = {
            "name": _label_name(label_table, value),
            "dice": float(dice(predicted, expected)),
            "hd95_mm": _finite_or_none(hausdorff95_mm(predicted, expected, spacing)),
            "volume_difference_ml": float(volume_difference_ml(predicted, expected, spacing)),
        }
    mean = float(np.mean([r["dice"] for r in results.values()])) if results else None
    return {"labels": results, "mean_dice": mean}


def format_evaluation(report: dict) -> str:
    lines = [f"{'label':>5}  {'name':<22} {'dice':>6} {'hd95 mm':>8} {'dvol ml':>8}"]
    for value, row in report["labels"].items():
        hd = "-" if row["hd95_mm"] is None else f"{row['hd95_mm']:.1f}"
        dv = "-" if row["volume_difference_ml"] is None else f"{row['volume_difference_ml']:.1f}"
        lines.append(f"{value:>5}  {row['name'][:22]:<22} {row['dice']:6.3f} {hd:>8} {dv:>8}")
    mean = report["mean_dice"]
    lines.append(f"{'':>5}  {'mean':<22} {'-' if mean is None else format(mean, '6.3f'):>6}")
    return "\n".join(lines)

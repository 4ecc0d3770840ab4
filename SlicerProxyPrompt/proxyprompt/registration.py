"""Segmentation by registration (classic atlas): warp a reference case's labels onto a target image.

This is the weight-free, GPU-free `registration` generator and the baseline / mask prior of the
SAM-based generators. Everything runs in physical (LPS) space with SimpleITK, so the reference and
the target may sit on different grids (size, spacing, origin, oblique direction); the output is
always on the target's exact grid.

Pipeline for one reference -> target pair (``method="deformable"``):

1. **Locate** -- the reference structure is found in the target by masked normalised
   cross-correlation (numpy FFT; box sums for the template's overlapping part) of a template (the
   reference image inside the structure dilated by only 5 mm, so that the score is about the structure,
   not the surroundings that differ between patients) over all 3D translations -- in-plane *and*
   the slice offset -- for 12 in-plane rotations (about the target's slice normal) x 5 in-plane scales
   (0.7-1.41: structure sizes differ that much between patients), on a 6 mm in-plane search grid. The
   best 5 distinct peaks (>= 20 mm apart) are kept: the NCC peak alone is the right place in ~3 of 4
   cross-patient pairs, one of the 5 peaks in ~9 of 10.
2. **Affine** -- each candidate gets a short affine SimpleITK registration (correlation metric,
   restricted to the structure dilated by 10 mm and mapped into the target), the best by masked NCC
   (same 10 mm region: it picks the right candidate more often than the locate score, Mattes MI or
   wider regions) is then converged. It runs in the target's index-aligned frame (a rigid change of
   coordinates); for thick-slice stacks the rotation/shear entries that involve the slice axis are
   frozen (in-plane affine + slice-axis scale and translation).
3. **Deformable** -- fast symmetric-forces demons (SimpleITK) between the target and the affinely
   warped, histogram-matched reference, on a crop of the target around the structure (dilated by 20 mm),
   two levels (in-plane shrink 2 then 1), field smoothed with sigma 3 mm in-plane.
4. **Labels** -- each label's one-hot map is warped with linear interpolation (soft maps = the
   `probabilities`), the label is the argmax (background = 1 - sum), so labels never mix.
5. **Intensity** (``method="intensity"``, the default of `segment_by_registration`) -- the warped maps
   become spatial priors of an EM segmentation whose intensity models come from the target itself
   (`proxyprompt.intensity`): the registration says where a structure is, the target's contrast
   says where its border runs. Before the final EM the priors are re-fitted along the slice axis onto
   the EM's own result (which slices hold the base and the apex: thick slices leave that to the affine
   alone). `probabilities` are then the EM posteriors.

`RegisteredCase.similarity` is the masked NCC after the affine stage (demons would inflate it).
`segment_by_registration` ranks references by label agreement (the mean Dice of each warped label with
the others') by default: on held-out ACDC patients it picked better references than image similarity.

Methods: ``"copy"`` (identity transform in physical space: the label resampled where it lies; this
is "copy without registration"), ``"centred"`` (copy after a translation that aligns the two image
centres: the 'copy' row of REFERENCES.md section 7), ``"located"`` (step 1 only), ``"affine"``
(steps 1-2), ``"deformable"`` (1-3), ``"intensity"`` (1-3 and 5).

Measured on ACDC (see ``docs/benchmarks.md``, ``benchmarks/registration.py``). This pipeline was tuned on cardiac
cine and can fail elsewhere; the registration generator runs it as one of several candidates
(`proxyprompt.registration_candidates`, ``benchmarks/oneshot.py``).

Deterministic: SimpleITK runs on `FIXED_THREADS` threads inside `register_case` (`fixed_threads`), metric sampling
is seeded, candidate scores are rounded to `SCORE_DECIMALS` before they are compared.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .metrics import dice
from .progress import ProgressCallback, check_cancel, report
from .quality import label_agreement, structure_quality
from .filters import crop_box, gaussian_mm, largest_component, signed_distance_mm
from .frames import slice_axis_of_spacing, window_intensities
from .intensity import DEFAULT_INTENSITY_SETTINGS, IntensitySettings, refine_by_intensity
from .ncc import NccImage, ncc as _ncc
from .volume import Volume

METHODS = ("copy", "centred", "located", "affine", "deformable", "intensity")
FUSIONS = ("vote", "mean", "staple")
# SimpleITK runs on this many threads inside the registration whatever the machine's default: its sums (metric
# values and gradients) are then reduced in one order, so the same inputs give the same output bit for bit on any
# thread count (measured: with the machine's 2 threads the affine parameters differed in the 10th digit from 1).
FIXED_THREADS = 1
SCORE_DECIMALS = 4  # candidate scores equal to this many decimals are a tie (float noise never decides)


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegistrationSettings:
    """The knobs of the pipeline (defaults = the configuration measured in docs/benchmarks.md)."""

    # intensity normalisation (robust percentiles -> [0, 1]); same rule for both images
    percentiles: Tuple[float, float] = (0.5, 99.5)
    # --- locate (template search)
    search_spacing_mm: float = 6.0          # in-plane spacing of the search grid (coarse: the refinement follows)
    search_rotations: int = 12              # in-plane rotations over 360 degrees
    # in-plane scales, geometric 0.7-1.41: hearts of different patients (dilated vs hypertrophic) differ
    # that much in size; with (0.85, 1.0, 1.18) small hearts had no fitting template
    search_scales: Tuple[float, ...] = (0.7, 0.84, 1.0, 1.19, 1.41)
    # template = structure dilated by this much; a tight margin keeps the NCC on the heart rather than on
    # the surroundings that vary between patients (measured: 15 mm -> 5 mm, right place first 70% -> 80%)
    search_margin_mm: float = 5.0
    search_min_overlap: float = 0.7         # fraction of the template that must fall inside the target
    search_candidates: int = 5              # distinct peaks screened by a short affine (right one in top 5: 93%)
    search_candidate_distance_mm: float = 20.0
    search_candidates_in_plane: bool = False  # candidate distance measured in-plane only
    # --- affine refinement
    affine_transform: str = "affine"        # "affine" | "none"
    affine_mode: str = "auto"               # "3d" | "inplane" (slice-axis rotation/shear frozen) | "auto":
                                            # inplane when the slice spacing > 2x the in-plane spacing
    affine_margin_mm: float = 10.0          # metric mask = warped structure dilated by this much
    affine_iterations: int = 150
    affine_screen_iterations: int = 30      # per located candidate, before the best one is converged
    affine_sampling: float = 0.12
    affine_regular_sampling: bool = False
    affine_step_mm: float = 2.0
    affine_min_step_mm: float = 0.001
    # --- demons
    demons_margin_mm: float = 20.0          # crop = warped structure dilated by this much
    demons_levels: Tuple[int, ...] = (2, 1)  # in-plane shrink factors, coarse to fine
    demons_iterations: Tuple[int, ...] = (40, 20)
    demons_sigma_mm: float = 3.0            # smoothing of the displacement field (in-plane)
    demons_mode: str = "3d"                 # "3d" | "2d" (per slice) | "auto" (2d when anisotropic)
    demons_max_step: float = 2.0            # maximum update step (voxels)
    # --- labels
    label_sigma_mm: float = 0.0             # optional smoothing of one-hot maps before warping
    # --- similarity score
    similarity_margin_mm: float = 10.0
    # --- stage 5 (method "intensity")
    intensity: IntensitySettings = DEFAULT_INTENSITY_SETTINGS


DEFAULT_SETTINGS = RegistrationSettings()


@dataclass
class RegisteredCase:
    """One reference warped onto the target grid."""

    label: Volume                                   # integer labels on the target's grid
    probabilities: Dict[int, np.ndarray]            # label value -> float32 [0, 1] on the target grid
    similarity: float                               # masked NCC target vs reference after the linear stages
    seconds: float
    method: str = "deformable"
    transform: Optional[sitk.Transform] = None      # target physical point -> reference physical point
    stages: Dict[str, Tuple[Volume, float]] = field(default_factory=dict)  # name -> (label, cumulative s)
    info: Dict[str, object] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
_THREADS_LOCK = threading.RLock()


@contextlib.contextmanager
def fixed_threads():
    """SimpleITK's default thread count set to `FIXED_THREADS` for the block (restored after; reentrant)."""
    with _THREADS_LOCK:
        previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(FIXED_THREADS)
        try:
            yield
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _label_values(label: Volume) -> List[int]:
    return [int(v) for v in np.unique(label.array) if v != 0]


def _normalised(volume: Volume, percentiles=(0.5, 99.5)) -> sitk.Image:
    """Float32 copy scaled so that the robust intensity range maps to [0, 1] (clipped): the frames' windowing rule."""
    return volume.with_array(window_intensities(volume.array, percentiles)).to_sitk()


def _slice_axis(image: sitk.Image) -> int:
    """Index axis (0=i, 1=j, 2=k) with the largest spacing; ties -> the last (k) (`frames.slice_axis_of_spacing`)."""
    return slice_axis_of_spacing(image.GetSpacing())


def _direction(image: sitk.Image) -> np.ndarray:
    return np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)


def _index_to_physical_matrix(image: sitk.Image) -> Tuple[np.ndarray, np.ndarray]:
    return _direction(image) * np.asarray(image.GetSpacing())[None, :], np.asarray(image.GetOrigin())


def _physical_points(image: sitk.Image, mask_kji: np.ndarray) -> np.ndarray:
    """Physical coordinates (N x 3) of the voxels where mask_kji is true."""
    k, j, i = np.nonzero(mask_kji)
    matrix, origin = _index_to_physical_matrix(image)
    return np.stack([i, j, k], axis=1).astype(float) @ matrix.T + origin


def _rotation_about(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    x, y, z = axis
    skew = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + math.sin(angle) * skew + (1 - math.cos(angle)) * skew @ skew


def _affine(matrix: np.ndarray, center, translation) -> sitk.AffineTransform:
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in np.asarray(matrix).ravel()))
    transform.SetCenter(tuple(float(v) for v in center))
    transform.SetTranslation(tuple(float(v) for v in translation))
    return transform


def _grid_like(image: sitk.Image, spacing, size, origin) -> sitk.Image:
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(s) for s in spacing))
    grid.SetOrigin(tuple(float(o) for o in origin))
    grid.SetDirection(image.GetDirection())
    return grid


def _resample(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform, linear=True, default=0.0):
    return sitk.Resample(
        image, grid, transform, sitk.sitkLinear if linear else sitk.sitkNearestNeighbor, float(default),
        sitk.sitkFloat32 if linear else image.GetPixelID(),
    )


# --------------------------------------------------------------------------------------------
# stage 1: locate by masked NCC template search
# --------------------------------------------------------------------------------------------
def _locate(ref_image: sitk.Image, ref_mask: sitk.Image, ref_distance: sitk.Image,
            target: sitk.Image, settings: RegistrationSettings) -> List[Tuple[float, sitk.AffineTransform]]:
    """Candidate transforms (target point -> reference point), best first, with their NCC."""
    axis = _slice_axis(target)
    direction = _direction(target)
    normal = direction[:, axis]
    target_spacing = np.asarray(target.GetSpacing(), dtype=float)
    spacing = np.maximum(target_spacing, settings.search_spacing_mm)
    spacing[axis] = target_spacing[axis]

    # target on the coarse search grid (anti-aliased)
    size = np.maximum(np.round(np.asarray(target.GetSize()) * target_spacing / spacing), 1).astype(int)
    origin = np.asarray(target.GetOrigin()) + direction @ (0.5 * (spacing - target_spacing))
    search_grid = _grid_like(target, spacing, size, origin)
    sigma = 0.5 * np.where(spacing > target_spacing * 1.01, spacing, 0.0)
    fixed = sitk.GetArrayFromImage(_resample(gaussian_mm(target, sigma), search_grid, sitk.Transform()))

    # reference structure geometry
    ref_points = _physical_points(ref_mask, sitk.GetArrayViewFromImage(ref_mask) > 0)
    center = ref_points.mean(axis=0)
    offsets = ref_points - center
    along = offsets @ normal
    radius = float(np.sqrt(np.max(np.sum(offsets * offsets, axis=1) - along * along, initial=0.0)))
    half = np.empty(3)
    reach = radius * max(settings.search_scales) + settings.search_margin_mm
    half[:] = np.ceil(reach / spacing)
    half[axis] = np.ceil((np.max(np.abs(along), initial=0.0) + 0.5 * spacing[axis]) / spacing[axis])
    template_size = (2 * half + 1).astype(int)
    template_origin = center - direction @ (half * spacing)
    template_grid = _grid_like(target, spacing, template_size, template_origin)

    ref_spacing = np.asarray(ref_image.GetSpacing(), dtype=float)
    ref_sigma = 0.5 * np.maximum(spacing.min() - ref_spacing, 0) * (ref_spacing < spacing.min())
    ref_smooth = gaussian_mm(ref_image, ref_sigma)

    templates, transforms = [], []
    for r in range(settings.search_rotations):
        rotation = _rotation_about(normal, 2 * math.pi * r / settings.search_rotations)
        for scale in settings.search_scales:
            scaling = scale * np.eye(3) + (1 - scale) * np.outer(normal, normal)
            matrix = rotation @ scaling
            transform = _affine(matrix, center, (0, 0, 0))
            template = sitk.GetArrayFromImage(_resample(ref_smooth, template_grid, transform))
            distance = sitk.GetArrayFromImage(_resample(ref_distance, template_grid, transform, default=1e6))
            mask = (distance <= settings.search_margin_mm).astype(np.float64)
            if mask.sum() < 8:
                continue
            templates.append((template, mask))
            transforms.append(matrix)
    if not templates:
        raise InputError("the reference label is too small to locate")

    # masked NCC of every template at every shift; FFTs in single precision (about twice as fast)
    search = NccImage(fixed, fft_dtype=np.float32)
    maps = [search.search(template, mask, settings.search_min_overlap) for template, mask in templates]
    # best template at every shift, then distinct peaks (non-maximum suppression in mm)
    best = np.full(maps[0].shape, -np.inf)
    which = np.zeros(best.shape, dtype=np.int32)
    for index, ncc in enumerate(maps):
        better = ncc > best
        best[better] = ncc[better]
        which[better] = index
    shape = np.asarray(templates[0][0].shape)
    matrix_s, origin_s = _index_to_physical_matrix(search_grid)
    u = np.stack(np.meshgrid(*[np.arange(n) for n in best.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    positions = (u - (shape - 1) + half[::-1])[:, ::-1] @ matrix_s.T + origin_s  # template centre, physical
    scores = best.ravel().copy()
    chosen = []
    while len(chosen) < settings.search_candidates and np.isfinite(scores).any() and scores.max() > -1:
        index = int(np.argmax(scores))
        position = positions[index]
        chosen.append((float(scores[index]), transforms[int(which.ravel()[index])], position))
        offset = positions - position
        if settings.search_candidates_in_plane:  # distinct in-plane places, not slice offsets of one place
            offset = offset - np.outer(offset @ normal, normal)
        near = np.linalg.norm(offset, axis=1) < settings.search_candidate_distance_mm
        scores[near] = -np.inf
    # T(x) = centre_ref + M (x - p)
    return [(score, _affine(matrix, position, center - position)) for score, matrix, position in chosen]


# --------------------------------------------------------------------------------------------
# stage 2: affine refinement restricted to the structure
# --------------------------------------------------------------------------------------------
def _warped_mask(ref_distance: sitk.Image, target: sitk.Image, transform: sitk.Transform, margin: float):
    distance = _resample(ref_distance, target, transform, default=1e6)
    return sitk.Cast(distance <= margin, sitk.sitkUInt8)


def _masked_correlation(target: sitk.Image, ref_image: sitk.Image, mask: sitk.Image, transform) -> float:
    mask_array = sitk.GetArrayViewFromImage(mask) > 0
    if mask_array.sum() < 10:
        return -1.0
    # a copy, not a view: a view of the temporary resampled image would read freed memory once it is collected
    # (that made the candidate choice, and so the output, differ between identical runs)
    warped = sitk.GetArrayFromImage(_resample(ref_image, target, transform))
    return _ncc(sitk.GetArrayViewFromImage(target)[mask_array], warped[mask_array])


def _local_frame(image: sitk.Image, rotation: np.ndarray, origin: np.ndarray) -> sitk.Image:
    """The same image after the rigid change of coordinates x -> R^T (x - o) (metadata only)."""
    local = sitk.Image(image)
    local.SetOrigin(tuple(float(v) for v in rotation.T @ (np.asarray(image.GetOrigin()) - origin)))
    local.SetDirection(tuple(float(v) for v in (rotation.T @ _direction(image)).ravel()))
    return local


def _conjugate(transform: sitk.AffineTransform, rotation: np.ndarray, origin: np.ndarray, to_local: bool):
    """Express an affine transform in the frame y = R^T (x - o) (to_local) or back to physical."""
    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    centre = np.asarray(transform.GetCenter())
    translation = np.asarray(transform.GetTranslation())
    if to_local:
        return _affine(rotation.T @ matrix @ rotation, rotation.T @ (centre - origin), rotation.T @ translation)
    return _affine(rotation @ matrix @ rotation.T, rotation @ centre + origin, rotation @ translation)


def _refine_affine(target: sitk.Image, ref_image: sitk.Image, ref_distance: sitk.Image,
                   initial: sitk.AffineTransform, settings: RegistrationSettings) -> sitk.Transform:
    """Affine refinement with a correlation metric restricted to the dilated, warped structure.

    Runs in the target's index-aligned frame (a rigid change of coordinates, so nothing changes
    physically); for anisotropic stacks the matrix entries that involve the slice axis are frozen
    (in-plane affine + a translation along the slice axis), as thick slices cannot constrain them.
    """
    if settings.affine_transform == "none":
        return initial
    mask = _warped_mask(ref_distance, target, initial, settings.affine_margin_mm)
    if sitk.GetArrayViewFromImage(mask).sum() < 50:
        return initial
    rotation, origin = _direction(target), np.asarray(target.GetOrigin(), dtype=float)
    axis = _slice_axis(target)
    spacing = np.asarray(target.GetSpacing())
    anisotropic = spacing[axis] > 2.0 * np.delete(spacing, axis).max()
    fixed = _local_frame(target, rotation, origin)
    moving = _local_frame(ref_image, rotation, origin)
    local_mask = _local_frame(mask, rotation, origin)
    transform = _conjugate(initial, rotation, origin, to_local=True)

    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(FIXED_THREADS)
    method.SetMetricAsCorrelation()
    method.SetMetricFixedMask(local_mask)
    method.SetMetricSamplingStrategy(method.REGULAR if settings.affine_regular_sampling else method.RANDOM)
    method.SetMetricSamplingPercentage(settings.affine_sampling, seed=1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetInitialTransform(transform, inPlace=True)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=settings.affine_step_mm, minStep=settings.affine_min_step_mm,
        numberOfIterations=settings.affine_iterations, relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    weights = np.ones(12)
    if settings.affine_mode == "inplane" or (settings.affine_mode == "auto" and anisotropic):
        frozen = np.zeros((3, 3), dtype=bool)
        frozen[axis, :] = True
        frozen[:, axis] = True
        frozen[axis, axis] = False  # the scale along the slice axis (heart length) stays free
        weights[:9][frozen.ravel()] = 0.0
    method.SetOptimizerWeights([float(w) for w in weights])
    # a candidate that drifts out of the reference makes ITK print warnings: it is scored, not shown
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        method.Execute(fixed, moving)
    except RuntimeError:
        return initial
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    return _conjugate(transform, rotation, origin, to_local=False)


# --------------------------------------------------------------------------------------------
# stage 3: demons on a crop around the structure
# --------------------------------------------------------------------------------------------
def _demons(fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings, axis: int, two_d: bool):
    """Displacement field (numpy [k, j, i, 3], mm along the index axes) mapping fixed -> moving."""
    spacing = np.asarray(fixed.GetSpacing(), dtype=float)
    fixed_array = sitk.GetArrayFromImage(fixed)
    moving_array = sitk.GetArrayFromImage(moving)

    def local(array, spacing_local):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(float(s) for s in spacing_local))
        return image

    in_plane = [a for a in range(3) if a != axis]
    if two_d:
        field = np.zeros(fixed_array.shape + (3,), dtype=np.float64)
        numpy_axis = 2 - axis
        for index in range(fixed_array.shape[numpy_axis]):
            f2 = np.take(fixed_array, index, axis=numpy_axis)
            m2 = np.take(moving_array, index, axis=numpy_axis)
            if f2.std() < 1e-6 or m2.std() < 1e-6:
                continue
            d2 = _demons_pyramid(local(f2, spacing[in_plane]), local(m2, spacing[in_plane]), settings, 2)
            slicer = [slice(None)] * 3
            slicer[numpy_axis] = index
            view = field[tuple(slicer)]
            view[..., in_plane[0]] = d2[..., 0]
            view[..., in_plane[1]] = d2[..., 1]
        return field
    return _demons_pyramid(local(fixed_array, spacing), local(moving_array, spacing), settings, 3)


def _demons_pyramid(fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings, dimension: int):
    spacing = np.asarray(fixed.GetSpacing(), dtype=float)
    field = None
    for shrink, iterations in zip(settings.demons_levels, settings.demons_iterations):
        factors = [int(shrink) if s < 2.5 * spacing.min() else 1 for s in spacing]
        if any(f > 1 for f in factors):
            sigma = [0.5 * f * s if f > 1 else 0.01 * s for f, s in zip(factors, spacing)]
            sigma = [s if f > 1 else 0.0 for s, f in zip(sigma, factors)]
            f_level = sitk.Shrink(gaussian_mm(fixed, sigma), factors)
            m_level = sitk.Shrink(gaussian_mm(moving, sigma), factors)
        else:
            f_level, m_level = fixed, moving
        level_spacing = np.asarray(f_level.GetSpacing())
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfThreads(FIXED_THREADS)
        demons.SetNumberOfIterations(int(iterations))
        demons.SetSmoothDisplacementField(True)
        # standard deviations are in voxels of this level; the physical sigma is kept
        demons.SetStandardDeviations(
            [float(max(settings.demons_sigma_mm / s, 0.5)) if s < 2.5 * spacing.min() else 0.5 for s in level_spacing]
        )
        demons.SetMaximumUpdateStepLength(settings.demons_max_step)
        demons.SetUseImageSpacing(True)
        if field is not None:
            initial = sitk.Resample(field, f_level, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
            field = demons.Execute(f_level, m_level, initial)
        else:
            field = demons.Execute(f_level, m_level)
    field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
    return sitk.GetArrayFromImage(field).astype(np.float64)


def _deformable(target: sitk.Image, ref_image: sitk.Image, ref_distance: sitk.Image,
                affine: sitk.Transform, settings: RegistrationSettings) -> sitk.Transform:
    """Composite transform: displacement (demons, on a crop of the target) then `affine`."""
    mask = _warped_mask(ref_distance, target, affine, settings.demons_margin_mm)
    box = crop_box(sitk.GetArrayViewFromImage(mask) > 0)
    if box is None:
        return affine
    lower = [box[2].start, box[1].start, box[0].start]  # i, j, k
    size = [box[2].stop - box[2].start, box[1].stop - box[1].start, box[0].stop - box[0].start]
    fixed = sitk.RegionOfInterest(target, size, lower)
    moving = _resample(ref_image, fixed, affine)
    matching = sitk.HistogramMatchingImageFilter()
    matching.SetNumberOfThreads(FIXED_THREADS)
    matching.SetNumberOfHistogramLevels(64)
    matching.SetNumberOfMatchPoints(7)
    matching.SetThresholdAtMeanIntensity(True)
    moving = matching.Execute(moving, fixed)
    axis = _slice_axis(target)
    spacing = np.asarray(target.GetSpacing())
    in_plane = np.delete(spacing, axis)
    anisotropic = spacing[axis] > 2.0 * in_plane.max()
    two_d = settings.demons_mode == "2d" or (settings.demons_mode == "auto" and anisotropic)
    if size[axis] < 2:
        two_d = True
    local_field = _demons(fixed, moving, settings, axis, two_d)
    # local index-axis displacements (mm) -> physical: d_phys = D @ d_local
    direction = _direction(target)
    physical = local_field @ direction.T
    # taper the field to zero at the crop border so that the warp is continuous
    taper = np.ones(physical.shape[:3])
    for numpy_axis in range(3):
        n = physical.shape[numpy_axis]
        ramp = np.minimum(np.arange(n) + 1, np.arange(n)[::-1] + 1).astype(float)
        ramp = np.clip(ramp / 3.0, 0, 1) if n > 6 else np.ones(n)
        shape = [1, 1, 1]
        shape[numpy_axis] = n
        taper = taper * ramp.reshape(shape)
    physical = physical * taper[..., None]
    field_image = sitk.GetImageFromArray(physical, isVector=True)
    field_image.CopyInformation(fixed)
    displacement = sitk.DisplacementFieldTransform(sitk.Cast(field_image, sitk.sitkVectorFloat64))
    return sitk.CompositeTransform([affine, displacement])  # displacement applied first


# --------------------------------------------------------------------------------------------
# label warping and similarity
# --------------------------------------------------------------------------------------------
def _warp_labels(ref_label: Volume, target: sitk.Image, transform: sitk.Transform, values, sigma_mm=0.0):
    probabilities = {}
    for value in values:
        one_hot = ref_label.with_array((ref_label.array == value).astype(np.float32)).to_sitk()
        if sigma_mm > 0:
            one_hot = gaussian_mm(one_hot, sigma_mm)
        warped = sitk.GetArrayFromImage(_resample(one_hot, target, transform))
        probabilities[int(value)] = np.clip(warped, 0.0, 1.0).astype(np.float32)
    return probabilities


def labels_from_probabilities(probabilities: Dict[int, np.ndarray], shape=None) -> np.ndarray:
    """Argmax over {background = 1 - sum, each label}; integer array (label values)."""
    values = sorted(probabilities)
    if not values:
        return np.zeros(shape, dtype=np.int32)
    stack = np.stack([probabilities[v] for v in values])
    background = 1.0 - stack.sum(axis=0)
    winner = np.argmax(np.concatenate([background[None], stack]), axis=0)
    lookup = np.asarray([0] + values, dtype=np.int32)
    return lookup[winner]


def _similarity(target: sitk.Image, ref_image: sitk.Image, ref_distance: sitk.Image, transform, margin):
    mask = _warped_mask(ref_distance, target, transform, margin)
    return _masked_correlation(target, ref_image, mask, transform)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def register_case(reference_image: Volume, reference_label: Volume, target_image: Volume,
                  method: str = "deformable", cancel=None, settings: RegistrationSettings = DEFAULT_SETTINGS,
                  keep_stages: bool = False) -> RegisteredCase:
    """Warp `reference_label` onto `target_image`'s grid by registering the reference image to it.

    ``method``: ``"copy"`` (identity in physical space), ``"centred"`` (translation aligning the image
    centres), ``"located"``, ``"affine"``, ``"deformable"``, ``"intensity"`` (see the module docstring).
    ``cancel``: optional object with ``is_set()``, checked between stages (raises `Cancelled`).
    ``keep_stages``: also return the label after each stage (``RegisteredCase.stages``).
    Deterministic: the same inputs give the same output whatever SimpleITK's thread count (`fixed_threads`).
    """
    with fixed_threads():
        return _register_case(reference_image, reference_label, target_image, method, cancel, settings, keep_stages)


def _register_case(reference_image: Volume, reference_label: Volume, target_image: Volume, method: str, cancel,
                   settings: RegistrationSettings, keep_stages: bool) -> RegisteredCase:
    start = time.perf_counter()
    if method not in METHODS:
        raise InputError(f"unknown registration method {method!r}; choose one of {', '.join(METHODS)}")
    if not reference_image.same_grid(reference_label):
        raise InputError(
            "the reference label is not on the reference image's grid "
            f"({reference_label.describe_grid()} vs {reference_image.describe_grid()})"
        )
    values = _label_values(reference_label)
    if not values:
        raise InputError("the reference label is empty")
    check_cancel(cancel)

    target = _normalised(target_image, settings.percentiles)
    ref_image = _normalised(reference_image, settings.percentiles)
    ref_mask = sitk.Cast(reference_label.with_array((reference_label.array > 0).astype(np.uint8)).to_sitk(),
                         sitk.sitkUInt8)
    ref_distance = signed_distance_mm(ref_mask)
    stages: Dict[str, Tuple[Volume, float]] = {}
    info: Dict[str, object] = {}

    def record(name, transform):
        if keep_stages:
            probabilities = _warp_labels(reference_label, target, transform, values)
            stages[name] = (target_image.with_array(labels_from_probabilities(probabilities)),
                            time.perf_counter() - start)

    if method == "copy":
        transform: sitk.Transform = sitk.AffineTransform(3)
        linear = transform
    elif method == "centred":
        transform = sitk.TranslationTransform(3, tuple(_image_centre(ref_image) - _image_centre(target)))
        linear = transform
    else:
        candidates = _locate(ref_image, ref_mask, ref_distance, target, settings)
        info["locate_scores"] = [c[0] for c in candidates]
        transform = candidates[0][1]
        record("located", transform)
        check_cancel(cancel)
        if method in ("affine", "deformable", "intensity") and settings.affine_transform != "none":
            # screen every candidate with a short refinement, then converge the best one
            best = None
            screen = replace(settings, affine_iterations=settings.affine_screen_iterations)
            for _, initial in candidates:
                check_cancel(cancel)
                refined = _refine_affine(target, ref_image, ref_distance, initial,
                                         screen if len(candidates) > 1 else settings)
                score = round(_similarity(target, ref_image, ref_distance, refined, settings.affine_margin_mm),
                              SCORE_DECIMALS)
                if best is None or score > best[0]:
                    best = (score, refined)
            if len(candidates) > 1:
                check_cancel(cancel)
                refined = _refine_affine(target, ref_image, ref_distance, best[1], settings)
                score = round(_similarity(target, ref_image, ref_distance, refined, settings.affine_margin_mm),
                              SCORE_DECIMALS)
                if score >= best[0]:
                    best = (score, refined)
            info["affine_score"] = best[0]
            transform = best[1]
            record("affine", transform)
        linear = transform
        info["linear"] = linear
        if method in ("deformable", "intensity"):
            check_cancel(cancel)
            transform = _deformable(target, ref_image, ref_distance, transform, settings)
    check_cancel(cancel)
    probabilities = _warp_labels(reference_label, target, transform, values, settings.label_sigma_mm)
    label = target_image.with_array(labels_from_probabilities(probabilities))
    if method == "intensity":
        if keep_stages:
            stages["deformable"] = (label, time.perf_counter() - start)
        check_cancel(cancel)
        refined, probabilities = refine_by_intensity(target_image, probabilities, settings.intensity)
        label = target_image.with_array(refined)
    # image match in the structure region after the last *linear* stage: demons would inflate it
    # (measured: ranks references better than the post-demons NCC)
    similarity = _similarity(target, ref_image, ref_distance, linear, settings.similarity_margin_mm)
    seconds = time.perf_counter() - start
    if keep_stages:
        stages[method] = (label, seconds)
    return RegisteredCase(label, probabilities, similarity, seconds, method, transform, stages, info)


def _image_centre(image: sitk.Image) -> np.ndarray:
    centre_index = (np.asarray(image.GetSize(), dtype=float) - 1) / 2
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(tuple(centre_index)))


def fuse_labels(labels: Sequence[Volume], method: str = "vote",
                probabilities: Optional[Sequence[Dict[int, np.ndarray]]] = None) -> Volume:
    """Fuse label maps on one grid.

    ``"vote"``: majority vote (SimpleITK LabelVoting); a tie goes to the first map's label, so pass
    the maps best first. With `probabilities` (one dict per map), ``"vote"`` and ``"mean"`` sum the
    soft maps and take the argmax instead. ``"staple"``: SimpleITK MultiLabelSTAPLE (undecided voxels
    take the first map's label).
    """
    labels = list(labels)
    if not labels:
        raise InputError("no label maps to fuse")
    for other in labels[1:]:
        if not labels[0].same_grid(other):
            raise InputError("label maps to fuse must be on the same grid")
    if method not in FUSIONS:
        raise InputError(f"unknown fusion {method!r}; choose one of {', '.join(FUSIONS)}")
    if len(labels) == 1:
        return labels[0]
    if method in ("vote", "mean") and probabilities is not None:
        values = sorted({v for p in probabilities for v in p})
        summed = {v: sum(p[v] for p in probabilities if v in p) / len(probabilities) for v in values}
        return labels[0].with_array(labels_from_probabilities(summed, labels[0].array.shape))
    if method == "mean":
        raise InputError("fusion 'mean' needs the probabilities")
    images = [sitk.Cast(label.with_array(label.array.astype(np.uint16)).to_sitk(), sitk.sitkUInt16)
              for label in labels]
    undecided = int(max(int(label.array.max()) for label in labels)) + 1
    if method == "vote":
        fused = sitk.LabelVoting(images, undecided)
    else:
        fused = sitk.MultiLabelSTAPLE(images, undecided)
    array = sitk.GetArrayFromImage(fused).astype(np.int32)
    tie = array == undecided
    array[tie] = labels[0].array[tie]
    return labels[0].with_array(array)


def keep_largest_component(label: Volume, values: Optional[Sequence[int]] = None) -> Volume:
    """Keep, for each label value, only its largest 3D connected component (the rest -> background)."""
    values = _label_values(label) if values is None else [int(v) for v in values]
    array = np.array(label.array, dtype=label.array.dtype, copy=True)
    for value in values:
        mask = label.array == value
        array[mask & ~largest_component(mask)] = 0
    return label.with_array(array)


def rank_references(results: Sequence[RegisteredCase], select: str = "agreement") -> List[int]:
    """Indices of registered references, best first.

    ``"similarity"``: by `RegisteredCase.similarity` (image match in the structure region);
    ``"agreement"``: by the mean Dice of each warped label with the others' (label consensus);
    ``"combined"``: by the sum of both ranks (ties by similarity).
    """
    count = len(results)
    by_similarity = sorted(range(count), key=lambda i: -round(results[i].similarity, SCORE_DECIMALS))
    if select == "similarity" or count < 3:
        return by_similarity
    agreement = np.zeros(count)
    for a in range(count):
        for b in range(a + 1, count):
            score = _mean_dice(results[a].label.array, results[b].label.array)
            agreement[a] += score
            agreement[b] += score
    by_agreement = sorted(range(count), key=lambda i: -round(float(agreement[i]), SCORE_DECIMALS))
    if select == "agreement":
        return by_agreement
    if select != "combined":
        raise InputError(f"unknown reference selection {select!r}")
    rank_s = {index: rank for rank, index in enumerate(by_similarity)}
    rank_a = {index: rank for rank, index in enumerate(by_agreement)}
    return sorted(range(count), key=lambda i: (rank_s[i] + rank_a[i], rank_s[i]))


def _mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    values = sorted(set(np.unique(a)) | set(np.unique(b)) - {0})
    scores = []
    for value in values:
        scores.append(dice(a == value, b == value))
    return float(np.mean(scores)) if scores else 1.0


def _check_fusion_arguments(fusion: str, top_k: Optional[int]) -> None:
    if fusion not in FUSIONS:
        raise InputError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
    if top_k is not None and top_k < 1:
        raise InputError("top_k must be at least 1")


def fuse_registered(results: Sequence[RegisteredCase], fusion: str = "vote", top_k: Optional[int] = None,
                    cleanup: bool = True, select: str = "agreement") -> Tuple[Volume, dict]:
    """Rank registered references, fuse the `top_k` best (all if None); optional largest-component clean-up."""
    if not results:
        raise InputError("no registered references")
    _check_fusion_arguments(fusion, top_k)
    order = rank_references(results, select)
    chosen = order[:top_k] if top_k is not None else order
    if any("known" in results[i].info for i in chosen):
        fused = _fuse_known(results, chosen)
    else:
        fused = fuse_labels(
            [results[i].label for i in chosen], fusion,
            [results[i].probabilities for i in chosen] if fusion == "mean" else None,
        )
    if cleanup:
        fused = keep_largest_component(fused)
    values = sorted({v for i in chosen for v in results[i].probabilities})
    mean_probabilities = {
        v: (sum(results[i].probabilities[v] for i in chosen if v in results[i].probabilities) / len(chosen))
        .astype(np.float32)
        for v in values
    }
    return fused, {"chosen": chosen, "probabilities": mean_probabilities}


def _fuse_known(results: Sequence[RegisteredCase], chosen: Sequence[int]) -> Volume:
    """Mean of the soft labels weighted by each reference's known mask (`proxyprompt.sparse`): where a sparse
    reference knows nothing it casts no vote; where no chosen reference knows anything the result is 0."""
    shape = results[chosen[0]].label.array.shape
    weight = np.zeros(shape, dtype=np.float32)
    values = sorted({v for i in chosen for v in results[i].probabilities})
    summed = {v: np.zeros(shape, dtype=np.float32) for v in values}
    for i in chosen:
        known = results[i].info.get("known")
        known = np.ones(shape, dtype=np.float32) if known is None else known
        weight += known
        for v, p in results[i].probabilities.items():
            summed[v] += known * p
    informed = weight >= 0.5
    fused = {v: np.where(informed, summed[v] / np.maximum(weight, 1e-6), 0.0).astype(np.float32) for v in values}
    return results[chosen[0]].label.with_array(labels_from_probabilities(fused, shape))


def warp_known(known: Volume, target_image: Volume, transform: sitk.Transform) -> np.ndarray:
    """A sparse reference's known mask warped onto the target's grid (float32 in [0, 1])."""
    return _warp_labels(known, target_image.to_sitk(), transform, [1])[1]


def fused_quality(results: Sequence[RegisteredCase], chosen: Sequence[int], fused: Volume) -> Dict[int, dict]:
    """Per-structure quality of a (fused) registration result: the chosen references' own evidence
    (``info["quality_evidence"]``: candidate / intensity agreement), their agreement with the fused label when
    several are fused, and their image match (`proxyprompt.quality.structure_quality`)."""
    values = sorted({v for i in chosen for v in results[i].probabilities})
    evidence: Dict[str, Dict[int, float]] = {}
    for name in sorted({n for i in chosen for n in results[i].info.get("quality_evidence", {})}):
        per_label = [results[i].info["quality_evidence"][name] for i in chosen
                     if name in results[i].info.get("quality_evidence", {})]
        evidence[name] = {v: float(np.mean([p[v] for p in per_label if v in p])) for v in values
                          if any(v in p for p in per_label)}
    if len(chosen) > 1:
        evidence["references"] = label_agreement(fused.array, [results[i].label.array for i in chosen], values)
    similarity = float(np.mean([results[i].info.get("alignment_ncc", results[i].similarity) for i in chosen]))
    return structure_quality(values, similarity, evidence)


def segment_by_registration(references: Sequence[Tuple[Volume, Volume]], target_image: Volume,
                            method: str = "intensity", fusion: str = "vote", top_k: Optional[int] = None,
                            cleanup: bool = True, cancel=None,
                            progress: Optional[ProgressCallback] = None,
                            settings: RegistrationSettings = DEFAULT_SETTINGS,
                            select: str = "agreement", register: Optional[Callable[..., RegisteredCase]] = None,
                            known: Optional[Sequence[Optional[Volume]]] = None) -> Tuple[Volume, dict]:
    """Register every reference (image, label) to the target and fuse the `top_k` best.

    ``register``: the one-pair registration, called as ``register(image, label, target, method, cancel,
    settings)`` (default `register_case`; `registration_candidates.register_robust` runs several pipelines).
    ``known``: per reference, None (dense) or its known mask (`proxyprompt.sparse`): warped with the labels, and
    the fusion counts a reference only where it is known.
    Returns the label on the target's grid and an info dict: ``similarity`` (per reference, input
    order), ``chosen`` (indices of the fused references, best first), ``seconds``,
    ``seconds_per_reference``, ``method``, ``fusion``, ``probabilities`` (mean soft maps of the chosen),
    ``reference_info`` (each reference's `RegisteredCase.info`), ``quality`` (label value -> estimate,
    `proxyprompt.quality`).
    """
    register = register or register_case
    start = time.perf_counter()
    references = list(references)
    if not references:
        raise InputError("no reference cases")
    _check_fusion_arguments(fusion, top_k)
    results: List[RegisteredCase] = []
    for index, (image, label) in enumerate(references):
        check_cancel(cancel)
        report(progress, "register", index, len(references) + 1,
               f"registering reference {index + 1} of {len(references)}")
        results.append(register(image, label, target_image, method, cancel, settings))
        if known is not None and known[index] is not None:
            results[-1].info["known"] = warp_known(known[index], target_image, results[-1].transform)
    check_cancel(cancel)
    report(progress, "register", len(references), len(references) + 1, f"fusing label maps ({fusion})")
    fused, fused_info = fuse_registered(results, fusion, top_k, cleanup, select)
    info = {
        "method": method,
        "fusion": fusion,
        "select": select,
        "similarity": [r.similarity for r in results],
        "chosen": fused_info["chosen"],
        "seconds_per_reference": [r.seconds for r in results],
        "seconds": time.perf_counter() - start,
        "probabilities": fused_info["probabilities"],
        "reference_info": [r.info for r in results],
        "quality": fused_quality(results, fused_info["chosen"], fused),
    }
    report(progress, "register", len(references) + 1, len(references) + 1, "done")
    return fused, info

"""Atlas-guided intensity refinement: registered label maps as spatial priors, the target's own intensities decide.

A registered reference label is right about *where* a structure is and wrong about its exact border:
two patients' hearts never have the same shape. The target image itself shows the border (bright blood
pool, darker myocardium). This stage is the classic atlas-prior expectation-maximisation segmentation
(Van Leemput et al. 1999; here with non-parametric intensity models):

1. Priors: each label's warped probability map, smoothed in-plane by ``prior_sigma_mm`` (the
   registration is only accurate to a few millimetres), a small floor so that every class stays
   possible, background = 1 - sum; only a region around the structures (``region_margin_mm``) is
   re-labelled, everything outside it is background.
2. EM: each class's intensity model is a smoothed histogram of the target's (robustly normalised)
   intensities weighted by the class's current posterior; posterior = prior x likelihood, normalised;
   ``iterations`` rounds. The intensity models come from this target alone, so a different scanner,
   contrast or window between reference and target does not matter.
3. Labels: argmax of the posteriors; each label keeps its largest 3D connected component.

Measured on ACDC one-reference pairs (``benchmarks/registration.py``): see ``docs/benchmarks.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
import SimpleITK as sitk

from .filters import gaussian_mm, largest_component, signed_distance_mm
from .frames import choose_slice_axis
from .volume import Volume


@dataclass(frozen=True)
class IntensitySettings:
    """Knobs of the refinement (defaults = the configuration measured in docs/benchmarks.md)."""

    prior_sigma_mm: float = 3.0      # in-plane smoothing of the registered maps (registration error)
    prior_floor: float = 0.02        # every class keeps this much prior probability inside the region
    region_margin_mm: float = 20.0   # re-labelled region = the registered structures dilated by this much
    iterations: int = 4              # EM rounds
    bins: int = 64                   # intensity histogram bins over the normalised range [0, 1]
    bin_sigma: float = 1.5           # histogram smoothing (bins)
    percentiles: Tuple[float, float] = (1.0, 99.0)  # intensity normalisation inside the region


DEFAULT_INTENSITY_SETTINGS = IntensitySettings()


def _grid_image(array_kji: np.ndarray, spacing_ijk) -> sitk.Image:
    """An index-aligned sitk image with the target's spacing (in-plane operations need only spacing)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))
    image.SetSpacing(tuple(float(s) for s in spacing_ijk))
    return image


def _smooth_in_plane(array_kji: np.ndarray, target_image: Volume, sigma_mm: float) -> np.ndarray:
    """Gaussian smoothing within each slice (none across the slice axis: slices are thick)."""
    sigma_ijk = np.full(3, float(sigma_mm))
    sigma_ijk[2 - choose_slice_axis(target_image)] = 0.0
    return sitk.GetArrayFromImage(gaussian_mm(_grid_image(array_kji.astype(np.float32), target_image.spacing),
                                              sigma_ijk))


def _within_mm(mask_kji: np.ndarray, spacing_ijk, margin_mm: float) -> np.ndarray:
    """Voxels at most `margin_mm` from the mask (a dilation in physical units)."""
    distance = signed_distance_mm(_grid_image(mask_kji.astype(np.uint8), spacing_ijk))
    return sitk.GetArrayViewFromImage(distance) <= margin_mm


def _histogram_density(intensity: np.ndarray, weight: np.ndarray, settings: IntensitySettings) -> np.ndarray:
    """Weighted, smoothed intensity histogram as a density over `bins` (sums to `bins`)."""
    counts, _ = np.histogram(intensity, bins=settings.bins, range=(0.0, 1.0), weights=weight)
    x = np.arange(-int(4 * settings.bin_sigma) - 1, int(4 * settings.bin_sigma) + 2)
    kernel = np.exp(-0.5 * (x / settings.bin_sigma) ** 2)
    counts = np.convolve(counts, kernel / kernel.sum(), mode="same")
    counts = counts + 1e-6 * max(float(counts.sum()), 1e-12)  # no class is impossible at any intensity
    return counts / counts.sum() * settings.bins


def refine_by_intensity(target_image: Volume, probabilities: Dict[int, np.ndarray],
                        settings: IntensitySettings = DEFAULT_INTENSITY_SETTINGS
                        ) -> Tuple[np.ndarray, Dict[int, np.ndarray]]:
    """Re-label the region around the registered structures from the target's intensities.

    ``probabilities``: label value -> float map in [0, 1] on the target's grid (k, j, i), e.g.
    `RegisteredCase.probabilities`. Returns (int32 label array on the target's grid, posterior maps
    per label value, float32). Inputs are not modified.
    """
    values = sorted(int(v) for v in probabilities)
    shape = target_image.array.shape
    if not values:
        return np.zeros(shape, dtype=np.int32), {}
    spacing = target_image.spacing
    priors_lkji = np.stack([np.clip(np.asarray(probabilities[v], dtype=np.float32), 0, 1) for v in values])
    if priors_lkji.shape[1:] != shape:
        raise ValueError(f"probability maps {priors_lkji.shape[1:]} are not on the target grid {shape}")
    structures = priors_lkji.sum(axis=0) >= 0.5
    if not structures.any():
        return np.zeros(shape, dtype=np.int32), {v: np.zeros(shape, np.float32) for v in values}
    region = _within_mm(structures, spacing, settings.region_margin_mm)

    image = np.asarray(target_image.array, dtype=np.float32)
    low, high = np.percentile(image[region], settings.percentiles)
    intensity_n = np.clip((image[region] - low) / max(float(high - low), 1e-6), 0.0, 1.0)  # (N,)
    bin_n = np.minimum((intensity_n * settings.bins).astype(np.int64), settings.bins - 1)

    smoothed_lkji = np.clip(np.stack([_smooth_in_plane(p, target_image, settings.prior_sigma_mm)
                                      for p in priors_lkji]), 0.0, 1.0)
    prior_cn = np.concatenate([np.clip(1.0 - smoothed_lkji.sum(axis=0), 0.0, 1.0)[None], smoothed_lkji])[:, region]
    prior_cn = prior_cn + settings.prior_floor  # class 0 = background
    prior_cn /= prior_cn.sum(axis=0, keepdims=True)

    posterior_cn = prior_cn
    for _ in range(settings.iterations):
        likelihood_cn = np.stack([_histogram_density(intensity_n, weight_n, settings)[bin_n]
                                  for weight_n in posterior_cn])
        posterior_cn = prior_cn * likelihood_cn
        posterior_cn /= posterior_cn.sum(axis=0, keepdims=True)

    lookup = np.asarray([0] + values, dtype=np.int32)
    label = np.zeros(shape, dtype=np.int32)
    label[region] = lookup[np.argmax(posterior_cn, axis=0)]
    for value in values:
        stray = (label == value) & ~largest_component(label == value)
        label[stray] = 0
    posteriors = {}
    for index, value in enumerate(values, start=1):
        posterior = np.zeros(shape, dtype=np.float32)
        posterior[region] = posterior_cn[index]
        posteriors[value] = posterior
    return label, posteriors

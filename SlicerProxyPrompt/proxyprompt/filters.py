"""Small SimpleITK filters in physical units, shared by the registration and intensity stages."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk


def crop_box(mask_kji: np.ndarray, spacing_xyz=None, margin_mm: float = 0.0) -> Optional[Tuple[slice, ...]]:
    """Index box (one slice per array axis, k j i) around a mask's voxels, `margin_mm` wider on every side (needs
    `spacing_xyz`) and clipped to the array; None if the mask is empty."""
    mask = np.asarray(mask_kji)
    margin = np.zeros(mask.ndim, dtype=int)
    if margin_mm:
        margin = np.ceil(margin_mm / np.asarray(spacing_xyz, dtype=float)[::-1]).astype(int)
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if present.size == 0:
            return None
        box.append(slice(int(max(present[0] - margin[axis], 0)),
                         int(min(present[-1] + 1 + margin[axis], mask.shape[axis]))))
    return tuple(box)


def gaussian_mm(image: sitk.Image, sigma_mm) -> sitk.Image:
    """Gaussian smoothing with a per-axis sigma in mm (0 = none along that axis)."""
    sigma = np.broadcast_to(np.asarray(sigma_mm, dtype=float), (image.GetDimension(),))
    if not np.any(sigma > 0):
        return image
    if min(image.GetSize()) >= 4:
        # the recursive Gaussian needs sigma > 0 on each axis; a tiny sigma is a no-op
        sigma = np.maximum(sigma, 1e-3 * np.asarray(image.GetSpacing()))
        return sitk.SmoothingRecursiveGaussian(image, tuple(float(s) for s in sigma))
    # fewer than 4 voxels along an axis: the recursive filter refuses; use the discrete kernel
    return sitk.DiscreteGaussian(image, tuple(float(s * s) for s in sigma), 32, 0.01, True)


def signed_distance_mm(mask: sitk.Image) -> sitk.Image:
    """Signed distance (mm, negative inside) to a binary mask, float32."""
    return sitk.Cast(
        sitk.SignedMaurerDistanceMap(mask, insideIsPositive=False, squaredDistance=False, useImageSpacing=True),
        sitk.sitkFloat32,
    )


def largest_component(mask_kji: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean array (empty stays empty)."""
    if not mask_kji.any():
        return mask_kji.copy()
    components = sitk.RelabelComponent(
        sitk.ConnectedComponent(sitk.GetImageFromArray(mask_kji.astype(np.uint8)), True), sortByObjectSize=True
    )
    return sitk.GetArrayViewFromImage(components) == 1

"""Prompt extraction from a warped mask (Med-PerSAM, our reconstruction: ../shared/docs/REFERENCES.md 3.8).

Per slice and structure: the box of the mask (plus a margin), and well-spread point prompts from a feature-similarity
map (prototype = mean feature under the mask): positive candidates inside the mask eroded by `kernel` px, negative
candidates in a band outside the mask dilated by `kernel` px; the candidates are split into sub-regions (k-means on
their coordinates, so points do not cluster: the failure of PerSAM the paper names) and the most similar candidate
of each sub-region is taken, no two points of a kind closer than `spacing` px.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk

from ..contract import PixelFeatures


def morph(mask_hw: np.ndarray, radius: int, dilate: bool) -> np.ndarray:
    """Binary erosion / dilation of a 2D mask by a ball of `radius` px (0: the mask)."""
    mask = np.asarray(mask_hw, dtype=bool)
    if radius <= 0 or not mask.any():
        return mask.copy()
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    operation = sitk.BinaryDilate if dilate else sitk.BinaryErode
    return sitk.GetArrayFromImage(operation(image, [int(radius)] * 2, sitk.sitkBall)).astype(bool)


def split_regions(coords_p2: np.ndarray, parts: int, iterations: int = 10) -> np.ndarray:
    """[P] sub-region index of each candidate (row, col): deterministic k-means, started from farthest points."""
    points = np.asarray(coords_p2, dtype=np.float64)
    parts = max(1, min(int(parts), len(points)))
    centres = [points[0]]
    for _ in range(1, parts):
        distance = np.min([((points - c) ** 2).sum(axis=1) for c in centres], axis=0)
        centres.append(points[int(np.argmax(distance))])
    centres = np.asarray(centres)
    assignment = np.zeros(len(points), dtype=int)
    for _ in range(iterations):
        assignment = np.argmin(((points[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
        for k in range(parts):
            if np.any(assignment == k):
                centres[k] = points[assignment == k].mean(axis=0)
    return assignment


def pick_points(candidates_hw: np.ndarray, similarity_hw: np.ndarray, count: int, spacing: float) -> np.ndarray:
    """[K, 2] (row, col) points, K <= count: the most similar candidate of each of `count` sub-regions, in order of
    similarity, skipping any closer than `spacing` px to one already taken."""
    rows, cols = np.nonzero(candidates_hw)
    if count <= 0 or rows.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    coords = np.stack([rows, cols], axis=1)
    scores = similarity_hw[rows, cols]
    order = np.lexsort((cols, rows, -scores))  # most similar first; ties by position (deterministic)
    coords, scores = coords[order], scores[order]
    regions = split_regions(coords, count)
    best = [int(np.flatnonzero(regions == k)[0]) for k in np.unique(regions)]  # first = most similar of its region
    best.sort(key=lambda i: (-scores[i], i))
    chosen = []
    for index in best:
        point = coords[index]
        if all(np.hypot(*(point - other)) >= spacing for other in chosen):
            chosen.append(point)
    return np.asarray(chosen, dtype=np.int64).reshape(-1, 2)


def point_prompts(mask_hw: np.ndarray, similarity_hw: np.ndarray, positives: int, negatives: int, kernel: int,
                  spacing: float, band: Optional[int] = None) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(xy [P, 2] float32, labels [P] int32: 1 positive, 0 negative) for one slice, or None without a mask.

    Positives inside the mask eroded by `kernel` (the mask itself when erosion empties it); negatives outside the
    mask dilated by `kernel` and inside it dilated by `kernel + band` (default band: 2 * kernel + spacing): the most
    similar pixels just outside the structure, which SAM most needs told apart."""
    mask = np.asarray(mask_hw, dtype=bool)
    if not mask.any():
        return None
    inner = morph(mask, kernel, dilate=False)
    if not inner.any():
        inner = mask
    outer = morph(mask, kernel, dilate=True)
    band = (2 * kernel + int(np.ceil(spacing))) if band is None else band
    ring = morph(mask, kernel + band, dilate=True) & ~outer
    positive = pick_points(inner, similarity_hw, positives, spacing)
    negative = pick_points(ring, similarity_hw, negatives, spacing)
    coords = np.concatenate([positive, negative])[:, ::-1].astype(np.float32)  # (row, col) -> (x, y)
    labels = np.concatenate([np.ones(len(positive), np.int32), np.zeros(len(negative), np.int32)])
    return coords, labels


def similarity_maps(features: PixelFeatures, masks_nhw: np.ndarray) -> np.ndarray:
    """[N, H, W] cosine similarity of every frame pixel to the prototype: the mean feature of the cells under the
    masks (weighted by how much of each cell they cover), upsampled bilinearly from the feature grid."""
    import torch
    import torch.nn.functional as F

    grid = features.grid
    values = features.features_nchw.astype(np.float32)
    weights = np.stack([grid.mask_to_grid(m) for m in np.asarray(masks_nhw, dtype=np.float32)])  # [N, h, w]
    n, height, width = masks_nhw.shape
    if weights.sum() <= 0:
        return np.zeros((n, height, width), np.float32)
    prototype = (values * weights[:, None]).sum(axis=(0, 2, 3)) / weights.sum()
    norms = np.linalg.norm(values, axis=1) * max(np.linalg.norm(prototype), 1e-12)
    cosine = np.einsum("nchw,c->nhw", values, prototype) / np.maximum(norms, 1e-12)
    cosine[:, grid.valid[0]:, :] = cosine.min()
    cosine[:, :, grid.valid[1]:] = cosine.min()
    # cell centres -> frame pixels (align the cell grid's extent with cell_size x shape frame pixels)
    extent = (max(height, int(round(grid.cell_size[0] * grid.shape[0]))),
              max(width, int(round(grid.cell_size[1] * grid.shape[1]))))
    up = F.interpolate(torch.from_numpy(cosine)[:, None], size=extent, mode="bilinear", align_corners=False)
    return up[:, 0, :height, :width].numpy().astype(np.float32)

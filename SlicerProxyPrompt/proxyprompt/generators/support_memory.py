"""`support-memory`: the reference's annotated slices become SAM 2 conditioning memory (training-free).

The training-free form of SAM2-SGP's pseudo-mask generation (FS-MedSAM2 / APDM style, REFERENCES §1.5,
§3.4): every reference slice that carries annotation, windowed with the same rule as the target and
resampled in-plane to the target's pixel spacing and size, is a `SupportSlice` with its per-label masks.
The SAM 2 model puts them in front of the target's slices as conditioning frames and, for each target
slice, attends only the `top_k` most similar ones (cosine of pooled image embeddings; k = 4 as in SGP).

Propagation starts at the target slice that best matches an annotated reference slice (embedding cosine,
penalised by the difference in relative z-position) and runs both ways. Each structure's `frame_range` is
its relative slice extent in the reference mapped onto the target (plus a margin).

With a SAM-family model (no memory), the most similar reference slice's masks (and their boxes) are put on
the best-matching target slice as `ObjectPrompt.masks` / `.boxes`; the model propagates slice by slice.
A sparse reference (a label on only a few slices) works: only the annotated slices are used.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import InputError
from ..frames import SliceStack, bounding_box, make_slice_stack
from .base import Generator, GeneratorContext, ObjectPrompt, PromptPlan, SupportSlice, register_generator

DEFAULT_TOP_K = 4
DEFAULT_MAX_SUPPORT = 12
Z_WEIGHT = 0.5  # start-frame score = cosine - Z_WEIGHT * |relative z difference|
RANGE_MARGIN = 1  # slices added on each side of a structure's expected slice range


def resample_to_grid(image: np.ndarray, spacing: Tuple[float, float], target_shape: Tuple[int, int],
                     target_spacing: Tuple[float, float], nearest: bool = False) -> np.ndarray:
    """A 2D slice onto the target's in-plane pixel grid: scaled so its pixel spacing equals the target's
    (physical sizes preserved), centres aligned, then cropped / zero-padded to the target's size."""
    import SimpleITK as sitk

    source = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float32))
    source.SetSpacing((float(spacing[1]), float(spacing[0])))  # SimpleITK: (x = column, y = row)
    height, width = image.shape
    source.SetOrigin((0.0, 0.0))
    centre = np.array([(width - 1) * spacing[1], (height - 1) * spacing[0]]) / 2.0
    out_h, out_w = target_shape
    out_spacing = (float(target_spacing[1]), float(target_spacing[0]))
    out_centre = np.array([(out_w - 1) * out_spacing[0], (out_h - 1) * out_spacing[1]]) / 2.0
    origin = centre - out_centre
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    resampled = sitk.Resample(source, (int(out_w), int(out_h)), sitk.Transform(), interpolator,
                              (float(origin[0]), float(origin[1])), out_spacing, (1.0, 0.0, 0.0, 1.0), 0.0,
                              sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


def _relative_z(index: int, count: int) -> float:
    return float(index) / max(count - 1, 1)


def _image_embeddings(images: np.ndarray) -> np.ndarray:
    """Model-free fallback embedding: 32x32 average-pooled intensities, centred, L2-normalised."""
    import SimpleITK as sitk

    rows = []
    for image in images:
        small = sitk.GetArrayFromImage(sitk.Resample(
            sitk.GetImageFromArray(image.astype(np.float32)), (32, 32), sitk.Transform(), sitk.sitkLinear,
            (0.0, 0.0), (image.shape[1] / 32.0, image.shape[0] / 32.0), (1.0, 0.0, 0.0, 1.0)))
        vector = small.ravel() - small.mean()
        rows.append(vector / max(np.linalg.norm(vector), 1e-12))
    return np.stack(rows)


def support_embeddings(model, images: np.ndarray) -> Optional[np.ndarray]:
    """[K, D] embeddings of support images with the model's encoder if it offers `embed_slices`."""
    embed = getattr(model, "embed_slices", None)
    if embed is None:
        return None
    return np.asarray(embed(images))


@register_generator
class SupportMemoryGenerator(Generator):
    name = "support-memory"
    description = ("reference slices with their masks as SAM 2 conditioning memory; per target slice the "
                   "k most similar reference slices are attended (training-free SAM2-SGP / FS-MedSAM2)")
    needs_training = False

    def plan(self, context: GeneratorContext) -> PromptPlan:
        options = context.options
        top_k = int(options.get("top_k") or DEFAULT_TOP_K)
        max_support = int(options.get("max_support") or DEFAULT_MAX_SUPPORT)
        frames = context.target_frames
        model = context.model
        family = getattr(model, "family", "none")
        labels = [int(v) for v in context.labels]

        support, extents, support_z = self._support_slices(context, frames, labels, max_support)
        if not support:
            raise InputError("the reference holds none of the requested labels on any slice")

        # similarity between target slices and support slices
        support_images = np.stack([s.image for s in support])
        target_vectors = reference_vectors = None
        if model is not None and hasattr(model, "slice_embeddings") and hasattr(model, "embed_slices"):
            target_vectors = np.asarray(model.slice_embeddings(frames, context.progress, context.cancel))
            reference_vectors = support_embeddings(model, support_images)
        if target_vectors is None or reference_vectors is None:
            target_vectors = _image_embeddings(frames.images)
            reference_vectors = _image_embeddings(support_images)
            similarity_source = "image intensities"
        else:
            similarity_source = "model embeddings"
        cosine = target_vectors @ reference_vectors.T  # [N, S]
        count = frames.num_slices
        target_z = np.array([_relative_z(i, count) for i in range(count)])
        support_z = np.asarray(support_z)  # relative z of each support slice in its reference volume
        # prefer support slices that show every requested structure (mid-organ slices) as anchors
        coverage = np.array([sum(bool(np.any(s.masks.get(v, False))) for v in labels) for s in support])
        anchors = np.flatnonzero(coverage == coverage.max())
        score = cosine[:, anchors] - Z_WEIGHT * np.abs(target_z[:, None] - support_z[None, anchors])
        best_frame, best_anchor = np.unravel_index(int(np.argmax(score)), score.shape)
        best_support = int(anchors[best_anchor])

        objects: Dict[int, ObjectPrompt] = {}
        for value in labels:
            prompt = ObjectPrompt(label=value)
            if value in extents:
                first, last = extents[value]
                lo = int(np.floor(first * (count - 1))) - RANGE_MARGIN
                hi = int(np.ceil(last * (count - 1))) + RANGE_MARGIN
                prompt.frame_range = (max(lo, 0), min(hi, count - 1))
            objects[value] = prompt

        plan = PromptPlan(objects=objects, support_top_k=top_k, start_frame=int(best_frame))
        if family in ("sam", "litemedsam"):
            # no memory: the best-matching reference slice's masks prompt the best-matching target slice
            chosen = support[best_support]
            for value in labels:
                mask = chosen.masks.get(value)
                if mask is not None and mask.any():
                    objects[value].masks[int(best_frame)] = mask.copy()
                    objects[value].boxes[int(best_frame)] = bounding_box(mask)
            plan.notes.append(
                f"support-memory (SAM family): reference slice {chosen.source_index} prompts target slice "
                f"{best_frame} ({similarity_source})")
        else:
            plan.support = support
            plan.notes.append(
                f"support-memory: {len(support)} reference slice(s) as conditioning memory, top-{top_k} per "
                f"target slice ({similarity_source}); start at target slice {best_frame} "
                f"(best match: reference slice {support[best_support].source_index})")
        return plan

    @staticmethod
    def _support_slices(context: GeneratorContext, frames: SliceStack, labels: List[int],
                        max_support: int):
        """Annotated reference slices on the target's in-plane grid, each label's relative slice extent
        (first, last) in the reference volume, and each support slice's relative z in its volume."""
        support: List[SupportSlice] = []
        volume_z: List[float] = []
        extents: Dict[int, Tuple[float, float]] = {}
        per_reference = max(1, max_support // max(len(context.references), 1))
        for reference in context.references:
            stack = make_slice_stack(reference.image, frames.axis)  # same windowing rule as the target
            label_stack = stack.labels(reference.label)
            count = stack.num_slices
            annotated = [n for n in range(count) if np.isin(label_stack[n], labels).any()]
            if not annotated:
                continue
            span_first, span_last = annotated[0], annotated[-1]
            for value in labels:
                present = np.flatnonzero((label_stack == value).reshape(count, -1).any(axis=1))
                if present.size:
                    first, last = _relative_z(present[0], count), _relative_z(present[-1], count)
                    old = extents.get(value)
                    extents[value] = (first, last) if old is None else (min(old[0], first), max(old[1], last))
            if len(annotated) > per_reference:  # evenly spread over the annotated range
                picks = np.unique(np.round(np.linspace(0, len(annotated) - 1, per_reference)).astype(int))
                annotated = [annotated[i] for i in picks]
            for n in annotated:
                image = resample_to_grid(stack.images[n], stack.pixel_spacing, (frames.height, frames.width),
                                         frames.pixel_spacing)
                masks = {}
                for value in labels:
                    mask = label_stack[n] == value
                    if mask.any():
                        masks[value] = resample_to_grid(mask.astype(np.float32), stack.pixel_spacing,
                                                        (frames.height, frames.width), frames.pixel_spacing,
                                                        nearest=True) > 0.5
                within = (n - span_first) / max(span_last - span_first, 1)
                support.append(SupportSlice(image=np.clip(image, 0.0, 1.0).astype(np.float32), masks=masks,
                                            relative_position=float(within), source_index=int(n)))
                volume_z.append(_relative_z(n, count))
        return support, extents, volume_z

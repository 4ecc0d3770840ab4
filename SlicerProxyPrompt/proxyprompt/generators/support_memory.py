"""`support-memory`: the reference's annotated slices become SAM 2 conditioning memory (training-free).

The training-free form of SAM2-SGP's pseudo-mask generation (FS-MedSAM2 / APDM style, REFERENCES §1.5,
§3.4): every reference slice that carries annotation, windowed with the same rule as the target and
resampled in-plane to the target's pixel spacing and size, is a `SupportSlice` with its per-label masks.
The SAM 2 model puts them in front of the target's slices as conditioning frames; for each target slice the
plan names the `top_k` most similar ones (cosine of the model's pooled slice embeddings; k = 4 as in SGP), and only
those are attended (`PromptPlan.support_attention`, chosen by `propagation.top_k_support`).

Propagation starts at the target slice that best matches an annotated reference slice (embedding cosine,
penalised by the difference in relative z-position) and runs both ways. Each structure's `frame_range` is
its relative slice extent in the reference mapped onto the target (plus a margin).

With a SAM-family model (no memory) the reference slices instead give the conditioning slices' prompts,
after locating the structures in the target (`_aligned_conditioning`): the reference's structures may sit
anywhere in the target's field of view, so the support slices (already on the target's pixel grid, physical size
kept) are aligned in 2D before their masks are used.
* Global alignment (`global_alignment`), per reference: one similarity transform (rotation -30..30 deg x
  scale 0.8..1.4, acting on millimetres, x every translation) found by masked normalised cross-correlation
  (numpy FFT, window sums from integral images). The template is each support slice's image around its
  annotated structures plus TEMPLATE_MARGIN_MM of context; each target slice takes, at each position, the
  best NCC over the support slices, and the mean over target slices is maximised (no slice correspondence
  needed, robust to single-slice false matches).
* Per pair (target slice, support slice showing every requested structure, relative z within
  CANDIDATE_Z_WINDOW): a local refinement (+-REFINE_WINDOW_MM, +-10 deg, +-8 % scale), scored by its NCC
  minus Z_WEIGHT x the relative-z difference. The best pair is the start frame; up to
  `conditioning_slices` (default DEFAULT_CONDITIONING) pairs are kept, MIN_CONDITIONING_GAP slices apart and
  in the reference's slice order.
* The support slice's masks, warped by the pair's transform, are the start frame's `ObjectPrompt.masks`
  (exact seeds; they also tell the model which label is a ring and how thick it is); every conditioning
  slice gets the warped masks' `ObjectPrompt.boxes`, which the model segments itself (option
  `conditioning_masks`: how many of the best conditioning slices get masks too, default 1: measured,
  warped masks as seeds on every conditioning slice lowered Dice because seeds are copied unrefined).
  The model then propagates slice by slice from them, both ways, within each structure's `frame_range`.
* When even the best pair's NCC is below MIN_ALIGNMENT_NCC, the 2D search has not found the structures (on
  ACDC: a dilated heart against a hypertrophic one, a field of view far off); the plan then comes from the
  `registration` generator (3D search with the whole stack's context), and the plan's notes and the log say so.
A sparse reference (a label on only a few slices) works: only the annotated slices are used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import InputError
from ..options import REGISTRATION_METHODS, Options, option
from ..progress import check_cancel, report
from ..frames import SliceStack, bounding_box, make_slice_stack
from ..ncc import NccImage, NccTemplate
from .base import Generator, GeneratorContext, ObjectPrompt, PromptPlan, SupportSlice, register_generator
from .propagation import top_k_support

log = logging.getLogger("proxyprompt")

DEFAULT_TOP_K = 4
DEFAULT_MAX_SUPPORT = 12
Z_WEIGHT = 0.5  # start-frame score = cosine - Z_WEIGHT * |relative z difference|
RANGE_MARGIN = 1  # slices added on each side of a structure's expected slice range

# SAM-family path: 2D alignment of reference slices onto target slices (masked NCC search)
ALIGN_ANGLES = (-30.0, -15.0, 0.0, 15.0, 30.0)  # degrees, global search
ALIGN_SCALES = (0.8, 0.9, 1.0, 1.12, 1.25, 1.4)  # global search (target size / reference size)
REFINE_ANGLES = (-10.0, 0.0, 10.0)  # per-slice refinement around the global alignment
REFINE_SCALES = (0.92, 1.0, 1.08)
REFINE_WINDOW_MM = 10.0  # per-slice translation search around the global alignment
TEMPLATE_MARGIN_MM = 25.0  # context kept around the annotated structures in a template
DEFAULT_CONDITIONING = 3  # conditioning target slices (SAM family)
MIN_CONDITIONING_GAP = 2  # slices between two conditioning slices, at least
CANDIDATE_Z_WINDOW = 0.3  # (target slice, support slice) pairs compared: relative z within this
MIN_CONDITIONING_NCC = 0.0  # conditioning slices after the best one need a positive NCC
# Below this NCC of the best aligned slice pair the 2D search has not found the structures: the plan comes from
# the registration generator. Chosen on ACDC (LiteMedSAM, the 40 pairs of benchmarks/accuracy.py: each of the 20
# shared patients, ED and ES, from the next patient): in the 16 pairs below 0.55 support-memory gave mean Dice 0.09
# and the registration prior 0.42; in the 24 above, 0.71 and 0.65. Not held out; `--reference-offset 2` of the
# benchmark checks it on 40 other pairs (docs/benchmarks.md).
MIN_ALIGNMENT_NCC = 0.55
FALLBACK_NOTE = "so the prompts come from the registration generator instead"  # in the plan's notes


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


@dataclass(frozen=True)
class SupportMemoryOptions(Options):
    attention_top_k: int = option(DEFAULT_TOP_K, "SAM 2 memory: per target slice, the k most similar reference "
                                                 "slices attended", int, minimum=1)
    max_support: int = option(DEFAULT_MAX_SUPPORT, "most reference slices used as support", int, minimum=1)
    conditioning_slices: int = option(DEFAULT_CONDITIONING, "SAM family: target slices prompted from aligned "
                                                            "reference slices", int, minimum=1)
    conditioning_masks: int = option(1, "SAM family: how many of the best conditioning slices get the warped "
                                        "masks as seeds (the others get boxes)", int, minimum=0)
    min_alignment_ncc: float = option(MIN_ALIGNMENT_NCC, "SAM family: below this NCC of the best aligned slice "
                                                         "pair the prompts come from registration (above 1: "
                                                         "always)", float)
    registration_method: Optional[str] = option(
        None, "registration stages (default: intensity = locate, affine, demons, intensity EM with --model none and "
              "as a memory-less model's prior; deformable = without the EM, as a memory model's prior)", str, REGISTRATION_METHODS)


# --- 2D alignment of reference slices onto target slices (SAM-family path) ---------------------------------
@dataclass
class SliceAlignment:
    """A 2D similarity transform (physical rotation + isotropic scale + translation) that puts the point
    `source_centre` of a support slice on `target_centre` of a target slice; both (row, col) pixels on the
    target's in-plane grid. `score`: normalised cross-correlation of the template at that placement."""

    score: float
    angle: float  # degrees
    scale: float  # target size / reference size
    source_centre: Tuple[float, float]
    target_centre: Tuple[float, float]


def _similarity_warp(image: np.ndarray, source_centre, target_centre, angle: float, scale: float, spacing,
                     shape, nearest: bool = False) -> np.ndarray:
    """`image` (a support slice on the target's pixel spacing) moved onto a grid of `shape` by the similarity
    transform that puts its pixel `source_centre` on the grid's pixel `target_centre` (both (row, col)),
    rotated by `angle` degrees and scaled by `scale` (target size / reference size). Rotation and scale act
    on millimetres, so anisotropic pixels are handled. SimpleITK resampling (linear, or nearest neighbour
    for masks); 0 outside."""
    import SimpleITK as sitk

    row_mm, col_mm = float(spacing[0]), float(spacing[1])
    source = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.uint8 if nearest else np.float32))
    source.SetSpacing((col_mm, row_mm))  # SimpleITK: (x = column, y = row), origin 0 for both grids
    centre = (float(target_centre[1]) * col_mm, float(target_centre[0]) * row_mm)
    # Resample maps each output point p to the input point T(p) = (R(-angle) / scale) (p - centre) + source
    # centre: the inverse of "rotate by angle, scale by scale, move source_centre onto target_centre"
    transform = sitk.Similarity2DTransform(1.0 / float(scale), -float(np.radians(angle)), (
        float(source_centre[1]) * col_mm - centre[0], float(source_centre[0]) * row_mm - centre[1]), centre)
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    warped = sitk.Resample(source, (int(shape[1]), int(shape[0])), transform, interpolator, (0.0, 0.0),
                           (col_mm, row_mm), (1.0, 0.0, 0.0, 1.0), 0.0,
                           sitk.sitkUInt8 if nearest else sitk.sitkFloat32)
    return sitk.GetArrayFromImage(warped)


def _union(masks) -> np.ndarray:
    union = None
    for mask in masks:
        union = mask.copy() if union is None else (union | mask)
    return union


def _box_centre(mask) -> Tuple[float, float]:
    """(row, col) centre of the mask's bounding box."""
    col0, row0, col1, row1 = bounding_box(mask)
    return (row0 + row1) / 2.0, (col0 + col1) / 2.0


class _NccTarget:
    """One target slice prepared for NCC with rectangular templates (`ncc.NccImage`, FFT cached)."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = np.asarray(image, dtype=np.float64)
        self._search = NccImage(self.image)

    def centre_map(self, template, half: Tuple[int, int]) -> np.ndarray:
        """NCC of the template for each position of its centre pixel [H, W]; -1 where it does not fit or
        where the window has (almost) no contrast (5 % of the slice's variance)."""
        out = np.full(self.image.shape, -1.0)
        ncc = self._search.search(template, contrast_floor=0.05)
        out[half[0]:half[0] + ncc.shape[0], half[1]:half[1] + ncc.shape[1]] = ncc
        return out


def _template(support: SupportSlice, centre, angle, scale, spacing, shape, margin_mm):
    """The support slice's image around its annotated structures (plus margin_mm), rotated and scaled,
    as it would look on the target grid; the template's centre pixel is the support point `centre`."""
    union = _union(support.masks.values())
    col0, row0, col1, row1 = bounding_box(union)
    half_r = (max(centre[0] - row0, row1 - centre[0]) + margin_mm / spacing[0]) * scale
    half_c = (max(centre[1] - col0, col1 - centre[1]) + margin_mm / spacing[1]) * scale
    half = (int(round(min(half_r, (shape[0] - 1) / 2.0 - 1))), int(round(min(half_c, (shape[1] - 1) / 2.0 - 1))))
    template = _similarity_warp(support.image, centre, half, angle, scale, spacing,
                                (2 * half[0] + 1, 2 * half[1] + 1))
    return template.astype(np.float64), half


def global_alignment(supports: List[SupportSlice], targets: List["_NccTarget"], spacing,
                     angles=ALIGN_ANGLES, scales=ALIGN_SCALES, margin_mm=TEMPLATE_MARGIN_MM,
                     cancel=None, progress=None) -> SliceAlignment:
    """One similarity transform for a whole reference onto the whole target stack: for each rotation x
    scale, every target slice takes, at each position, the best NCC over the support slices (so no slice
    correspondence is needed); the mean over target slices is maximised. The support point is the centre
    of the box around all support slices' annotations (one reference: one physical point)."""
    centre = _box_centre(_union(_union(s.masks.values()) for s in supports))
    shape = targets[0].image.shape
    best = None
    steps = [(angle, scale) for angle in angles for scale in scales]
    for step, (angle, scale) in enumerate(steps):
        check_cancel(cancel)
        report(progress, "align", step, len(steps))
        # each template is searched over every target slice: its FFT is taken once (NccTemplate)
        templates = [(NccTemplate(template), half) for template, half in
                     (_template(s, centre, angle, scale, spacing, shape, margin_mm) for s in supports)]
        total = np.zeros(shape)
        for target in targets:
            best_here = np.full(shape, -1.0)
            for template, half in templates:
                best_here = np.maximum(best_here, target.centre_map(template, half))
            total += best_here
        total /= len(targets)
        index = np.unravel_index(int(np.argmax(total)), shape)
        if best is None or total[index] > best.score:
            best = SliceAlignment(float(total[index]), float(angle), float(scale), centre,
                                  (float(index[0]), float(index[1])))
    report(progress, "align", len(steps), len(steps))
    return best


def refine_alignment(support: SupportSlice, target: "_NccTarget", start: SliceAlignment, spacing,
                     window_mm=REFINE_WINDOW_MM, angles=REFINE_ANGLES, scales=REFINE_SCALES,
                     margin_mm=TEMPLATE_MARGIN_MM) -> SliceAlignment:
    """The best NCC placement of one support slice on one target slice near a starting alignment
    (translation within window_mm, small rotation / scale changes)."""
    height, width = target.image.shape
    row, col = int(round(start.target_centre[0])), int(round(start.target_centre[1]))
    wr, wc = max(int(round(window_mm / spacing[0])), 1), max(int(round(window_mm / spacing[1])), 1)
    r0, r1, c0, c1 = max(row - wr, 0), min(row + wr + 1, height), max(col - wc, 0), min(col + wc + 1, width)
    best = None
    for d_angle in angles:
        for d_scale in scales:
            angle, scale = start.angle + d_angle, start.scale * d_scale
            template, half = _template(support, start.source_centre, angle, scale, spacing, (height, width), margin_mm)
            window = target.centre_map(template, half)[r0:r1, c0:c1]
            index = np.unravel_index(int(np.argmax(window)), window.shape)
            if best is None or window[index] > best.score:
                best = SliceAlignment(float(window[index]), float(angle), float(scale), start.source_centre,
                                      (float(r0 + index[0]), float(c0 + index[1])))
    return best


def warp_masks(masks: Dict[int, np.ndarray], alignment: SliceAlignment, shape, spacing) -> Dict[int, np.ndarray]:
    """Support-slice masks moved onto the target slice by the alignment (nearest neighbour)."""
    return {value: _similarity_warp(mask, alignment.source_centre, alignment.target_centre, alignment.angle,
                                    alignment.scale, spacing, shape, nearest=True).astype(bool)
            for value, mask in masks.items()}


@register_generator
class SupportMemoryGenerator(Generator):
    name = "support-memory"
    description = ("reference slices with their masks as SAM 2 conditioning memory; per target slice the "
                   "k most similar reference slices are attended (training-free SAM2-SGP / FS-MedSAM2)")
    needs_training = False
    needs_model = True
    Options = SupportMemoryOptions

    def plan(self, context: GeneratorContext) -> PromptPlan:
        options = self.options_of(context)
        top_k = options.attention_top_k
        max_support = options.max_support
        frames = context.target_frames
        model = context.model
        if model is None:
            raise InputError("generator 'support-memory' gives no mask prior, so it needs a model (not 'none')")
        capabilities = model.capabilities
        labels = [int(v) for v in context.labels]

        support, extents, support_z, groups = self._support_slices(context, frames, labels, max_support)
        if not support:
            raise InputError("the reference holds none of the requested labels on any slice")

        # similarity between target slices and support slices
        support_images = np.stack([s.image for s in support])
        target_vectors = reference_vectors = None
        if capabilities.slice_embeddings:
            target_vectors = np.asarray(model.slice_embeddings(frames, context.progress, context.cancel))
            reference_vectors = np.asarray(model.embed_slices(support_images))
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

        plan = PromptPlan(objects=objects, start_frame=int(best_frame))
        if not capabilities.memory:
            # no memory: reference slices, aligned in 2D onto their best-matching target slices, give the
            # conditioning slices' masks and boxes; the model propagates slice by slice from them
            plan.start_frame = None  # a model without memory has no start frame
            wanted = options.conditioning_slices
            chosen = self._aligned_conditioning(support, groups, support_z, coverage, frames, wanted, context.cancel,
                                                context.progress)
            floor = options.min_alignment_ncc
            best = chosen[0][2].score
            if best < floor:
                return self._registration_fallback(context, best, floor, options.registration_method)
            mask_frames = options.conditioning_masks
            for rank, (frame, index, alignment, warped) in enumerate(chosen):
                for value in labels:
                    mask = warped.get(value)
                    if mask is not None and mask.any():
                        if rank < mask_frames:
                            objects[value].masks[frame] = mask
                        objects[value].boxes[frame] = bounding_box(mask)
            plan.notes.append(
                "support-memory (SAM family): " + "; ".join(
                    f"reference slice {support[index].source_index} aligned onto target slice {frame} "
                    f"(NCC {alignment.score:.2f}, {alignment.angle:+.0f} deg, x{alignment.scale:.2f})"
                    for frame, index, alignment, _ in chosen))
        else:
            plan.support = support
            plan.support_attention = top_k_support(cosine, top_k)
            plan.notes.append(
                f"support-memory: {len(support)} reference slice(s) as conditioning memory, top-{top_k} per "
                f"target slice ({similarity_source}); start at target slice {best_frame} "
                f"(best match: reference slice {support[best_support].source_index})")
        return plan

    @staticmethod
    def _registration_fallback(context: GeneratorContext, best: float, floor: float,
                               method: Optional[str]) -> PromptPlan:
        """The reference's structures were not found in 2D (best aligned slice pair below `floor`): prompts
        from the registration generator, whose 3D search sees the whole stack's context."""
        from .registration import RegistrationGenerator

        message = (f"support-memory (SAM family): the reference's slices match no target slice well (best aligned "
                   f"NCC {best:.2f} < {floor:.2f}), {FALLBACK_NOTE}")
        log.warning("%s", message)
        plan = RegistrationGenerator.plan_with_method(context, method)
        plan.notes.insert(0, message)
        return plan

    @staticmethod
    def _aligned_conditioning(support: List[SupportSlice], groups: List[int], support_z, coverage,
                              frames: SliceStack, wanted: int, cancel=None, progress=None):
        """[(target frame, support index, SliceAlignment, warped masks)], best first: up to `wanted` target
        slices, each with the support slice that matches it best once aligned.

        Per reference: one global 2D similarity transform (`global_alignment`), then each pair (target
        slice, support slice showing every requested structure) is refined locally (`refine_alignment`)
        and scored by its NCC minus Z_WEIGHT x the difference in relative z. The best pair comes first;
        further ones keep MIN_CONDITIONING_GAP slices apart and the reference's slice order."""
        spacing = frames.pixel_spacing
        shape = (frames.height, frames.width)
        targets = [_NccTarget(image) for image in frames.images]
        count = frames.num_slices
        target_z = np.array([_relative_z(i, count) for i in range(count)])
        anchors = set(int(i) for i in np.flatnonzero(coverage == coverage.max()))
        candidates = []  # (score, frame, support index, alignment)
        for group in sorted(set(groups)):
            members = [i for i, g in enumerate(groups) if g == group]
            start = global_alignment([support[i] for i in members], targets, spacing, cancel=cancel,
                                     progress=progress)
            for index in members:
                if index not in anchors:
                    continue
                for frame in range(count):
                    dz = abs(target_z[frame] - support_z[index])
                    if dz > CANDIDATE_Z_WINDOW:
                        continue
                    alignment = refine_alignment(support[index], targets[frame], start, spacing)
                    candidates.append((alignment.score - Z_WEIGHT * dz, frame, index, alignment))
        if not candidates:  # degenerate (e.g. a one-slice target far from every anchor): take the best anyway
            for index in sorted(anchors):
                for frame in range(count):
                    alignment = refine_alignment(support[index], targets[frame], global_alignment(
                        [support[index]], [targets[frame]], spacing, cancel=cancel), spacing)
                    candidates.append((alignment.score, frame, index, alignment))
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        chosen = []
        for score, frame, index, alignment in candidates:
            if len(chosen) >= max(wanted, 1):
                break
            if chosen and alignment.score <= MIN_CONDITIONING_NCC:
                continue  # no placement correlates (NCC -1: the template fits nowhere): a box there is a guess
            if any(abs(frame - f) < MIN_CONDITIONING_GAP for f, _, _ in chosen):
                continue
            if any(np.sign(frame - f) != np.sign(support_z[index] - support_z[i]) for f, i, _ in chosen):
                continue  # keeps the reference's slice order
            chosen.append((frame, index, alignment))
        return [(frame, index, alignment, warp_masks(support[index].masks, alignment, shape, spacing))
                for frame, index, alignment in chosen]

    @staticmethod
    def _support_slices(context: GeneratorContext, frames: SliceStack, labels: List[int],
                        max_support: int):
        """Annotated reference slices on the target's in-plane grid, each label's relative slice extent
        (first, last) in the reference volume, each support slice's relative z in its volume and the index
        of the reference it comes from."""
        support: List[SupportSlice] = []
        groups: List[int] = []
        volume_z: List[float] = []
        extents: Dict[int, Tuple[float, float]] = {}
        per_reference = max(1, max_support // max(len(context.references), 1))
        for group, reference in enumerate(context.references):
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
                groups.append(group)
        return support, extents, volume_z, groups

"""Registration that holds on any anatomy: several pipelines per pair, one chosen without the target's labels.

`proxyprompt.registration`'s locate-first pipeline (NCC template search, masked affine, demons) was tuned on
cardiac cine and fails where its search has nothing distinct to lock onto (a structure that fills most of a
small field of view, e.g. MSD hippocampus crops). The textbook pipeline (geometry-centred affine initialiser,
Mattes MI affine over the whole image at 2 resolutions, then demons on histogram-matched images) holds there
but knows nothing of where the structure is. So every pair runs several candidates:

* ``locate``: the locate-first pipeline of `registration.register_case` (method "deformable");
* ``geometry``: textbook pipeline from the geometry-centred start (image centres aligned);
* ``moments``: textbook pipeline from the moments-centred start (intensity centres of mass aligned);

and keeps one by evidence computed from the images and the candidates themselves (`choose_candidate`): the
image similarity (NCC) between the target and each warped reference over one region shared by all candidates
(the union of their warped structures, dilated), and each candidate's label agreement with the others. The
choice and its evidence go to `RegisteredCase.info["candidates"]` (and from there into the plan's notes).

Determinism: SimpleITK's metric sampling is seeded and the registration and demons filters run on a fixed
number of threads (`FIXED_THREADS`), so the result does not depend on the machine's thread count; scores are
rounded (`SCORE_DECIMALS`) before they are compared, and ties go to the earlier candidate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .filters import signed_distance_mm
from .intensity import contrast_separability, refine_by_intensity
from .progress import check_cancel
from .quality import label_agreement
from .registration import (
    DEFAULT_SETTINGS,
    FIXED_THREADS,
    SCORE_DECIMALS,
    RegisteredCase,
    RegistrationSettings,
    _deformable,
    _label_values,
    _masked_correlation,
    _mean_dice,
    _normalised,
    _warp_labels,
    fixed_threads,
    labels_from_probabilities,
    register_case,
)
from .volume import Volume

CANDIDATES = ("locate", "geometry", "moments")
ROBUST_METHODS = ("deformable", "intensity")  # the methods `register_robust` runs
# the intensity stage runs when the most distinct structure's contrast separability (`contrast_separability`,
# with the registered labels) is at least this. Selection pairs: hippocampus 0.38-0.52 (the stage lost Dice on
# every one), ACDC ED 0.43-0.78 (it gained on all but 3, where it lost <= 0.01); 0.55 gave the best mean on both
INTENSITY_MIN_SEPARABILITY = 0.55
# a candidate whose linear stage changes volume by more than this factor (either way) is kept only when every
# candidate does. Selection pairs: the linear stages' volume changes were 0.26-2.91 on ACDC ED and 0.85-1.84 on
# hippocampus, and a bound of 3 or 4 changed no choice there; a held-out ACDC pair's two textbook candidates had
# 0.05 and 0.08 (true Dice 0.0). 4 rather than 3 leaves room beside the 0.37 of a right result (Dice 0.65).
MAX_VOLUME_CHANGE = 4.0


@dataclass(frozen=True)
class TextbookSettings:
    """The textbook SimpleITK pipeline's knobs."""

    histogram_bins: int = 32
    sampling: float = 0.25
    shrink_factors: Tuple[int, ...] = (2, 1)
    smoothing_sigmas: Tuple[float, ...] = (1.0, 0.0)  # in physical units (mm)
    iterations: int = 100
    learning_rate: float = 1.0


DEFAULT_TEXTBOOK = TextbookSettings()


def centred_start(target: sitk.Image, ref_image: sitk.Image, start: str) -> sitk.AffineTransform:
    """Affine transform (target point -> reference point) aligning the image centres ("geometry") or the
    intensity centres of mass ("moments")."""
    mode = {"geometry": sitk.CenteredTransformInitializerFilter.GEOMETRY,
            "moments": sitk.CenteredTransformInitializerFilter.MOMENTS}[start]
    try:
        return sitk.AffineTransform(sitk.CenteredTransformInitializer(target, ref_image, sitk.AffineTransform(3),
                                                                      mode))
    except RuntimeError:
        # an image whose windowed intensities have no mass has no centre of mass (ITK throws): centre the geometry
        if start == "geometry":
            raise
        return centred_start(target, ref_image, "geometry")


def mattes_affine(target: sitk.Image, ref_image: sitk.Image, initial: sitk.AffineTransform,
                  settings: TextbookSettings = DEFAULT_TEXTBOOK) -> sitk.AffineTransform:
    """Whole-image Mattes mutual information affine registration, multi-resolution (seeded, fixed threads)."""
    transform = sitk.AffineTransform(initial)
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(FIXED_THREADS)
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(settings.sampling, seed=1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsGradientDescent(learningRate=settings.learning_rate, numberOfIterations=settings.iterations,
                                         convergenceMinimumValue=1e-6, convergenceWindowSize=10)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(settings.shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(settings.smoothing_sigmas))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        method.Execute(target, ref_image)
    except RuntimeError:
        return sitk.AffineTransform(initial)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    return transform


def textbook_transform(target: sitk.Image, ref_image: sitk.Image, ref_distance: sitk.Image, start: str,
                       settings: RegistrationSettings = DEFAULT_SETTINGS,
                       textbook: TextbookSettings = DEFAULT_TEXTBOOK) -> Tuple[sitk.Transform, sitk.Transform]:
    """(affine, affine + demons) of the textbook pipeline from a ``"geometry"`` or ``"moments"`` start."""
    affine = mattes_affine(target, ref_image, centred_start(target, ref_image, start), textbook)
    return affine, _deformable(target, ref_image, ref_distance, affine, settings)


@dataclass
class Candidate:
    name: str
    linear: sitk.Transform
    transform: sitk.Transform
    label: np.ndarray                       # argmax label on the target grid (before any intensity stage)
    probabilities: Dict[int, np.ndarray]
    locate_info: Optional[dict] = None
    seconds: float = 0.0


def _candidate_region(candidates: Sequence[Candidate], target: sitk.Image, margin_mm: float) -> sitk.Image:
    """Union of the candidates' warped structures, dilated by `margin_mm`: one region to score them all in."""
    union = np.zeros(candidates[0].label.shape, dtype=np.uint8)
    for candidate in candidates:
        union |= (candidate.label > 0).astype(np.uint8)
    image = sitk.GetImageFromArray(union)
    image.CopyInformation(target)
    distance = sitk.GetArrayFromImage(signed_distance_mm(image))  # a copy: the image is a temporary
    region = sitk.GetImageFromArray((distance <= margin_mm).astype(np.uint8))
    region.CopyInformation(target)
    return region


def linear_volume_change(transform: sitk.Transform, image: sitk.Image) -> float:
    """Determinant of `transform`'s (target point -> reference point) Jacobian at the centre of `image`, by finite
    differences over 1 mm: reference volume per unit target volume (1 = no change of size; negative = a mirror)."""
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()]))
    origin = np.asarray(transform.TransformPoint(centre.tolist()))
    jacobian = np.column_stack([np.asarray(transform.TransformPoint((centre + step).tolist())) - origin
                                for step in np.eye(3)])
    return float(np.linalg.det(jacobian))


def candidate_evidence(candidates: Sequence[Candidate], target: sitk.Image, ref_image: sitk.Image,
                       margin_mm: float, values: Sequence[int], reference_volume_mm3: float = 0.0) -> List[dict]:
    """Per candidate: NCC of target vs warped reference after its linear and its last stage, over the shared
    region; mean label agreement (Dice) with the other candidates, overall and per label; the linear stage's
    volume change (`linear_volume_change`) and, given the reference structures' volume, the warped structures'
    volume over it. Rounded to `SCORE_DECIMALS`."""
    region = _candidate_region(candidates, target, margin_mm)
    voxel_mm3 = float(np.prod(target.GetSpacing()))
    evidence = []
    for index, candidate in enumerate(candidates):
        other_labels = [other.label for j, other in enumerate(candidates) if j != index]
        others = [_mean_dice(candidate.label, other) for other in other_labels]
        per_label = label_agreement(candidate.label, other_labels, values)
        own = _candidate_region([candidate], target, margin_mm)
        evidence.append({
            "name": candidate.name,
            "ncc_own": round(_masked_correlation(target, ref_image, own, candidate.linear), SCORE_DECIMALS),
            "ncc_linear": round(_masked_correlation(target, ref_image, region, candidate.linear), SCORE_DECIMALS),
            "ncc": round(_masked_correlation(target, ref_image, region, candidate.transform), SCORE_DECIMALS),
            "agreement": round(float(np.mean(others)) if others else 1.0, SCORE_DECIMALS),
            "label_agreement": {v: round(a, SCORE_DECIMALS) for v, a in per_label.items()},
            "volume_change": round(linear_volume_change(candidate.linear, target), SCORE_DECIMALS),
            "volume_ratio": (round(float((candidate.label > 0).sum()) * voxel_mm3 / reference_volume_mm3,
                                   SCORE_DECIMALS) if reference_volume_mm3 > 0 else None),
        })
    return evidence


def plausible_volume_change(evidence: dict) -> bool:
    """Whether a candidate's linear stage changes volume by at most `MAX_VOLUME_CHANGE` either way (and mirrors
    nothing): the same structure in two subjects differs in size, not by an order of magnitude."""
    change = evidence["volume_change"]
    return change > 0 and 1.0 / MAX_VOLUME_CHANGE <= change <= MAX_VOLUME_CHANGE


def choose_candidate(evidence: Sequence[dict]) -> int:
    """Index of the candidate to keep: among those whose linear stage changes volume plausibly
    (`plausible_volume_change`; all of them when none does), the highest sum of its image match in its own
    structure region after its linear stage (``ncc_own``: the locate-first pipeline's own similarity) and its
    label agreement with the other candidates (a candidate that agrees with none is an outlier); ties go to the
    earlier candidate.

    Chosen on 10 + 10 selection pairs (hippocampus, ACDC ED; docs/benchmarks.md) among: NCC over the union of
    the candidates' regions (+ agreement), after the linear or the last stage, own-region NCC alone, and
    "locate-first unless beaten by a margin"; this one was best or tied on both anatomies. The volume-change
    bound then fixed a held-out ACDC pair (both textbook candidates squeezed the target ~15x into the
    reference, agreed with each other and outvoted the right locate-first result) and changed no selection
    pair's choice."""
    plausible = [plausible_volume_change(e) for e in evidence]
    eligible = plausible if any(plausible) else [True] * len(evidence)
    scores = [round(e["ncc_own"] + e["agreement"], SCORE_DECIMALS) if ok else -np.inf
              for e, ok in zip(evidence, eligible)]
    return int(np.argmax(scores))  # argmax returns the first of equal maxima


def build_candidates(reference_image: Volume, reference_label: Volume, target_image: Volume, cancel=None,
                     settings: RegistrationSettings = DEFAULT_SETTINGS, candidates: Sequence[str] = CANDIDATES,
                     textbook: TextbookSettings = DEFAULT_TEXTBOOK) -> Tuple[List[Candidate], List[dict]]:
    """Every pipeline of `candidates` run on one pair, and the label-free evidence for each."""
    unknown = sorted(set(candidates) - set(CANDIDATES))
    if unknown or not candidates:
        raise InputError(f"unknown registration candidate(s) {unknown}; choose from {', '.join(CANDIDATES)}")
    values = _label_values(reference_label)
    if not values:
        raise InputError("the reference label is empty")
    target = _normalised(target_image, settings.percentiles)
    ref_image = _normalised(reference_image, settings.percentiles)
    ref_mask = sitk.Cast(reference_label.with_array((reference_label.array > 0).astype(np.uint8)).to_sitk(),
                         sitk.sitkUInt8)
    ref_distance = signed_distance_mm(ref_mask)
    shape = target_image.array.shape
    built: List[Candidate] = []
    for name in candidates:
        check_cancel(cancel)
        tick = time.perf_counter()
        if name == "locate":
            located = register_case(reference_image, reference_label, target_image, "deformable", cancel, settings)
            built.append(Candidate(name, located.info["linear"], located.transform, np.asarray(located.label.array),
                                   located.probabilities, located.info, located.seconds))
            continue
        linear, transform = textbook_transform(target, ref_image, ref_distance, name, settings, textbook)
        probabilities = _warp_labels(reference_label, target, transform, values, settings.label_sigma_mm)
        built.append(Candidate(name, linear, transform, labels_from_probabilities(probabilities, shape), probabilities,
                               seconds=time.perf_counter() - tick))
    check_cancel(cancel)
    reference_volume_mm3 = float((reference_label.array > 0).sum()) * float(np.prod(reference_label.spacing))
    return built, candidate_evidence(built, target, ref_image, settings.similarity_margin_mm, values,
                                     reference_volume_mm3)


def register_robust(reference_image: Volume, reference_label: Volume, target_image: Volume,
                    method: str = "intensity", cancel=None, settings: RegistrationSettings = DEFAULT_SETTINGS,
                    candidates: Sequence[str] = CANDIDATES,
                    textbook: TextbookSettings = DEFAULT_TEXTBOOK) -> RegisteredCase:
    """Register with every pipeline in `candidates`, keep the one the evidence picks (module docstring).

    ``method``: ``"deformable"`` (the chosen candidate's warped labels) or ``"intensity"`` (followed by the
    atlas-prior intensity EM, as `register_case`). `info["candidates"]`: the evidence per candidate and the
    choice.
    """
    if method not in ROBUST_METHODS:
        raise InputError(f"robust registration supports methods deformable and intensity, not {method!r}")
    with fixed_threads():
        return _register_robust(reference_image, reference_label, target_image, method, cancel, settings,
                                candidates, textbook)


def _register_robust(reference_image, reference_label, target_image, method, cancel, settings, candidates,
                     textbook) -> RegisteredCase:
    start = time.perf_counter()
    built, evidence = build_candidates(reference_image, reference_label, target_image, cancel, settings,
                                       candidates, textbook)
    case = conclude(target_image, built, evidence, method, settings, cancel)
    case.seconds = time.perf_counter() - start
    return case


def conclude(target_image: Volume, built: Sequence[Candidate], evidence: Sequence[dict], method: str,
             settings: RegistrationSettings = DEFAULT_SETTINGS, cancel=None) -> RegisteredCase:
    """The chosen candidate as a `RegisteredCase` (with the intensity stage when ``method="intensity"`` and it
    agrees with the registration); `seconds` counts this step only."""
    start = time.perf_counter()
    chosen_index = choose_candidate(evidence)
    chosen = built[chosen_index]
    probabilities = chosen.probabilities
    label = target_image.with_array(chosen.label)
    values = sorted(probabilities)
    quality_evidence = {"candidates": evidence[chosen_index]["label_agreement"]}
    info = {"candidates": evidence, "chosen_candidate": chosen.name}
    if method == "intensity":
        check_cancel(cancel)
        # the intensity stage redraws borders from the target's contrast: only where some structure stands out
        # from its surroundings (cardiac blood pools do; the hippocampus in grey matter does not, and there the
        # stage lost 0.1-0.4 Dice on every selection pair)
        separability = contrast_separability(target_image, chosen.label)
        info["separability"] = {v: round(a, SCORE_DECIMALS) for v, a in separability.items()}
        info["intensity_kept"] = bool(round(max(separability.values(), default=0.0), SCORE_DECIMALS)
                                      >= INTENSITY_MIN_SEPARABILITY)
        if info["intensity_kept"]:
            refined, refined_probabilities = refine_by_intensity(target_image, probabilities, settings.intensity)
            moved = label_agreement(refined, [chosen.label], values)
            info["intensity_agreement"] = {v: round(a, SCORE_DECIMALS) for v, a in moved.items()}
            label = target_image.with_array(refined)
            probabilities = refined_probabilities
            quality_evidence["intensity"] = info["intensity_agreement"]
    info["quality_evidence"] = quality_evidence
    info["alignment_ncc"] = evidence[chosen_index]["ncc_own"]
    return RegisteredCase(label, probabilities, evidence[chosen_index]["ncc_linear"], time.perf_counter() - start,
                          method, chosen.transform, {}, info)


def describe_choice(info: dict) -> str:
    """One line for the notes: which candidate was kept, the evidence for each (a volume change out of bounds
    marked implausible), the intensity stage's fate."""
    parts = [f"{e['name']} (NCC {e['ncc_own']:.3f}, agreement {e['agreement']:.3f}, volume change "
             f"{e['volume_change']:.2f}{'' if plausible_volume_change(e) else ' implausible'})"
             for e in info["candidates"]]
    text = f"registration kept {info['chosen_candidate']} of " + ", ".join(parts)
    if "intensity_kept" in info:
        separability = max(info["separability"].values(), default=0.0)
        text += (f"; intensity stage {'run' if info['intensity_kept'] else 'skipped'} (contrast separability "
                 f"{separability:.3f}, threshold {INTENSITY_MIN_SEPARABILITY})")
    return text

"""`warp`: Med-PerSAM (our reconstruction, ../shared/docs/REFERENCES.md 3.7-3.8): the reference warped onto the
target, prompts extracted from the warped mask, refined over a few rounds by the model's own output.

* Warp (`--warp`): `registration` = the registration generator's prior (candidates chosen by label-free evidence,
  deformable for a model with memory, with the intensity EM for a memory-less one and for model none; fused over
  several references as the engine says); `learned` = the chosen candidate's linear stage, then the
  test-time-fitted displacement CNN of `proxyprompt.learned_warp` per slice pair instead of demons (several
  references: their warped soft labels averaged).
* Prompts per slice and structure (`--warp-prompts`, comma-separated): `box` (the warped mask's box), `points`
  (`warp_prompts.point_prompts`: prototype similarity, eroded / dilated candidates split into sub-regions; needs a
  model with the `points` capability, dropped with a note otherwise), `mask` (SAM 2: the warped mask as the
  conditioning mask; LiteMedSAM / SAM ViT: the prior as the decoder's mask input).
* Models: with memory (SAM 2) the prompts go on `--conditioning-frames` slices spread over the structure's slice
  range and SAM 2 propagates the rest; refinement rounds make the model's masks on those slices the conditioning
  masks. Without memory (LiteMedSAM, SAM ViT) every slice in the range is prompted from the prior through the shared
  model stage (`prior_refinement`: box margin in model-input pixels, prior kept for a structure whose mask moves with its box); refinement rounds take
  the model's output as the next prior. With `--warp learned` each round first refits the warp with the
  mask-alignment term (the warped reference mask must match the model's mask) and prompts from the refitted warp.
* Rounds stop when two consecutive outputs agree (Dice > `--warp-stop-agreement` for every structure) or at the
  engine's `refinement_rounds` (3). With model `none` the warped labels are the result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..filters import largest_component
from ..frames import bounding_box, make_slice_stack
from ..learned_warp import LOSSES, WarpFitSettings, fit_displacement, image_dissimilarity, warp_frames
from ..metrics import dice
from ..options import option
from ..progress import check_cancel
from ..registration import fixed_threads, labels_from_probabilities
from ..registration_candidates import CANDIDATES, build_candidates, choose_candidate
from .base import Generator, GeneratorContext, ObjectPrompt, PromptPlan, register_generator
from .prior_refinement import PriorStageOptions
from .propagation import reference_rings
from .registration import RegistrationGenerator, default_registration_method
from .warp_prompts import point_prompts, similarity_maps

WARPS = ("registration", "learned")
PROMPT_KINDS = ("box", "points", "mask")
ROUND_MIN_AGREEMENT = 0.5  # refinement rounds with a memory-less model: the per-slice choice against the last round


@dataclass(frozen=True)
class WarpOptions(PriorStageOptions):
    warp: str = option("registration", "how the reference is warped onto the target: registration (SimpleITK, the "
                                        "registration generator's) or learned (a displacement CNN fitted at test time)",
                       str, WARPS)
    warp_iterations: int = option(150, "learned warp: optimiser steps of the test-time fit", int, minimum=1)
    warp_resolution: int = option(64, "learned warp: longer side (px) of the grid the displacement is fitted on",
                                  int, minimum=16)
    warp_loss: str = option("mse", "learned warp: image dissimilarity (mse of standardised images, or local ncc)",
                            str, LOSSES)
    warp_prompts: str = option("box,points", "prompts per slice from the warped mask, comma-separated of box, points, "
                                             "mask (points need a model that executes them: SAM 2)", str)
    positive_points: int = option(3, "positive points per slice and structure (one per sub-region)", int, minimum=0)
    negative_points: int = option(2, "negative points per slice and structure", int, minimum=0)
    point_kernel: int = option(2, "px the warped mask is eroded (positives) / dilated (negatives) by", int, minimum=0)
    point_spacing: float = option(6.0, "minimum distance (px) between two points of a kind on a slice", float,
                                  minimum=0.0)
    conditioning_frames: int = option(3, "SAM 2: slices prompted (then refined) per structure; the rest propagates",
                                      int, minimum=1)
    warp_stop_agreement: float = option(0.98, "refinement stops when two rounds agree above this Dice", float,
                                        minimum=0.0, maximum=1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.prompt_kinds()) - set(PROMPT_KINDS))
        if unknown or not self.prompt_kinds():
            raise InputError(f"option warp_prompts: unknown or no prompt kind(s) {', '.join(unknown)}; "
                             f"known: {', '.join(PROMPT_KINDS)}")

    def prompt_kinds(self):
        return tuple(kind.strip() for kind in self.warp_prompts.split(",") if kind.strip())

    def fit_settings(self) -> WarpFitSettings:
        return WarpFitSettings(iterations=self.warp_iterations, resolution=self.warp_resolution, loss=self.warp_loss)


@dataclass
class _LearnedWarp:
    """What the refit needs: target frames, warped-reference frames (linear stage), reference soft labels (linear
    stage) and the current displacement, per reference."""

    moving: np.ndarray  # [N, H, W] reference image on the target frames (linear stage)
    labels: Dict[int, np.ndarray]  # value -> [N, H, W] reference soft label on the target frames (linear stage)
    displacement: np.ndarray  # [N, 2, H, W]


def conditioning_frames(mask_nhw: np.ndarray, count: int) -> List[int]:
    """Up to `count` frames holding the structure, spread over its slice range (the largest cross-section among
    the frames nearest each evenly spaced position)."""
    areas = np.asarray(mask_nhw).reshape(mask_nhw.shape[0], -1).sum(axis=1)
    present = np.flatnonzero(areas > 0)
    if present.size == 0:
        return []
    if count == 1 or present.size == 1:
        return [int(present[np.argmax(areas[present])])]
    positions = np.linspace(present[0], present[-1], count + 2)[1:-1] if present.size > count else present
    chosen = []
    for position in positions:
        nearest = present[np.argsort(np.abs(present - position), kind="stable")[:2]]
        frame = int(nearest[np.argmax(areas[nearest])])
        if frame not in chosen:
            chosen.append(frame)
    return sorted(chosen)


@register_generator
class WarpGenerator(Generator):
    name = "warp"
    description = ("Med-PerSAM: the reference warped onto the target (registration or a test-time-fitted CNN), box / "
                   "point / mask prompts from the warped mask, refined by the model's own output")
    Options = WarpOptions

    def __init__(self) -> None:
        self._learned: List[_LearnedWarp] = []
        self._fixed: Optional[np.ndarray] = None
        self._previous: Optional[Dict[int, np.ndarray]] = None
        self._conditioning: Dict[int, List[int]] = {}

    # ---- warping ------------------------------------------------------------------------------------
    def warp_prior_plan(self, context: GeneratorContext) -> PromptPlan:
        """A plan holding the warped masks as priors (per label [N, H, W]) and the warp's notes."""
        options = self.options_of(context)
        if options.warp == "registration":
            method = default_registration_method(context.model)
            return RegistrationGenerator.plan_with_method(context, method)
        return self._learned_prior(context, options)

    def _learned_prior(self, context: GeneratorContext, options: WarpOptions) -> PromptPlan:
        frames = context.target_frames
        self._fixed = frames.images
        target_sitk = context.target_image.to_sitk()
        settings = options.fit_settings()
        notes = []
        for index, reference in enumerate(context.references):
            check_cancel(context.cancel)
            with fixed_threads():
                built, evidence = build_candidates(reference.image, reference.label, context.target_image,
                                                   context.cancel, candidates=CANDIDATES)
                chosen = built[choose_candidate(evidence)]
                moved = sitk.Resample(reference.image.to_sitk(), target_sitk, chosen.linear, sitk.sitkLinear, 0.0,
                                      sitk.sitkFloat32)
                soft = {}
                for value in context.labels:
                    one_hot = reference.label.with_array((reference.label.array == value).astype(np.float32))
                    warped = sitk.Resample(one_hot.to_sitk(), target_sitk, chosen.linear, sitk.sitkLinear, 0.0,
                                           sitk.sitkFloat32)
                    soft[value] = frames.labels(context.target_image.with_array(
                        np.clip(sitk.GetArrayFromImage(warped), 0, 1)))
            moving = make_slice_stack(context.target_image.with_array(sitk.GetArrayFromImage(moved)),
                                      frames.axis).images
            displacement = fit_displacement(frames.images, moving, settings, progress=context.progress,
                                            cancel=context.cancel, phase="warp")
            before = image_dissimilarity(frames.images, moving, settings)
            after = image_dissimilarity(frames.images, warp_frames(moving, displacement), settings)
            self._learned.append(_LearnedWarp(moving, soft, displacement))
            notes.append(f"reference {index + 1}: linear stage of registration candidate '{chosen.name}', then the "
                         f"learned warp ({settings.iterations} steps at {settings.resolution} px, {settings.loss}: "
                         f"dissimilarity {before:.3f} -> {after:.3f})")
        return self._plan_from_learned(context, notes)

    def _plan_from_learned(self, context: GeneratorContext, notes: List[str]) -> PromptPlan:
        frames = context.target_frames
        probabilities = {v: np.zeros(frames.images.shape, np.float32) for v in context.labels}
        for warp in self._learned:
            for value in context.labels:
                probabilities[value] += warp_frames(warp.labels[value], warp.displacement) / len(self._learned)
        label_stack = labels_from_probabilities(probabilities, frames.images.shape)
        objects = {}
        for value in context.labels:
            mask = largest_component(label_stack == value)
            objects[value] = ObjectPrompt(label=value, prior=mask.astype(np.float32))
        return PromptPlan(objects=objects, optional_fields=("prior",), notes=notes)

    def _refit(self, context: GeneratorContext, masks: Dict[int, np.ndarray]) -> PromptPlan:
        """The paper's loop: refit each learned warp with the mask-alignment term (the warped reference mask must
        match the model's refined mask); a fresh, seeded fit (deterministic)."""
        options = self.options_of(context)
        settings = options.fit_settings()
        target_mask = np.zeros(self._fixed.shape, np.float32)
        for mask in masks.values():
            target_mask = np.maximum(target_mask, mask.astype(np.float32))
        for warp in self._learned:
            reference_mask = np.zeros(self._fixed.shape, np.float32)
            for value in masks:
                reference_mask = np.maximum(reference_mask, warp.labels[value])
            warp.displacement = fit_displacement(self._fixed, warp.moving, settings, target_mask, reference_mask,
                                                 progress=context.progress, cancel=context.cancel, phase="warp")
        return self._plan_from_learned(context, [f"round {context.refinement_round}: learned warp refitted with the "
                                                 f"mask-alignment term"])

    # ---- prompts --------------------------------------------------------------------------------------
    def _prompts(self, context: GeneratorContext, options: WarpOptions, plan: PromptPlan,
                 model_masks: Optional[Dict[int, np.ndarray]]) -> PromptPlan:
        """Box / points / mask prompts from each object's prior (the warped mask) on the frames the model reads."""
        model = context.model
        if model is None:
            return plan
        kinds = options.prompt_kinds()
        memory = model.capabilities.memory
        priors = {v: np.asarray(p.prior) > 0.5 for v, p in plan.objects.items() if p.prior is not None}
        similarity = None
        if "points" in kinds and not (model.capabilities.points and model.capabilities.pixel_features):
            note = "point prompts not made: the model does not execute points (or offers no per-pixel features)"
            if note not in plan.notes:
                plan.notes.append(note)
        elif "points" in kinds and priors:
            features = model.pixel_features(context.target_frames, cancel=context.cancel)
            similarity = {v: similarity_maps(features, mask) for v, mask in priors.items()}
        for value, prompt in plan.objects.items():
            mask = priors.get(value)
            if mask is None:
                continue
            present = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
            if present.size:
                prompt.frame_range = (int(present[0]), int(present[-1]))
            if memory:
                if value not in self._conditioning:
                    self._conditioning[value] = conditioning_frames(mask, options.conditioning_frames)
                frames = self._conditioning[value]
            else:
                frames = [int(f) for f in present]
            for frame in frames:
                check_cancel(context.cancel)
                source = mask[frame]
                if model_masks is not None and memory and model_masks[value][frame].any():
                    source = model_masks[value][frame]  # refined slices: the model's own mask conditions
                    prompt.masks[frame] = source.copy()
                elif memory and "mask" in kinds and source.any():
                    prompt.masks[frame] = source.copy()
                if "box" in kinds:
                    box = bounding_box(source)
                    if box is not None:
                        prompt.boxes[frame] = box
                if similarity is not None:
                    points = point_prompts(source, similarity[value][frame], options.positive_points,
                                           options.negative_points, options.point_kernel, options.point_spacing)
                    if points is not None:
                        prompt.points[frame] = points
        if memory:
            plan.prior_policy = None
            for prompt in plan.objects.values():
                prompt.prior = None  # SAM 2 reads the conditioning frames, not a prior
        else:
            plan.prior_policy = options.prior_policy(mask_prompt="mask" in kinds)
            if plan.prior_policy.describe() not in plan.notes:
                plan.notes.append(plan.prior_policy.describe())
        if "points" in kinds:
            plan.optional_fields = tuple(sorted(set(plan.optional_fields) | {"points"}))
        return plan

    # ---- the generator interface ----------------------------------------------------------------------
    def plan(self, context: GeneratorContext) -> PromptPlan:
        options = self.options_of(context)
        self._learned, self._previous, self._conditioning = [], None, {}
        plan = self.warp_prior_plan(context)
        if plan.rings is None:  # the rings the reference's label has (a warped ring may be open)
            plan.rings = reference_rings(context.references)
        plan.notes.append(f"warp: {options.warp}; prompts: {', '.join(options.prompt_kinds())}")
        return self._prompts(context, options, plan, None)

    def refine(self, plan: PromptPlan, probabilities: Dict[int, np.ndarray],
               context: GeneratorContext) -> Optional[PromptPlan]:
        if context.model is None:
            return None
        options = self.options_of(context)
        masks = {v: np.asarray(p) > 0.5 for v, p in probabilities.items()}
        if self._previous is not None:
            agreement = min(dice(masks[v], self._previous[v]) for v in masks)
            if agreement > options.warp_stop_agreement:
                return None  # two rounds agree: stop
        self._previous = masks
        if self._learned:
            new_plan = self._refit(context, masks)
        else:
            new_plan = PromptPlan(objects={v: ObjectPrompt(label=v, prior=masks[v].astype(np.float32))
                                           for v in masks}, optional_fields=("prior",))
        new_plan.quality = plan.quality
        new_plan.rings = plan.rings
        new_plan.notes.append(f"round {context.refinement_round}: prompts from the model's output")
        refined = self._prompts(context, options, new_plan, masks)
        if refined.prior_policy is not None:
            # a round keeps the previous round's mask on slices where the model now departs from it (Dice < 0.5):
            # without it the masks drifted from round to round (measured: ACDC patient066 <- 078, the LV swallowed
            # the myocardium over 3 rounds, 0.85 -> 0.48)
            policy = refined.prior_policy
            refined.prior_policy = replace(policy, min_agreement=max(policy.min_agreement, ROUND_MIN_AGREEMENT))
        return refined

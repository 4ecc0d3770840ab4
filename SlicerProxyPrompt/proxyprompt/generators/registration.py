"""`registration`: the reference label(s) registered onto the target (classic atlas segmentation).

With model `none` the warped labels are the result (works with no GPU and no weights: the baseline every
other generator must beat). With a model, they become per-slice prompts: a mask prior, a box per slice,
and the slice range where each structure is expected (the stopping rule of propagation); a memory-less model runs
them through the shared model stage from a prior (`prior_refinement`: `--prior-box-margin`,
`--prior-min-stability`, `--prior-min-agreement`, `--prior-crop-margin`), as the warp generator does.

For methods deformable / intensity (the defaults) every reference is registered by several pipelines and one is
kept by label-free evidence (`proxyprompt.registration_candidates`); the plan carries a per-structure quality
estimate (`PromptPlan.quality`, `proxyprompt.quality`) and a LOW CONFIDENCE note when it is low. Options
(`RegistrationOptions`): ``registration_method``, ``registration_candidates`` (comma-separated subset of
`registration_candidates.CANDIDATES`); fusion of several references is the engine's (`EngineOptions`). A sparse
reference (`ReferenceCase.annotated_slices`, `proxyprompt.sparse`) counts only where it is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Tuple

import numpy as np

from ..errors import InputError
from ..frames import bounding_box
from ..options import REGISTRATION_METHODS, option
from ..quality import quality_warnings
from ..registration import segment_by_registration
from ..registration_candidates import CANDIDATES, ROBUST_METHODS, describe_choice, register_robust
from ..sparse import prepare_reference
from .base import Generator, GeneratorContext, ObjectPrompt, PromptPlan, register_generator
from .prior_refinement import PriorStageOptions
from .propagation import reference_rings


@dataclass(frozen=True)
class RegistrationOptions(PriorStageOptions):
    registration_method: Optional[str] = option(
        None, "registration stages (default: intensity = several registration pipelines, the best by label-free "
              "evidence, then the intensity EM where the target's contrast shows the structures, with --model none and as "
              "a memory-less model's prior (LiteMedSAM); deformable = without the EM, as a memory model's prior)", str, REGISTRATION_METHODS)
    registration_candidates: Optional[str] = option(
        None, "comma-separated registration pipelines a pair is chosen among by label-free evidence "
              f"(default: all of {','.join(CANDIDATES)}; 'locate' = the cardiac-tuned pipeline alone)", str)

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.candidates()) - set(CANDIDATES))
        if unknown:
            raise InputError(f"option registration_candidates: unknown pipeline(s) {', '.join(unknown)}; "
                             f"known: {', '.join(CANDIDATES)}")

    def candidates(self) -> Tuple[str, ...]:
        if not self.registration_candidates:
            return CANDIDATES
        return tuple(name.strip() for name in self.registration_candidates.split(",") if name.strip())


def plan_from_label_stack(label_stack: np.ndarray, labels, box_margin: int = 0) -> dict:
    """ObjectPrompts (prior, per-slice boxes, slice range) from a label stack [N, H, W] on the target frames."""
    objects = {}
    for value in labels:
        mask = label_stack == value
        present = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
        prompt = ObjectPrompt(label=int(value), prior=mask.astype(np.float32))
        if present.size:
            prompt.frame_range = (int(present[0]), int(present[-1]))
            for frame in present:
                prompt.boxes[int(frame)] = bounding_box(mask[frame], box_margin)
        objects[int(value)] = prompt
    return objects


def default_registration_method(model) -> str:
    """``"intensity"`` when the registered label is the result (model None) and as the prior of a memory-less model
    (LiteMedSAM, SAM ViT: the model stage of `prior_refinement`); ``"deformable"`` as the prior of a model with memory
    (SAM 2: not measured with real weights, unchanged).

    Measured (ACDC, LiteMedSAM): before the EM's slice-axis re-fit, on 16 pairs, the intensity stage improved the
    label itself (model none: mean Dice 0.468 -> 0.503) but a model prompted from it did worse than from the demons
    labels (0.538 -> 0.488). With the re-fit, on the 40 + 40 pairs of benchmarks/accuracy.py (offsets 1 and 2), the
    two priors gave LiteMedSAM the same (demons 0.559 / 0.501, intensity 0.560 / 0.495), so the faster one stayed.
    With the model stage's box margin in model-input pixels, its stability check and the rings taken from the
    reference (session 8, docs/benchmarks.md), on the 4 ACDC ED selection pairs: intensity 0.815 vs deformable 0.777
    (registration alone 0.732); before the rings came from the reference the intensity prior's open myocardium sank
    two of them (0.708). Hippocampus: the two priors are bit-identical on all 7 pairs measured (the EM's gate).
    """
    if model is None:
        return "intensity"
    memory = getattr(getattr(model, "capabilities", None), "memory", True)
    return "deformable" if memory else "intensity"


@register_generator
class RegistrationGenerator(Generator):
    name = "registration"
    description = "reference labels registered onto the target (SimpleITK); a prior for any model, or the result"
    needs_training = False
    Options = RegistrationOptions

    def plan(self, context: GeneratorContext) -> PromptPlan:
        options = self.options_of(context)
        plan = self.plan_with_method(context, options.registration_method, options.candidates())
        if context.model is not None and not context.model.capabilities.memory:
            plan.prior_policy = options.prior_policy()  # the model stage adds to the prior (prior_refinement)
            plan.notes.append(plan.prior_policy.describe())
        return plan

    @staticmethod
    def plan_with_method(context: GeneratorContext, method: Optional[str],
                         candidates: Tuple[str, ...] = CANDIDATES) -> PromptPlan:
        """The plan from the registered reference label(s) (None: the default method for the model); fusion of
        several references as the engine's options say. Also the support-memory generator's fallback."""
        pairs, known, sparse_notes = [], [], []
        for index, reference in enumerate(context.references):
            # sparse references: unannotated slices are unknown, never background (proxyprompt.sparse)
            label, known_mask, note = prepare_reference(reference.label, reference.annotated_slices)
            pairs.append((reference.image, label))
            known.append(known_mask)
            if note:
                sparse_notes.append(f"reference {index + 1}: {note}")
        method = method or default_registration_method(context.model)
        # several registration pipelines per reference, one kept by label-free evidence (registration_candidates)
        register = partial(register_robust, candidates=candidates) if method in ROBUST_METHODS else None
        fused, info = segment_by_registration(
            pairs,
            context.target_image,
            method=method,
            fusion=context.engine_options.fusion,
            top_k=context.engine_options.fusion_top_k,
            # a model's prior is cleaned here (its boxes and slice ranges come from it); without a model the
            # registered labels are the result, cleaned once by the engine (or kept whole with cleanup=False)
            cleanup=context.model is not None,
            cancel=context.cancel,
            progress=context.progress,
            register=register,
            known=known,
        )
        label_stack = context.target_frames.labels(fused)
        # the prior is what a model without a prior input cannot use; boxes and slice ranges still prompt it
        plan = PromptPlan(objects=plan_from_label_stack(label_stack, context.labels), optional_fields=("prior",),
                          rings=reference_rings(context.references))  # an open registered ring is still a ring
        plan.notes.append(
            f"registration ({method}) of {len(pairs)} reference(s)"
        )
        plan.notes.extend(sparse_notes)
        for index in info["chosen"]:
            reference_info = info["reference_info"][index]
            if "candidates" in reference_info:
                plan.notes.append(f"reference {index + 1}: {describe_choice(reference_info)}")
        plan.quality = info["quality"]
        table = context.references[0].table or {}
        names = {v: getattr(table[v], "name", str(table[v])) for v in context.labels if v in table}
        plan.notes.extend(quality_warnings(plan.quality, names))
        return plan

"""`registration`: the reference label(s) registered onto the target (classic atlas segmentation).

With model `none` the warped labels are the result (works with no GPU and no weights: the baseline every
other generator must beat). With a model, they become per-slice prompts: a mask prior, a box per slice,
and the slice range where each structure is expected (the stopping rule of propagation).
"""

from __future__ import annotations

import numpy as np

from dataclasses import dataclass
from typing import Optional

from ..frames import bounding_box
from ..options import REGISTRATION_METHODS, Options, option
from .base import Generator, GeneratorContext, ObjectPrompt, PromptPlan, register_generator


@dataclass(frozen=True)
class RegistrationOptions(Options):
    registration_method: Optional[str] = option(
        None, "registration stages (default: intensity = locate, affine, demons, intensity EM with --model none; "
              "deformable = without the EM as a model's prior)", str, REGISTRATION_METHODS)


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
    """``"intensity"`` when the registered label is the result (model None), ``"deformable"`` as a model's prior.

    Measured (ACDC, LiteMedSAM): before the EM's slice-axis re-fit, on 16 pairs, the intensity stage improved the
    label itself (model none: mean Dice 0.468 -> 0.503) but a model prompted from it did worse than from the demons
    labels (0.538 -> 0.488). With the re-fit, on the 40 + 40 pairs of benchmarks/accuracy.py (offsets 1 and 2), the
    two priors give LiteMedSAM the same: demons 0.559 / 0.501 (the benchmark's rows), intensity 0.560 / 0.495 (a
    one-off run of the same pairs, `Engine("litemedsam").segment(..., generator="registration",
    options={"registration_method": "intensity"})`), so the faster one stays.
    """
    return "intensity" if model is None else "deformable"


@register_generator
class RegistrationGenerator(Generator):
    name = "registration"
    description = "reference labels registered onto the target (SimpleITK); a prior for any model, or the result"
    needs_training = False
    Options = RegistrationOptions

    def plan(self, context: GeneratorContext) -> PromptPlan:
        return self.plan_with_method(context, self.options_of(context).registration_method)

    @staticmethod
    def plan_with_method(context: GeneratorContext, method: Optional[str]) -> PromptPlan:
        """The plan from the registered reference label(s) (None: the default method for the model); fusion of
        several references as the engine's options say. Also the support-memory generator's fallback."""
        from ..registration import segment_by_registration

        pairs = [(reference.image, reference.label) for reference in context.references]
        method = method or default_registration_method(context.model)
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
        )
        label_stack = context.target_frames.labels(fused)
        # the prior is what a model without a prior input cannot use; boxes and slice ranges still prompt it
        plan = PromptPlan(objects=plan_from_label_stack(label_stack, context.labels), optional_fields=("prior",))
        plan.notes.append(
            f"registration ({method}) of {len(pairs)} reference(s)"
        )
        return plan

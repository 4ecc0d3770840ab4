"""`registration`: the reference label(s) registered onto the target (classic atlas segmentation).

With model `none` the warped labels are the result (works with no GPU and no weights: the baseline every
other generator must beat). With a model, they become per-slice prompts: a mask prior, a box per slice,
and the slice range where each structure is expected (the stopping rule of propagation).

For methods deformable / intensity (the defaults) every reference is registered by several pipelines and one is
kept by label-free evidence (`proxyprompt.registration_candidates`); the plan carries a per-structure quality
estimate (`PromptPlan.quality`, `proxyprompt.quality`) and a LOW CONFIDENCE note when it is low. Options (in
`context.options`): ``registration_method``, ``fusion``, ``top_k``, ``registration_candidates`` (subset of
`registration_candidates.CANDIDATES`), ``annotated_slices`` (sparse references, `proxyprompt.sparse`).
"""

from __future__ import annotations

import numpy as np

from ..frames import bounding_box
from ..progress import report
from .base import Generator, GeneratorContext, ObjectPrompt, PromptPlan, register_generator


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


def annotated_slices_for(options: dict, index: int):
    """Option "annotated_slices": None (slices with any label), one list for every reference, or one list (or
    None) per reference."""
    annotated = options.get("annotated_slices")
    if annotated is None or not len(annotated):
        return None
    if all(isinstance(entry, (list, tuple)) or entry is None for entry in annotated):
        return annotated[index] if index < len(annotated) else None
    return [int(n) for n in annotated]


@register_generator
class RegistrationGenerator(Generator):
    name = "registration"
    description = "reference labels registered onto the target (SimpleITK); a prior for any model, or the result"
    needs_training = False

    def plan(self, context: GeneratorContext) -> PromptPlan:
        from functools import partial

        from ..quality import quality_warnings
        from ..registration import segment_by_registration
        from ..registration_candidates import CANDIDATES, ROBUST_METHODS, describe_choice, register_robust
        from ..sparse import prepare_reference

        options = context.options
        pairs, known, sparse_notes = [], [], []
        for index, reference in enumerate(context.references):
            # sparse references: unannotated slices are unknown, never background (proxyprompt.sparse)
            label, known_mask, note = prepare_reference(reference.label, annotated_slices_for(options, index))
            pairs.append((reference.image, label))
            known.append(known_mask)
            if note:
                sparse_notes.append(f"reference {index + 1}: {note}")
        progress = context.progress

        def on_fraction(fraction, message=""):
            report(progress, "register", int(round(100 * fraction)), 100, message)

        method = options.get("registration_method") or default_registration_method(context.model)
        # several registration pipelines per reference, one kept by label-free evidence (registration_candidates);
        # option "registration_candidates": which ones (default all; ["locate"] = the cardiac-tuned pipeline alone)
        candidates = tuple(options.get("registration_candidates") or CANDIDATES)
        register = partial(register_robust, candidates=candidates) if method in ROBUST_METHODS else None
        fused, info = segment_by_registration(
            pairs,
            context.target_image,
            method=method,
            fusion=options.get("fusion", "vote"),
            top_k=options.get("top_k"),
            cleanup=True,
            cancel=context.cancel,
            progress=on_fraction,
            register=register,
            known=known,
        )
        label_stack = context.target_frames.labels(fused)
        plan = PromptPlan(objects=plan_from_label_stack(label_stack, context.labels))
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

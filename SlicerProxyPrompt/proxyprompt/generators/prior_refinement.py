"""The model stage from a mask prior (issue 16 item 2): how a memory-less model (LiteMedSAM, SAM ViT) refines a prior
so that it adds to it rather than losing Dice. Shared by every generator that hands a model a prior (registration,
warp): the generator puts a `PriorPolicy` on its plan (`PromptPlan.prior_policy`), `propagation.execute_plan` runs it.

Measured (docs/benchmarks.md, "Model stage from a prior"; settings chosen on selection pairs of ACDC and hippocampus):
* **box margin in model-input pixels** (`box_margin`, default 5: MedSAM's own box jitter at 256 px): LiteMedSAM
  fills the box it is given, and a margin in frame pixels grows with the upsampling: 3 frame px on a 51 px
  hippocampus slice is 15 input px and made its masks ~1.5x the truth (per-slice diagnosis, hippocampus_001).
* **stability check** (`min_stability`, default 0.85; `jitter_px` 2): the model runs a second time with each box
  2 frame px wider; a structure whose mask moves with the box (3D Dice between the two runs below 0.85) keeps its
  prior. On hippocampus LiteMedSAM is no better than the registration prior even from the TRUE box (0.74-0.77 3D
  Dice against priors of 0.75-0.82) and its mask follows the box (0.64-0.83); on ACDC it snaps to the chambers'
  edges (0.93-1.0 measured at 1 vs 3 px) and adds +0.06 to +0.19 to the prior.
* **choice per slice** (`min_agreement`, default 0: off): keeping the prior on slices where the model disagrees with
  it cost ACDC up to 0.15 where the prior was poor (the disagreement is the model's correction there).
* **crop** (`crop_margin`, default off): the frames cropped to a square around the prior's box over the volume (all
  structures, this fraction of its side added each way), so the structures fill the model's 256 px input as in
  MedSAM's own practice. Measured again with the margin and stability check above (ACDC ED selection pairs
  patient001 <- 002, 002 <- 008): crop 0.1 / 0.25 / 0.5 gave 0.773 / 0.804 / 0.836 against 0.848 for the whole
  frame, lower on every structure of both pairs and the lower the tighter; hippocampus unchanged (the stability check
  keeps the prior whatever the crop).
Slices without prior and seeds (corrections, conditioning masks) are handled by `SliceBySlicePropagation` as before.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import numpy as np

from ..contract import Corrections, ObjectPrompt, PriorPolicy, PromptPlan
from ..frames import SliceStack
from ..metrics import dice
from ..options import Options, option


@dataclass(frozen=True)
class PriorStageOptions(Options):
    """The options of the model stage from a prior, shared by the generators that give one (declared alike, so one
    CLI flag each). A negative crop margin: no crop (the whole frame)."""

    prior_crop_margin: float = option(
        -1.0, "model stage from a prior (LiteMedSAM, SAM ViT): crop the frames around the prior, this fraction of its "
             "size added on each side (negative: no crop, the whole frame)", float)
    prior_min_agreement: float = option(
        0.0, "model stage from a prior: per slice, keep the prior where the model's mask agrees with it below this "
             "Dice (0: always the model)", float, minimum=0.0, maximum=1.0)
    prior_box_margin: float = option(
        5.0, "model stage from a prior: margin around each prior box, in model-input pixels (LiteMedSAM: the frame's "
             "longest side is 256)", float, minimum=0.0)
    prior_min_stability: float = option(
        0.85, "model stage from a prior: keep a structure's prior where the model's mask moves with its box (3D Dice "
             "between runs with boxes --prior-jitter-px apart below this; 0: no check)", float, minimum=0.0,
        maximum=1.0)
    prior_jitter_px: float = option(
        2.0, "model stage from a prior: how much wider (frame pixels) the second box of the stability check is",
        float, minimum=0.0)

    def prior_policy(self, mask_prompt: bool = False) -> PriorPolicy:
        margin = None if self.prior_crop_margin < 0 else self.prior_crop_margin
        return PriorPolicy(crop_margin=margin, min_agreement=self.prior_min_agreement,
                           box_margin=self.prior_box_margin, jitter_px=self.prior_jitter_px,
                           min_stability=self.prior_min_stability, mask_prompt=mask_prompt)


def prior_crop(plan: PromptPlan, shape_hw: Tuple[int, int], margin: float,
               min_side: int) -> Optional[Tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) square-ish crop around every structure's prior over all frames, None when no prior."""
    union = None
    for prompt in plan.objects.values():
        if prompt.prior is None:
            continue
        present = np.asarray(prompt.prior) > 0.5
        union = present.any(axis=0) if union is None else (union | present.any(axis=0))
    if union is None or not union.any():
        return None
    height, width = shape_hw
    rows = np.flatnonzero(union.any(axis=1))
    cols = np.flatnonzero(union.any(axis=0))
    centre_y, centre_x = (rows[0] + rows[-1]) / 2.0, (cols[0] + cols[-1]) / 2.0
    side = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) * (1.0 + 2.0 * margin)
    side = int(np.ceil(max(side, min_side)))
    side_y, side_x = min(side, height), min(side, width)
    y0 = int(np.clip(round(centre_y - side_y / 2.0), 0, height - side_y))
    x0 = int(np.clip(round(centre_x - side_x / 2.0), 0, width - side_x))
    return y0, y0 + side_y, x0, x0 + side_x


def _crop_prompt(prompt: ObjectPrompt, y0: int, y1: int, x0: int, x1: int) -> ObjectPrompt:
    shift = np.array([x0, y0, x0, y0], dtype=np.float32)
    limit = np.array([x1 - x0 - 1, y1 - y0 - 1, x1 - x0 - 1, y1 - y0 - 1], dtype=np.float32)
    boxes = {f: np.clip(np.asarray(b, dtype=np.float32) - shift, 0, limit) for f, b in prompt.boxes.items()}
    return ObjectPrompt(
        label=prompt.label,
        masks={f: np.asarray(m)[y0:y1, x0:x1] for f, m in prompt.masks.items()},
        boxes=boxes,
        prior=None if prompt.prior is None else np.ascontiguousarray(np.asarray(prompt.prior)[:, y0:y1, x0:x1]),
        frame_range=prompt.frame_range,
    )


def crop_frames(frames: SliceStack, y0: int, y1: int, x0: int, x1: int) -> SliceStack:
    """The frames cut to a window (same volume and axis: only the images differ, so the feature cache keys differ)."""
    return replace(frames, images=np.ascontiguousarray(frames.images[:, y0:y1, x0:x1]))


def frame_box_margin(model, shape_hw: Tuple[int, int], input_margin: float) -> float:
    """A box margin given in model-input pixels, in frame pixels: SAM-family models resize the frame's longest side
    to `model.image_size`, so on a 50 px hippocampus slice one frame pixel is five input pixels (measured: LiteMedSAM
    fills the box it is given, so a 3 frame-pixel margin there made its masks half as large again as the truth)."""
    size = float(getattr(model, "image_size", 0) or max(shape_hw))
    return float(input_margin) * max(shape_hw) / size


def box_stability(first: np.ndarray, second: np.ndarray, prior: np.ndarray, skip=()) -> float:
    """3D Dice of two runs' masks of one structure over the slices its prior holds (seeded slices `skip`ped): how
    much the model's mask moves when its box does (1: not at all). NaN when no slice is left."""
    frames = [f for f in np.flatnonzero((prior > 0.5).reshape(prior.shape[0], -1).any(axis=1)) if f not in skip]
    if not frames:
        return float("nan")
    return dice(first[frames] > 0.5, second[frames] > 0.5)


def unstable_structures(model, run, plan: PromptPlan, policy: PriorPolicy, margin: float, first, seeded):
    """Labels whose mask moves with the box (`box_stability` below `policy.min_stability` between the run at
    `margin` and one at `margin + policy.jitter_px`): where the image gives the model no boundary of its own it
    draws the box it is given, and the prior is the better guess (measured on hippocampus, docs/benchmarks.md)."""
    if policy.min_stability <= 0:
        return {}
    second = run(plan, margin + policy.jitter_px)
    scores = {}
    for value, prompt in plan.objects.items():
        if prompt.prior is None or value not in first:
            continue
        stability = box_stability(first[value], second[value], np.asarray(prompt.prior),
                                  seeded | {int(f) for f in prompt.masks})
        if stability < policy.min_stability:
            scores[value] = stability
    return scores


def _prior_as_seeds(plan: PromptPlan, labels) -> PromptPlan:
    """The plan with `labels` fixed to their prior on every slice the prior holds (exact masks, nothing decoded), so
    that structures derived from them (a ring minus what it encloses) follow."""
    objects = {}
    for value, prompt in plan.objects.items():
        if value in labels and prompt.prior is not None:
            prior = np.asarray(prompt.prior) > 0.5
            masks = {int(f): prior[f] for f in np.flatnonzero(prior.reshape(prior.shape[0], -1).any(axis=1))}
            masks.update({int(f): np.asarray(m, dtype=bool) for f, m in prompt.masks.items()})
            prompt = replace(prompt, masks=masks)
        objects[value] = prompt
    return replace(plan, objects=objects)


def run_with_prior(model, frames: SliceStack, plan: PromptPlan, policy: PriorPolicy, strategy,
                   corrections: Optional[Corrections] = None, progress=None, cancel=None) -> Dict[int, np.ndarray]:
    """Execute a plan with priors on a memory-less model under `policy` with the slice-by-slice `strategy`
    (`propagation.SliceBySlicePropagation`; its prior box margin is set here from `policy.box_margin`): label ->
    [N, H, W] float32 probability."""
    n, height, width = frames.images.shape
    window = None
    if policy.crop_margin is not None and not any(p.embeddings for p in plan.objects.values()):
        window = prior_crop(plan, (height, width), policy.crop_margin, policy.min_crop_px)
    shape_hw = (height, width) if window is None else (window[1] - window[0], window[3] - window[2])
    margin = frame_box_margin(model, shape_hw, policy.box_margin)

    def run(this_plan: PromptPlan, box_margin: float, report_to=None):
        sized = replace(strategy, prior_margin=box_margin)
        if window is None:
            return sized.propagate(model, frames, this_plan, corrections, report_to, cancel)
        y0, y1, x0, x1 = window
        cropped_plan = replace(this_plan, objects={v: _crop_prompt(p, *window) for v, p in this_plan.objects.items()})
        cropped_corrections = None
        if corrections is not None:
            cropped_corrections = Corrections(np.ascontiguousarray(corrections.labels[:, y0:y1, x0:x1]),
                                              list(corrections.frames))
        cropped = sized.propagate(model, crop_frames(frames, *window), cropped_plan, cropped_corrections,
                                  report_to, cancel)
        full_size = {}
        for value, probability in cropped.items():
            full = np.zeros((n, height, width), dtype=np.float32)
            full[:, y0:y1, x0:x1] = probability
            full_size[value] = full
        return full_size

    seeded = set(corrections.frames) if corrections is not None else set()
    probabilities = run(plan, margin, progress)
    unstable = unstable_structures(model, run, plan, policy, margin, probabilities, seeded)
    if unstable:
        probabilities = run(_prior_as_seeds(plan, unstable), margin)
        # the clinician sees which structures are the prior's, not the model's (`--json` notes, the log)
        plan.notes.extend(
            f"model stage: label {value} keeps its prior (the model's mask moved with a {policy.jitter_px:g} px wider "
            f"box: 3D Dice {score:.2f} < {policy.min_stability:g})" for value, score in sorted(unstable.items()))
    for value, prompt in plan.objects.items():
        if prompt.prior is None or value not in probabilities or value in unstable:
            continue
        prior = np.asarray(prompt.prior, dtype=np.float32)
        output = probabilities[value]
        for frame in range(n):
            if frame in seeded or frame in prompt.masks:
                continue
            prior_mask = prior[frame] > 0.5
            if not prior_mask.any():
                continue
            if dice(output[frame] > 0.5, prior_mask) < policy.min_agreement:
                output[frame] = prior[frame]
        if corrections is not None:  # seeds are exact on the whole frame (the crop may have cut them)
            for frame in corrections.frames:
                output[frame] = (corrections.labels[frame] == value).astype(np.float32)
    return probabilities

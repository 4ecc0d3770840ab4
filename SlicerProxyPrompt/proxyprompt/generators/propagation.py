"""Slice-by-slice propagation: how a model without memory (LiteMedSAM, SAM ViT) is prompted over a volume.

Strategy, not model: it drives one model call, `model.predict_slice(frame, box, mask_prior, frames=, embedding=)
-> (probability [H, W], IoU score)`; a model with memory (SAM 2's video predictor, capability `memory`) executes a
plan itself (`model.propagate`). `execute_plan` picks the one or the other by the model's capabilities, and bounds a
memory model's output to each structure's `frame_range` (`clip_to_frame_ranges`; slice by slice, the range bounds the
propagation itself). `top_k_support` is the per-frame choice of support slices a memory model attends
(`PromptPlan.support_attention`).

The rules (measured on ACDC with LiteMedSAM; docs/benchmarks.md, the report of issue 3):
* slices with exact masks (user corrections, conditioning masks of the plan) are seeds, copied as is; slices
  prompted by prompt embeddings are decoded from them first and then act as seeds;
* with a prior (registration generator): each slice inside the prior's slice range gets the box of the
  prior on that slice (plus `prior_margin` px), shifted by the offset measured between the prior and the
  nearest seed where one exists; slices in the range where the prior is empty take the neighbour's
  prediction box; slices outside the range (extended to include corrected slices holding the label) stay
  empty;
* without a prior: from each seed (or box-only frame), outwards in both directions, each slice's box is the
  box of its neighbour's prediction; propagation stops at the plan's frame range, when the model's IoU
  score falls below `min_score`, when the mask shrinks below `min_area_ratio` of the seed's area or
  `min_area_px`, or when it keeps less than `min_overlap` IoU with the neighbour's mask.
* a ring-shaped label (one whose hole-filled mask contains another label: the myocardium around the left
  ventricle; detected generically by `ring_structure`, not by label number) cannot be described by a box:
  prompted with the outer box, LiteMedSAM segments the enclosed cavity (ring Dice 0.02 measured). So the
  ring is the prior's filled region (ring + enclosed labels) minus the model's enclosed structures (outer
  boundary from the prior, inner boundary from the model), minus the other labels; without a prior, the
  model's enclosed structure grown by the ring thickness measured on the seed slices, minus it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..frames import bounding_box, make_slice_stack
from ..progress import check_cancel, report
from .prior_refinement import run_with_prior


def _fill_holes_2d(mask_hw: np.ndarray) -> np.ndarray:
    """2D hole filling (scipy-free): background not connected to the border becomes foreground."""
    import SimpleITK as sitk

    if not mask_hw.any():
        return mask_hw.copy()
    image = sitk.GetImageFromArray(mask_hw.astype(np.uint8))
    filled = sitk.BinaryFillhole(image, fullyConnected=False, foregroundValue=1)
    return sitk.GetArrayFromImage(filled).astype(bool)


def ring_structure(masks_by_label: Dict[int, np.ndarray], min_fraction: float = 0.5) -> Dict[int, List[int]]:
    """Ring-shaped labels: {ring label: [labels it encloses]}.

    `masks_by_label`: label -> bool [N, H, W] (or [H, W]). A label is a ring when, slice by slice, its
    hole-filled mask minus itself covers at least `min_fraction` of another label's voxels.
    """
    filled: Dict[int, np.ndarray] = {}
    for value, mask in masks_by_label.items():
        mask = np.asarray(mask, dtype=bool)
        mask3 = mask[None] if mask.ndim == 2 else mask
        holes = np.zeros_like(mask3)
        for n in np.flatnonzero(mask3.reshape(mask3.shape[0], -1).any(axis=1)):
            holes[n] = _fill_holes_2d(mask3[n]) & ~mask3[n]
        filled[value] = holes
    rings: Dict[int, List[int]] = {}
    for ring, holes in filled.items():
        if not holes.any():
            continue
        inner = []
        for other, mask in masks_by_label.items():
            if other == ring:
                continue
            mask3 = np.asarray(mask, dtype=bool)
            mask3 = mask3[None] if mask3.ndim == 2 else mask3
            total = int(mask3.sum())
            if total and (holes & mask3).sum() >= min_fraction * total:
                inner.append(int(other))
        if inner:
            rings[int(ring)] = sorted(inner)
    return rings


def reference_rings(references) -> Dict[int, List[int]]:
    """Ring-shaped labels of the reference label(s) (`ring_structure` on each reference's frames; a ring kept when
    every reference has it). An annotated ring is closed, a registered or warped one may not be: measured on ACDC
    (docs/benchmarks.md), priors whose myocardium was open on some slices were not recognised as rings, the
    myocardium was box-prompted as a blob and LiteMedSAM returned the cavity (myocardium 0.44 -> 0.22)."""
    common: Optional[Dict[int, List[int]]] = None
    for reference in references:
        stack = make_slice_stack(reference.image).labels(reference.label)
        values = [int(v) for v in np.unique(stack) if v]
        rings = ring_structure({v: stack == v for v in values}) if len(values) > 1 else {}
        if common is None:
            common = rings
        else:
            common = {v: sorted(set(inner) & set(rings.get(v, ()))) for v, inner in common.items()}
            common = {v: inner for v, inner in common.items() if inner}
    return common or {}


@dataclass
class SliceBySlicePropagation:
    """The slice-by-slice strategy and its settings (measured defaults): `prior_margin` px added to boxes from a
    prior, `neighbour_margin` px added to boxes from a neighbour's prediction, `use_mask_prompt` (feed the prior as
    SAM's mask input), `min_score`, `min_area_px`, `min_area_ratio`, `min_overlap` (stopping rule without a
    prior), `ring_mode` ("prior-filled-minus-inner": the prior's filled region (ring + enclosed) minus the model's
    enclosed structures; "prior": the prior's ring minus the model's enclosed structures; "filled-minus-inner":
    the model's prediction in the outer box minus the enclosed structures, measured useless because LiteMedSAM
    segments the cavity inside the outer box), `shift_prior_to_seeds`."""

    prior_margin: float = 3
    neighbour_margin: int = 3
    use_mask_prompt: bool = False
    min_score: float = 0.5
    min_area_px: int = 10
    min_area_ratio: float = 0.15
    min_overlap: float = 0.2
    ring_mode: str = "prior-filled-minus-inner"
    shift_prior_to_seeds: bool = True

    def predict_slice(self, frame: int, box=None, mask_prior=None, embedding=None):
        """The model's one call: (probability [H, W], IoU score) of one frame of the stack being propagated."""
        return self._model.predict_slice(frame, box, mask_prior, frames=self._frames, embedding=embedding)

    def propagate(self, model, frames, plan, corrections=None, progress=None, cancel=None) -> Dict[int, np.ndarray]:
        """Execute a PromptPlan over the frames with a model without memory: label -> [N, H, W] float32.

        Only the slices that can hold a structure are encoded: those inside a prior's slice range are encoded
        up front (batched), the others only when propagation asks for them (a neighbour-driven structure that
        stops early never encodes the slices beyond); outside every range the output is background."""
        self._model, self._frames = model, frames
        n, height, width = frames.images.shape
        labels = list(plan.labels)
        objects = plan.objects

        # exact masks per label: plan conditioning masks, then corrections (which win)
        seeds: Dict[int, Dict[int, np.ndarray]] = {v: {} for v in labels}
        for value in labels:
            for frame, mask in objects[value].masks.items():
                seeds[value][int(frame)] = np.asarray(mask, dtype=bool)
        if corrections is not None:
            for frame in corrections.frames:
                for value in labels:
                    seeds[value][frame] = np.asarray(corrections.labels[frame] == value)

        rings = self._rings(plan, seeds, labels)
        # work items: each cavity / plain label, and for a ring the filled region (ring + enclosed)
        items = []
        for value in labels:
            if value in rings:
                items.append(("filled", value, [value] + rings[value]))
            else:
                items.append(("plain", value, [value]))
        model.features(frames, progress=progress, cancel=cancel,
                       needed=self._frames_with_prior(objects, seeds, items, n))
        total = n * len(items)
        done = 0
        report(progress, "propagate", 0, total)

        def step_done(step=1):
            nonlocal done
            done += step
            report(progress, "propagate", min(done, total), total)

        raw: Dict[int, np.ndarray] = {}
        for kind, value, members in items:
            if kind == "filled" and self.ring_mode != "filled-minus-inner":
                step_done(n)  # the ring is derived below, no decoding of its own
                continue
            prior = self._combined_prior(objects, members)
            member_seeds = self._combined_seeds(seeds, members)
            boxes = {} if len(members) > 1 else {int(f): b for f, b in objects[value].boxes.items()}
            embeddings = {} if len(members) > 1 else {int(f): e for f, e in (objects[value].embeddings or {}).items()}
            frame_range = self._combined_range(objects, members)
            raw[value] = self._propagate_object(prior, member_seeds, boxes, frame_range, (n, height, width),
                                                step_done, cancel, embeddings)

        probabilities: Dict[int, np.ndarray] = {}
        for kind, value, members in items:
            if kind == "plain":
                probabilities[value] = raw[value]
        for kind, value, members in items:
            if kind != "filled":
                continue
            check_cancel(cancel)
            inner = np.zeros((n, height, width), dtype=np.float32)
            for other in members[1:]:
                inner = np.maximum(inner, probabilities.get(other, inner))
            others = np.zeros((n, height, width), dtype=np.float32)  # labels neither the ring nor inside it
            for other, probability in probabilities.items():
                if other not in members:
                    others = np.maximum(others, probability)
            filled_prior = self._combined_prior(objects, members)
            if self.ring_mode == "filled-minus-inner":  # the model's filled region (measured: it finds the cavity)
                ring = raw[value] * (1.0 - inner)
            elif self.ring_mode == "prior" and objects[value].prior is not None:
                ring = np.asarray(objects[value].prior, dtype=np.float32) * (1.0 - inner)
            elif filled_prior is not None:  # outer boundary from the prior, inner boundary from the model
                ring = filled_prior * (1.0 - inner)
            else:  # no prior: the model's enclosed structure grown by the seeds' ring thickness
                ring = self._ring_from_thickness(seeds, value, members[1:], inner, objects[value].frame_range)
            probabilities[value] = (ring * (1.0 - others)).astype(np.float32)

        # seeds are exact: probability 1 / 0 on seeded frames
        for value in labels:
            for frame, mask in seeds[value].items():
                probabilities[value][frame] = mask.astype(np.float32)
        return probabilities

    def _frames_with_prior(self, objects, seeds, items, n: int) -> List[int]:
        """The frames `_from_prior` decodes (each structure with a prior: its slice range less its seeds, the
        rule `_from_prior` applies) and the frames prompted by embeddings: encoded before propagation."""
        needed = set()
        for kind, value, members in items:
            if kind == "filled" and self.ring_mode != "filled-minus-inner":
                continue
            if len(members) == 1:
                needed |= {int(f) for f in (objects[value].embeddings or {})}
            prior = self._combined_prior(objects, members)
            if prior is None:
                continue
            member_seeds = self._combined_seeds(seeds, members)
            span = self._prior_span(prior, member_seeds, self._combined_range(objects, members))
            if span is not None:
                needed |= set(range(span[0], span[1] + 1)) - set(member_seeds)
        return sorted(f for f in needed if 0 <= f < n)

    @staticmethod
    def _prior_span(prior, seeds, frame_range) -> Optional[Tuple[int, int]]:
        """(first, last) slices a structure with a prior is decoded on: its frame range (else the prior's
        extent), widened to the seeds that hold it; None when there is neither."""
        n = prior.shape[0]
        present = np.flatnonzero((prior > 0.5).reshape(n, -1).any(axis=1))
        if frame_range is None and present.size:
            frame_range = (int(present[0]), int(present[-1]))
        seeded = sorted(f for f, m in seeds.items() if m.any())
        if frame_range is None and not seeded:
            return None
        first, last = frame_range if frame_range is not None else (seeded[0], seeded[-1])
        if seeded:  # a corrected slice holding the structure extends the range
            first, last = min(first, seeded[0]), max(last, seeded[-1])
        return int(first), int(last)

    @staticmethod
    def _ring_from_thickness(seeds, ring_value, inner_values, inner, frame_range) -> np.ndarray:
        """Without a prior: ring = the enclosed structure's prediction dilated by the ring's thickness on the
        seed slices (95th percentile of the ring pixels' distance to the enclosed structure), minus it."""
        import SimpleITK as sitk

        n = inner.shape[0]
        distances = []
        for frame, ring_mask in seeds.get(ring_value, {}).items():
            enclosed = np.zeros_like(ring_mask)
            for other in inner_values:
                if frame in seeds.get(other, {}):
                    enclosed |= seeds[other][frame]
            if ring_mask.any() and enclosed.any():
                distance = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
                    sitk.GetImageFromArray(enclosed.astype(np.uint8)), insideIsPositive=False,
                    squaredDistance=False, useImageSpacing=False))
                distances.append(distance[ring_mask & ~enclosed])
        ring = np.zeros_like(inner)
        if not distances:
            return ring
        radius = max(1, int(round(float(np.percentile(np.concatenate(distances), 95)))))
        first, last = frame_range if frame_range is not None else (0, n - 1)
        for frame in range(max(first, 0), min(last, n - 1) + 1):
            mask = inner[frame] > 0.5
            if not mask.any():
                continue
            grown = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(mask.astype(np.uint8)),
                                                             [radius, radius], sitk.sitkBall)).astype(bool)
            ring[frame] = (grown & ~mask).astype(np.float32)
        return ring

    def _rings(self, plan, seeds, labels) -> Dict[int, List[int]]:
        """Ring-shaped labels: the plan's (`PromptPlan.rings`, from the reference) when it gives them, else detected on
        the priors when every label has one, else on the frames where every label has an exact mask."""
        if plan.rings is not None:
            rings = {v: [i for i in inner if i in labels] for v, inner in plan.rings.items() if v in labels}
            return {v: inner for v, inner in rings.items() if inner}
        if all(plan.objects[v].prior is not None for v in labels):
            masks = {v: np.asarray(plan.objects[v].prior) > 0.5 for v in labels}
        else:
            common = set.intersection(*[set(seeds[v]) for v in labels]) if labels else set()
            common = sorted(common)
            if not common:
                return {}
            masks = {v: np.stack([seeds[v][f] for f in common]) for v in labels}
        return ring_structure(masks) if len(masks) > 1 else {}

    @staticmethod
    def _combined_prior(objects, members) -> Optional[np.ndarray]:
        priors = [objects[v].prior for v in members if objects[v].prior is not None]
        if not priors:
            return None
        combined = np.asarray(priors[0], dtype=np.float32)
        for prior in priors[1:]:
            combined = np.maximum(combined, np.asarray(prior, dtype=np.float32))
        return combined

    @staticmethod
    def _combined_seeds(seeds, members) -> Dict[int, np.ndarray]:
        frames = set()
        for v in members:
            frames |= set(seeds[v])
        combined = {}
        for frame in frames:
            mask = None
            for v in members:
                if frame in seeds[v]:
                    mask = seeds[v][frame] if mask is None else (mask | seeds[v][frame])
            combined[frame] = mask
        return combined

    @staticmethod
    def _combined_range(objects, members) -> Optional[Tuple[int, int]]:
        ranges = [objects[v].frame_range for v in members if objects[v].frame_range is not None]
        if not ranges:
            return None
        return min(r[0] for r in ranges), max(r[1] for r in ranges)

    def _propagate_object(self, prior, seeds, boxes, frame_range, shape, advance, cancel,
                          embeddings=None) -> np.ndarray:
        """One structure over the frames. Frames prompted by prompt embeddings are decoded from them first and
        then act as seeds (their decoded masks) for the rest; they keep their soft probabilities."""
        n, height, width = shape
        result = np.zeros(shape, dtype=np.float32)
        decoded = {}
        for frame, embedding in sorted((embeddings or {}).items()):
            if frame not in seeds:
                check_cancel(cancel)
                decoded[frame] = self.predict_slice(frame, embedding=embedding)[0]
        if decoded:
            seeds = dict(seeds)
            seeds.update({frame: probability > 0.5 for frame, probability in decoded.items()})
        for frame, mask in seeds.items():
            result[frame] = mask
        if prior is not None:
            self._from_prior(result, prior, seeds, boxes, frame_range, advance, cancel)
        else:
            self._from_neighbours(result, seeds, boxes, frame_range, advance, cancel)
        for frame, probability in decoded.items():
            result[frame] = probability
        return result

    # prior mode: box per slice from the prior, shifted by the seeds' offset; range = the prior's range
    def _from_prior(self, result, prior, seeds, boxes, frame_range, advance, cancel) -> None:
        n = result.shape[0]
        span = self._prior_span(prior, seeds, frame_range)
        if span is None:
            advance(n)
            return
        first, last = span
        seeded = sorted(f for f, m in seeds.items() if m.any())
        # offset between prior and seeds (where both exist): shifts the prior's boxes near the seeds
        offsets = {}
        if self.shift_prior_to_seeds:
            for frame in seeded:
                seed_box = bounding_box(seeds[frame])
                prior_box = bounding_box(prior[frame] > 0.5)
                if seed_box is not None and prior_box is not None:
                    offsets[frame] = ((seed_box[0] + seed_box[2]) - (prior_box[0] + prior_box[2])) / 2.0, \
                                     ((seed_box[1] + seed_box[3]) - (prior_box[1] + prior_box[3])) / 2.0
        order = list(range(first, last + 1))
        pending = []
        for frame in range(n):
            check_cancel(cancel)
            if frame in seeds or not first <= frame <= last:
                advance()
                continue
            box = bounding_box(prior[frame] > 0.5, self.prior_margin)
            if box is None and frame in boxes and boxes[frame] is not None:
                box = np.asarray(boxes[frame], dtype=np.float32)
            if box is None:
                pending.append(frame)  # no prior here: take the neighbour's prediction afterwards
                advance()
                continue
            if offsets:
                nearest = min(offsets, key=lambda f: (abs(f - frame), f))
                dx, dy = offsets[nearest]
                box = self._clip_box(box + np.array([dx, dy, dx, dy], dtype=np.float32), result.shape[1:])
            mask_prior = prior[frame] if self.use_mask_prompt else None
            probability, _ = self.predict_slice(frame, box, mask_prior)
            result[frame] = probability
            advance()
        del order
        for frame in pending:  # gaps inside the range: box of the nearest predicted neighbour
            check_cancel(cancel)
            for distance in range(1, n):
                neighbours = [f for f in (frame - distance, frame + distance) if 0 <= f < n and result[f].max() > 0.5]
                if neighbours:
                    box = bounding_box(result[neighbours[0]] > 0.5, self.neighbour_margin)
                    result[frame] = self.predict_slice(frame, box)[0]
                    break

    # no prior: from each seed / boxed frame outwards, box of the neighbour's prediction, stopping rule
    def _from_neighbours(self, result, seeds, boxes, frame_range, advance, cancel) -> None:
        n = result.shape[0]
        first, last = frame_range if frame_range is not None else (0, n - 1)
        known = {f for f, m in seeds.items()}
        starts = {f: m for f, m in seeds.items() if m.any()}
        for frame, box in sorted(boxes.items()):  # box-only frames: predict them first, they become starts
            if frame in known or box is None or not first <= frame <= last:
                continue
            probability, score = self.predict_slice(frame, np.asarray(box, dtype=np.float32))
            result[frame] = probability
            known.add(frame)
            starts[frame] = probability > 0.5
        reported = 0

        def step_done():
            nonlocal reported
            if reported < n:
                reported += 1
                advance()

        owner_distance = {f: 0 for f in known}
        for start in sorted(starts):
            seed_area = max(int(starts[start].sum()), 1)
            for step in (-1, 1):
                previous = starts[start]
                frame = start + step
                distance = 1
                while first <= frame <= last and 0 <= frame < n:
                    check_cancel(cancel)
                    if frame in known:
                        break
                    if frame in owner_distance and owner_distance[frame] <= distance:
                        break  # a nearer start already segmented it
                    box = bounding_box(previous, self.neighbour_margin)
                    if box is None:
                        break
                    self._prefetch(frame, step, first, last, known)
                    probability, score = self.predict_slice(frame, box)
                    mask = probability > 0.5
                    area = int(mask.sum())
                    overlap = (mask & previous).sum() / max((mask | previous).sum(), 1)
                    if (score < self.min_score or area < self.min_area_px or area < self.min_area_ratio * seed_area
                            or overlap < self.min_overlap):
                        result[frame] = 0.0  # the structure ends here
                        step_done()
                        break
                    step_done()
                    result[frame] = probability
                    owner_distance[frame] = distance
                    previous = mask
                    frame += step
                    distance += 1
        if reported < n:
            advance(n - reported)

    def _prefetch(self, frame: int, step: int, first: int, last: int, known) -> None:
        """Encode `frame` with the next frames the walk may reach (one encoder batch; batches run ~25 % faster per
        slice than single slices on a CPU). At most a batch less one slice beyond where the structure ends."""
        size = max(int(getattr(self._model, "batch_size", 1)), 1)
        ahead = [f for f in range(frame, frame + step * size, step) if first <= f <= last and f not in known]
        self._model.features(self._frames, needed=ahead)

    @staticmethod
    def _clip_box(box, shape_hw):
        height, width = shape_hw
        return np.array([np.clip(box[0], 0, width - 1), np.clip(box[1], 0, height - 1),
                         np.clip(box[2], 0, width - 1), np.clip(box[3], 0, height - 1)], dtype=np.float32)


def top_k_support(similarity_ns: np.ndarray, top_k: int) -> Optional[Dict[int, Tuple[int, ...]]]:
    """`PromptPlan.support_attention` from a [N target frames, S support slices] similarity (e.g. cosine of the
    model's pooled slice embeddings): each frame attends its `top_k` most similar support slices (ties -> lower
    index). None (attend all) when there is nothing to choose: no more support slices than `top_k`."""
    similarity = np.asarray(similarity_ns)
    if top_k is None or top_k <= 0 or similarity.shape[1] <= top_k:
        return None
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :top_k]
    return {frame: tuple(int(s) for s in order[frame]) for frame in range(similarity.shape[0])}


def clip_to_frame_ranges(results: Dict[int, np.ndarray], plan, corrections=None) -> Dict[int, np.ndarray]:
    """Zero each structure's probability outside its `frame_range` (in place), except on corrected frames."""
    corrected = list(corrections.frames) if corrections is not None else []
    for value, probability in results.items():
        prompt = plan.objects.get(value)
        if prompt is None or prompt.frame_range is None:
            continue
        count = probability.shape[0]
        first, last = max(int(prompt.frame_range[0]), 0), min(int(prompt.frame_range[1]), count - 1)
        outside = np.ones(count, bool)
        outside[first : last + 1] = False
        outside[corrected] = False
        probability[outside] = 0.0
    return results


def execute_plan(model, frames, plan, corrections=None, progress=None, cancel=None,
                 strategy: Optional[SliceBySlicePropagation] = None) -> Dict[int, np.ndarray]:
    """A plan over the frames: a model with memory propagates it itself (bounded to the frame ranges here), any
    other model slice by slice. Returns label -> [N, H, W] float32 probability."""
    if model.capabilities.memory:
        results = model.propagate(frames, plan, corrections, progress=progress, cancel=cancel)
        return clip_to_frame_ranges(results, plan, corrections)
    policy = plan.prior_policy
    if strategy is None and policy is not None and any(p.prior is not None for p in plan.objects.values()):
        strategy = SliceBySlicePropagation(use_mask_prompt=policy.mask_prompt)  # box margin: run_with_prior
        return run_with_prior(model, frames, plan, policy, strategy, corrections, progress, cancel)
    return (strategy or SliceBySlicePropagation()).propagate(model, frames, plan, corrections, progress, cancel)

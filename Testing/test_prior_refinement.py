"""The model stage from a prior (issue 16 item 2): the box margin in model-input pixels and the per-structure
stability check (a model whose mask moves with its box keeps the prior), on synthetic frames with two stand-in
models: one that draws whatever box it is given, one that finds the same boundary whatever the box."""

from __future__ import annotations

import numpy as np

from proxyprompt.contract import ObjectPrompt, PriorPolicy, PromptPlan
from proxyprompt.frames import make_slice_stack
from proxyprompt.generators.prior_refinement import box_stability, frame_box_margin, run_with_prior
from proxyprompt.contract import ReferenceCase
from proxyprompt.generators.propagation import SliceBySlicePropagation, reference_rings
from proxyprompt.metrics import dice
from proxyprompt.volume import Volume

SHAPE = (3, 40, 48)


def _disc(centre, radius):
    rows, cols = np.mgrid[0 : SHAPE[1], 0 : SHAPE[2]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


class _StandIn:
    """The slice-by-slice strategy's model interface: `features` and `predict_slice`. image_size: the model input's
    side (the frame's longest side is resized to it). `draws_box`: the mask is the box itself (no boundary of its
    own); otherwise the mask is `structure` whatever the box."""

    def __init__(self, structure, draws_box: bool, image_size: int = 240):
        self.structure, self.draws_box, self.image_size = structure, draws_box, image_size
        self.boxes = []

    def features(self, frames, progress=None, cancel=None, needed=None):
        return None

    def predict_slice(self, frame, box=None, mask_prior=None, frames=None, embedding=None):
        self.boxes.append(np.asarray(box, dtype=float))
        if not self.draws_box:
            return self.structure.astype(np.float32), 0.9
        x0, y0, x1, y1 = np.round(box).astype(int)
        mask = np.zeros(SHAPE[1:], np.float32)
        mask[y0 : y1 + 1, x0 : x1 + 1] = 1.0
        return mask, 0.9


def _run(model, prior, min_stability, notes=None):
    frames = make_slice_stack(Volume(np.random.default_rng(0).random(SHAPE).astype(np.float32), np.eye(4)), axis=0)
    plan = PromptPlan(objects={1: ObjectPrompt(1, prior=prior.astype(np.float32))})
    policy = PriorPolicy(min_agreement=0.0, box_margin=5.0, jitter_px=2.0, min_stability=min_stability)
    output = run_with_prior(model, frames, plan, policy, SliceBySlicePropagation())[1] > 0.5
    if notes is not None:
        notes.extend(plan.notes)
    return output


def test_box_margin_is_in_model_input_pixels():
    model = _StandIn(None, True, image_size=256)
    assert frame_box_margin(model, (51, 35), 5.0) == 5.0 * 51 / 256  # a small slice: about one frame pixel
    assert frame_box_margin(model, (256, 216), 5.0) == 5.0


def test_a_model_that_draws_its_box_keeps_the_prior_one_that_finds_a_boundary_is_kept():
    truth = np.stack([_disc((21, 25), 7)] * SHAPE[0])
    prior = np.stack([_disc((19, 23), 6)] * SHAPE[0])  # near the structure, smaller: the model should correct it
    drawer = _StandIn(None, draws_box=True)
    unchecked = _run(drawer, prior, 0.0)
    notes = []
    checked = _run(_StandIn(None, draws_box=True), prior, 0.9, notes)
    # the box drawer's mask moves with the box: the check finds it and keeps the prior for the whole structure
    assert not np.array_equal(unchecked, prior)
    assert np.array_equal(checked, prior)
    assert len(notes) == 1 and "label 1 keeps its prior" in notes[0]  # the user is told which structure
    # the margin reached the model in frame pixels: 5 input px on a 48 px frame resized to 240 = 1 frame px
    x0, y0, x1, y1 = drawer.boxes[0]
    rows, cols = np.flatnonzero(prior[0].any(axis=1)), np.flatnonzero(prior[0].any(axis=0))
    assert (x0, y0, x1, y1) == (cols[0] - 1, rows[0] - 1, cols[-1] + 1, rows[-1] + 1)

    finder = _StandIn(truth[0], draws_box=False)
    notes = []
    kept = _run(finder, prior, 0.9, notes)
    assert notes == []
    assert np.array_equal(kept, truth)  # stable under the jittered box: the model's boundary replaces the prior
    assert dice(kept, truth) > dice(prior, truth)


def test_box_stability_ignores_slices_without_prior_and_seeded_ones():
    prior = np.zeros(SHAPE, np.float32)
    prior[1] = _disc((20, 20), 6)
    first, second = np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32)
    first[1], second[1] = _disc((20, 20), 6), _disc((20, 20), 6)
    first[0] = 1.0  # a slice the prior does not hold: not counted
    assert box_stability(first, second, prior) == 1.0
    assert np.isnan(box_stability(first, second, prior, skip={1}))


class _CropSeer:
    """A model that draws the box it is given on whatever frames it is handed (the crop's or the whole frame's) and
    records their size and the boxes."""

    image_size = 240

    def __init__(self):
        self.shapes, self.boxes = [], []

    def features(self, frames, progress=None, cancel=None, needed=None):
        return None

    def predict_slice(self, frame, box=None, mask_prior=None, frames=None, embedding=None):
        self.shapes.append(frames.images.shape[1:])
        self.boxes.append(np.asarray(box, dtype=float))
        x0, y0, x1, y1 = np.round(box).astype(int)
        mask = np.zeros(frames.images.shape[1:], np.float32)
        mask[y0 : y1 + 1, x0 : x1 + 1] = 1.0
        return mask, 0.9


def test_crop_around_the_prior_gives_the_model_a_square_window_and_pastes_its_mask_back():
    prior = np.zeros(SHAPE, np.float32)
    prior[:, 13:22, 30:41] = 1.0  # 9 x 11 px, off centre (centre row 17, column 35)
    frames = make_slice_stack(Volume(np.random.default_rng(0).random(SHAPE).astype(np.float32), np.eye(4)), axis=0)
    policy = PriorPolicy(crop_margin=0.5, min_agreement=0.0, box_margin=0.0, min_stability=0.0, min_crop_px=8)
    model = _CropSeer()
    plan = PromptPlan(objects={1: ObjectPrompt(1, prior=prior)})
    output = run_with_prior(model, frames, plan, policy, SliceBySlicePropagation())[1] > 0.5
    # the window: the prior's longer side (11 px) plus half of it each side = 22 px square, centred on the prior
    assert set(model.shapes) == {(22, 22)}
    y0, x0 = 17 - 11, 35 - 11
    # boxes in the window's coordinates, the same box as on the whole frame shifted by the window's corner
    assert all(np.array_equal(box, [30 - x0, 13 - y0, 40 - x0, 21 - y0]) for box in model.boxes)
    # pasted back where the prior is: the drawn box is the prior itself, nothing outside the window
    assert np.array_equal(output, prior > 0.5)
    whole = run_with_prior(_CropSeer(), frames, PromptPlan(objects={1: ObjectPrompt(1, prior=prior)}),
                           PriorPolicy(crop_margin=None, box_margin=0.0, min_stability=0.0),
                           SliceBySlicePropagation())[1] > 0.5
    assert np.array_equal(whole, output)


def test_a_ring_open_in_the_prior_is_still_a_ring_when_the_reference_says_so():
    """The myocardium of a registered prior may be open on some slices; detected on the prior it is then no ring, is
    box-prompted like a blob and the model returns the cavity (measured on ACDC, docs/benchmarks.md). The reference's
    closed ring (`reference_rings`, carried by the plan) keeps the ring rule: the prior's filled region minus the
    model's cavity."""
    cavity = np.stack([_disc((20, 24), 6)] * SHAPE[0])
    closed = np.stack([_disc((20, 24), 10)] * SHAPE[0]) & ~cavity
    reference_label = np.where(cavity, 3, np.where(closed, 2, 0)).astype(np.int16)
    affine = np.diag([1.0, 1.0, 5.0, 1.0])  # thick along the array's first axis: the frames are those slices
    reference = ReferenceCase(Volume(np.random.default_rng(1).random(SHAPE).astype(np.float32), affine),
                              Volume(reference_label, affine), None)
    assert reference_rings([reference]) == {2: [3]}
    opened = closed.copy()
    opened[:, 18:23, 24:] = False  # a gap on the right side: no hole to fill, so no ring on the prior
    frames = make_slice_stack(Volume(np.random.default_rng(0).random(SHAPE).astype(np.float32), np.eye(4)), axis=0)

    def myocardium(rings):
        plan = PromptPlan(objects={2: ObjectPrompt(2, prior=opened.astype(np.float32)),
                                   3: ObjectPrompt(3, prior=cavity.astype(np.float32))}, rings=rings)
        policy = PriorPolicy(min_agreement=0.0, box_margin=0.0, min_stability=0.0)
        # a model that finds the cavity whatever box it is given (LiteMedSAM on a myocardium's box)
        return run_with_prior(_StandIn(cavity[0], draws_box=False), frames, plan, policy,
                              SliceBySlicePropagation())[2] > 0.5

    as_blob = myocardium(None)
    assert np.array_equal(as_blob, cavity)  # detected on the prior: no ring, the myocardium became the cavity
    as_ring = myocardium(reference_rings([reference]))
    assert not (as_ring & cavity).any() and np.array_equal(as_ring, opened)

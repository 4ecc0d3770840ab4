"""SAM 2 model layer (random weights, 512 px, CPU): in-memory frames, cached features, propagation,
corrections, cancel, progress. Random weights: these tests check behaviour and plumbing, never accuracy."""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

from proxyprompt.errors import Cancelled  # noqa: E402
from proxyprompt.frames import make_slice_stack  # noqa: E402
from proxyprompt.generators.base import Corrections, ObjectPrompt, PromptPlan, ReferenceCase  # noqa: E402
from proxyprompt.pipeline import CancelToken, Engine  # noqa: E402
from proxyprompt.volume import read_image, read_label  # noqa: E402

from conftest import crop_slices  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "acdc"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared ACDC data not found")




def load_case(name: str, first: int, count: int):
    image = read_image(DATA / f"{name}_image.nii.gz")
    label, table = read_label(DATA / f"{name}_label.nii.gz")
    return crop_slices(image, first, count), crop_slices(label, first, count), table


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(2)
    # fp32: the equivalence tests below compare code paths at float tolerance; bf16 has its own test
    return Engine(model="random", image_size=512, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def cases():
    ref_image, ref_label, table = load_case("patient001_ED", 4, 3)
    tgt_image, tgt_label, _ = load_case("patient002_ED", 4, 3)
    return ReferenceCase(ref_image, ref_label, table), tgt_image, tgt_label


@pytest.fixture(scope="module")
def first_run(engine, cases):
    reference, target, _ = cases
    events = []
    result = engine.segment([reference], target, generator="support-memory", labels=[1, 3],
                            progress=lambda event: events.append((event.phase, event.done, event.total)))
    return result, events


def test_model_is_real_architecture_with_random_weights(engine):
    model = engine.model
    assert model.is_random and model.family == "random" and model.image_size == 512
    assert "RANDOM weights" in model.describe()
    assert model.predictor.image_size == 512


def test_output_geometry_labels_and_random_flag(first_run, cases):
    result, _ = first_run
    reference, target, _ = cases
    assert result.label.same_grid(target) and result.label.array.shape == target.array.shape
    assert set(np.unique(result.label.array)) <= {0} | set(np.unique(reference.label.array))
    assert result.info["random_weights"] is True
    assert result.info["generator"] == "support-memory"


def test_progress_reports_every_slice(first_run, cases):
    _, events = first_run
    _, target, _ = cases
    count = target.array.shape[0]
    propagated = [done for phase, done, total in events if phase == "propagate"]
    assert propagated == list(range(1, count + 1))
    assert any(phase == "encode" and done == total == count for phase, done, total in events)


def test_same_input_same_output(engine, cases, first_run):
    reference, target, _ = cases
    again = engine.segment([reference], target, generator="support-memory", labels=[1, 3])
    assert np.array_equal(again.label.array, first_run[0].label.array)


def test_rerun_with_corrections_keeps_slices_and_reuses_features(engine, cases, first_run):
    reference, target, truth = cases
    calls_before = engine.model.encoder_calls
    corrections = truth.with_array(np.where(np.isin(truth.array, [1, 3]), truth.array, 0).astype(np.uint16))
    result = engine.segment([reference], target, generator="support-memory", labels=[1, 3],
                            corrections=corrections, corrected_slices=[1])
    assert engine.model.encoder_calls == calls_before  # target and support features came from the cache
    assert np.array_equal(result.label.array[1], corrections.array[1])
    assert result.info["corrected_slices"] == [1]


def test_cancel_mid_run_raises(engine, cases):
    reference, target, _ = cases
    token = CancelToken()

    def progress(event):
        if event.phase == "propagate" and event.done >= 1:
            token.set()

    with pytest.raises(Cancelled):
        engine.segment([reference], target, generator="support-memory", labels=[1, 3], progress=progress,
                       cancel=token)


def test_mask_on_a_frame_plan_direct(engine, cases):
    """A plan without support slices: a conditioning mask on frame 1, propagated both ways; the
    conditioning frame comes back as its exact mask (sam2 outputs a mask prompt unchanged)."""
    _, target, truth = cases
    model = engine.model
    frames = make_slice_stack(target)
    labels = frames.labels(truth)
    plan = PromptPlan(objects={3: ObjectPrompt(label=3, masks={1: labels[1] == 3})})
    out = model.propagate(frames, plan)
    assert set(out) == {3} and out[3].shape == frames.images.shape and out[3].dtype == np.float32
    assert np.array_equal(out[3][1] > 0.5, labels[1] == 3)
    assert np.all((out[3] >= 0) & (out[3] <= 1))


# ---------------------------------------------------------------- incremental re-run after corrections
@pytest.fixture(scope="module")
def five():
    """A 5-slice target (its frames and ground-truth label stack) for direct mask-on-a-frame plans."""
    image, label, _ = load_case("patient002_ED", 3, 5)
    frames = make_slice_stack(image)
    return frames, frames.labels(label)


def mask_plan(labels, frame=2, values=(3,)):
    return PromptPlan(objects={v: ObjectPrompt(label=v, masks={frame: labels[frame] == v}) for v in values},
                      start_frame=frame)


def test_model_attends_the_support_slices_the_plan_names(engine, five):
    """The per-frame choice of support slices is the plan's (`support_attention`): the model attends exactly those
    (+ the target's own conditioning frames) and refuses indices the plan does not have."""
    from proxyprompt.contract import SupportSlice
    from proxyprompt.errors import InputError

    frames, labels = five
    model = engine.model
    support = [SupportSlice(frames.images[i], {3: labels[i] == 3}, i / 4, i) for i in (1, 3)]
    attention = {f: (f % 2,) for f in range(5)}
    plan = PromptPlan(objects={3: ObjectPrompt(label=3, masks={2: labels[2] == 3})}, support=support,
                      support_attention=attention, start_frame=2)
    seen = []
    model.propagate(frames, plan, progress=lambda event: seen.append(getattr(model.predictor, "_active_selection", None)))
    offset = len(support)
    assert seen and seen[-1] == {offset + f: {f % 2, offset + 2} for f in range(5)}
    plan.support_attention = {0: (2,)}
    with pytest.raises(InputError, match="support_attention of target slice 0"):
        model.propagate(frames, plan)


def test_incremental_rerun_tracks_only_downstream_frames(engine, five):
    """Start frame 2 of 0..4: a correction on 3 re-tracks 3 (its exact mask) and 4 only; a later one on 1
    re-tracks 1 and 0 only (reverse side); every other frame is bit-identical to the previous run."""
    frames, labels = five
    model = engine.model
    plan = mask_plan(labels)
    first = model.propagate(frames, plan)
    assert model._last_run["incremental"] is False and model.frames_propagated == 5

    events = []
    second = model.propagate(frames, plan, Corrections(labels, [3]),
                             progress=lambda event: events.append((event.phase, event.done, event.total)))
    assert model._last_run["incremental"] is True and model._last_run["new_corrections"] == [3]
    assert model.frames_propagated == 2
    assert [(d, t) for p, d, t in events if p == "propagate"] == [(1, 2), (2, 2)]
    assert np.array_equal(second[3][:3], first[3][:3])  # start side: untouched
    # the corrected frame is a conditioning mask (output = the mask, up to sam2's resize round trip)
    assert np.mean((second[3][3] > 0.5) == (labels[3] == 3)) > 0.99

    third = model.propagate(frames, plan, Corrections(labels, [1, 3]))
    assert model._last_run["incremental"] is True and model._last_run["new_corrections"] == [1]
    assert model.frames_propagated == 2  # frames 1 and 0
    assert np.array_equal(third[3][2:], second[3][2:])
    assert np.mean((third[3][1] > 0.5) == (labels[1] == 3)) > 0.99

    # nothing new: no frame is propagated, same output
    again = model.propagate(frames, plan, Corrections(labels, [1, 3]))
    assert model.frames_propagated == 0 and np.array_equal(again[3], third[3])


def test_incremental_rerun_falls_back_to_full_run_and_is_deterministic(engine, five):
    frames, labels = five
    model = engine.model
    plan = mask_plan(labels)
    reference_first = model.propagate(frames, plan)  # corrections removed (or first run): full run
    assert model._last_run["incremental"] is False and model.frames_propagated == 5
    reference_second = model.propagate(frames, plan, Corrections(labels, [3]))
    assert model.frames_propagated == 2
    model._incremental = None  # a first run with the same correction: the corrected frame's output is the same
    full = model.propagate(frames, plan, Corrections(labels, [3]))
    assert model._last_run["incremental"] is False and np.array_equal(full[3][3], reference_second[3][3])

    changed = mask_plan(labels, frame=1)  # a different plan (prompt and start frame): full run
    model.propagate(frames, changed, Corrections(labels, [3]))
    assert model._last_run["incremental"] is False and model.frames_propagated == 5
    model.propagate(frames, mask_plan(labels, values=(1, 3)), Corrections(labels, [3]))  # other labels
    assert model._last_run["incremental"] is False and model.frames_propagated == 5

    first = model.propagate(frames, plan)  # back to the first plan: full run, then the same correction
    assert model._last_run["incremental"] is False
    assert np.array_equal(first[3], reference_first[3])
    second = model.propagate(frames, plan, Corrections(labels, [3]))
    assert model._last_run["incremental"] is True and np.array_equal(second[3], reference_second[3])


def test_cancelled_run_invalidates_the_kept_state(engine, five):
    frames, labels = five
    model = engine.model
    plan = mask_plan(labels)
    model.propagate(frames, plan)
    token = CancelToken()
    token.set()
    with pytest.raises(Cancelled):
        model.propagate(frames, plan, Corrections(labels, [3]), cancel=token)
    model.propagate(frames, plan, Corrections(labels, [3]))
    assert model._last_run["incremental"] is False and model.frames_propagated == 5


def test_engine_rerun_is_incremental_and_keeps_corrected_slice(engine, cases):
    reference, target, truth = cases
    model = engine.model
    first = engine.segment([reference], target, generator="support-memory", labels=[1, 3],
                           return_probabilities=True)
    start, count = model._incremental.start, target.array.shape[0]
    frame = start + 1 if start + 1 < count else start - 1
    calls = model.encoder_calls
    corrections = truth.with_array(np.where(np.isin(truth.array, [1, 3]), truth.array, 0).astype(np.uint16))
    result = engine.segment([reference], target, generator="support-memory", labels=[1, 3],
                            corrections=corrections, corrected_slices=[frame], return_probabilities=True)
    assert model.encoder_calls == calls
    assert model._last_run["incremental"] is True
    downstream = list(range(frame, count)) if frame > start else list(range(frame, -1, -1))
    assert model.frames_propagated == len(downstream) < count
    assert np.array_equal(result.label.array[frame], corrections.array[frame])  # bit-exact
    for value in (1, 3):
        for n in set(range(count)) - set(downstream):
            assert np.array_equal(result.probabilities[value].array[n], first.probabilities[value].array[n])


def test_batched_objects_equal_per_object_path(engine, five):
    """All objects of a run tracked as ONE batch (memory attention, decoder, memory encoder) give the
    per-object (sam2 1.1.0) results within float tolerance, first run and incremental re-run alike."""
    frames, labels = five
    model = engine.model
    plan = mask_plan(labels, values=(1, 2, 3))
    outputs = {}
    try:
        for batched in (False, True):
            model.batch_objects = batched
            model._incremental = None
            first = model.propagate(frames, plan)
            second = model.propagate(frames, plan, Corrections(labels, [3]))
            assert model._last_run["incremental"] is True and model.frames_propagated == 2
            outputs[batched] = (first, second)
    finally:
        model.batch_objects = True
        model._incremental = None
    for run in (0, 1):
        for value in (1, 2, 3):
            per_object, batched = outputs[False][run][value], outputs[True][run][value]
            assert np.abs(per_object - batched).max() < 1e-4
            assert np.array_equal(per_object > 0.5, batched > 0.5)


def test_support_frames_batched_over_objects_equal_per_object_path(engine, five):
    """Support slices enter the run as conditioning frames of every object in ONE decoder + memory-encoder call
    per slice (`_add_support_frames`); the result equals sam2's per-object `add_new_mask` + preflight path within
    float tolerance, including a support slice that lacks one of the labels, and with fewer model calls."""
    from proxyprompt.contract import SupportSlice

    frames, labels = five
    model = engine.model
    support = [SupportSlice(frames.images[i], {v: labels[i] == v for v in (1, 2, 3) if (labels[i] == v).any()},
                            i / 4, i) for i in (0, 2, 4)]
    support[1].masks.pop(2, None)  # a support slice without the myocardium
    plan = PromptPlan(objects={v: ObjectPrompt(label=v) for v in (1, 2, 3)}, support=support,
                      support_attention={f: (0, 1, 2) for f in range(5)}, start_frame=0)
    calls = {"decoder": 0}
    original = model.predictor._forward_sam_heads

    def counted(*args, **kwargs):
        calls["decoder"] += 1
        return original(*args, **kwargs)

    outputs, decoder_calls = {}, {}
    model.predictor._forward_sam_heads = counted
    try:
        for batched in (False, True):
            model.batch_objects = batched
            model._incremental = None
            calls["decoder"] = 0
            outputs[batched] = model.propagate(frames, plan)
            decoder_calls[batched] = calls["decoder"]
    finally:
        model.batch_objects = True
        model._incremental = None
        del model.predictor._forward_sam_heads
    for value in (1, 2, 3):
        assert np.abs(outputs[False][value] - outputs[True][value]).max() < 1e-4
        assert np.array_equal(outputs[False][value] > 0.5, outputs[True][value] > 0.5)
    # per object: 3 supports x 3 objects + 5 frames x 3 objects; batched: 3 supports + 5 frames
    assert decoder_calls == {False: 24, True: 8}


def test_bf16_autocast_matches_fp32(engine, five):
    """The bf16 path (default on CUDA and on CPUs with Intel AMX) computes the same probabilities as fp32
    within bf16 rounding. Random weights put every probability near 0.5, so labels are compared through the
    probability maps, not thresholds."""
    frames, labels = five
    model = engine.model
    plan = mask_plan(labels, values=(1, 2, 3))
    outputs = {}
    try:
        for precision in ("fp32", "bf16"):
            model.precision = precision
            model._feature_cache.clear()  # features are computed under the precision of the run
            model._incremental = None
            outputs[precision] = model.propagate(frames, plan)
    finally:
        model.precision = "fp32"
        model._feature_cache.clear()
        model._incremental = None
    for value in (1, 2, 3):
        full, half = outputs["fp32"][value], outputs["bf16"][value]
        assert half.dtype == np.float32 and half.shape == full.shape
        assert np.abs(full - half).mean() < 2e-3
        assert np.corrcoef(full.ravel(), half.ravel())[0, 1] > 0.99
        assert np.array_equal(full[2] > 0.5, half[2] > 0.5)  # the conditioning frame keeps its given mask
    # bf16 really ran: were the precision ignored, the two would be bit-identical
    assert any(not np.array_equal(outputs["fp32"][v], outputs["bf16"][v]) for v in (1, 2, 3))

"""The pipeline around the models: label composition, corrections copied in, cancel, progress, validation."""

import numpy as np
import pytest

from conftest import oblique_direction
from proxyprompt.errors import Cancelled, InputError
from proxyprompt.generators import ReferenceCase, list_generators
from proxyprompt.pipeline import CancelToken, Engine, compose_labels, keep_largest_components
from proxyprompt.volume import LabelInfo, Volume


def _case(shift=0):
    array = np.zeros((8, 32, 32), np.int16)
    label = np.zeros((8, 32, 32), np.uint8)
    array[2:6, 8 + shift:20 + shift, 8:22] = 400
    label[2:6, 8 + shift:20 + shift, 8:14] = 1
    label[2:6, 8 + shift:20 + shift, 14:22] = 2
    image = Volume.from_geometry(array, (1.2, 1.2, 6.0), (5.0, -3.0, 2.0), oblique_direction())
    return ReferenceCase(image, image.with_array(label), {1: LabelInfo("a"), 2: LabelInfo("b")})


def test_compose_labels_thresholds_and_takes_the_most_probable():
    low, high = np.full((1, 2, 2), 0.2, np.float32), np.full((1, 2, 2), 0.9, np.float32)
    high[0, 0, 0] = 0.4
    probabilities = {1: high, 2: np.full((1, 2, 2), 0.6, np.float32), 3: low}
    labels = compose_labels(probabilities)
    assert labels[0, 0, 0] == 2 and labels[0, 1, 1] == 1
    assert compose_labels({1: low})[0].max() == 0


def test_largest_component_cleanup_drops_islands_per_label():
    stack = np.zeros((4, 10, 10), np.uint16)
    stack[1:3, 1:5, 1:5] = 1
    stack[0, 8, 8] = 1
    stack[3, 8, 0] = 2
    cleaned = keep_largest_components(stack, [1, 2])
    assert cleaned[0, 8, 8] == 0 and cleaned[1, 2, 2] == 1 and cleaned[3, 8, 0] == 2


def test_registration_engine_output_is_on_the_target_grid_and_corrections_are_exact():
    reference, target = _case(), _case(shift=2)
    engine = Engine("none")
    options = {"registration_method": "copy"}
    first = engine.segment([reference], target.image, options=options)
    assert first.label.same_grid(target.image)
    assert set(np.unique(first.label.array)) <= {0, 1, 2}
    assert first.info["generator"] == "registration" and first.info["random_weights"] is False

    corrections = np.zeros(target.image.array.shape, np.uint8)
    corrections[3, 10:13, 10:13] = 2  # one slice, drawn by the user
    corrected = engine.segment([reference], target.image, options=options,
                               corrections=target.image.with_array(corrections))
    assert corrected.info["corrected_slices"] == [3]
    assert np.array_equal(corrected.label.array[3], corrections[3])
    assert np.array_equal(corrected.label.array[:3], first.label.array[:3])


def test_progress_and_cancel():
    reference, target = _case(), _case(shift=1)
    token = CancelToken()
    phases = []

    def progress(event):
        phases.append(event.phase)
        token.set()

    with pytest.raises(Cancelled):
        Engine("none").segment([reference], target.image, options={"registration_method": "affine"},
                               progress=progress, cancel=token)
    assert phases


def test_pipeline_validation():
    reference, target = _case(), _case()
    engine = Engine("none")
    with pytest.raises(InputError, match="lacks"):
        engine.segment([reference], target.image, labels=[5])
    with pytest.raises(InputError, match="corrected-slices needs"):
        engine.segment([reference], target.image, corrected_slices=[1])
    other_grid = Volume.from_geometry(np.ones((8, 32, 31), np.uint8), (1, 1, 1), (0, 0, 0))
    with pytest.raises(InputError, match="target's grid"):
        engine.segment([reference], target.image, corrections=other_grid)
    with pytest.raises(InputError, match="unknown generator"):
        engine.segment([reference], target.image, generator="magic")


def test_generators_are_registered():
    names = {generator.name for generator in list_generators()}
    assert "registration" in names


def test_without_a_model_the_cleanup_is_the_engines_and_can_be_turned_off():
    """The registered labels are the result with model 'none': the largest-component cleanup is applied once, by the
    engine, so cleanup=False keeps an island the reference has (before, the generator had removed it already)."""
    reference = _case()
    label = np.array(reference.label.array)
    label[7, 28:30, 28:30] = 1  # an island of label 1, away from its body
    reference = ReferenceCase(reference.image, reference.label.with_array(label), reference.table)
    engine = Engine("none")
    options = {"registration_method": "copy"}
    kept = engine.segment([reference], reference.image, options=options, cleanup=False)
    cleaned = engine.segment([reference], reference.image, options=options)
    assert np.array_equal(kept.label.array, label)
    assert cleaned.label.array[7, 28, 28] == 0 and np.array_equal(cleaned.label.array[:7], label[:7])

"""support-memory generator: plan contents (support slices, top-k, start frame, slice ranges, SAM-family
form) and an end-to-end run with a sparse reference (random weights: plumbing, not accuracy)."""

from pathlib import Path

import numpy as np
import pytest

from proxyprompt.generators.base import GeneratorContext, ReferenceCase, get_generator
from proxyprompt.frames import make_slice_stack
from proxyprompt.generators.support_memory import resample_to_grid
from proxyprompt.volume import read_image, read_label

from conftest import crop_slices  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "acdc"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared ACDC data not found")




@pytest.fixture(scope="module")
def acdc():
    ref_image = read_image(DATA / "patient001_ED_image.nii.gz")
    ref_label, table = read_label(DATA / "patient001_ED_label.nii.gz")
    target = read_image(DATA / "patient002_ED_image.nii.gz")
    return ReferenceCase(ref_image, ref_label, table), target


def sparse(reference: ReferenceCase, keep=(3, 5, 7)) -> ReferenceCase:
    array = np.array(reference.label.array)
    mask = np.zeros(array.shape[0], bool)
    mask[list(keep)] = True
    array[~mask] = 0
    return ReferenceCase(reference.image, reference.label.with_array(array), reference.table)


class FakeModel:
    """Stands in for a model: family + embeddings (random unit vectors, deterministic)."""

    def __init__(self, family):
        self.family = family

    def slice_embeddings(self, frames, progress=None, cancel=None):
        rng = np.random.default_rng(0)
        vectors = rng.normal(size=(frames.num_slices, 8))
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def embed_slices(self, images):
        rng = np.random.default_rng(1)
        vectors = rng.normal(size=(len(images), 8))
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def plan_for(reference, target, family, options=None):
    frames = make_slice_stack(target)
    context = GeneratorContext([reference], target, frames, [1, 2, 3], FakeModel(family), dict(options or {}))
    return get_generator("support-memory").plan(context), frames


def test_resample_keeps_physical_size():
    image = np.zeros((20, 20), np.float32)
    image[5:15, 5:15] = 1  # 10 px at 1 mm = 10 mm
    out = resample_to_grid(image, (1.0, 1.0), (40, 40), (0.5, 0.5), nearest=True)
    assert out.shape == (40, 40) and int(out.sum()) == 400  # 20 px at 0.5 mm = 10 mm, centred


def test_plan_for_sam2_uses_annotated_reference_slices(acdc):
    reference, target = acdc
    plan, frames = plan_for(reference, target, "sam2", {"top_k": 3})
    annotated = np.flatnonzero(reference.label.array.reshape(reference.label.array.shape[0], -1).any(axis=1))
    assert plan.support_top_k == 3 and 0 < len(plan.support) <= 12
    assert {s.source_index for s in plan.support} <= set(int(n) for n in annotated)
    for s in plan.support:
        assert s.image.shape == (frames.height, frames.width) and s.image.dtype == np.float32
        assert 0.0 <= s.relative_position <= 1.0 and s.masks and all(m.dtype == bool for m in s.masks.values())
    assert 0 <= plan.start_frame < frames.num_slices
    assert plan.labels == [1, 2, 3]
    for prompt in plan.objects.values():
        first, last = prompt.frame_range
        assert 0 <= first <= last < frames.num_slices and not prompt.masks


def test_plan_for_sam_family_puts_masks_on_the_start_frame(acdc):
    reference, target = acdc
    plan, frames = plan_for(reference, target, "litemedsam")
    assert plan.support == []
    for prompt in plan.objects.values():
        assert set(prompt.masks) == {plan.start_frame} == set(prompt.boxes)
        assert prompt.masks[plan.start_frame].shape == (frames.height, frames.width)


def test_sparse_reference_plan(acdc):
    reference, target = acdc
    plan, _ = plan_for(sparse(reference), target, "sam2")
    assert sorted({s.source_index for s in plan.support}) == [3, 5, 7]


def test_sparse_reference_end_to_end(acdc):
    torch = pytest.importorskip("torch")
    pytest.importorskip("sam2")
    from proxyprompt.pipeline import Engine

    torch.set_num_threads(2)
    reference, target = acdc
    reference = ReferenceCase(crop_slices(reference.image, 3, 5), crop_slices(reference.label, 3, 5), reference.table)
    reference = sparse(reference, keep=(0, 2, 4))
    target = crop_slices(target, 4, 2)
    engine = Engine(model="random", image_size=512, device="cpu")
    result = engine.segment([reference], target, generator="support-memory", labels=[2, 3],
                            options={"top_k": 2})
    assert result.label.same_grid(target)
    assert set(np.unique(result.label.array)) <= {0, 2, 3}
    assert result.info["random_weights"] is True
    assert any("3 reference slice(s)" in note for note in result.info["notes"])

